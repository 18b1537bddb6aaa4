"""SigLIP 2's NaFlex inputs inside tf.data: each image at its own aspect ratio, as patches.

`clip.naflex_preprocess` (transformers' `Siglip2ImageProcessor`, PIL) written with tf ops, so it
runs in tf.data's threads: `target_size` is its float64 bisection (the same operations, so the
same sizes), the resize is `data.transforms`' PIL-equal one (the model's interpolation: PIL's
bilinear for SigLIP 2; within one uint8 level of PIL), then the model's mean and std, patches in
raster order flattened (row, column, channel), zeros up to the step's sequence length S.

Training first takes a crop that keeps the aspect ratio (`crop_window`): a share `scale` of the
image's area, its aspect ratio within `ratio` times the image's own, the seed stateless as in
`transforms.random_resized_crop`. An image with a side smaller than one patch is reported
(`too_small`), never upscaled: the pipelines count it as a skip.

Batches follow a `data.naflex_batching.NaFlexBatching`: `StepPlan` is this process's (or one
mixture source's) share of it, and `batches` gives step g the length `seq_len(g)` and its number
of images, from any starting step (so a resumed run continues exactly):

  {'patches': float32 (B, S, P*P*3), 'spatial_shapes': int32 (B, 2), ...}
"""
import numpy as np
import tensorflow as tf

from data import naflex_batching
from data import transforms

_CHUNK = 256  # steps the plan computes at a time
_HALVINGS = 8  # of target_size's bisection per loop iteration
# transforms' PIL-equal resize: width pass then height pass, each rounded to uint8 as PIL rounds.
_pil_resize = transforms._resized  # pylint: disable=protected-access


def target_size(height, width, patch_size, max_num_patches, eps=1e-5):
  """`clip.naflex.target_size` in tf: the (height, width) in pixels, int32 scalars, that
  Siglip2ImageProcessor resizes a (height, width) image to, the largest scale (bisected to `eps`
  in [eps / 10, 100], in float64 as Python) whose sides, each rounded up to whole patches (at
  least one), make at most `max_num_patches` patches. `max_num_patches` may be a tensor.

  The same float64 operations as Python, so the same sizes. A tf.while_loop of `_HALVINGS`
  halvings per iteration, each a no-op once the interval is below eps (24 for eps 1e-5): half
  the time of one per iteration, a smaller graph than all unrolled (faster to build)."""
  hw = tf.cast(tf.stack([height, width]), tf.float64)
  p = tf.constant(patch_size, tf.float64)
  budget = tf.cast(max_num_patches, tf.float64)

  def sides(scale):
    return tf.maximum(p, tf.math.ceil(hw * scale / p) * p)

  def halvings(low, high):
    for _ in range(_HALVINGS):
      scale = (low + high) / 2
      fits = tf.reduce_prod(sides(scale) / p) <= budget
      active = high - low >= eps
      low, high = tf.where(active & fits, scale, low), tf.where(active & ~fits, scale, high)
    return low, high

  low, _ = tf.while_loop(lambda low, high: high - low >= eps, halvings,
                         (tf.constant(eps / 10, tf.float64), tf.constant(100.0, tf.float64)))
  out = tf.cast(sides(low), tf.int32)
  return out[0], out[1]


def crop_window(height, width, seed, scale, ratio, attempts=10):
  """A random crop keeping the aspect ratio: `(begin, size)`, int32 (2,) each, (row, col).

  As torchvision's RandomResizedCrop, up to `attempts` draws of an area (a share of the image's
  in `scale`) and a log-uniform aspect ratio, here relative: `ratio` times the image's own; the
  first that fits is placed uniformly, else the whole image. `seed` is a stateless seed, int
  (2,): the same seed gives the same crop."""
  u = tf.random.stateless_uniform([attempts, 4], seed, dtype=tf.float64)
  area = scale[0] + (scale[1] - scale[0]) * u[:, 0]
  log_lo, log_hi = np.log(ratio[0]), np.log(ratio[1])
  relative = tf.exp(log_lo + (log_hi - log_lo) * u[:, 1])
  h, w = tf.cast(height, tf.float64), tf.cast(width, tf.float64)
  crop_h, crop_w = tf.round(h * tf.sqrt(area / relative)), tf.round(w * tf.sqrt(area * relative))
  fits = (crop_h >= 1) & (crop_h <= h) & (crop_w >= 1) & (crop_w <= w)
  top, left = tf.floor(u[:, 2] * (h - crop_h + 1)), tf.floor(u[:, 3] * (w - crop_w + 1))
  first, any_fits = tf.argmax(tf.cast(fits, tf.int32)), tf.reduce_any(fits)
  size = tf.where(any_fits, tf.stack([crop_h[first], crop_w[first]]), tf.stack([h, w]))
  begin = tf.where(any_fits, tf.stack([top[first], left[first]]), tf.zeros(2, tf.float64))
  return tf.cast(begin, tf.int32), tf.cast(size, tf.int32)


def too_small(shape, patch_size):
  """Whether an image of `shape` (H, W, ...) has a side below one patch."""
  return tf.reduce_any(shape[:2] < patch_size)


