"""Image transforms inside tf.data: decode, a model's eval resize, random resized crop, normalise.

The eval transform is the model's own (`clip.PreprocessConfig`, as `clip.preprocess` runs it on
PIL images) written with tf ops, so it runs in tf.data's threads without the GIL: 'shortest' is
OpenAI's `preprocess` (torchvision `Resize(n)` of the short side, `CenterCrop(n)`), 'squash'
resizes both sides to n (SigLIP), 'longest' resizes the long side to n and centre-pads (open_clip's
`ResizeKeepRatio(longest=1)` + `CenterCropOrPad`), each bicubic or bilinear. It follows PIL step
by step (accurate JPEG IDCT, width pass then height pass, each rounded to uint8) and lands within
one uint8 level of `clip.preprocess`. The train transform is the random resized crop CLIP models
are trained with (open_clip's scale (0.9, 1.0), bicubic, whatever the eval transform), decoding a
JPEG inside the crop window only. Randomness is stateless: the crop of an image is a function of
its seed, whatever thread computes it. Normalisation uses the model's mean and std.
"""
import tensorflow as tf


# tf.data runs on the host: keep a GPU build of TensorFlow off the accelerators JAX uses (it would
# reserve their memory). Too late only if TensorFlow already initialised them on purpose.
try:
  tf.config.set_visible_devices([], 'GPU')
except RuntimeError:
  pass

TRAIN_SCALE = (0.9, 1.0)
TRAIN_RATIO = (3 / 4, 4 / 3)
JPEG_DCT = 'INTEGER_ACCURATE'  # PIL's (libjpeg's JDCT_ISLOW)


def decode(image_bytes, on_white=False):
  """JPEG / PNG / WebP / GIF / BMP bytes -> uint8 (H, W, 3); grey is repeated, alpha dropped, or
  with `on_white` (`PreprocessConfig.convert_first`, transformers' `convert_to_rgb`) transparency
  composited onto white as `clip.preprocess.rgb_on_white` does (GIFs decode without theirs).

  JPEGs use the accurate integer IDCT, as PIL does (tf's default, the fast one, is up to 7
  levels off). Bytes that are not an image raise `tf.errors.InvalidArgumentError`; the reader
  turns that into a counted, skipped record."""
  def rgb():
    return tf.io.decode_image(image_bytes, channels=3, expand_animations=False, dtype=tf.uint8)

  other = rgb
  if on_white:
    is_gif = tf.equal(tf.strings.substr(image_bytes, 0, 3), b'GIF')
    other = lambda: tf.cond(is_gif, rgb, lambda: _on_white(tf.io.decode_image(
        image_bytes, channels=4, expand_animations=False, dtype=tf.uint8)))
  image = tf.cond(
      tf.io.is_jpeg(image_bytes),
      lambda: tf.io.decode_jpeg(image_bytes, channels=3, dct_method=JPEG_DCT), other)
  image.set_shape([None, None, 3])
  return image


def _on_white(rgba_u8):
  """PIL's `alpha_composite` of an RGBA image onto opaque white, in its integer arithmetic (7
  fraction bits, its division by 255), as RGB: equal to PIL's."""
  x = tf.cast(rgba_u8, tf.int32)
  alpha = x[..., 3:]
  shift = tf.bitwise.right_shift
  total = 128 * (x[..., :3] * alpha + 255 * (255 - alpha)) + (0x80 << 7)
  return tf.cast(shift(shift(shift(total, 8) + total, 8), 7), tf.uint8)


def _resize_pass(image_HxWx3, size_hw, method):
  x = tf.image.resize(image_HxWx3, size_hw, method=method, antialias=True)
  # PIL rounds half up (its fixed point adds 0.5, then shifts): ties are common when upscaling.
  return tf.cast(tf.clip_by_value(tf.floor(x + 0.5), 0.0, 255.0), tf.uint8)


def _resize_to_uint8(image_HxWx3, size_hw, method):
  """PIL's bicubic or bilinear resize: antialiased when shrinking, width first, then height, each
  pass rounded and clipped to uint8 (the clip between passes matters where the kernel
  overshoots)."""
  height = tf.shape(image_HxWx3)[0]
  wide = _resize_pass(image_HxWx3, tf.stack([height, size_hw[1]]), method)
  return _resize_pass(wide, size_hw, method)


def _resized(image_u8, new_h, new_w, method):
  """`image_u8` resized to (new_h, new_w), left alone when it has that size already (as PIL)."""
  shape = tf.shape(image_u8)
  return tf.cond(
      tf.logical_and(tf.equal(new_h, shape[0]), tf.equal(new_w, shape[1])),
      lambda: image_u8, lambda: _resize_to_uint8(image_u8, tf.stack([new_h, new_w]), method))


