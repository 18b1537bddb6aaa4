"""SigLIP 2 NaFlex: images at their own aspect ratio, as a variable number of patches.

transformers' `Siglip2ImageProcessor` resizes each image (keeping its aspect ratio as far as whole
patches allow) to the largest size whose patch grid fits `max_num_patches`, cuts it into patches
flattened as (row, column, channel) and pads every image's sequence to `max_num_patches`.
`Siglip2Model` embeds the patches with a Linear layer, adds its square position table resized to
each image's (h, w) patch grid (bilinear, antialiased: `F.interpolate(mode='bilinear',
align_corners=False, antialias=True)`), masks the padding in its attention and in its MAP head.

`naflex_preprocess` is that processor (its PIL backend) and `encode_image_naflex` that image
tower, over our parameters (a SigLIP ViT: `visual.conv1.weight (D, 3, P, P)`, the square
`visual.positional_embedding (G*G, D)`, the MAP head): `clip.load` of a `Siglip2Model` folder
gives them. The sizes travel as traced values: one compile per (batch size, max_num_patches).
"""
import dataclasses
import functools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from clip import configs
from clip import layers
from clip import preprocess
from clip import transformer
from clip import vit
from clip.formats import siglip

# Siglip2ImageProcessor's settings: SigLIP's mean and std (0.5), PIL's bilinear filter; it does
# not convert to RGB first (`do_convert_rgb` unset).
# Siglip2ImageProcessor's defaults: SigLIP's mean and std, bilinear, 256 patches per image.
NAFLEX_PREPROCESS = dataclasses.replace(siglip.SIGLIP_PREPROCESS, interpolation='bilinear',
                                        max_num_patches=256)


# ---------------------------------------------------------------- images -> patches

def _scaled_side(scale, side, patch_size):
  """A side scaled by `scale`, rounded up to whole patches, at least one."""
  return max(patch_size, math.ceil(side * scale / patch_size) * patch_size)


def target_size(height, width, patch_size, max_num_patches, eps=1e-5):
  """The (height, width) in pixels Siglip2ImageProcessor resizes an image to: both sides scaled
  by the largest factor (bisected to `eps`, in [eps / 10, 100]) whose sides, each rounded up to
  whole patches (at least one), make at most `max_num_patches` patches
  (`get_image_size_for_max_num_patches`)."""
  low, high = eps / 10, 100.0
  while high - low >= eps:
    scale = (low + high) / 2
    patches = (_scaled_side(scale, height, patch_size) / patch_size
               * (_scaled_side(scale, width, patch_size) / patch_size))
    low, high = (scale, high) if patches <= max_num_patches else (low, scale)
  return _scaled_side(low, height, patch_size), _scaled_side(low, width, patch_size)


def _patchify(x_HxWx3, patch_size):
  """(H, W, 3) -> (H/P * W/P, P*P*3): patches in raster order, each flattened (row, col, chan)."""
  h, w = x_HxWx3.shape[0] // patch_size, x_HxWx3.shape[1] // patch_size
  x = x_HxWx3.reshape(h, patch_size, w, patch_size, 3).transpose(0, 2, 1, 3, 4)
  return x.reshape(h * w, -1)


def _image_patches(image, patch_size, max_num_patches, config):
  """One image -> ((h*w, P*P*3) normalised patches, (h, w))."""
  image = preprocess.to_pil(image)
  if config.convert_first:
    image = preprocess.rgb_on_white(image)
  height, width = target_size(image.height, image.width, patch_size, max_num_patches)
  if (width, height) != image.size:
    filters = preprocess._FILTERS  # pylint: disable=protected-access
    image = image.resize((width, height), filters[config.interpolation])
  x_HxWx3 = np.asarray(image.convert('RGB'), np.float32) / np.float32(255)
  x_HxWx3 = configs.normalize_with(x_HxWx3, config.mean, config.std, 'naflex_preprocess')
  return _patchify(x_HxWx3, patch_size), (height // patch_size, width // patch_size)


def _positive_int(value, name):
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f'{name} must be a positive int, got {value!r}')
  return int(value)


