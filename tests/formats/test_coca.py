"""CoCa (clip/coca.py) against open_clip 3.3's `coca_model.CoCa` on the same random weights (every
parameter perturbed): contrastive features and the decoder's scores within 1e-4 relative error,
greedy captions token for token; the full-size coca_* configs convert to the parameter shapes of
open_clip's models, built on the meta device. Beam search is not compared: open_clip's needs
transformers' BeamSearchScorer, which transformers 5 removed."""
import copy
import functools
import json
import os
import tempfile

import numpy as np
import PIL.Image
import pytest
import torch

import clip
from clip import coca
from experiments.references import open_clip as open_clip_reference
from experiments.references import openai as openai_reference

VOCAB, SOT, EOS = 100, 98, 99
# coca_ViT-B-32 shrunk: its keys and options, small widths (the pooler's embed_dim 32 differs
# from the ViT width 48, as B-32's 512 / 768, so its q/k/v weights are separate).
TINY = {
    'embed_dim': 32,
    'vision_cfg': {'image_size': 32, 'layers': 1, 'width': 48, 'head_width': 16, 'patch_size': 8,
                   'attentional_pool': True, 'attn_pooler_heads': 4, 'attn_pooler_queries': 6,
                   'output_tokens': True},
    'text_cfg': {'context_length': 12, 'vocab_size': VOCAB, 'width': 32, 'heads': 4, 'layers': 1,
                 'embed_cls': True, 'output_tokens': True},
    'multimodal_cfg': {'context_length': 12, 'vocab_size': VOCAB, 'width': 32, 'heads': 4,
                       'layers': 2, 'attn_pooler_heads': 4},
    'custom_text': True,
}
# coca_base's layout: no attentional pooler, the decoder reads the ViT's patches.
TINY_BASE = copy.deepcopy(TINY)
TINY_BASE['vision_cfg'] = {'image_size': 32, 'layers': 1, 'width': 32, 'head_width': 16,
                           'patch_size': 8, 'output_tokens': True}


def _rel(ours, theirs):
  ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
  return np.abs(ours - theirs).max() / np.abs(theirs).max()


@pytest.fixture(scope='module')
def oc():
  return open_clip_reference.import_open_clip()


def _build(oc, model_cfg):
  kwargs = {k: v for k, v in model_cfg.items() if k != 'custom_text'}
  torch.manual_seed(0)
  model = oc.coca_model.CoCa(**kwargs).eval()
  # open_clip leaves the decoder's vocabulary head as torch.empty (its init_parameters is not
  # called): give it its intended init before the perturbation.
  with torch.no_grad():
    head = model.text_decoder.text_projection
    head.normal_(std=head.shape[0] ** -0.5)
  return openai_reference.perturb(model, seed=1)


MODELS = {'attn_pool': TINY, 'base': TINY_BASE}


@functools.cache
def _pair(name):
  """(open_clip's CoCa, our params, our config) of MODELS[name], built once per session: saved
  as open_clip ships a model (its state dict `.pt` beside `open_clip_config.json`) and loaded."""
  model = _build(open_clip_reference.import_open_clip(), MODELS[name])
  with tempfile.TemporaryDirectory() as folder:
    torch.save(model.state_dict(), os.path.join(folder, 'open_clip_pytorch_model.bin'))
    with open(os.path.join(folder, 'open_clip_config.json'), 'w') as f:
      json.dump({'model_cfg': MODELS[name]}, f)
    params, cfg = clip.load(folder)
  return model, params, cfg


def _inputs(n=3, seed=0):
  rng = np.random.default_rng(seed)
  images = rng.standard_normal((n, 32, 32, 3)).astype(np.float32)
  tokens = rng.integers(1, SOT, (n, 12))
  tokens[:, 0] = SOT
  for row, end in enumerate((5, 9, 11)[:n]):  # EOS, then padding (0), as the tokenizer pads
    tokens[row, end], tokens[row, end + 1:] = EOS, 0
  return images, tokens


def _torch_images(images):
  return torch.from_numpy(images).permute(0, 3, 1, 2)


@pytest.mark.parametrize('name', sorted(MODELS))
def test_features_and_logits(name):
  model, params, cfg = _pair(name)
  images, tokens = _inputs()
  with torch.no_grad():
    image_ref = model.encode_image(_torch_images(images), normalize=False).numpy()
    text_ref = model.encode_text(torch.from_numpy(tokens), normalize=False).numpy()
    logits_ref = model(_torch_images(images), torch.from_numpy(tokens),
                       output_labels=False)['logits'].numpy()
  image, text, logits = coca.apply(params, images, tokens, cfg)
  assert logits.shape == logits_ref.shape == (3, 12, VOCAB)
  assert _rel(image, image_ref) < 1e-4
  assert _rel(text, text_ref) < 1e-4
  assert _rel(logits, logits_ref) < 1e-4


