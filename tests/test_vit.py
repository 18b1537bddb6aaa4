"""clip/vit.py: the vision tower against float64 numpy for every pooling (cls, gap, map), position
embedding (learned, sin-cos), registers, block option, patch bias and norm epsilon; gap pooling
alone on the tower's own tokens."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import clip
from clip import configs
from clip import vit
from tests.numpy_reference import MUST_DIFFER
from tests.numpy_reference import RTOL
from tests.numpy_reference import TEXT
from tests.numpy_reference import VISION
from tests.numpy_reference import np_norm
from tests.numpy_reference import np_vision
from tests.numpy_reference import perturbed
from tests.numpy_reference import rel_err
from tests.numpy_reference import to_np


VISION_CASES = {
    'cls': {},
    'gap': dict(pool='gap'),
    'gap-registers-dropped': dict(pool='gap', registers=3),
    'gap-registers-kept': dict(pool='gap', registers=3, pool_registers=True),
    'map': dict(pool='map', pool_heads=2),
    'map-sincos-registers': dict(pool='map', pos_embedding='sincos2d', registers=2),
    'cls-sincos-registers': dict(pos_embedding='sincos2d', registers=1),
    'siglip-like': dict(pool='map', pos_embedding='sincos2d', mlp='gelu', norm='rmsnorm',
                        qk_norm=True, projection=False),
    'cls-patch-bias-norm-eps': dict(patch_bias=True, norm_eps=0.5),  # ln_pre=False: SIGLIP_LIKE
}


@pytest.mark.parametrize('name', sorted(VISION_CASES))
def test_vision_tower_matches_numpy(name):
  vision = configs.VisionConfig(**VISION, **VISION_CASES[name])
  cfg = configs.CLIPConfig(32, vision, configs.TextConfig(**TEXT))
  params = perturbed(clip.init(jax.random.PRNGKey(0), cfg))
  images = np.random.default_rng(2).standard_normal((2, 24, 24, 3)).astype(np.float32)
  out = clip.encode_image(params, images, cfg)
  assert rel_err(out, np_vision(to_np(params['visual']), images.astype(np.float64), vision)) < RTOL
  assert ('class_embedding' in params['visual']) == (vision.pool == 'cls')
  assert ('positional_embedding' in params['visual']) == (vision.pos_embedding == 'learned')
  assert ('attn_pool' in params['visual']) == (vision.pool == 'map')
  assert ('ln_pre' in params['visual']) == vision.ln_pre
  assert ('bias' in params['visual']['conv1']) == vision.patch_bias
  if vision.norm_eps is not None:
    default_eps = dataclasses.replace(vision, norm_eps=None)
    assert rel_err(out, np_vision(to_np(params['visual']), images.astype(np.float64),
                                  default_eps)) > MUST_DIFFER


def test_gap_pooling_is_the_mean_of_the_patch_tokens():
  """Pooling alone, against numpy on the tower's own tokens: registers dropped unless kept."""
  for keep in (False, True):
    vision = configs.VisionConfig(**VISION, pool='gap', registers=2, pool_registers=keep,
                                  projection=False)
    cfg = configs.CLIPConfig(32, vision, configs.TextConfig(**TEXT))
    p = perturbed(clip.init(jax.random.PRNGKey(0), cfg))['visual']
    images = np.random.default_rng(3).standard_normal((2, 24, 24, 3)).astype(np.float32)
    tokens = np.asarray(vit.tokens(p, images, vision), np.float64)
    assert tokens.shape == (2, 2 + 9, 32)
    expected = np_norm(to_np(p)['ln_post'], tokens if keep else tokens[:, 2:], 'layernorm').mean(1)
    assert rel_err(vit.pool(p, jnp.asarray(tokens, jnp.float32), vision), expected) < RTOL
