"""Every checkpoint family against the library that defines it: open-clip-torch (OpenAI-style and
timm-trunk SigLIP towers), transformers (`CLIPModel`, `SiglipModel`) and big_vision's `.npz`
naming, random weights with every parameter perturbed, small widths with the families' real
head widths, MLP ratios and options; saved as each library ships them, loaded with and without
`config=`; ambiguous files warn; exports load back into the peer libraries. The 2026 families'
rows of the checkpoint-families table (SigLIP So400m off the patch grid, NaFlex at any shape,
CoCa, MetaCLIP 2) are run here as the table runs them; their own files test them in depth."""
import dataclasses
import json
import warnings

import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import save_file

import clip
from clip.formats import export
from clip.formats.open_clip import config_from_open_clip
from clip.formats.siglip import SIGLIP_PREPROCESS
from experiments import checkpoint_families
from experiments import checkpoint_families_recent
from experiments.checkpoint_families_measure import save_image_processor
from experiments.references import open_clip as open_clip_reference
from experiments.references import openai as reference

RTOL = 1e-4  # fp32, relative error of features and logits
ATOL = 1e-5
# transformers' conventions (RGB on white before the resize, the crop at the floor of the
# overhang), which clip.load records for a Hugging Face folder's image processor.
HF = {'convert_first': True, 'crop_rounding': 'floor'}


@pytest.fixture(scope='module')
def oc():
  return open_clip_reference.import_open_clip()


def _rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.abs(a - b).max() / max(np.abs(b).max(), 1e-12)


def _inputs(cfg, n=3, seed=0):
  rng = np.random.default_rng(seed)
  r = cfg.image_resolution
  images = rng.normal(size=(n, r, r, 3)).astype(np.float32)
  tokens = reference.random_tokens(rng, n, cfg)
  return images, tokens


def _assert_open_clip_equal(torch_model, params, cfg, tokens=None):
  images, default_tokens = _inputs(cfg)
  tokens = default_tokens if tokens is None else tokens
  with torch.no_grad():
    img = torch_model.encode_image(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()
    txt = torch_model.encode_text(torch.from_numpy(tokens).long()).numpy()
  assert _rel_err(clip.encode_image(params, images, cfg), img) < RTOL
  assert _rel_err(clip.encode_text(params, tokens, cfg), txt) < RTOL


def _open_clip_vit(oc, quick_gelu, seed=0, head_width=88):
  """An open_clip ViT CLIP with ViT-g-14's head width and MLP ratio, small."""
  model_cfg = {'embed_dim': 48, 'quick_gelu': quick_gelu,
               'vision_cfg': {'image_size': 28, 'layers': 2, 'width': 2 * head_width,
                              'head_width': head_width,
                              'mlp_ratio': 4.3637, 'patch_size': 14},
               'text_cfg': {'context_length': 12, 'vocab_size': 300, 'width': 64, 'heads': 4,
                            'layers': 2}}
  torch.manual_seed(seed)
  m = oc.model.CLIP(**{k: v for k, v in model_cfg.items() if k != 'quick_gelu'},
                    quick_gelu=quick_gelu)
  return reference.perturb(m.eval(), seed), model_cfg


def test_open_clip_gelu_state_dict_warns_and_config_makes_it_exact(oc, tmp_path):
  m, model_cfg = _open_clip_vit(oc, quick_gelu=False, head_width=64)
  torch.save(m.state_dict(), tmp_path / 'model.pt')
  with pytest.warns(clip.CheckpointWarning, match='QuickGELU'):
    _, wrong_cfg = clip.load(tmp_path / 'model.pt')
  assert wrong_cfg.vision.mlp == 'quick_gelu' and wrong_cfg.vision.hidden_dim == 558
  cfg = config_from_open_clip(model_cfg)
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    params, cfg = clip.load(tmp_path / 'model.pt', config=cfg)
  assert (cfg.vision.heads, cfg.vision.mlp) == (2, 'gelu')
  _assert_open_clip_equal(m, params, cfg)


def test_head_count_the_shapes_cannot_tell_is_an_error(oc, tmp_path):
  m, _ = _open_clip_vit(oc, quick_gelu=False)  # 2 heads of 88
  torch.save(m.state_dict(), tmp_path / 'model.pt')
  with pytest.raises(clip.CheckpointError, match='cannot infer head counts.*pass config='):
    clip.load(tmp_path / 'model.pt')


@pytest.mark.parametrize('wrap', ['compiled', 'ddp_compiled', 'training_checkpoint'])
def test_open_clip_hub_folders_and_wrappers_load_exactly_without_warning(oc, tmp_path, wrap):
  m, model_cfg = _open_clip_vit(oc, quick_gelu=True, seed=1)
  prefix = {'compiled': '_orig_mod.', 'ddp_compiled': 'module._orig_mod.',
            'training_checkpoint': 'module.'}[wrap]
  state = {prefix + k: v for k, v in m.state_dict().items()}
  if wrap == 'training_checkpoint':
    torch.save({'epoch': 3, 'state_dict': state}, tmp_path / 'open_clip_pytorch_model.bin')
  else:
    save_file({k: v.contiguous() for k, v in state.items()},
              str(tmp_path / 'open_clip_model.safetensors'))
  (tmp_path / 'open_clip_config.json').write_text(json.dumps({'model_cfg': model_cfg}))
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    params, cfg = clip.load(tmp_path)
  assert (cfg.vision.heads, cfg.vision.mlp, cfg.text.mlp) == (2, 'quick_gelu', 'quick_gelu')
  _assert_open_clip_equal(m, params, cfg)


def test_config_that_contradicts_the_config_file_raises_with_both_values(oc, tmp_path):
  m, model_cfg = _open_clip_vit(oc, quick_gelu=True)
  torch.save(m.state_dict(), tmp_path / 'open_clip_pytorch_model.bin')
  (tmp_path / 'open_clip_config.json').write_text(json.dumps({'model_cfg': model_cfg}))
  cfg = config_from_open_clip(dict(model_cfg, quick_gelu=False))
  with pytest.raises(clip.CheckpointError, match="mlp: config= says 'gelu', the file says "
                     "'quick_gelu'"):
    clip.load(tmp_path, config=cfg)


def test_missing_keys_error_names_the_tower_the_file_holds(oc, tmp_path):
  m, _ = _open_clip_vit(oc, quick_gelu=True)
  state = {k: v for k, v in m.state_dict().items() if k != 'visual.conv1.weight'}
  torch.save(state, tmp_path / 'broken.pt')
  with pytest.raises(clip.CheckpointError, match=r"ViT image tower.*'visual\.conv1\.weight'"):
    clip.load(tmp_path / 'broken.pt')


# ---------------------------------------------------------------- Hugging Face CLIPModel

def _hf_clip(act, seed=0):
  config = transformers.CLIPConfig(
      text_config=dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, vocab_size=100, max_position_embeddings=16,
                       hidden_act=act, eos_token_id=2),
      vision_config=dict(hidden_size=80, intermediate_size=200, num_hidden_layers=2,
                         num_attention_heads=1, image_size=32, patch_size=8, hidden_act=act),
      projection_dim=24)
  torch.manual_seed(seed)
  return reference.perturb(transformers.CLIPModel(config).eval(), seed)


