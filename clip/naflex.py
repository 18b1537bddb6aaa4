"""SigLIP 2 NaFlex: images at their own aspect ratio, as a variable number of patches.

transformers' `Siglip2ImageProcessor` resizes each image (keeping its aspect ratio as far as whole
patches allow) to the largest size whose patch grid fits `max_num_patches`, cuts it into patches
flattened as (row, column, channel) and pads every image's sequence to `max_num_patches`.
`Siglip2Model` embeds the patches with a Linear layer, adds its square position table resized to
each image's (h, w) patch grid (bilinear, antialiased: `F.interpolate(mode='bilinear',
align_corners=False, antialias=True)`), masks the padding in its attention and in its MAP head.

`naflex_preprocess` is that processor (its PIL backend) and `encode_image_naflex` that image
tower (`clip.vit_naflex`, any of our ViT options; a SigLIP ViT with `visual.conv1.weight (D, 3,
P, P)`, the square `visual.positional_embedding (G*G, D)` and the MAP head is Siglip2Model's):
`clip.load` of a `Siglip2Model` folder gives it. The sizes travel as traced values: one compile
per (batch size, max_num_patches).
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
from clip import preprocess
from clip import vit_naflex
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

@functools.partial(jax.jit, static_argnames=('cfg',))
def _features(params, pixels_NxSxK, shapes_Nx2, cfg):
  return vit_naflex.features(params['visual'], pixels_NxSxK, shapes_Nx2, cfg.vision,
                             cfg.execution).astype(jnp.float32)


# The VisionConfig fields `clip.vit_naflex` runs at any value: a field added later is refused
# at a non-default value until the NaFlex tower runs it.
_KNOWN = ('arch', 'width', 'layers', 'heads', 'image_resolution', 'patch_size', 'pool',
          'pos_embedding', 'registers', 'pool_registers', 'ln_pre', 'patch_bias',
          'patch_dropout', 'rope_2d', 'rope_theta', 'rope_ref_grid', 'rope_grid_offset',
          'rope_xy', 'class_token', 'projection_bias')


def _check_model(cfg):
  if not isinstance(cfg, configs.CLIPConfig):
    raise TypeError(f'expected a clip.CLIPConfig, got {type(cfg).__name__}')
  v = cfg.vision
  if v.arch != 'vit':
    raise ValueError(f'NaFlex runs a ViT image tower (patches of their own grids); this model\'s '
                     f'is a {v.arch!r} (arch={v.arch!r}), which takes square images: use '
                     'clip.encode_image')
  known = set(_KNOWN) | {f.name for f in dataclasses.fields(configs.BlockOptions)}
  other = {f.name: getattr(v, f.name) for f in dataclasses.fields(v)
           if f.name not in known and getattr(v, f.name) != f.default}
  if other:
    raise ValueError(f'NaFlex runs the ViT options of clip.vit_naflex, the others only at their '
                     f'defaults; this tower has {other}')


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
    params: a ViT model's parameters (e.g. `clip.load` of a `Siglip2Model` folder); a learned
      position table `visual.positional_embedding` is a square G x G grid (after a class
      token's row).
    pixel_values: float (N, S, P*P*3) normalised patches, each flattened (row, column, channel).
    pixel_attention_mask: (N, S) ints or bools, nonzero for the real patches, which come first;
      checked against spatial_shapes, which alone then say which patches are real (h*w).
    spatial_shapes: ints (N, 2), each image's (h, w) patch grid, h*w real patches.
    cfg: the model's CLIPConfig; its vision tower a ViT with patch size P, any of its options
      (`clip.vit_naflex`).

  Each image sees its own grid's positions (a learned table resized to (h, w), sin-cos or 2-D
  RoPE per grid); its padding is hidden from the blocks' attention and from the pooling. Compiled
  once per shape of the inputs (batch size and S): the grids are traced values.

  Raises:
    TypeError / ValueError: a cfg that is not a ViT tower (a ResNet) or has an option NaFlex does
      not run, pixel_values whose last axis is not the model's P*P*3, masks or spatial_shapes of
      another batch or length; with concrete (not traced) values: a mask that is not 1s then 0s
      per row, grids with h*w > S or h*w not the mask's count of real patches.
  """
  _check_model(cfg)
  _check_inputs(pixel_values, pixel_attention_mask, spatial_shapes, cfg)
  return _features(params, jnp.asarray(pixel_values), jnp.asarray(spatial_shapes, jnp.int32), cfg)