def _preprocess_config(preprocess_or_cfg):
  if preprocess_or_cfg is None:
    return NAFLEX_PREPROCESS
  if isinstance(preprocess_or_cfg, configs.CLIPConfig):
    return preprocess_or_cfg.preprocess
  if isinstance(preprocess_or_cfg, configs.PreprocessConfig):
    return preprocess_or_cfg
  raise TypeError('naflex_preprocess takes a clip.PreprocessConfig or a clip.CLIPConfig (its '
                  f'preprocess), got {type(preprocess_or_cfg).__name__}')


def naflex_preprocess(images, patch_size, max_num_patches, preprocess_or_cfg=None):
  """Images of any sizes -> NaFlex inputs, as transformers' `Siglip2ImageProcessor` (PIL backend,
  `Siglip2ImageProcessorPil`) makes them.

  Args:
    images: a sequence of PIL images, image file paths or uint8 (H, W, 3) RGB arrays (mixed, any
      sizes), or a uint8 (N, H, W, 3) array.
    patch_size: P, pixels per patch side (the model's `cfg.vision.patch_size`).
    max_num_patches: S, the patches per image after padding (Siglip2ImageProcessor's setting;
      released NaFlex models were trained at 256 to 1024); None: the config's
      `preprocess.max_num_patches` (a loaded NaFlex folder's processor states it; 256 where it
      says nothing, as transformers' default).
    preprocess_or_cfg: a `clip.PreprocessConfig` or a `clip.CLIPConfig` whose `preprocess` gives
      the mean, std, interpolation and `convert_first`; None: Siglip2ImageProcessor's (mean and
      std 0.5, bilinear, no RGB conversion first). Its `resize_mode` is not used: each image is
      resized to `target_size`, keeping its aspect ratio as far as whole patches allow.

  Returns:
    `(pixel_values, pixel_attention_mask, spatial_shapes)`: float32 (N, S, P*P*3) patches in
    raster order, each flattened as (row, column, channel), pixels in [0, 1] normalised, zeros
    after each image's h*w patches; int32 (N, S), 1 for a real patch then 0 for padding; int32
    (N, 2), each image's (h, w) patch grid, h*w <= S.

  Raises:
    TypeError / ValueError: images that are not a sequence of images, an empty one, a file that
      is not an image, a patch_size or max_num_patches that is not a positive int.
  """
  p = _positive_int(patch_size, 'patch_size')
  config = _preprocess_config(preprocess_or_cfg)
  if max_num_patches is None and config.max_num_patches is None:
    raise ValueError('naflex_preprocess needs max_num_patches: none given and the config states '
                     'none (preprocess.max_num_patches is None)')
  s = _positive_int(config.max_num_patches if max_num_patches is None else max_num_patches,
                    'max_num_patches')
  if isinstance(images, (str, os.PathLike, Image.Image)) or (
      isinstance(images, np.ndarray) and images.ndim != 4):
    raise TypeError('naflex_preprocess expects a sequence of images or a uint8 (N, H, W, 3) '
                    f'array, got {type(images).__name__}'
                    + (f' of shape {images.shape}' if isinstance(images, np.ndarray) else ''))
  if len(images) == 0:
    raise ValueError('naflex_preprocess got no images')
  pixels_NxSxK = np.zeros((len(images), s, p * p * 3), np.float32)
  shapes_Nx2 = np.zeros((len(images), 2), np.int32)
  for i, image in enumerate(images):
    patches, shapes_Nx2[i] = _image_patches(image, p, s, config)
    pixels_NxSxK[i, :len(patches)] = patches
  mask_NxS = (np.arange(s) < shapes_Nx2.prod(1)[:, None]).astype(np.int32)
  return pixels_NxSxK, mask_NxS, shapes_Nx2


