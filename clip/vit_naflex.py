"""The ViT image tower over NaFlex inputs (SigLIP 2's native aspect ratio): patchified images of
their own (h, w) patch grids, padded to one sequence length S, for every option `clip/vit.py` has.

An image is `h * w` patches in raster order, each flattened (row, column, channel) as
`clip.naflex_preprocess` makes them, then padding up to S; its grid `(h, w)` is the only mask
(`h * w <= S` real patches, the rest padding). The tower is `vit.tokens` / `vit.pool` with:

- prefix tokens (class token, registers) before the patches, as `vit.tokens` puts them; the blocks'
  attention sees each row's first `prefix + real` tokens (`layers.Mask(kv_lengths_N=...)`);
- positions per grid: a learned square table resized to (h, w) (`resized_positions`,
  `Siglip2VisionEmbeddings`' antialiased bilinear resize; the class token's row as is), the
  sin-cos positions of big_vision's `posemb_sincos_2d(h, w)` (`sincos_positions`), EVA's 2-D
  RoPE at each patch's row and column (`rope2d.grid_angles`, prefix tokens unturned);
- pooling over real tokens only: the class token, the mean of the real patches (and the
  registers with `pool_registers`), or the MAP probe attending to the real tokens;
- FLIP's patch dropout over real patches only: an image of h*w real patches keeps
  `kept_patches(cfg, h*w)` = max(1, round((1 - patch_dropout) * h*w)) of them (a uniformly
  random subset, in order), in a static `kept_patches(cfg, S)` slots; padding is never kept.

Padding never reaches a real token: padded patches are zeroed before the embedding, hidden from
attention and pooling, so garbage there changes no output bit. The grids are traced values: one
compile per (batch size, S). On a full square grid (h = w = grid_size, S = grid_size^2) the
tower is `vit.apply` (tests/test_vit_naflex.py).
"""
import math

import jax
import jax.numpy as jnp
import numpy as np

from clip import configs
from clip import layers
from clip import rope2d
from clip import vit


# ---------------------------------------------------------------- positions per grid

