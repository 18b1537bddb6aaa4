"""Changing the input resolution (clip/formats/resize.py): the position grid resized bicubically,
sin-cos tables recomputed."""

import chex
import jax
import numpy as np
import safetensors.numpy

import clip
from clip import configs
from clip.formats import files
from clip.formats import resize
from tests.numpy_reference import TEXT
from tests.numpy_reference import VISION

from tests.formats.test_openai import CFG
from tests.formats.test_openai import inputs  # pylint: disable=unused-import
from tests.formats.test_openai import state_dict  # pylint: disable=unused-import
from tests.formats.test_openai import torch_model  # pylint: disable=unused-import

def test_interpolated_position_embedding(tmp_path, state_dict, inputs):
  safetensors.numpy.save_file(state_dict, str(tmp_path / 'm.safetensors'))
  params, cfg = clip.load(tmp_path / 'm.safetensors', image_resolution=48)
  assert cfg.image_resolution == 48
  chex.assert_shape(params['visual']['positional_embedding'], (6 * 6 + 1, 64))
  np.testing.assert_array_equal(params['visual']['positional_embedding'][0],
                                state_dict['visual.positional_embedding'][0])
  images = np.random.default_rng(0).standard_normal((2, 48, 48, 3)).astype(np.float32)
  chex.assert_tree_all_finite(clip.encode_image(params, images, cfg))
  # resizing to the same grid is the identity (bicubic at integer positions)
  same, _ = resize.interpolate_pos_embed(files.nest(dict(state_dict)), CFG, 32)
  np.testing.assert_allclose(same['visual']['positional_embedding'],
                             state_dict['visual.positional_embedding'], atol=1e-6)


def test_sincos_and_gap_models_change_resolution():
  for options in (dict(pool='gap'), dict(pool='map', pos_embedding='sincos2d')):
    cfg = configs.CLIPConfig(32, configs.VisionConfig(**VISION, **options), configs.TextConfig(**TEXT))
    params = clip.init(jax.random.PRNGKey(0), cfg)
    new_params, new_cfg = resize.interpolate_pos_embed(params, cfg, 32)
    if 'positional_embedding' in params['visual']:
      assert new_params['visual']['positional_embedding'].shape == (16, 32)
    out = clip.encode_image(new_params, np.zeros((1, 32, 32, 3), np.float32), new_cfg)
    chex.assert_tree_all_finite(out)