# ---------------------------------------------------------------- the image tower

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
  patches: (N, length, D), rows past h*w (padding) holding the grid's first position, as
  `Siglip2VisionEmbeddings.resize_positional_embeddings`. `shapes_Nx2` may be traced: the resize
  is a per-image pair of interpolation matrices, computed in fp32."""
  grid = math.isqrt(table_GGxD.shape[0])
  h_N, w_N = shapes_Nx2[:, 0], shapes_Nx2[:, 1]
  position_S = jnp.arange(length)
  real_NxS = position_S < (h_N * w_N)[:, None]
  rows_NxS = jnp.where(real_NxS, position_S // w_N[:, None], 0)
  cols_NxS = jnp.where(real_NxS, position_S % w_N[:, None], 0)
  table_GxGxD = table_GGxD.reshape(grid, grid, -1).astype(jnp.float32)
  return jnp.einsum('nsg,nsk,gkd->nsd', _axis_weights(rows_NxS, h_N, grid),
                    _axis_weights(cols_NxS, w_N, grid), table_GxGxD)


def tokens(params, pixels_NxSxK, lengths_N, shapes_Nx2, cfg, execution=configs.Execution()):
  """NaFlex patches -> the last block's tokens (N, S, D) in `execution.dtype`: the patch
  embedding (`conv1` as a Linear over (row, col, channel) patches), the resized positions, the
  blocks with each row attending to its first `lengths_N` tokens. `cfg` a VisionConfig."""
  dtype = jnp.dtype(execution.dtype)
  # conv1's OIHW kernel read as a Linear over patches flattened (row, col, channel).
  patches_NxSxPxQxC = pixels_NxSxK.reshape(*pixels_NxSxK.shape[:2], cfg.patch_size,
                                           cfg.patch_size, 3).astype(dtype)
  x_NxSxD = jnp.einsum('nspqc,ocpq->nso', patches_NxSxPxQxC,
                       params['conv1']['weight'].astype(dtype))
  if 'bias' in params['conv1']:
    x_NxSxD = x_NxSxD + params['conv1']['bias'].astype(dtype)
  positions = resized_positions(params['positional_embedding'], shapes_Nx2, x_NxSxD.shape[1])
  x_NxSxD = x_NxSxD + positions.astype(dtype)
  if 'ln_pre' in params:
    x_NxSxD = layers.norm(params['ln_pre'], x_NxSxD, cfg.norm, cfg.norm_eps)
  mask = layers.Mask(kv_lengths_N=lengths_N)
  return transformer.apply(params['transformer'], x_NxSxD, cfg, mask, execution=execution)


@functools.partial(jax.jit, static_argnames=('cfg',))
def _features(params, pixels_NxSxK, lengths_N, shapes_Nx2, cfg):
  visual, v = params['visual'], cfg.vision
  x_NxSxD = tokens(visual, pixels_NxSxK, lengths_N, shapes_Nx2, v, cfg.execution)
  real_NxS = jnp.arange(x_NxSxD.shape[1]) < lengths_N[:, None]
  return vit.pool(visual, x_NxSxD, v, cfg.execution, real_NxS).astype(jnp.float32)


# The image tower NaFlex runs: these settings, any block options (the blocks are
# `transformer.apply`'s), and other VisionConfig options only at their defaults (a new option is
# refused here until `tokens` runs it).
_NAFLEX_TOWER = dict(arch='vit', pool='map', pos_embedding='learned', registers=0)
_FREE = ('width', 'layers', 'heads', 'image_resolution', 'patch_size', 'ln_pre', 'patch_bias',
         'patch_dropout', 'projection_bias', 'pool_registers')


def _check_model(cfg):
  if not isinstance(cfg, configs.CLIPConfig):
    raise TypeError(f'expected a clip.CLIPConfig, got {type(cfg).__name__}')
  v = cfg.vision
  other = {k: getattr(v, k) for k, want in _NAFLEX_TOWER.items() if getattr(v, k) != want}
  free = set(_FREE) | {f.name for f in dataclasses.fields(configs.BlockOptions)}
  other.update({f.name: getattr(v, f.name) for f in dataclasses.fields(v)
                if f.name not in free | set(_NAFLEX_TOWER) and getattr(v, f.name) != f.default})
  if other:
    raise ValueError(f'NaFlex runs a SigLIP image tower ({_NAFLEX_TOWER}, other ViT options at '
                     f'their defaults); this one has {other}')


def _check_inputs(pixels_NxSxK, mask_NxS, shapes_Nx2, cfg):
  """Shapes always; values where they are concrete (not traced)."""
  p = cfg.vision.patch_size
  shape = getattr(pixels_NxSxK, 'shape', None)
  if shape is None or len(shape) != 3 or shape[2] != p * p * 3:
    raise ValueError(f'pixel_values must be (N, S, {p * p * 3}) (patches of {p} x {p} x 3 '
                     f'pixels, the model\'s patch_size {p}), got shape {shape}')
  if not jnp.issubdtype(pixels_NxSxK.dtype, jnp.floating):
    raise TypeError(f'pixel_values must be floating point (normalised), got dtype '
                    f'{pixels_NxSxK.dtype}')
  n, s = shape[:2]
  for name, x, want in (('pixel_attention_mask', mask_NxS, (n, s)),
                        ('spatial_shapes', shapes_Nx2, (n, 2))):
    if getattr(x, 'shape', None) != want:
      raise ValueError(f'{name} must be {want} for pixel_values {tuple(shape)}, got shape '
                       f'{getattr(x, "shape", None)}')
  if isinstance(shapes_Nx2, jax.core.Tracer) or isinstance(mask_NxS, jax.core.Tracer):
    return
  shapes_Nx2, mask_NxS = np.asarray(shapes_Nx2), np.asarray(mask_NxS)
  if not np.issubdtype(shapes_Nx2.dtype, np.integer) or (shapes_Nx2 < 1).any():
    raise ValueError(f'spatial_shapes must be positive ints (h, w), got {shapes_Nx2.tolist()}')
  if (shapes_Nx2.prod(1) > s).any():
    raise ValueError(f'spatial_shapes {shapes_Nx2.tolist()} hold more patches (h * w) than the '
                     f'{s} of pixel_values')
  lengths_N = (mask_NxS != 0).sum(1)
  if ((mask_NxS != 0) != (np.arange(s) < lengths_N[:, None])).any():
    raise ValueError('pixel_attention_mask must be each image\'s real patches first, then its '
                     'padding (1s then 0s per row, as Siglip2ImageProcessor pads)')
  if (lengths_N != shapes_Nx2.prod(1)).any():
    raise ValueError(f'pixel_attention_mask has {lengths_N.tolist()} real patches per image, '
                     f'but spatial_shapes say h * w = {shapes_Nx2.prod(1).tolist()}')


def encode_image_naflex(params, pixel_values, pixel_attention_mask, spatial_shapes, cfg):
  """NaFlex inputs (`naflex_preprocess`, or transformers' `Siglip2ImageProcessor`) -> (N,
  embed_dim) fp32 image features, not L2-normalised: `Siglip2Model.get_image_features(...)
  .pooler_output`.

  Args:
    params: a SigLIP model's parameters (`clip.load` of a `Siglip2Model` folder); the position
      table `visual.positional_embedding` is a square G x G grid.
    pixel_values: float (N, S, P*P*3) normalised patches, each flattened (row, column, channel).
    pixel_attention_mask: (N, S) ints or bools, nonzero for the real patches, which come first.
    spatial_shapes: ints (N, 2), each image's (h, w) patch grid, h*w real patches.
    cfg: the model's CLIPConfig; its vision tower a SigLIP ViT with patch size P.

  Each image sees the position table resized to its (h, w) grid (`resized_positions`); its
  padding is hidden from the blocks' attention and from the MAP head. Compiled once per shape
  of the inputs (batch size and S): the grids are traced values.

  Raises:
    TypeError / ValueError: a cfg that is not a SigLIP ViT tower, pixel_values whose last axis is
      not the model's P*P*3, masks or spatial_shapes of another batch or length; with concrete
      (not traced) values: a mask that is not 1s then 0s per row, grids with h*w > S or h*w not
      the mask's count of real patches.
  """
  _check_model(cfg)
  _check_inputs(pixel_values, pixel_attention_mask, spatial_shapes, cfg)
  lengths_N = (jnp.asarray(pixel_attention_mask) != 0).sum(1).astype(jnp.int32)
  return _features(params, jnp.asarray(pixel_values), lengths_N,
                   jnp.asarray(spatial_shapes, jnp.int32), cfg)