def _assert_hf_equal(hf, params, cfg, siglip=False):
  images, tokens = _inputs(cfg)
  if siglip:  # SigLIP pools the last position: every position is a real token
    tokens = np.random.default_rng(5).integers(0, cfg.text.vocab_size, tokens.shape, np.int32)
  with torch.no_grad():
    out = hf(input_ids=torch.from_numpy(tokens).long(),
             pixel_values=torch.from_numpy(images).permute(0, 3, 1, 2))
  normalize = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  assert _rel_err(normalize(clip.encode_image(params, images, cfg)), out.image_embeds) < RTOL
  assert _rel_err(normalize(clip.encode_text(params, tokens, cfg)), out.text_embeds) < RTOL
  logits_per_image, _ = clip.apply(params, images, tokens, cfg)
  assert _rel_err(logits_per_image, out.logits_per_image) < RTOL


def test_hugging_face_gelu_clip_folder_and_lone_file(tmp_path):
  hf = _hf_clip('gelu')
  hf.save_pretrained(tmp_path)
  save_image_processor(tmp_path, siglip=False, size=32)
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    params, cfg = clip.load(tmp_path)  # config.json beside the weights says gelu, 1 head of 80
  assert (cfg.vision.mlp, cfg.vision.heads, cfg.vision.hidden_dim) == ('gelu', 1, 200)
  assert cfg.preprocess == clip.PreprocessConfig(**HF)
  _assert_hf_equal(hf, params, cfg)
  params, cfg = clip.load(tmp_path / 'model.safetensors')  # a lone file reads it too
  _assert_hf_equal(hf, params, cfg)
  lone = tmp_path / 'lone'
  lone.mkdir()
  (lone / 'weights.safetensors').write_bytes((tmp_path / 'model.safetensors').read_bytes())
  with pytest.raises(clip.CheckpointError, match='cannot infer head counts'):  # 1 head of 80
    clip.load(lone / 'weights.safetensors')
  params, cfg = clip.load(lone / 'weights.safetensors', config=cfg)
  _assert_hf_equal(hf, params, cfg)


