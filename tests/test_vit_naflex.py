"""clip/vit_naflex.py: the ViT over NaFlex patches, for every ViT option. On a full square grid it
is `vit.apply` (the fixed-resolution tower, itself checked against numpy and torch); padding, even
garbage, changes no output bit, and a padded image equals itself run without padding, in batches
that mix aspect ratios and lengths (one compile per batch shape); patch dropout draws real patches
only and on a full grid draws as `vit.drop_patches`; EVA's RoPE per grid equals timm's
`RotaryEmbeddingCat` at each (h, w), the sin-cos positions big_vision's per grid; the FLOP count
at a sequence length equals XLA's matmuls."""
import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from clip import configs
from clip import flops
from clip import layers
from clip import rope2d
from clip import vit
from clip import vit_naflex
from clip.naflex import _patchify  # pylint: disable=protected-access
from tests.formats.test_checkpoint_families import oc  # pylint: disable=unused-import
from tests.numpy_reference import VISION as _VISION
from tests.numpy_reference import rel_err
from tests.test_flops import RESNET
from tests.test_flops import TINY
from tests.test_flops import dot_flops

VISION = dict(_VISION, layers=1)  # one block: masking and positions act in the first
RTOL = 1e-5  # fp32 features of two programs, relative to their largest magnitude
P, G = VISION['patch_size'], VISION['image_resolution'] // VISION['patch_size']  # 8 px, 3 x 3
EMBED = 16

# Every ViT option, in combinations: class token / gap / MAP pooling, learned / sin-cos / RoPE
# positions, registers (pooled or not), ln_pre, patch bias, EVA's RoPE grid.
CONFIGS = {
    'cls-learned-registers-bias': dict(registers=2, patch_bias=True),
    'gap-sincos-pooled-registers-no-ln-pre': dict(pool='gap', pos_embedding='sincos2d',
                                                  registers=2, pool_registers=True, ln_pre=False),
    'map-learned-registers': dict(pool='map', registers=1, patch_bias=True, ln_pre=False),
    'eva-cls-rope-registers': dict(rope_2d=True, registers=1, rope_ref_grid=4),
}
# Mixed aspect ratios and lengths (9 or 12 real patches of 12), grids below and above G.
GRIDS = np.array([[3, 3], [1, 9], [9, 1], [4, 3]], np.int32)
S = 12