def grid_coordinates(shapes_Nx2, length):
  """Each position's (row, column) in its image's (h, w) grid, raster order: two int (N, length)
  arrays, 0 at the padding (positions past h*w)."""
  h_N, w_N = shapes_Nx2[:, 0], shapes_Nx2[:, 1]
  position_S = jnp.arange(length)
  real_NxS = position_S < (h_N * w_N)[:, None]
  rows_NxS = jnp.where(real_NxS, position_S // w_N[:, None], 0)
  cols_NxS = jnp.where(real_NxS, position_S % w_N[:, None], 0)
  return rows_NxS, cols_NxS


def _axis_weights(index_NxS, size_N, grid):
  """(N, S, grid) weights of the antialiased bilinear resize of `grid` samples to `size_N`,
  for output sample `index_NxS` of each row: F.interpolate(mode='bilinear', align_corners=False,
  antialias=True) along one axis, a triangle filter widened by the scale when it shrinks."""
  scale_Nx1 = (grid / size_N.astype(jnp.float32))[:, None]
  support_Nx1 = jnp.maximum(scale_Nx1, 1.0)
  center_NxS = (index_NxS.astype(jnp.float32) + 0.5) * scale_Nx1 - 0.5
  source_G = jnp.arange(grid, dtype=jnp.float32)
  distance_NxSxG = jnp.abs(source_G - center_NxS[..., None]) / support_Nx1[..., None]
  weights_NxSxG = jnp.maximum(1 - distance_NxSxG, 0.0)
  return weights_NxSxG / weights_NxSxG.sum(-1, keepdims=True)


def resized_positions(table_GGxD, shapes_Nx2, length):
  """The square position table (G*G, D) resized to each image's (h, w) grid and laid out as its
  patches: (N, length, D) fp32, rows past h*w (padding) holding the grid's first position, as
  `Siglip2VisionEmbeddings.resize_positional_embeddings` (torch's antialiased bilinear
  `F.interpolate`). `shapes_Nx2` may be traced: each position's weight over the G x G table is
  the product of its row's and its column's interpolation weights, one (G*G)-deep matmul."""
  grid = math.isqrt(table_GGxD.shape[0])
  rows_NxS, cols_NxS = grid_coordinates(shapes_Nx2, length)
  weights_NxSxGxG = (_axis_weights(rows_NxS, shapes_Nx2[:, 0], grid)[..., :, None]
                     * _axis_weights(cols_NxS, shapes_Nx2[:, 1], grid)[..., None, :])
  table_GxGxD = table_GGxD.reshape(grid, grid, -1).astype(jnp.float32)
  return jnp.einsum('nsgk,gkd->nsd', weights_NxSxGxG, table_GxGxD)


def sincos_positions(rows_NxS, cols_NxS, width, temperature=10000.0):
  """(N, S, width) fp32 2-D sin-cos positions of patches at (row, column): big_vision's
  `posemb_sincos_2d(h, w, width)` evaluated at each patch of its own grid, channels sin(x),
  cos(x), sin(y), cos(y) (x the column) at `temperature^(-k / (width/4 - 1))`; equal to
  `layers.sincos_2d` on a full square grid."""
  quarter = width // 4
  omega_q = 1.0 / temperature ** (np.arange(quarter, dtype=np.float32) / max(quarter - 1, 1))
  x_NxSxq = cols_NxS.astype(jnp.float32)[..., None] * omega_q
  y_NxSxq = rows_NxS.astype(jnp.float32)[..., None] * omega_q
  return jnp.concatenate([jnp.sin(x_NxSxq), jnp.cos(x_NxSxq), jnp.sin(y_NxSxq),
                          jnp.cos(y_NxSxq)], -1)


def patch_positions(params, cfg, shapes_Nx2, length):
  """(N, length, D) fp32 positions of each image's patches in its own grid: the learned table's
  patch rows resized (`resized_positions`) or the sin-cos grid (`sincos_positions`)."""
  if cfg.pos_embedding == 'learned':
    table = params['positional_embedding'][int(cfg.has_class_token):]
    return resized_positions(table, shapes_Nx2, length)
  return sincos_positions(*grid_coordinates(shapes_Nx2, length), cfg.width)


# ---------------------------------------------------------------- patch dropout

def kept_patches(cfg, real):
  """Patches an image of `real` real patches keeps under `cfg.patch_dropout`: round((1 - p) *
  real) in float64, half to even (Python's round, as `cfg.kept_patches` for a full grid), at
  least 1. `real` an int (-> int) or an int array (-> int32 numpy)."""
  keep = np.maximum(1, np.round((1.0 - cfg.patch_dropout) * np.asarray(real, np.float64)))
  return int(keep) if np.ndim(keep) == 0 else keep.astype(np.int32)


def drop_patches(x_NxSxD, real_N, cfg, key):
  """FLIP's patch dropout over real patches only: each row keeps `kept_patches(cfg, h*w)` of
  its `real_N` real patches, a uniformly random subset from `key`, in their original order,
  then padding: ((N, kept_patches(cfg, S), D), kept_N). The slots are static, the kept counts
  traced; padding is never drawn (its score sorts after every real one), and the slots past a
  row's count hold a copy of the sequence's last token (the caller's mask hides them)."""
  n, s, _ = x_NxSxD.shape
  slots = kept_patches(cfg, s)
  kept_N = jnp.asarray(kept_patches(cfg, np.arange(s + 1)))[real_N]
  scores_NxS = jax.random.uniform(key, (n, s))
  scores_NxS = jnp.where(jnp.arange(s) < real_N[:, None], scores_NxS, 2.0)  # padding last
  order_NxK = jnp.argsort(scores_NxS, axis=1)[:, :slots]
  order_NxK = jnp.where(jnp.arange(slots) < kept_N[:, None], order_NxK, s)  # unused slots last
  keep_NxK = jnp.minimum(jnp.sort(order_NxK, axis=1), s - 1)
  return jnp.take_along_axis(x_NxSxD, keep_NxK[..., None], axis=1), kept_N


# ---------------------------------------------------------------- the tower

def embed(params, patches_NxSxK, shapes_Nx2, cfg, dtype, dropout_key=None):
  """NaFlex patches -> (tokens (N, prefix + slots, D) in `dtype`, real tokens per row (N,)), as
  `vit.tokens` builds them: the embedded patches (the padding zeroed first), the class token
  before them, the positions (the class token's row of `vit.position_table`, the patches' of
  their grid), patch dropout with a `dropout_key` when `cfg.patch_dropout` > 0, the registers."""
  n, s, _ = patches_NxSxK.shape
  p, c = cfg.patch_size, int(cfg.has_class_token)
  real_N = shapes_Nx2[:, 0] * shapes_Nx2[:, 1]
  real_NxS = jnp.arange(s) < real_N[:, None]
  patches_NxSxK = jnp.where(real_NxS[..., None], patches_NxSxK, 0).astype(dtype)
  x_NxSxD = vit.embed_patches(params, patches_NxSxK.reshape(n, s, p, p, 3), 'nspqc,ocpq->nso',
                              dtype)
  class_row_NxCxD = jnp.broadcast_to(vit.position_table(params, cfg, dtype)[:c],
                                     (n, c, cfg.width))
  positions_NxLxD = jnp.concatenate(
      [class_row_NxCxD, patch_positions(params, cfg, shapes_Nx2, s).astype(dtype)], axis=1)
  x_NxLxD = vit.with_class_token(params, x_NxSxD, cfg) + positions_NxLxD
  if dropout_key is not None and cfg.patch_dropout > 0:
    kept_NxKxD, real_N = drop_patches(x_NxLxD[:, c:], real_N, cfg, dropout_key)
    x_NxLxD = jnp.concatenate([x_NxLxD[:, :c], kept_NxKxD], axis=1)
  return vit.with_registers(params, x_NxLxD, cfg), vit.prefix_length(cfg) + real_N


def rope_angles(cfg, shapes_Nx2, length):
  """(N, prefix + length, head_dim/2) EVA 2-D RoPE angles of each row's tokens: 0 for the prefix
  tokens, then each patch's in its own grid (`rope2d.grid_angles`)."""
  patches_NxSxh = rope2d.grid_angles(cfg, *grid_coordinates(shapes_Nx2, length), shapes_Nx2)
  n, _, h = patches_NxSxh.shape
  prefix_NxPxh = jnp.zeros((n, vit.prefix_length(cfg), h), jnp.float32)
  return jnp.concatenate([prefix_NxPxh, patches_NxSxh], axis=1)


def tokens(params, patches_NxSxK, shapes_Nx2, cfg, execution=configs.Execution(),
           dropout_key=None):
  """NaFlex patches -> (the last block's tokens (N, L, D) in `execution.dtype`, real tokens per
  row `lengths_N` (N,) int32): L = prefix + S (prefix + `kept_patches(cfg, S)` slots under patch
  dropout), each row's first `lengths_N` tokens real (prefix, then patches in raster order, the
  kept ones under dropout), the rest padding, which no real token attends to.

  Args:
    params: the image tower's parameters (`params['visual']` of a ViT CLIP model).
    patches_NxSxK: float (N, S, P*P*3) normalised patches, each image's h*w real ones first in
      raster order, each flattened (row, column, channel); what follows is ignored.
    shapes_Nx2: int (N, 2) each image's (h, w) patch grid, 1 <= h*w <= S (not checked here: the
      caller's, e.g. `clip.encode_image_naflex`).
    cfg: the ViT's `clip.VisionConfig` (any options; RoPE and patch dropout never together).
    execution: dtype, attention implementation, scan / remat of the blocks (as `vit.tokens`).
    dropout_key: with `cfg.patch_dropout` > 0, FLIP's patch dropout over the real patches
      (`drop_patches`); None (evaluation): every patch.
  """
  dtype = jnp.dtype(execution.dtype)
  x_NxLxD, lengths_N = embed(params, patches_NxSxK, shapes_Nx2, cfg, dtype, dropout_key)
  angles = rope_angles(cfg, shapes_Nx2, patches_NxSxK.shape[1]) if cfg.rope_2d else None
  mask = layers.Mask(kv_lengths_N=lengths_N)
  return vit.blocks(params, x_NxLxD, cfg, execution, mask, angles), lengths_N.astype(jnp.int32)


def features(params, patches_NxSxK, shapes_Nx2, cfg, execution=configs.Execution(),
             dropout_key=None):
  """NaFlex patches -> (N, embed_dim) image features in `execution.dtype`, not L2-normalised:
  `tokens` (see its arguments), then `vit.pool` over each row's real tokens only (the class
  token; the mean of the real patches, and of the registers with `pool_registers`; the MAP probe
  attending to the real tokens). Traceable: one compile per (N, S)."""
  x_NxLxD, lengths_N = tokens(params, patches_NxSxK, shapes_Nx2, cfg, execution, dropout_key)
  real_NxL = jnp.arange(x_NxLxD.shape[1]) < lengths_N[:, None]
  return vit.pool(params, x_NxLxD, cfg, execution, real_NxL)
