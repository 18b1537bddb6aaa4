"""Image preprocessing without torchvision: images -> normalised NHWC float32, each family's way.

OpenAI's `preprocess` is torchvision's `Resize(n_px, BICUBIC)`, `CenterCrop(n_px)`, RGB
conversion, `ToTensor()` and `Normalize(IMAGE_MEAN, IMAGE_STD)` on a PIL image. The same PIL
calls run here in the same order: the resize happens in the image's own mode (an RGBA image is
resized premultiplied, a palette image with nearest neighbours, as PIL does) and only the crop is
converted to RGB, so the result equals OpenAI's pixel for pixel.

The other resize modes are open_clip's (`open_clip.transform.image_transform`, eval branch), on
PIL images as torchvision runs them: 'squash' is `Resize((n, n))` (SigLIP; Hugging Face's
`SiglipImageProcessor` resizes the same way, after converting to RGB), 'longest' is timm's
`ResizeKeepRatio(longest=1)` (long side to n, the other `round(side / ratio)`) and
`CenterCropOrPad(n, fill)`. The mean, std, mode and interpolation come from a
`clip.PreprocessConfig`, and so do transformers' two differences (`convert_first`: RGB with
transparency on white before the resize; `crop_rounding='floor'`), which make it equal to
`CLIPImageProcessor` / `SiglipImageProcessor` (their PIL backend) for Hugging Face folders.
"""
import os

import numpy as np
from PIL import Image
from PIL import ImageOps

from clip import configs


def resized_size(width, height, n_px):
  """torchvision's rule: the short side becomes `n_px`, the long one `int(n_px * long / short)`."""
  short, long = (width, height) if width <= height else (height, width)
  new_short, new_long = n_px, int(n_px * long / short)
  return (new_short, new_long) if width <= height else (new_long, new_short)


def _open(path):
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'no image file at {path!r}')
  try:
    with Image.open(path) as image:
      image.load()  # decode now, while the file is open; a truncated file fails here
      return image
  except (OSError, SyntaxError, ValueError) as e:  # PIL's UnidentifiedImageError is an OSError
    raise ValueError(f'cannot read {path!r} as an image: {e}') from e


def to_pil(image):
  """A PIL image, an image file path, or a uint8 (H, W, 3) RGB array -> PIL image."""
  if isinstance(image, Image.Image):
    return image
  if isinstance(image, (str, os.PathLike)):
    return _open(image)
  if isinstance(image, np.ndarray):
    if image.dtype != np.uint8:
      raise TypeError(f'image arrays must be uint8 RGB (H, W, 3), got dtype {image.dtype}')
    if image.ndim != 3 or image.shape[-1] != 3:
      raise ValueError(f'image arrays must be uint8 RGB (H, W, 3), got shape {image.shape}')
    return Image.fromarray(image, 'RGB')
  raise TypeError('an image must be a PIL image, a file path or a uint8 (H, W, 3) array, '
                  f'got {type(image).__name__}')


_FILTERS = {'bicubic': Image.Resampling.BICUBIC, 'bilinear': Image.Resampling.BILINEAR}


def _offset(excess, rounding):
  """Where a centre crop starts: torchvision's `round(excess / 2)` or transformers' floor."""
  return int(round(excess / 2.0)) if rounding == 'round' else excess // 2


def _centre_crop(image, n_px, rounding):
  width, height = image.size
  top, left = _offset(height - n_px, rounding), _offset(width - n_px, rounding)
  return image.crop((left, top, left + n_px, top + n_px))


def resize_and_crop(image, n_px, interpolation='bicubic', crop_rounding='round'):
  """torchvision's `Resize(n_px)` then `CenterCrop(n_px)` on a PIL image (transformers'
  `CLIPImageProcessor` with `crop_rounding='floor'`)."""
  width, height = image.size
  size = resized_size(width, height, n_px)
  if size != (width, height):
    image = image.resize(size, _FILTERS[interpolation])
  # Both sides are >= n_px after the resize, so CenterCrop never pads.
  return _centre_crop(image, n_px, crop_rounding)


def rgb_on_white(image):
  """transformers' `convert_to_rgb` on a PIL image: transparency (an alpha band, or a palette's
  or grey image's transparent colour) composited onto white, then RGB."""
  if 'A' in image.getbands() or image.info.get('transparency') is not None:
    rgba = image.convert('RGBA')
    return Image.alpha_composite(Image.new('RGBA', rgba.size, (255, 255, 255, 255)),
                                 rgba).convert('RGB')
  return image.convert('RGB')


