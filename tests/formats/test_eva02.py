"""open_clip's EVA and PE-Core models (timm `Eva` image trunks: EVA02-B/L with 2-D RoPE, SwiGLU and
sub-LN, EVA01-g's fused q/v-biased attention, EVA02-E's residual post-norm, PE-Core's shifted
xy-indexed RoPE, pre-norm and attention pool over a class token; open_clip's own text tower)
against open-clip-torch 3.3.0 and timm 1.0.31 run in float64: tiny trunks built from the real
timm model functions (every option of the named trunk, only widths and depth cut), every
parameter perturbed, saved as open_clip saves them and loaded by `clip.load`. Full-size configs
are checked against open_clip's models on the meta device in tests/formats/test_open_clip.py."""
import copy
import dataclasses

import numpy as np
import PIL.Image
import pytest
import torch

import clip
from clip import rope2d
from clip.formats import families
from clip.formats import timm_trunks
from clip.formats.load import CheckpointWarning
from clip.formats.open_clip import config_from_open_clip
from experiments import checkpoint_families
from tests.formats.test_checkpoint_families import _inputs
from tests.formats.test_checkpoint_families import _rel_err
from tests.formats.test_checkpoint_families import oc  # pylint: disable=unused-import

RTOL = 1e-4
MUST_DIFFER = 1e-2
# open_clip configs, their trunks cut small: EVA02-B-16 for RoPE, SwiGLU with sub-LN and q/k/v
# apart (as EVA02-L-14 and -336), EVA02-E-14 for the fused qkv with q and v biases, the GELU MLP
# and the residual post-norm (EVA01-g-14's trunk is E's with pre-norm blocks, the default ones),
# PE-Core-B-16 for PE's RoPE grid, class token under a MAP head, pre-norm, unbiased patches.
MODELS = ('EVA02-B-16', 'EVA02-E-14', 'PE-Core-B-16')


def _features(m, images, tokens):
  """open_clip's image and text features in float64."""
  m = copy.deepcopy(m).double()
  with torch.no_grad():
    img = m.encode_image(torch.from_numpy(images).permute(0, 3, 1, 2).double()).numpy()
    txt = m.encode_text(torch.from_numpy(tokens).long()).numpy()
  return img, txt


@pytest.mark.parametrize('name', MODELS)
def test_eva_clip_loads_and_equals_open_clip_float64(oc, tmp_path, name):
  m, cfg = checkpoint_families.timm_eva(oc, name)
  path = tmp_path / 'eva.pt'
  torch.save(m.state_dict(), path)
  if name.startswith('PE-'):  # no open_clip_config.json beside the weights: PE's own, stated
    with pytest.warns(CheckpointWarning, match="PE-Core preprocessing"):
      params, loaded = clip.load(path, config=cfg)
    assert loaded.preprocess == timm_trunks.PE_PREPROCESS
  else:
    params, loaded = clip.load(path, config=cfg)
  assert loaded.vision == cfg.vision and loaded.text == cfg.text
  images, tokens = _inputs(cfg)
  img, txt = _features(m, images, tokens)
  assert _rel_err(clip.encode_image(params, images, loaded), img) < RTOL
  if name == 'EVA02-B-16':
    # The same open_clip text tower in every EVA config: compiled and compared once.
    assert _rel_err(clip.encode_text(params, tokens, loaded), txt) < RTOL
    # The rotation acts, at the scale of its reference grid (16 / 4 here).
    other = dataclasses.replace(loaded.vision, rope_ref_grid=None)
    other = dataclasses.replace(loaded, vision=other)
    assert _rel_err(clip.encode_image(params, images, other), img) > MUST_DIFFER


# (our options, timm's RotaryEmbeddingCat arguments): EVA02's, PE-Core's.
ROPES = {
    'EVA02': (dict(registers=1, rope_ref_grid=16), dict(ref_feat_shape=(16, 16))),
    'PE-Core': (dict(pool='map', class_token=True, rope_ref_grid=24, rope_grid_offset=1.0,
                     rope_xy=True), dict(ref_feat_shape=(24, 24), grid_offset=1.0,
                                         grid_indexing='xy')),
}


@pytest.mark.parametrize('kind', sorted(ROPES))
def test_rope2d_equals_timms_rotary_embedding_cat_float64(oc, kind):
  from timm.layers import pos_embed_sincos as timm_rope  # pylint: disable=g-import-not-at-top
  ours_options, theirs_options = ROPES[kind]
  cfg = clip.VisionConfig('vit', 128, 1, 2, 40, 8, rope_2d=True, **ours_options)
  rope = timm_rope.RotaryEmbeddingCat(dim=64, in_pixels=False, feat_shape=[5, 5],
                                      **theirs_options).double()
  angles = rope2d.angles(cfg)
  prefix = len(angles) - 25  # class token (and register)
  np.testing.assert_array_equal(angles[:prefix], 0)
  x = np.random.default_rng(0).normal(size=(2, len(angles), 2, 64))
  ours = np.asarray(rope2d.rotate(x.astype(np.float32), angles))
  x_t = torch.from_numpy(x[:, prefix:]).transpose(1, 2)  # (N, H, L, d), as timm's attention
  theirs = timm_rope.apply_rot_embed_cat(x_t, rope.get_embed()).transpose(1, 2).numpy()
  assert _rel_err(ours[:, prefix:], theirs) < RTOL
  np.testing.assert_array_equal(ours[:, :prefix], x[:, :prefix].astype(np.float32))