def _offset(excess, rounding):
  """Where a centre crop starts: torchvision's int(round(excess / 2)) (half to even, as Python's
  round), or transformers' excess // 2 (`rounding='floor'`)."""
  if rounding == 'floor':
    return excess // 2
  return tf.cast(tf.round(tf.cast(excess, tf.float64) / 2.0), tf.int32)


def _centre_crop(image_u8, n_px, rounding='round'):
  """The centre `n_px` square of an image at least `n_px` on both sides."""
  shape = tf.shape(image_u8)
  top, left = _offset(shape[0] - n_px, rounding), _offset(shape[1] - n_px, rounding)
  crop = image_u8[top:top + n_px, left:left + n_px]
  crop.set_shape([n_px, n_px, 3])
  return crop


def resized_size(width, height, n_px):
  """torchvision's `Resize(n_px)`: short side -> n_px, long side -> int(n_px * long / short);
  `clip.preprocess.resized_size` on tensors, in its (width, height) order -> (new_w, new_h)."""
  w, h = tf.cast(width, tf.float64), tf.cast(height, tf.float64)
  short, long = tf.minimum(h, w), tf.maximum(h, w)
  new_long = tf.cast(tf.floor(n_px * long / short), tf.int32)
  new_w = tf.where(width <= height, n_px, new_long)
  new_h = tf.where(width <= height, new_long, n_px)
  return new_w, new_h


def center_crop(image_u8, n_px, interpolation='bicubic', crop_rounding='round'):
  """OpenAI's eval transform ('shortest') on a uint8 (H, W, 3) image -> uint8 (n_px, n_px, 3):
  the short side resized to `n_px`, then the centre crop."""
  shape = tf.shape(image_u8)
  new_w, new_h = resized_size(shape[1], shape[0], n_px)
  return _centre_crop(_resized(image_u8, new_h, new_w, interpolation), n_px, crop_rounding)


def squash(image_u8, n_px, interpolation='bicubic'):
  """'squash' (SigLIP's): both sides resized to `n_px`, the aspect ratio not kept."""
  out = _resized(image_u8, n_px, n_px, interpolation)
  out.set_shape([n_px, n_px, 3])
  return out


def resize_longest_and_pad(image_u8, n_px, interpolation='bicubic', fill_color=0,
                           crop_rounding='round'):
  """'longest': `clip.preprocess.resize_longest_and_pad` on tensors. The long side becomes
  `n_px`, the other `round(side / ratio)` (half to even, as Python's round), then the image is
  centred on an `n_px` square of `fill_color`: torchvision's pad gives the left / top the floor
  of the half, and a side past `n_px` is centre-cropped."""
  shape = tf.shape(image_u8)
  height, width = tf.cast(shape[0], tf.float64), tf.cast(shape[1], tf.float64)
  ratio = tf.maximum(height / n_px, width / n_px)
  new_h = tf.cast(tf.round(height / ratio), tf.int32)
  new_w = tf.cast(tf.round(width / ratio), tf.int32)
  image_u8 = _resized(image_u8, new_h, new_w, interpolation)
  pad_h, pad_w = tf.maximum(n_px - new_h, 0), tf.maximum(n_px - new_w, 0)
  padded = tf.pad(image_u8, [[pad_h // 2, pad_h - pad_h // 2], [pad_w // 2, pad_w - pad_w // 2],
                             [0, 0]], constant_values=tf.constant(fill_color, tf.uint8))
  return _centre_crop(padded, n_px, crop_rounding)


def eval_transform(image_u8, n_px, preprocess):
  """A decoded uint8 (H, W, 3) image (`decode(bytes, preprocess.convert_first)`) -> uint8
  (n_px, n_px, 3) by the model's resize (`preprocess.resize_mode`, `.interpolation`,
  `.crop_rounding`): `clip.preprocess.transform` in tf."""
  mode, interpolation, rounding = (preprocess.resize_mode, preprocess.interpolation,
                                   preprocess.crop_rounding)
  if mode == 'shortest':
    return center_crop(image_u8, n_px, interpolation, rounding)
  if mode == 'squash':
    return squash(image_u8, n_px, interpolation)
  return resize_longest_and_pad(image_u8, n_px, interpolation, preprocess.fill_color, rounding)


def sample_window(image_shape, seed, scale=TRAIN_SCALE, ratio=TRAIN_RATIO):
  """A random crop window of an image of `image_shape` (H, W, ...) covering `scale` of its area
  with aspect ratio in `ratio`: int32 (4,) `(top, left, height, width)` in its pixels. `seed` is
  a stateless seed, int (2,): same seed and shape, same window."""
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
      image_shape, bounding_boxes=tf.zeros([1, 0, 4], tf.float32), seed=seed,
      min_object_covered=0.0, aspect_ratio_range=ratio, area_range=scale, max_attempts=10,
      use_image_if_no_bounding_boxes=True)
  return tf.concat([begin[:2], size[:2]], 0)


