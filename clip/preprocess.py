"""OpenAI's image preprocessing, without torchvision: images -> normalised NHWC float32.

OpenAI's `preprocess` is torchvision's `Resize(n_px, BICUBIC)`, `CenterCrop(n_px)`, RGB
conversion, `ToTensor()` and `Normalize(IMAGE_MEAN, IMAGE_STD)` on a PIL image. The same PIL
calls run here in the same order: the resize happens in the image's own mode (an RGBA image is
resized premultiplied, a palette image with nearest neighbours, as PIL does) and only the crop is
converted to RGB, so the result equals OpenAI's pixel for pixel.
"""
import os

import numpy as np
from PIL import Image

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


def resize_and_crop(image, n_px):
  """torchvision's `Resize(n_px, BICUBIC)` then `CenterCrop(n_px)` on a PIL image."""
  width, height = image.size
  size = resized_size(width, height, n_px)
  if size != (width, height):
    image = image.resize(size, Image.Resampling.BICUBIC)
  width, height = image.size
  # Both sides are >= n_px after the resize, so CenterCrop never pads.
  top = int(round((height - n_px) / 2.0))
  left = int(round((width - n_px) / 2.0))
  return image.crop((left, top, left + n_px, top + n_px))


def _check_resolution(resolution):
  if (isinstance(resolution, bool) or not isinstance(resolution, (int, np.integer))
      or resolution < 1):
    raise ValueError(f'resolution must be a positive int (the model\'s image_resolution), '
                     f'got {resolution!r}')


def preprocess_image(image, resolution):
  """One image (PIL, path, or uint8 (H, W, 3)) -> (resolution, resolution, 3) float32, OpenAI's
  preprocessing: short side resized to `resolution` (bicubic), centre crop, RGB, normalised."""
  _check_resolution(resolution)
  crop = resize_and_crop(to_pil(image), int(resolution)).convert('RGB')
  x_HxWx3 = np.asarray(crop, np.float32) / np.float32(255)
  mean = np.asarray(configs.IMAGE_MEAN, np.float32)
  std = np.asarray(configs.IMAGE_STD, np.float32)
  return (x_HxWx3 - mean) / std


def preprocess(images, resolution):
  """A sequence of images (PIL, paths, uint8 (H, W, 3) arrays, mixed) or a uint8 (N, H, W, 3)
  array -> (N, resolution, resolution, 3) float32, ready for `clip.encode_image`."""
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
  return np.stack([preprocess_image(image, r) for image in images])


def _describe(x):
  if isinstance(x, np.ndarray):
    return f'an array of shape {x.shape}'
  return type(x).__name__
