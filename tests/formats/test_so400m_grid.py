"""A resolution that is no multiple of the patch (SigLIP So400m/14 at 384 px): the patch grid
floors as the reference conv does (timm's and transformers' stride-`patch` conv drop the last
`resolution % patch` pixel rows and columns), the image is still the model's full square. Small
models with the same remainder structure (38 px over 8 px patches: a 4 x 4 grid, 6 pixels
dropped), every parameter perturbed. Loading them from transformers' and open_clip's files, equal to
the peers, is the So400m rows of the checkpoint-families table
(tests/formats/test_checkpoint_families.py)."""
import dataclasses

import jax
import numpy as np
import pytest

import clip
from tests.formats.test_checkpoint_families import _siglip_cfg

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