def decode_and_crop(image_bytes, patch_size, seed=None, scale=transforms.TRAIN_SCALE,
                    ratio=transforms.TRAIN_RATIO, on_white=False):
  """Encoded image -> `(uint8 (h, w, 3), too_small)`: the whole image (`seed` None, evaluation)
  or a `crop_window` of it (training; a JPEG decoded inside the window only); `too_small` when
  the image (before any crop) has a side below `patch_size` (a crop may have one: `patchify`
  resizes it to its grid like any image). `on_white` as `transforms.decode`."""
  if seed is None:
    image = transforms.decode(image_bytes, on_white)
    return image, too_small(tf.shape(image), patch_size)

  def jpeg():
    shape = tf.image.extract_jpeg_shape(image_bytes, tf.int32)
    begin, size = crop_window(shape[0], shape[1], seed, scale, ratio)
    crop = tf.io.decode_and_crop_jpeg(image_bytes, tf.concat([begin, size], 0), channels=3,
                                      dct_method=transforms.JPEG_DCT)
    return crop, shape[:2]

  def other():
    image = transforms.decode(image_bytes, on_white)
    shape = tf.shape(image)
    begin, size = crop_window(shape[0], shape[1], seed, scale, ratio)
    return tf.slice(image, tf.concat([begin, [0]], 0), tf.concat([size, [3]], 0)), shape[:2]

  crop, shape = tf.cond(tf.io.is_jpeg(image_bytes), jpeg, other)
  crop.set_shape([None, None, 3])
  return crop, too_small(shape, patch_size)


def patchify(image_u8, patch_size, seq_len, preprocess):
  """uint8 (H, W, 3) -> `(patches float32 (S, P*P*3), spatial_shape int32 (2,))`, as
  `clip.naflex_preprocess`: resized to `target_size` by `preprocess.interpolation`, normalised
  by its mean and std, cut into the (h, w) grid's patches in raster order, each flattened (row,
  column, channel), zeros after the h*w real ones. `seq_len` (S, may be a tensor) >= h*w."""
  p = patch_size
  shape = tf.shape(image_u8)
  new_h, new_w = target_size(shape[0], shape[1], p, seq_len)
  resized = _pil_resize(image_u8, new_h, new_w, preprocess.interpolation)
  x = transforms.normalize_image(resized, preprocess.mean, preprocess.std)
  grid_h, grid_w = new_h // p, new_w // p
  x = tf.transpose(tf.reshape(x, [grid_h, p, grid_w, p, 3]), [0, 2, 1, 3, 4])
  x = tf.reshape(x, [grid_h * grid_w, p * p * 3])
  x = tf.pad(x, [[0, tf.cast(seq_len, tf.int32) - grid_h * grid_w], [0, 0]])
  x.set_shape([None, p * p * 3])
  return x, tf.stack([grid_h, grid_w])


def check_crop(scale, ratio):
  """(scale, ratio) as floats, or ValueError: 0 < scale[0] <= scale[1] <= 1 (shares of the
  image's area) and 0 < ratio[0] <= 1 <= ratio[1] (times the image's own aspect ratio)."""
  def pair(x):
    try:
      return tuple(float(v) for v in x)
    except (TypeError, ValueError):
      return ()

  low_high = pair(scale)
  if len(low_high) != 2 or not 0 < low_high[0] <= low_high[1] <= 1:
    raise ValueError(f'scale must be (low, high) shares of the image area with 0 < low <= high '
                     f'<= 1, got {scale!r}')
  relative = pair(ratio)
  if len(relative) != 2 or not 0 < relative[0] <= 1 <= relative[1]:
    raise ValueError(f'ratio must be (low, high) with 0 < low <= 1 <= high (times the image\'s '
                     f'own aspect ratio), got {ratio!r}')
  return low_high, relative


def plan_for(naflex, process_count, global_batch_size, resolution, image_dtype):
  """A pipeline's `naflex` argument as this process's `StepPlan` (None: fixed resolution, which
  needs `global_batch_size` and `resolution`), the other arguments checked against it (ValueError
  or TypeError naming them): NaFlex sizes each image and batch itself and yields float32."""
  if naflex is None:
    if global_batch_size is None or resolution is None:
      raise ValueError('a fixed-resolution pipeline needs global_batch_size and resolution (or '
                       'naflex=NaFlexBatching(...)), got global_batch_size='
                       f'{global_batch_size!r}, resolution={resolution!r}')
    return None
  plan = naflex if isinstance(naflex, StepPlan) else StepPlan.for_process(naflex, process_count)
  if resolution is not None:
    raise ValueError(f'NaFlex resizes each image to its own patch grid: pass resolution=None, '
                     f'got {resolution!r}')
  if global_batch_size is not None and global_batch_size != plan.batching.batch_size:
    raise ValueError(f'NaFlex batch sizes come from naflex ({plan.batching}): pass '
                     f'global_batch_size=None, got {global_batch_size!r}')
  if image_dtype != 'float32':
    raise ValueError(f"NaFlex batches are normalised patches: image_dtype must be 'float32', got "
                     f'{image_dtype!r}')
  return plan