def resize_crop(crop_u8, n_px):
  """A crop -> uint8 (n_px, n_px, 3). Shrinking by up to 1.5x uses plain bicubic (4x cheaper than
  the antialiased kernel; the aliasing of so small a step is negligible), more uses
  antialiasing."""
  side = tf.cast(tf.reduce_max(tf.shape(crop_u8)[:2]), tf.float32)
  resize = lambda aa: tf.image.resize(crop_u8, [n_px, n_px], method='bicubic', antialias=aa)
  x = tf.cond(side > 1.5 * n_px, lambda: resize(True), lambda: resize(False))
  out = tf.cast(tf.clip_by_value(tf.round(x), 0.0, 255.0), tf.uint8)
  out.set_shape([n_px, n_px, 3])
  return out


def _decode_window(image_bytes, window_fn, on_white):
  """`window_fn(image shape) -> window` applied to an encoded image -> (uint8 crop (h, w, 3),
  window int32 (4,)). A JPEG is decoded inside the window only (`decode_and_crop_jpeg`), other
  formats whole; a window outside the image raises `tf.errors.InvalidArgumentError`."""
  def jpeg():
    window = window_fn(tf.image.extract_jpeg_shape(image_bytes))
    return tf.io.decode_and_crop_jpeg(image_bytes, window, channels=3,
                                      dct_method=JPEG_DCT), window

  def other():
    image = decode(image_bytes, on_white)
    window = window_fn(tf.shape(image))
    return tf.slice(image, tf.concat([window[:2], [0]], 0),
                    tf.concat([window[2:], [3]], 0)), window

  crop, window = tf.cond(tf.io.is_jpeg(image_bytes), jpeg, other)
  crop.set_shape([None, None, 3])
  return crop, window


def random_crop(image_bytes, seed, scale=TRAIN_SCALE, ratio=TRAIN_RATIO, on_white=False):
  """Encoded image -> (uint8 crop (h, w, 3), its window int32 (4,) `(top, left, height, width)`):
  `sample_window`'s window, once, to be resized to any resolution (`resize_crop`; a student's and
  a teacher's view of one crop) or stored and replayed (`crop_at`). `on_white` as `decode`'s."""
  return _decode_window(image_bytes, lambda shape: sample_window(shape, seed, scale, ratio),
                        on_white)


def crop_at(image_bytes, window, on_white=False):
  """Encoded image -> uint8 crop (height, width, 3) of a given window, int (4,)
  `(top, left, height, width)` in its pixels (a stored `random_crop` window: the same pixels).
  A window outside the image raises `tf.errors.InvalidArgumentError`."""
  window = tf.cast(window, tf.int32)
  return _decode_window(image_bytes, lambda shape: window, on_white)[0]


def random_resized_crop(image_bytes, n_px, seed, scale=TRAIN_SCALE, ratio=TRAIN_RATIO,
                        on_white=False):
  """Encoded image -> a random crop covering `scale` of its area with aspect ratio in `ratio`,
  resized to (n_px, n_px, 3) uint8. `seed` is a stateless seed, int (2,): same seed, same crop.
  `on_white` as `decode`'s. `random_crop` then `resize_crop`.

  A JPEG is decoded inside the crop window only (`decode_and_crop_jpeg`), other formats whole."""
  return resize_crop(random_crop(image_bytes, seed, scale, ratio, on_white)[0], n_px)


def normalize_image(image_u8, mean, std):
  """uint8 (..., 3) -> float32 normalised with the model's RGB `mean` and `std`
  (`cfg.preprocess.mean`, `.std`): `clip.processing.normalize` of the image / 255, as one
  multiply-add (a third of the memory passes of cast, divide, subtract, divide; equal to float32
  rounding)."""
  scale = tf.constant([1 / (255 * s) for s in std], tf.float32)
  offset = tf.constant([-m / s for m, s in zip(mean, std)], tf.float32)
  return tf.cast(image_u8, tf.float32) * scale + offset
