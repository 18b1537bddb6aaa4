"""A resolution that is no multiple of the patch (SigLIP So400m/14 at 384 px): the patch grid
floors as the reference conv does (timm's and transformers' stride-`patch` conv drop the last
`resolution % patch` pixel rows and columns), the image is still the model's full square. Small
models with the same remainder structure (38 px over 8 px patches: a 4 x 4 grid, 6 pixels
dropped), every parameter perturbed."""
import dataclasses
import warnings

import jax
import numpy as np
import pytest
import torch

import clip
from experiments import checkpoint_families
from tests.formats.test_checkpoint_families import _assert_hf_equal
from tests.formats.test_checkpoint_families import _assert_open_clip_equal
from tests.formats.test_checkpoint_families import _siglip_cfg
from tests.test_processing import oc  # pylint: disable=unused-import

RESOLUTION, PATCH = 38, 8


def _cfg(act):
  cfg = _siglip_cfg(act_vision=act, act_text=act)
  return dataclasses.replace(
      cfg, vision=dataclasses.replace(cfg.vision, image_resolution=RESOLUTION))


def test_the_grid_floors_and_the_unused_pixels_change_nothing():
  cfg = _cfg('gelu')
  assert cfg.vision.grid_size == RESOLUTION // PATCH == 4
  params = clip.init_params(jax.random.key(0), cfg)
  images = np.random.default_rng(0).normal(size=(2, RESOLUTION, RESOLUTION, 3)).astype(np.float32)
  edited = images.copy()
  edited[:, 4 * PATCH:] = 9.0  # the rows and columns past the last whole patch
  edited[:, :, 4 * PATCH:] = -9.0
  np.testing.assert_array_equal(clip.encode_image(params, images, cfg),
                                clip.encode_image(params, edited, cfg))
  with pytest.raises(ValueError, match=r'\(N, 38, 38, 3\)'):
    clip.encode_image(params, images[:, :32, :32], cfg)  # the covered square is not the input


def test_hugging_face_siglip_at_a_resolution_off_the_patch_grid(tmp_path):
  hf = checkpoint_families.hf_siglip(image_size=RESOLUTION)
  assert hf.vision_model.embeddings.num_patches == 16
  hf.save_pretrained(tmp_path)
  checkpoint_families.save_image_processor(tmp_path, siglip=True, size=RESOLUTION)
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    params, cfg = clip.load(tmp_path)  # config.json's 38 px over 8 px patches
  assert cfg.vision == _cfg('gelu_tanh').vision
  _assert_hf_equal(hf, params, cfg, siglip=True)


def test_open_clip_timm_trunk_at_a_resolution_off_the_patch_grid(oc, tmp_path):
  m = checkpoint_families.timm_siglip(oc, image_size=RESOLUTION)
  torch.save(m.state_dict(), tmp_path / 'siglip.pt')
  params, cfg = clip.load(tmp_path / 'siglip.pt', config=_cfg('gelu'))
  tokens = np.random.default_rng(4).integers(0, 100, (3, 16), np.int32)
  _assert_open_clip_equal(m, params, cfg, tokens)
