"""Image transforms inside tf.data: decode, OpenAI's eval crop, random resized crop, normalise.

The eval transform is OpenAI's `preprocess` (torchvision `Resize(n, BICUBIC)` of the short side,
`CenterCrop(n)`) written with tf ops, so it runs in tf.data's threads without the GIL. It follows
PIL step by step (accurate JPEG IDCT, width pass then height pass, each rounded to uint8) and
lands within one uint8 level of OpenAI's preprocessing. The train transform is the random resized
crop CLIP models are trained with (open_clip's scale (0.9, 1.0), bicubic), decoding a JPEG inside
the crop window only. Randomness is stateless: the crop of an image is a function of its seed,
whatever thread computes it. Normalisation uses `clip.IMAGE_MEAN` / `clip.IMAGE_STD`.
"""
import tensorflow as tf

from clip import configs

# tf.data runs on the host: keep a GPU build of TensorFlow off the accelerators JAX uses (it would
# reserve their memory). Too late only if TensorFlow already initialised them on purpose.
try:
  tf.config.set_visible_devices([], 'GPU')
except RuntimeError:
  pass

TRAIN_SCALE = (0.9, 1.0)
TRAIN_RATIO = (3 / 4, 4 / 3)
JPEG_DCT = 'INTEGER_ACCURATE'  # PIL's (libjpeg's JDCT_ISLOW)


def decode(image_bytes):
  """JPEG / PNG / WebP / GIF / BMP bytes -> uint8 (H, W, 3); grey is repeated, alpha dropped.

  JPEGs use the accurate integer IDCT, as PIL does (tf's default, the fast one, is up to 7
  levels off). Bytes that are not an image raise `tf.errors.InvalidArgumentError`; the reader
  turns that into a counted, skipped record."""
  image = tf.cond(
      tf.io.is_jpeg(image_bytes),
      lambda: tf.io.decode_jpeg(image_bytes, channels=3, dct_method=JPEG_DCT),
      lambda: tf.io.decode_image(image_bytes, channels=3, expand_animations=False,
                                 dtype=tf.uint8))
  image.set_shape([None, None, 3])
  return image


def _resize_pass(image_HxWx3, size_hw):
  x = tf.image.resize(image_HxWx3, size_hw, method='bicubic', antialias=True)
  return tf.cast(tf.clip_by_value(tf.round(x), 0.0, 255.0), tf.uint8)


def _resize_to_uint8(image_HxWx3, size_hw):
  """PIL's bicubic resize: antialiased when shrinking, width first, then height, each pass
  rounded and clipped to uint8 (the clip between passes matters where the kernel overshoots)."""
  height = tf.shape(image_HxWx3)[0]
  wide = _resize_pass(image_HxWx3, tf.stack([height, size_hw[1]]))
  return _resize_pass(wide, size_hw)


def resized_size(width, height, n_px):
  """torchvision's `Resize(n_px)`: short side -> n_px, long side -> int(n_px * long / short);
  `clip.preprocess.resized_size` on tensors, in its (width, height) order -> (new_w, new_h)."""
  w, h = tf.cast(width, tf.float64), tf.cast(height, tf.float64)
  short, long = tf.minimum(h, w), tf.maximum(h, w)
  new_long = tf.cast(tf.floor(n_px * long / short), tf.int32)
  new_w = tf.where(width <= height, n_px, new_long)
  new_h = tf.where(width <= height, new_long, n_px)
  return new_w, new_h


def center_crop(image_u8, n_px):
  """OpenAI's eval transform on a uint8 (H, W, 3) image -> uint8 (n_px, n_px, 3)."""
  shape = tf.shape(image_u8)
  height, width = shape[0], shape[1]
  new_w, new_h = resized_size(width, height, n_px)
  image_u8 = tf.cond(
      tf.logical_and(tf.equal(new_h, height), tf.equal(new_w, width)),
      lambda: image_u8, lambda: _resize_to_uint8(image_u8, tf.stack([new_h, new_w])))
  # torchvision's CenterCrop: int(round((size - n) / 2)), round half to even as Python's round.
  top = tf.cast(tf.round(tf.cast(new_h - n_px, tf.float64) / 2.0), tf.int32)
  left = tf.cast(tf.round(tf.cast(new_w - n_px, tf.float64) / 2.0), tf.int32)
  crop = image_u8[top:top + n_px, left:left + n_px]
  crop.set_shape([n_px, n_px, 3])
  return crop


def _crop_window(image_shape, seed, scale, ratio):
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
      image_shape, bounding_boxes=tf.zeros([1, 0, 4], tf.float32), seed=seed,
      min_object_covered=0.0, aspect_ratio_range=ratio, area_range=scale, max_attempts=10,
      use_image_if_no_bounding_boxes=True)
  return begin[:2], size[:2]


def _resize_crop(crop_u8, n_px):
  """A crop -> (n_px, n_px). Shrinking by up to 1.5x uses plain bicubic (4x cheaper than the
  antialiased kernel; the aliasing of so small a step is negligible), more uses antialiasing."""
  side = tf.cast(tf.reduce_max(tf.shape(crop_u8)[:2]), tf.float32)
  resize = lambda aa: tf.image.resize(crop_u8, [n_px, n_px], method='bicubic', antialias=aa)
  x = tf.cond(side > 1.5 * n_px, lambda: resize(True), lambda: resize(False))
  out = tf.cast(tf.clip_by_value(tf.round(x), 0.0, 255.0), tf.uint8)
  out.set_shape([n_px, n_px, 3])
  return out


def random_resized_crop(image_bytes, n_px, seed, scale=TRAIN_SCALE, ratio=TRAIN_RATIO):
  """Encoded image -> a random crop covering `scale` of its area with aspect ratio in `ratio`,
  resized to (n_px, n_px, 3) uint8. `seed` is a stateless seed, int (2,): same seed, same crop.

  A JPEG is decoded inside the crop window only (`decode_and_crop_jpeg`), other formats whole."""
  def jpeg():
    begin, size = _crop_window(tf.image.extract_jpeg_shape(image_bytes), seed, scale, ratio)
    window = tf.concat([begin, size], 0)
    return tf.io.decode_and_crop_jpeg(image_bytes, window, channels=3, dct_method=JPEG_DCT)

  def other():
    image = decode(image_bytes)
    begin, size = _crop_window(tf.shape(image), seed, scale, ratio)
    return tf.slice(image, tf.concat([begin, [0]], 0), tf.concat([size, [3]], 0))

  crop = tf.cond(tf.io.is_jpeg(image_bytes), jpeg, other)
  crop.set_shape([None, None, 3])
  return _resize_crop(crop, n_px)


def normalize_image(image_u8):
  """uint8 (..., 3) -> float32 normalised with OpenAI's mean and std: `clip.normalize_image` of
  the image / 255, as one multiply-add (a third of the memory passes of cast, divide, subtract,
  divide; equal to float32 rounding)."""
  scale = tf.constant([1 / (255 * s) for s in configs.IMAGE_STD], tf.float32)
  offset = tf.constant([-m / s for m, s in zip(configs.IMAGE_MEAN, configs.IMAGE_STD)], tf.float32)
  return tf.cast(image_u8, tf.float32) * scale + offset