def squash(image, n_px, interpolation='bicubic'):
  """torchvision's `Resize((n_px, n_px))` on a PIL image: the aspect ratio is not kept."""
  if image.size == (n_px, n_px):
    return image
  return image.resize((n_px, n_px), _FILTERS[interpolation])


def resize_longest_and_pad(image, n_px, interpolation='bicubic', fill_color=0,
                           crop_rounding='round'):
  """open_clip's `ResizeKeepRatio(n_px, longest=1)` then `CenterCropOrPad(n_px, fill)`: the long
  side becomes `n_px`, the short one `round(side / ratio)`, then the image is centred on an
  `n_px` square of `fill_color` (a side that rounds past `n_px` is centre-cropped)."""
  width, height = image.size
  ratio = max(height / n_px, width / n_px)
  size = (round(width / ratio), round(height / ratio))
  if size != (width, height):
    image = image.resize(size, _FILTERS[interpolation])
  width, height = image.size
  if width < n_px or height < n_px:  # torchvision's F.pad: left/top get the floor of the half
    pad_w, pad_h = max(n_px - width, 0), max(n_px - height, 0)
    border = (pad_w // 2, pad_h // 2, (pad_w + 1) // 2, (pad_h + 1) // 2)
    padded = ImageOps.expand(image, border, _fill(image.mode, fill_color))
    if image.mode == 'P':  # as torchvision: the padding is palette index `fill_color`
      padded.putpalette(image.getpalette())
    image = padded
  return _centre_crop(image, n_px, crop_rounding)


def _fill(mode, fill_color):
  """torchvision pads a PIL image with `fill` in every band (a palette image with index `fill`)."""
  bands = len(Image.new(mode, (1, 1)).getbands())
  return fill_color if bands == 1 else (fill_color,) * bands


def transform(image, n_px, config=None):
  """One PIL image -> the `n_px` square RGB PIL image the `PreprocessConfig` `config` (OpenAI's
  by default) makes of it, before normalisation."""
  config = config or configs.PreprocessConfig()
  if config.convert_first:
    image = rgb_on_white(image)
  if config.resize_mode == 'shortest':
    image = resize_and_crop(image, n_px, config.interpolation, config.crop_rounding)
  elif config.resize_mode == 'squash':
    image = squash(image, n_px, config.interpolation)
  else:
    image = resize_longest_and_pad(image, n_px, config.interpolation, config.fill_color,
                                   config.crop_rounding)
  return image.convert('RGB')


def _check_resolution(resolution):
  if (isinstance(resolution, bool) or not isinstance(resolution, (int, np.integer))
      or resolution < 1):
    raise ValueError(f'resolution must be a positive int (the model\'s image_resolution), '
                     f'got {resolution!r}')


def preprocess_image(image, resolution, config=None):
  """One image (PIL, path, or uint8 (H, W, 3)) -> (resolution, resolution, 3) float32: resized as
  the `PreprocessConfig` `config` says (default OpenAI's: short side to `resolution`, bicubic,
  centre crop), RGB, normalised with its mean and std."""
  _check_resolution(resolution)
  config = config or configs.PreprocessConfig()
  x_HxWx3 = np.asarray(transform(to_pil(image), int(resolution), config), np.float32)
  mean = np.asarray(config.mean, np.float32)
  std = np.asarray(config.std, np.float32)
  return (x_HxWx3 / np.float32(255) - mean) / std


def preprocess(images, resolution, config=None):
  """A sequence of images (PIL, paths, uint8 (H, W, 3) arrays, mixed) or a uint8 (N, H, W, 3)
  array -> (N, resolution, resolution, 3) float32, ready for `clip.encode_image`; `config` a
  `PreprocessConfig` (default OpenAI's). `clip.preprocess_images(images, cfg)` takes the model's
  own."""
  _check_resolution(resolution)
  if isinstance(images, (str, os.PathLike, Image.Image)) or (
      isinstance(images, np.ndarray) and images.ndim != 4):
    raise TypeError('preprocess expects a sequence of images or a uint8 (N, H, W, 3) array, got '
                    f'{_describe(images)}; use preprocess_image for a single image')
  if not isinstance(images, (list, tuple, np.ndarray)):
    raise TypeError(f'preprocess expects a list of images, got {type(images).__name__}')
  if len(images) == 0:
    raise ValueError('preprocess got no images')
  r = int(resolution)
  return np.stack([preprocess_image(image, r, config) for image in images])


def _describe(x):
  if isinstance(x, np.ndarray):
    return f'an array of shape {x.shape}'
  return type(x).__name__