# ---------------------------------------------------------------- SigLIP

def _siglip_cfg(act_vision='gelu_tanh', act_text='gelu_tanh', heads=(2, 4),
                tokenizer=clip.TokenizerConfig('siglip'), preprocess=SIGLIP_PREPROCESS):
  vision = clip.VisionConfig('vit', 64, 2, heads[0], 32, 8, pool='map', ln_pre=False,
                             patch_bias=True, projection=False, mlp=act_vision, norm_eps=1e-6,
                             mlp_dim=112)
  text = clip.TextConfig(64, 2, heads[1], 16, 100, pool='last', causal=False, mask_padding=False,
                         projection_bias=True, mlp=act_text, norm_eps=1e-6, mlp_dim=96)
  return clip.CLIPConfig(64, vision, text, logit_bias=True, tokenizer=tokenizer,
                         preprocess=preprocess)


def test_hugging_face_siglip_folder_exact_and_lone_file_warns(tmp_path):
  hf = checkpoint_families.hf_siglip()
  hf.save_pretrained(tmp_path)
  save_image_processor(tmp_path, siglip=True, size=32)
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    params, cfg = clip.load(tmp_path)
  assert cfg == _siglip_cfg(preprocess=dataclasses.replace(SIGLIP_PREPROCESS, **HF))
  _assert_hf_equal(hf, params, cfg, siglip=True)
  lone = tmp_path / 'lone'
  lone.mkdir()
  (lone / 'siglip.safetensors').write_bytes((tmp_path / 'model.safetensors').read_bytes())
  with pytest.warns(clip.CheckpointWarning, match='heads'):
    clip.load(lone / 'siglip.safetensors')


def test_big_vision_npz_equals_hugging_face_siglip(tmp_path):
  hf = checkpoint_families.hf_siglip(seed=2)
  checkpoint_families.big_vision_npz(hf, tmp_path / 'siglip.npz')
  with pytest.warns(clip.CheckpointWarning, match='last position'):
    params, cfg = clip.load(tmp_path / 'siglip.npz')
  assert cfg == _siglip_cfg()  # heads from the (D, heads, head_dim) kernels
  _assert_hf_equal(hf, params, cfg, siglip=True)


# ---------------------------------------------------------------- export

@pytest.mark.parametrize('family', ['clip', 'siglip'])
def test_export_hugging_face_folder_loads_strictly(tmp_path, family):
  hf = _hf_clip('gelu') if family == 'clip' else checkpoint_families.hf_siglip(seed=6)
  hf.save_pretrained(tmp_path / 'source')
  save_image_processor(tmp_path / 'source', siglip=family == 'siglip', size=32)
  spm = checkpoint_families.tiny_sentencepiece(str(tmp_path)) if family == 'siglip' else None
  params, cfg = clip.load(tmp_path / 'source', tokenizer=spm)
  with warnings.catch_warnings():
    warnings.simplefilter('error', export.ExportWarning)  # its processing is transformers'
    clip.save_hf(params, cfg, tmp_path / 'out')
  cls = transformers.CLIPModel if family == 'clip' else transformers.SiglipModel
  theirs, info = cls.from_pretrained(tmp_path / 'out', output_loading_info=True)
  assert not info['missing_keys'] and not info['unexpected_keys'], info
  _assert_hf_equal(theirs.eval(), params, cfg, siglip=family == 'siglip')
  again = clip.load(tmp_path / 'out')[1]
  if family == 'siglip':  # the export holds its own copy of the tokenizer's file
    assert open(again.tokenizer.model_file, 'rb').read() == open(spm, 'rb').read()
    again = dataclasses.replace(again, tokenizer=cfg.tokenizer)
  assert again == cfg


def test_siglip_user_flow_load_tokenize_zero_shot(tmp_path):
  """A SigLIP user's steps: load a Hugging Face folder, tokenize class prompts with its
  SentencePiece model, classify zero-shot; the predictions are the argmax of transformers'
  logits on the same ids."""
  classes = ['red circle', 'blue square', 'green triangle', 'yellow star']
  spm = checkpoint_families.tiny_sentencepiece(str(tmp_path))
  hf = checkpoint_families.hf_siglip(seed=7)
  hf.save_pretrained(tmp_path / 'model')
  save_image_processor(tmp_path / 'model', siglip=True, size=32)
  params, cfg = clip.load(tmp_path / 'model', tokenizer=spm)
  tokens = clip.get_tokenizer(cfg)(classes)
  weights_DxC = clip.zero_shot.classifier_weights_from_tokens(params, tokens[:, None], cfg)
  images, _ = _inputs(cfg, n=6, seed=8)
  top, _ = clip.zero_shot.classify(params, images, weights_DxC, cfg, k=1)
  with torch.no_grad():
    out = hf(input_ids=torch.from_numpy(tokens).long(),
             pixel_values=torch.from_numpy(images).permute(0, 3, 1, 2))
  np.testing.assert_array_equal(np.asarray(top)[:, 0], out.logits_per_image.argmax(-1).numpy())


