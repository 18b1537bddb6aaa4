"""EVA's 2-D rotary position embedding of a ViT's patch tokens (Heo et al. 2024, "Rotary Position
Embedding for Vision Transformer"; EVA-02, Fang et al. 2023), as timm 1.0.31's `Eva` builds it
with `RotaryEmbeddingCat(in_pixels=False)` and applies it with `apply_rot_embed_cat` (interleaved
pairs): each head's dimensions pair up as (2i, 2i+1), the first half of the pairs turning with the
patch's row and the second half with its column, pair k of a half at the frequency
`theta^(-k / (head_dim/4))`. The tokens before the patches (class token, registers) get angle 0:
they are left as they are, exactly, as timm leaves its prefix tokens out.
"""
import jax.numpy as jnp
import numpy as np


def _frequencies(cfg):
  """(head_dim/4,) float64 frequencies `rope_theta^(-k / (head_dim/4))` of each half's pairs."""
  quarter = cfg.width // cfg.heads // 4
  return cfg.rope_theta ** (-np.arange(quarter, dtype=np.float64) / quarter)


def angles(cfg):
  """(prefix + grid_size^2, head_dim/2) float32 rotation angles of the tokens of a ViT config
  with `rope_2d` (`clip.VisionConfig`): zero rows for the class token and the registers, then the
  patches in raster order, at row / column `(index + rope_grid_offset) * rope_ref_grid /
  grid_size` (timm's `grid_offset` and `ref_feat_shape` rescaling; unscaled when `rope_ref_grid`
  is None), the rows' angles first (timm's 'ij' indexing) or, with `rope_xy`, the columns'.
  Computed in float64 and rounded once."""
  grid, freqs = cfg.grid_size, _frequencies(cfg)
  scale = 1.0 if cfg.rope_ref_grid is None else cfg.rope_ref_grid / grid
  coords = (np.arange(grid, dtype=np.float64) + cfg.rope_grid_offset) * scale
  row_Gxq, col_Gxq = np.meshgrid(coords, coords, indexing='ij')  # (G, G) each
  axes = (col_Gxq, row_Gxq) if cfg.rope_xy else (row_Gxq, col_Gxq)
  patches = np.concatenate([a.reshape(-1, 1) * freqs for a in axes], 1)
  prefix = int(cfg.has_class_token) + cfg.registers
  return np.concatenate([np.zeros((prefix, len(freqs) * 2)), patches]).astype(np.float32)


def grid_angles(cfg, rows_NxS, cols_NxS, shapes_Nx2):
  """(N, S, head_dim/2) float32 angles of patches at (row, column) `rows_NxS`, `cols_NxS` of
  their own (h, w) grids `shapes_Nx2` (NaFlex; all may be traced): `angles`' rule with each axis
  scaled by its own size, row `(r + rope_grid_offset) * rope_ref_grid / h` and column `(c +
  rope_grid_offset) * rope_ref_grid / w`, as timm's `RotaryEmbeddingCat.get_embed((h, w))`.
  Computed in float32 (`angles` of a square grid_size grid, up to rounding)."""
  freqs_q = jnp.asarray(_frequencies(cfg), jnp.float32)
  coords = []
  for index_NxS, size_N in ((rows_NxS, shapes_Nx2[:, 0]), (cols_NxS, shapes_Nx2[:, 1])):
    coord_NxS = index_NxS.astype(jnp.float32) + cfg.rope_grid_offset
    if cfg.rope_ref_grid is not None:
      coord_NxS = coord_NxS * (cfg.rope_ref_grid / size_N.astype(jnp.float32))[:, None]
    coords.append(coord_NxS[..., None] * freqs_q)
  return jnp.concatenate(coords[::-1] if cfg.rope_xy else coords, axis=-1)


def rotate(x_NxLxHxd, angles):
  """Turns each pair (x[2i], x[2i+1]) of every head by `angles[..., i]`, in fp32, back in x's
  dtype: (x0 cos - x1 sin, x1 cos + x0 sin), timm's `apply_rot_embed(half=False)`. `angles`
  (L, head_dim/2) shared by the rows, or (N, L, head_dim/2) per row (NaFlex's grids)."""
  x = x_NxLxHxd.astype(jnp.float32)
  angles_NxLxh = angles if angles.ndim == 3 else angles[None]
  cos_NxLx1xh = jnp.cos(angles_NxLxh)[:, :, None]
  sin_NxLx1xh = jnp.sin(angles_NxLxh)[:, :, None]
  x0, x1 = x[..., 0::2], x[..., 1::2]
  out = jnp.stack([x0 * cos_NxLx1xh - x1 * sin_NxLx1xh, x1 * cos_NxLx1xh + x0 * sin_NxLx1xh], -1)
  return out.reshape(x.shape).astype(x_NxLxHxd.dtype)