def _params(cfg, seed=0):
  """Random weights for every parameter of the tower (numpy: no compile): norm scales 1 + 0.1 n,
  other vectors 0.1 n, matrices n / sqrt(fan_in)."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(lambda: vit.init(jax.random.PRNGKey(0), cfg, EMBED))

  def draw(path, leaf):
    n = rng.standard_normal(leaf.shape).astype(np.float32)
    if len(leaf.shape) > 1:
      return jnp.asarray(n * np.float32(np.prod(leaf.shape[1:]) ** -0.5))
    return jnp.asarray((path[-1].key == 'weight') + np.float32(0.1) * n)

  return jax.tree_util.tree_map_with_path(draw, shapes)


def _padded(grids, length, fill, seed=0):
  """Random real patches per grid (rows 1 and 2 the same ones), then padding: `fill` 'zeros' or
  'garbage' (large noise)."""
  rng = np.random.default_rng(seed)
  patches = rng.standard_normal((len(grids), length, P * P * 3)).astype(np.float32)
  patches[2] = patches[1]
  real = np.arange(length) < grids.prod(1)[:, None]
  padding = 0.0 if fill == 'zeros' else 1e3 * patches[::-1]
  return np.where(real[..., None], patches, padding).astype(np.float32)


@pytest.mark.parametrize('name', sorted(CONFIGS))
def test_full_grid_is_the_vit_and_padding_changes_nothing(name):
  cfg = configs.VisionConfig(**VISION, **CONFIGS[name])
  params = _params(cfg)
  features = jax.jit(vit_naflex.features, static_argnums=3)
  compiled = features._cache_size()  # pylint: disable=protected-access
  # A full square grid, no padding: the fixed-resolution tower on the same pixels.
  images = np.random.default_rng(1).standard_normal((4, G * P, G * P, 3)).astype(np.float32)
  patches = np.stack([_patchify(image, P) for image in images])
  full = features(params, patches, np.full((4, 2), G, np.int32), cfg)
  assert rel_err(full, jax.jit(vit.apply, static_argnums=2)(params, images, cfg)) < RTOL
  # Padding, garbage or zeros, changes no bit; the padded images equal themselves unpadded.
  garbage = features(params, _padded(GRIDS, S, 'garbage'), GRIDS, cfg)
  zeros = features(params, _padded(GRIDS, S, 'zeros'), GRIDS, cfg)
  chex.assert_trees_all_equal(garbage, zeros)
  nine = GRIDS.prod(1) == 9
  alone = features(params, _padded(GRIDS, S, 'zeros')[:, :9], np.where(nine[:, None], GRIDS, 3),
                   cfg)
  assert rel_err(alone[nine], zeros[nine]) < RTOL
  assert not np.allclose(zeros[1], zeros[2], atol=1e-2)  # the same patches as 1 x 9 and 9 x 1
  assert features._cache_size() == compiled + 2  # pylint: disable=protected-access  # S 9, 12


def test_patch_dropout_draws_real_patches_only():
  """On full grids the kept subsets are `vit.drop_patches`' (the same key, the same tower);
  garbage padding (rows of 8 and 5 real patches of 9) changes no bit of a dropped-out batch."""
  cfg = configs.VisionConfig(**VISION, registers=1, patch_dropout=0.5)
  params, key = _params(cfg), jax.random.PRNGKey(3)
  features = jax.jit(lambda p, x, s: vit_naflex.features(p, x, s, cfg, dropout_key=key))
  images = np.random.default_rng(1).standard_normal((4, G * P, G * P, 3)).astype(np.float32)
  grids = np.array([[3, 3], [2, 4], [1, 5], [3, 3]], np.int32)
  real = (np.arange(G * G) < grids.prod(1)[:, None])[..., None]
  patches = np.stack([_patchify(image, P) for image in images])
  garbage = features(params, np.where(real, patches, 1e3), grids)
  zeros = features(params, np.where(real, patches, 0.0), grids)
  chex.assert_trees_all_equal(garbage, zeros)
  want = jax.jit(vit.apply, static_argnums=2)(params, images, cfg, dropout_key=key)
  full = grids.prod(1) == G * G
  assert rel_err(zeros[full], want[full]) < RTOL  # and vit.apply's dropout acts (test_vit.py)


def test_drop_patches_keeps_round_half_of_the_real_patches_in_order():
  cfg = configs.VisionConfig(**VISION, patch_dropout=0.5)
  real = np.array([1, 5, 12, 7] * 128, np.int32)
  x = jnp.broadcast_to(jnp.arange(S, dtype=jnp.float32)[None, :, None], (len(real), S, 1))
  kept, kept_n = jax.jit(vit_naflex.drop_patches, static_argnums=2)(
      x, jnp.asarray(real), cfg, jax.random.PRNGKey(0))
  kept, kept_n = np.asarray(kept)[..., 0].astype(int), np.asarray(kept_n)
  assert kept.shape == (len(real), 6)  # round(0.5 * 12) slots
  np.testing.assert_array_equal(kept_n[:4], [1, 2, 6, 4])  # max(1, round half even)
  for row, r, k in zip(kept, real, kept_n):
    assert (row[:k] < r).all() and (np.diff(row[:k]) > 0).all(), (row, r, k)
  counts = np.bincount(kept[1::4, :2].ravel(), minlength=5)  # 2 of 5, 128 rows
  expected = 128 * 2 / 5
  assert np.abs(counts - expected).max() < 6 * np.sqrt(expected * 3 / 5), counts
  assert vit_naflex.kept_patches(cfg, G * G) == cfg.kept_patches


@pytest.mark.parametrize('ours, theirs', [
    (dict(registers=1, rope_ref_grid=16), dict(ref_feat_shape=(16, 16))),  # EVA02
    (dict(pool='map', class_token=True, rope_ref_grid=24, rope_grid_offset=1.0, rope_xy=True),
     dict(ref_feat_shape=(24, 24), grid_offset=1.0, grid_indexing='xy')),  # PE-Core
], ids=['EVA02', 'PE-Core'])
def test_rope_per_grid_equals_timms_rotary_embedding_cat(oc, ours, theirs):  # pylint: disable=redefined-outer-name
  from timm.layers import pos_embed_sincos as timm_rope  # pylint: disable=g-import-not-at-top
  del oc  # timm comes with open_clip's reference
  cfg = configs.VisionConfig('vit', 128, 1, 2, 40, 8, rope_2d=True, **ours)
  rope = timm_rope.RotaryEmbeddingCat(dim=64, in_pixels=False, **theirs).double()
  angles = np.asarray(vit_naflex.rope_angles(cfg, jnp.asarray(GRIDS), S))
  prefix = vit.prefix_length(cfg)
  np.testing.assert_array_equal(angles[:, :prefix], 0)
  x = np.random.default_rng(0).normal(size=(len(GRIDS), prefix + S, 2, 64))
  turned = np.asarray(rope2d.rotate(x.astype(np.float32), angles))
  for (h, w), x_i, ours_i in zip(GRIDS.tolist(), x, turned):
    x_t = torch.from_numpy(x_i[None, prefix:prefix + h * w]).transpose(1, 2)
    want = timm_rope.apply_rot_embed_cat(x_t, rope.get_embed([h, w])).transpose(1, 2)[0]
    assert rel_err(ours_i[prefix:prefix + h * w], want.numpy()) < 1e-5, (h, w)


def test_sincos_per_grid_is_the_square_tables_rows():
  """Patch (r, c) of an h x w grid has the 2-D sin-cos position of (r, c) in any larger square
  grid (`layers.sincos_2d`, big_vision's `posemb_sincos_2d`)."""
  big = layers.sincos_2d(9, 32)
  rows, cols = vit_naflex.grid_coordinates(jnp.asarray(GRIDS), S)
  ours = np.asarray(vit_naflex.sincos_positions(rows, cols, 32))
  for (h, w), ours_i in zip(GRIDS.tolist(), ours):
    r, c = np.divmod(np.arange(h * w), w)
    np.testing.assert_allclose(ours_i[:h * w], big[r * 9 + c], rtol=0, atol=1e-6)


def test_flops_at_a_sequence_length_are_xlas_matmuls():
  """Forward: exactly the dots of the lowered tower (patch dropout: the kept slots); the
  gradient: 3x, less the patch embedding's and the position resize's input gradients."""
  cfg = configs.VisionConfig(**VISION, pool='map', registers=2, patch_dropout=0.5)
  params = jax.eval_shape(lambda: vit.init(jax.random.PRNGKey(0), cfg, EMBED))
  patches = jax.ShapeDtypeStruct((4, S, P * P * 3), jnp.float32)
  shapes = jax.ShapeDtypeStruct((4, 2), jnp.int32)
  run = lambda key: lambda p, x, s: (vit_naflex.features(
      p, x, s, cfg, dropout_key=key) ** 2).sum()
  hlo = lambda f: dot_flops(jax.jit(f).lower(params, patches, shapes).as_text(dialect='hlo'))
  count = lambda training: 4 * flops.vit_flops(cfg, EMBED, training, num_patches=S)
  assert hlo(run(None)) == count(False)
  key = jax.random.PRNGKey(0)
  assert hlo(run(key)) == count(True) != count(False)
  embedding = 4 * 2 * S * 3 * P * P * cfg.width
  resize = 4 * 2 * S * G * G * cfg.width
  assert hlo(jax.grad(run(key))) == 3 * count(True) - embedding - resize
  full = dataclasses.replace(cfg, patch_dropout=0.0)
  assert flops.vit_flops(full, EMBED, num_patches=G * G) == flops.vit_flops(
      full, EMBED) + 2 * G ** 4 * cfg.width  # the fixed tower plus the resize


def test_flops_refuse_a_bad_sequence_length_and_a_resnet():
  for bad in (0, True, 2.0):
    with pytest.raises(ValueError, match=f'num_patches must be a positive int or None, got {bad}'):
      flops.train_step_flops(TINY, 8, num_patches=bad)
  with pytest.raises(ValueError, match='counts a NaFlex ViT; this tower is a ResNet'):
    flops.train_step_flops(RESNET, 8, num_patches=64)
  assert flops.train_step_flops(TINY, 8, num_patches=TINY.vision.grid_size ** 2) > (
      flops.train_step_flops(TINY, 8))  # the resize on top of the same tokens