def test_hugging_face_siglip2_naflex_at_its_grid(tmp_path):
  """Siglip2Model takes patchified pixels (row, col, channel order) and resizes its position
  table to each image's grid; at the table's own grid it is our SigLIP tower."""
  hf = checkpoint_families_recent.hf_siglip2_model(seed=9)
  hf.save_pretrained(tmp_path)
  with pytest.warns(clip.CheckpointWarning, match='NaFlex model.s images squashed to its square'):
    params, cfg = clip.load(tmp_path)
  assert cfg == _siglip_cfg(preprocess=dataclasses.replace(
      SIGLIP_PREPROCESS, interpolation='bilinear', max_num_patches=256))  # the processor's default
  images, _ = _inputs(cfg)
  tokens = np.random.default_rng(10).integers(0, 100, (3, 16), np.int32)
  n, p, grid = len(images), 8, 4
  patches = images.reshape(n, grid, p, grid, p, 3).transpose(0, 1, 3, 2, 4, 5).reshape(n, 16, -1)
  with torch.no_grad():
    out = hf(input_ids=torch.from_numpy(tokens).long(), pixel_values=torch.from_numpy(patches),
             pixel_attention_mask=torch.ones(n, 16, dtype=torch.long),
             spatial_shapes=torch.tensor([[grid, grid]] * n))
  normalize = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  assert _rel_err(normalize(clip.encode_image(params, images, cfg)), out.image_embeds) < RTOL
  assert _rel_err(normalize(clip.encode_text(params, tokens, cfg)), out.text_embeds) < RTOL
  assert _rel_err(clip.apply(params, images, tokens, cfg)[0], out.logits_per_image) < RTOL


def test_unreadable_files_are_checkpoint_errors_naming_the_path(tmp_path):
  (tmp_path / 'notes.pt').write_text('hello')
  safetensors_bytes = b'\x10\x00\x00\x00\x00\x00\x00\x00{"a": 1'  # a truncated header
  (tmp_path / 'cut.safetensors').write_bytes(safetensors_bytes)
  (tmp_path / 'cut.npz').write_bytes(b'PK\x03\x04 truncated')
  for name in ('notes.pt', 'cut.safetensors', 'cut.npz'):
    with pytest.raises(clip.CheckpointError, match=f'{name} is not a readable checkpoint'):
      clip.load(tmp_path / name)


def test_shapes_say_no_ln_pre_and_a_biased_text_projection(oc, tmp_path):
  model_cfg = {'embed_dim': 64,
               'vision_cfg': {'image_size': 32, 'layers': 1, 'width': 64, 'head_width': 64,
                              'patch_size': 16, 'no_ln_pre': True},
               'text_cfg': {'context_length': 8, 'vocab_size': 50, 'width': 64, 'heads': 1,
                            'layers': 1, 'proj_bias': True}}
  torch.manual_seed(11)
  m = reference.perturb(oc.model.CLIP(**model_cfg).eval(), 11)
  torch.save(m.state_dict(), tmp_path / 'model.pt')
  with pytest.warns(clip.CheckpointWarning, match='QuickGELU'):
    _, cfg = clip.load(tmp_path / 'model.pt')
  assert not cfg.vision.ln_pre and cfg.text.projection_bias
  params, cfg = clip.load(tmp_path / 'model.pt', config=clip.config_from_open_clip(model_cfg))
  _assert_open_clip_equal(m, params, cfg)


# ---------------------------------------------------------------- the 2026 families' rows

_RECENT = ('So400m', 'any shape', 'CoCa', 'MetaCLIP 2')


@pytest.mark.parametrize('row', [
    pytest.param(r, id=f'{w}: {r[1].split(" (")[0]}') for r in checkpoint_families.rows()
    for w in _RECENT if w in r[0]])
def test_recent_family_row_gives_its_expected_result(oc, tmp_path, row):
  """The table's row as the script measures it: the expected result, within RTOL of the peer."""
  got = checkpoint_families.run_row(*row, oc, str(tmp_path))
  assert got['result'] == got['expected'], got
  assert got['error'] is not None and got['error'] < RTOL, got
