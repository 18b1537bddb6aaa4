"""CoCa (clip/coca.py) against open_clip 3.3's `coca_model.CoCa` on the same random weights (every
parameter perturbed): contrastive features and the decoder's scores within 1e-4 relative error,
greedy captions token for token, with the KV cache and without; the full-size coca_* configs
convert to the parameter shapes of open_clip's models, built on the meta device. Beam search is
not compared: open_clip's needs transformers' BeamSearchScorer, which transformers 5 removed
(tests/test_coca_decoding.py compares it with an exhaustive search; here beam size 1 with greedy
captions)."""
import copy
import functools
import tempfile

import numpy as np
import PIL.Image
import pytest
import torch

import clip
from clip import coca
from experiments.checkpoint_families_recent import COCA_EOS as EOS
from experiments.checkpoint_families_recent import COCA_SOT as SOT
from experiments.checkpoint_families_recent import COCA_TINY as TINY
from experiments.checkpoint_families_recent import COCA_VOCAB as VOCAB
from experiments.checkpoint_families_recent import coca_inputs as _inputs
from experiments.checkpoint_families_recent import open_clip_coca_model
from experiments.checkpoint_families_recent import save_open_clip_folder
from experiments.references import open_clip as open_clip_reference

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


MODELS = {'attn_pool': TINY, 'base': TINY_BASE}


@functools.cache
def _pair(name):
  """(open_clip's CoCa, our params, our config) of MODELS[name], built once per session: saved
  as open_clip ships a model (its state dict `.pt` beside `open_clip_config.json`) and loaded."""
  model = open_clip_coca_model(open_clip_reference.import_open_clip(), MODELS[name])
  with tempfile.TemporaryDirectory() as folder:
    save_open_clip_folder(model, MODELS[name], folder)
    params, cfg = clip.load(folder)
  return model, params, cfg


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
  for use_cache in (True, False):
    ours = coca.caption(params, images, cfg, SOT, EOS, seq_len=10, min_seq_len=3,
                        use_cache=use_cache)
    np.testing.assert_array_equal(ours, ref)
  # Not a trivial agreement: the captions differ between images and run past min_seq_len.
  assert len({tuple(r) for r in ref}) > 1


def test_beam_size_one_is_greedy():
  """Beam size 1 picks greedy's tokens: `caption` without its minimum length, up to the last
  position, where `caption` forces eos_id and a beam is cut; both give one log-likelihood."""
  _, params, cfg = _pair('attn_pool')
  images = _inputs(seed=1)[0]
  greedy = np.asarray(coca.caption(params, images, cfg, SOT, EOS, seq_len=10, min_seq_len=0))
  tokens, scores = coca.beam_caption(params, images, cfg, SOT, EOS, seq_len=10, beam_size=1)
  tokens = np.asarray(tokens)
  assert not (greedy[:, 1:-1] == cfg.pad_id).any()  # no row ended by a generated pad id
  np.testing.assert_array_equal(tokens[:, :-1], greedy[:, :-1])
  ended = (greedy[:, 1:-1] == EOS).any(axis=1)
  np.testing.assert_array_equal(tokens[ended, -1], greedy[ended, -1])
  # Scored at test_features_and_logits' shape (3, 12), causal: the padding after changes nothing.
  logits = coca.apply(params, images, np.pad(tokens, ((0, 0), (0, 2))), cfg)[2][:, :9]
  logp = torch.log_softmax(torch.from_numpy(np.asarray(logits, np.float64)), -1).numpy()
  target = np.take_along_axis(logp, tokens[:, 1:, None], axis=2)[..., 0]
  first_end = np.where(ended, np.argmax(tokens[:, 1:] == EOS, axis=1), 8)
  counted = np.arange(9) <= first_end[:, None]
  np.testing.assert_allclose(scores, np.where(counted, target, 0).sum(1), rtol=1e-5)


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
