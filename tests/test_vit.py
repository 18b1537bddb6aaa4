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


# ---------------------------------------------------------------- FLIP's patch dropout

def test_drop_patches_keeps_a_random_subset_per_image_in_order():
  """Each row keeps `kept_patches` distinct patches in raster order and the class token; rows
  and keys draw different subsets; over many rows every patch is kept about equally often."""
  cfg = configs.VisionConfig(**dict(VISION, image_resolution=64), patch_dropout=0.75)  # 64 patches
  assert cfg.kept_patches == 16
  n, patches = 512, cfg.grid_size ** 2
  x = jnp.broadcast_to(jnp.arange(patches + 1, dtype=jnp.float32)[None, :, None],
                       (n, patches + 1, 1))
  kept = np.asarray(vit.drop_patches(x, cfg, jax.random.PRNGKey(0)))[..., 0]
  assert kept.shape == (n, 1 + 16) and (kept[:, 0] == 0).all()
  assert (np.diff(kept[:, 1:], axis=1) > 0).all()  # distinct, original order
  assert len({tuple(row) for row in kept}) == n     # per-image subsets
  again = np.asarray(vit.drop_patches(x, cfg, jax.random.PRNGKey(1)))[..., 0]
  assert (again != kept).any()
  counts = np.bincount(kept[:, 1:].astype(int).ravel(), minlength=patches + 1)[1:]
  expected = n * 16 / patches  # 128 per patch; binomial sd ~9.7
  assert np.abs(counts - expected).max() < 6 * np.sqrt(expected * (1 - 16 / patches))


@pytest.mark.parametrize('options', [{}, dict(pool='gap', registers=2),
                                     dict(pool='map', pos_embedding='sincos2d', registers=1)],
                         ids=['cls', 'gap-registers', 'map-sincos-registers'])
def test_patch_dropout_trains_on_kept_tokens_and_evaluates_on_all(options):
  base = configs.VisionConfig(**VISION, **options)
  cfg = dataclasses.replace(base, patch_dropout=0.5)
  params = perturbed(vit.init(jax.random.PRNGKey(0), base, 16))
  images = np.random.default_rng(0).standard_normal((3, 24, 24, 3)).astype(np.float32)
  key = jax.random.PRNGKey(3)
  prefix = int(base.pool == 'cls') + base.registers
  assert vit.tokens(params, images, cfg, dropout_key=key).shape == (3, prefix + 4, 32)  # 9 -> 4
  # Without a key (evaluation) every patch is seen, bit-identical to the tower without dropout;
  # a fraction of 0 ignores the key.
  full = vit.apply(params, images, base)
  np.testing.assert_array_equal(vit.apply(params, images, cfg), full)
  np.testing.assert_array_equal(vit.apply(params, images, base, dropout_key=key), full)
  dropped = vit.apply(params, images, cfg, dropout_key=key)
  assert not np.allclose(dropped, full)
  # The dropout path selecting every patch (0.01 of 9 rounds to 9 kept) is the full tower.
  keep_all = dataclasses.replace(base, patch_dropout=0.01)
  assert keep_all.kept_patches == 9
  np.testing.assert_allclose(vit.apply(params, images, keep_all, dropout_key=key), full,
                             rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('fraction', [-0.1, 1.0, 0.99])
def test_bad_patch_dropout_raises(fraction):
  with pytest.raises(ValueError, match='patch_dropout must be in'):
    configs.VisionConfig(**VISION, patch_dropout=fraction)


def test_patch_dropout_on_a_resnet_raises():
  with pytest.raises(ValueError, match='patch_dropout=0.5'):
    configs.VisionConfig('resnet', 8, (1, 1, 1, 1), 4, 32, patch_dropout=0.5)