def _check_batching(batching):
  if not isinstance(batching, naflex_batching.NaFlexBatching):
    raise TypeError(f'naflex must be a data.naflex_batching.NaFlexBatching, got '
                    f'{type(batching).__name__}')
  return batching


class StepPlan:
  """The images this process (or one mixture source) reads at each step of a NaFlexBatching.

  Args:
    batching: the run's `NaFlexBatching` (global: all processes, all sources).
    local_sizes: {S: images per step of length S here}, one for every length.

  `for_process(batching, process_count)` is a process's even share.
  """

  def __init__(self, batching, local_sizes):
    _check_batching(batching)
    if sorted(local_sizes) != list(batching.seq_lengths) or min(local_sizes.values()) < 1:
      raise ValueError(f'local_sizes must give at least one image for each length '
                       f'{batching.seq_lengths}, got {local_sizes}')
    self.batching = batching
    self.patch_size = batching.patch_size
    self.seq_lengths = batching.seq_lengths
    self.sizes_K = np.asarray([local_sizes[s] for s in self.seq_lengths], np.int64)

  @classmethod
  def for_process(cls, batching, process_count):
    """Each of `process_count` processes' share: the global batch of each length divided by the
    process count (ValueError where it does not divide: raise batch_multiple)."""
    shapes = _check_batching(batching).shapes()
    uneven = [(b, s) for b, s in shapes if b % process_count]
    if uneven:
      raise ValueError(f'NaFlex batches {uneven} (images, length) cannot be shared by '
                       f'{process_count} processes: make batch_multiple a multiple of the '
                       f'process count')
    return cls(batching, {s: b // process_count for b, s in shapes})

  def sizes(self, steps):
    """(length index, S, images here) of each step in `steps` (int arrays)."""
    seq = self.batching.seq_len(np.asarray(steps, np.int64))
    index = np.searchsorted(self.seq_lengths, seq)
    return index, seq, self.sizes_K[index]

  def start_of(self, step, records_per_epoch):
    """`(epoch, record)` where step `step` starts when no record is skipped: every epoch holds
    `records_per_epoch` samples, and a step whose batch the rest of an epoch cannot fill is
    dropped and read from the next epoch's start, as the pipelines do."""
    c = np.concatenate([[0], np.cumsum(self.sizes(np.arange(step + 1))[2])])
    epoch, first = 0, 0
    while c[step + 1] - c[first] > records_per_epoch:
      last = int(np.searchsorted(c, c[first] + records_per_epoch, 'right')) - 1
      if last == first:
        raise ValueError(f'an epoch of {records_per_epoch} records does not fill step {first}\'s '
                         f'batch of {c[first + 1] - c[first]} images')
      epoch, first = epoch + 1, last
    return epoch, int(c[step] - c[first])

  def _chunks(self, start):
    for first in range(int(start), 2**62, _CHUNK):
      steps = np.arange(first, first + _CHUNK, dtype=np.int64)
      index, seq, size = self.sizes(steps)
      yield steps, seq, size, steps * len(self.seq_lengths) + index

  def dataset(self, start_step):
    """Endless: one element per image slot, step after step from `start_step`:
    {'_step', '_seq_len', '_size' (the step's images here), '_key' (step and length index)}."""
    spec = tuple(tf.TensorSpec([_CHUNK], tf.int64) for _ in range(4))
    chunks = tf.data.Dataset.from_generator(self._chunks, args=(start_step,),
                                            output_signature=spec)
    names = ('_step', '_seq_len', '_size', '_key')
    return chunks.unbatch().flat_map(
        lambda *x: tf.data.Dataset.from_tensors(dict(zip(names, x))).repeat(x[2]))


def batches(samples, plan, start_step, preprocess, image_key='image'):
  """Samples in order (dicts with a uint8 (h, w, 3) `image_key`) -> the batches of the plan's
  steps from `start_step`: the image replaced by `'patches'` float32 (B, S, P*P*3) and
  `'spatial_shapes'` int32 (B, 2) (`patchify` at the step's S), plus `'_step'` and `'_size'`
  (B,) int64, the step and its full batch here (a last batch may hold fewer)."""
  def patches(sample, slot):
    out = {k: v for k, v in sample.items() if k != image_key}
    out['patches'], out['spatial_shapes'] = patchify(sample[image_key], plan.patch_size,
                                                     slot['_seq_len'], preprocess)
    out.update(slot)
    return out

  sizes = tf.constant(plan.sizes_K)
  count = len(plan.seq_lengths)
  size_of = lambda key: tf.gather(sizes, key % count)
  ds = tf.data.Dataset.zip((samples, plan.dataset(start_step)))
  ds = ds.map(patches, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.group_by_window(lambda x: x['_key'], lambda key, w: w.batch(size_of(key)),
                          window_size_func=size_of)
  return ds.map(lambda b: {k: v for k, v in b.items() if k not in ('_key', '_seq_len')})