def _trunk_keys(name, **kwargs):
  import timm  # pylint: disable=g-import-not-at-top
  with torch.device('meta'):
    trunk = timm.create_model(name, **kwargs)
  keys = {f'visual.trunk.{k}': np.zeros(1, np.float32) for k in trunk.state_dict()}
  return {**keys, 'token_embedding.weight': np.zeros(1, np.float32)}


@pytest.mark.parametrize('trunk, why', [
    ('vit_pe_core_gigantic_patch14_448', 'PE-Core G'),
    ('fastvit_mci0', 'MCi'),
    ('convnext_atto', 'ConvNeXt'),
])
def test_other_timm_trunk_keys_are_refused_by_what_they_are(oc, trunk, why):
  with pytest.raises(ValueError, match=why):
    families.detect(_trunk_keys(trunk))


def test_eva_trunk_keys_are_an_open_clip_timm_family(oc):
  flat = _trunk_keys('eva02_base_patch16_clip_224', num_classes=512)
  assert families.detect(flat) == families.OPEN_CLIP_TIMM
  flat['visual.trunk.blocks.0.gamma_1'] = np.zeros(1, np.float32)  # layer scale: no place
  with pytest.raises(ValueError, match='gamma_1'):
    families.to_ours(flat, families.OPEN_CLIP_TIMM)


@pytest.mark.parametrize('name, why', [
    ('PE-Core-bigG-14-448', 'PE-Core G'), ('MobileCLIP2-S0', 'MCi'), ('MobileCLIP-B', 'MCi'),
    ('convnext_base', 'ConvNeXt'), ('MobileCLIP2-L-14', 'CLIP-style ViT'),
])
def test_other_timm_configs_are_refused_by_what_they_are(oc, name, why):
  with pytest.raises(ValueError, match=f"timm_model_name.*{why}"):
    config_from_open_clip(oc.get_model_config(name))


@pytest.mark.parametrize('key, value', [
    ('timm_pool', 'avg'), ('timm_proj', 'linear'), ('timm_proj', 'none'), ('image_size', 256),
    ('timm_drop_path', 0.1),
])
def test_eva_options_we_do_not_run_are_refused_naming_the_key(oc, key, value):
  model_cfg = copy.deepcopy(oc.get_model_config('EVA02-B-16'))
  model_cfg['vision_cfg'][key] = value  # 'none': the 768 wide trunk, embed_dim 512
  with pytest.raises(ValueError, match=f"vision_cfg\\['{key}'\\]"):
    config_from_open_clip(model_cfg)


@pytest.mark.parametrize('build, message', [
    (lambda: clip.TextConfig(64, 1, 1, norm_placement='subln'), 'image-tower options'),
    (lambda: clip.TextConfig(64, 1, 1, k_bias=False), 'image-tower options'),
    (lambda: clip.DecoderConfig(64, 1, 1, norm_placement='res_post'), 'image-tower options'),
    (lambda: clip.VisionConfig('vit', 64, 1, 2, 32, 8, k_bias=False, bias=False),
     'needs bias=True'),
    (lambda: clip.VisionConfig('vit', 40, 1, 4, 32, 8, rope_2d=True), 'divisible by 4'),
    (lambda: clip.VisionConfig('vit', 64, 1, 1, 32, 8, rope_2d=True, patch_dropout=0.5),
     'no patch_dropout'),
    (lambda: clip.VisionConfig('vit', 64, 1, 1, 32, 8, rope_ref_grid=16), 'need rope_2d=True'),
    (lambda: clip.VisionConfig('vit', 64, 1, 1, 32, 8, class_token=True), '"map" pooled'),
    (lambda: clip.VisionConfig('vit', 64, 1, 1, 32, 8, projection=False, projection_bias=True),
     'needs projection=True'),
])
def test_eva_options_are_checked(build, message):
  with pytest.raises(ValueError, match=message):
    build()


@pytest.mark.parametrize('name', ['EVA02-B-16', 'PE-Core-B-16'])
def test_tokenizer_and_preprocessing_equal_open_clips(oc, name):
  """What a loaded EVA02 / PE checkpoint carries (OpenAI's BPE at the config's context length;
  OpenAI's transform for EVA, PE's squash-bilinear-0.5 for PE) equals open_clip's tokenizer for
  that model name and the transform of its released tag's pretrained cfg."""
  model_cfg = oc.get_model_config(name)
  cfg = dataclasses.replace(
      config_from_open_clip(model_cfg),
      preprocess=timm_trunks.PE_PREPROCESS if name.startswith('PE-') else clip.PreprocessConfig())
  texts = ['a photo of a cat', 'Two dogs, playing  in the snow!', '']
  np.testing.assert_array_equal(clip.get_tokenizer(cfg)(texts),
                                oc.get_tokenizer(name)(texts).numpy())
  tag, = oc.pretrained.list_pretrained_tags_by_model(name)
  pp = oc.get_pretrained_cfg(name, tag)
  transform = oc.image_transform(cfg.image_resolution, is_train=False, **{
      k: pp[k] for k in ('mean', 'std', 'interpolation', 'resize_mode')})
  rng = np.random.default_rng(0)
  for h, w in ((300, 260), (200, 410)):
    image = PIL.Image.fromarray(rng.integers(0, 256, (h, w, 3), np.uint8))
    np.testing.assert_allclose(clip.preprocess_images([image], cfg)[0],
                               transform(image).permute(1, 2, 0).numpy(), atol=1e-6)