def test_public_entry_points():
  """clip.encode_image / clip.encode_text run a CoCa config; bad inputs are refused."""
  model, params, cfg = _pair('base')
  images, tokens = _inputs()
  with torch.no_grad():
    image_ref = model.encode_image(_torch_images(images), normalize=False).numpy()
    text_ref = model.encode_text(torch.from_numpy(tokens[:, :7]), normalize=False).numpy()
  assert _rel(clip.encode_image(params, images, cfg), image_ref) < 1e-4
  assert _rel(clip.encode_text(params, tokens[:, :7], cfg), text_ref) < 1e-4
  with pytest.raises(ValueError, match='32, 32, 3'):
    clip.encode_image(params, images[:, :24], cfg)
  with pytest.raises(ValueError, match='L <= 12'):
    clip.encode_text(params, np.zeros((1, 13), np.int32), cfg)
  with pytest.raises(ValueError, match=str(VOCAB)):
    clip.encode_text(params, np.full((1, 4), VOCAB), cfg)


def test_load_refuses_without_config(tmp_path):
  model = _pair('attn_pool')[0]
  torch.save(model.state_dict(), tmp_path / 'open_clip_pytorch_model.bin')
  with pytest.raises(ValueError, match='config='):
    coca.load(tmp_path)
  with pytest.raises(clip.CheckpointError, match='config='):
    clip.load(tmp_path)
  params, cfg = clip.load(tmp_path, config=TINY)
  assert cfg == _pair('attn_pool')[2]
  assert params['text_decoder']['text_projection'].shape == (32, VOCAB)


def test_greedy_captions(oc, monkeypatch):
  model, params, cfg = _pair('attn_pool')
  images = _inputs(n=4, seed=1)[0]
  # Under transformers 5 open_clip turns `generate` off altogether (its BeamSearchScorer import
  # fails); the greedy path uses only what transformers 5 still has: turn that path back on.
  monkeypatch.setattr(oc.coca_model, '_has_transformers', True)
  monkeypatch.setitem(oc.coca_model.GENERATION_TYPES, 'top_k', oc.coca_model.TopKLogitsWarper)
  with torch.no_grad():
    ref = model.generate(_torch_images(images), generation_type='top_k', top_k=1, seq_len=10,
                         min_seq_len=3, sot_token_id=SOT, eos_token_id=EOS,
                         fixed_output_length=True).numpy()
  ours = np.asarray(coca.caption(params, images, cfg, SOT, EOS, seq_len=10, min_seq_len=3))
  np.testing.assert_array_equal(ours, ref)
  # Not a trivial agreement: the captions differ between images and run past min_seq_len.
  assert len({tuple(r) for r in ref}) > 1


def test_caption_refuses_bad_lengths():
  _, params, cfg = _pair('attn_pool')
  images = _inputs(n=1)[0]
  with pytest.raises(ValueError, match='seq_len'):
    coca.caption(params, images, cfg, SOT, EOS, seq_len=14)
  with pytest.raises(ValueError, match='eos_id'):
    coca.caption(params, images, cfg, SOT, VOCAB, seq_len=8)


def test_state_dict_mismatch_is_refused():
  model, _, cfg = _pair('attn_pool')
  flat = {k: v.numpy() for k, v in model.state_dict().items()}
  del flat['text.cls_emb']
  with pytest.raises(ValueError, match='cls_emb'):
    coca.from_state_dict(flat, cfg)


def test_tokenizer_and_preprocessing_are_open_clips(oc):
  """A CoCa config carries open_clip's tokenizer for it (OpenAI's BPE at its context length)
  and its image transform."""
  cfg = coca.config_from_open_clip(oc.get_model_config('coca_ViT-B-32'))
  texts = ['a photo of a cat', 'Two dogs, playing  in the snow!', '']
  np.testing.assert_array_equal(clip.get_tokenizer(cfg)(texts),
                                oc.get_tokenizer('coca_ViT-B-32')(texts).numpy())
  _, _, transform = oc.create_model_and_transforms('coca_ViT-B-32', device='meta')
  image = PIL.Image.fromarray(
      np.random.default_rng(0).integers(0, 256, (300, 260, 3), np.uint8))
  np.testing.assert_allclose(clip.preprocess_images([image], cfg)[0],
                             transform(image).permute(1, 2, 0).numpy(), atol=1e-6)


@pytest.mark.parametrize('name', ['coca_ViT-B-32', 'coca_ViT-L-14', 'coca_base'])
def test_full_size_shapes(oc, name):
  model_cfg = copy.deepcopy(oc.get_model_config(name))
  kwargs = {k: v for k, v in model_cfg.items() if k != 'custom_text'}
  with torch.device('meta'):
    model = oc.coca_model.CoCa(**kwargs)
  theirs = {k: tuple(v.shape) for k, v in model.state_dict().items()}
  assert coca.expected_shapes(coca.config_from_open_clip(model_cfg)) == theirs


def test_refusals(oc):
  roberta = oc.get_model_config('coca_roberta-ViT-B-32')
  with pytest.raises(ValueError, match='hf_model_name'):
    coca.config_from_open_clip(roberta)
  parallel = copy.deepcopy(TINY)
  parallel['vision_cfg']['attentional_pool'] = 'parallel'
  with pytest.raises(ValueError, match='parallel'):
    coca.config_from_open_clip(parallel)
  with pytest.raises(ValueError, match='multimodal_cfg'):
    coca.config_from_open_clip({k: v for k, v in TINY.items() if k != 'multimodal_cfg'})
