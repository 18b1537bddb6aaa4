"""The built-in set at native aspect ratio: two small shapes whose caption says where they are.

Each scene has one of five aspect ratios (`BUCKETS`, width:height 1:4 to 4:1, about the pixel
area of a `resolution` square) and holds two objects, each a shape and a colour of
`data.synthetic`'s and a pattern, side by side along the scene's long axis (either axis in a
square one). Its caption names both and their layout: "a striped red circle left of a solid
blue square." in a wide scene, "... above ..." in a tall one, either object named first ("a solid
blue square right of a striped red circle."); some templates name only the shapes, the colours
or the patterns, as alt-text leaves things out.

Each object is solid or striped: stripes one pixel wide across the layout axis, alternately
`1 + STRIPE` and `1 - STRIPE` times its colour. A model that squashes every scene to the square
(a fixed-resolution model at the same patch budget) halves the long axis of a 4:1 scene, and the
resize's filter averages each pair of stripes back to the solid colour: the pattern the caption
names is gone (partly, at 2:1). A NaFlex model at the same budget keeps the scene at its own
aspect ratio and about its resolution (`batches_naflex`) and can read it (exactly where the
budget tiles the scene, e.g. 4:1 at R=64, P=8, S=64; resampled a little otherwise). Evaluation:
`data.synthetic_layout_eval`.

Everything about sample `i` is a hash of (seed, split, i), its bucket `i % 5`: any sample can be
drawn on its own, and resuming needs nothing but the index of the next sample. Three unordered
pairs of shapes ({circle, diamond}, {square, cross}, {triangle, hexagon}: `HELDOUT_PAIRS`) never
meet in a 'train' scene; the 'heldout' split holds only them.

  ds = LayoutCaptions(seed=0, resolution=64)
  s = ds.get(range(5))        # {'image': list of uint8 (H, W, 3), 'caption': [...], ...}
  for batch in ds.batches_naflex(batching, tokenize=tokenize, preprocess=cfg.preprocess):
    ...                       # {'patches', 'spatial_shapes', 'tokens'} (the NaFlex contract)
  for batch in ds.batches(256, tokenize=tokenize, preprocess=cfg.preprocess):
    ...                       # {'image': float32 (B, R, R, 3) squashed, 'tokens'}
"""
import math

import numpy as np

from clip import naflex
from clip import preprocess as image_preprocess
from data import model_inputs
from data import processes
from data import synthetic
# The set's hash and drawing helpers are synthetic.py's: one generator for both built-in sets.
from data.synthetic import _mix  # pylint: disable=protected-access
from data.synthetic import _pick  # pylint: disable=protected-access
from data.synthetic import _shape_mask  # pylint: disable=protected-access
from data.synthetic import _uniform  # pylint: disable=protected-access

SHAPES, COLOURS = synthetic.SHAPES, synthetic.COLOURS
# (width, height) ratios; sample i has bucket i % len(BUCKETS). Named width x height: '4x1' is
# four times as wide as tall.
BUCKETS = ((1, 4), (1, 2), (1, 1), (2, 1), (4, 1))
BUCKET_NAMES = tuple(f'{w}x{h}' for w, h in BUCKETS)
AXES = ('horizontal', 'vertical')
# The words of each axis: the first object (left / top) `[0]` the second, or the second `[1]`
# the first.
RELATIONS = (('left of', 'right of'), ('above', 'below'))
PATTERNS = ('solid', 'striped')
RADIUS = 0.11            # object radius as a fraction of the square bucket's side, +-15%
STRIPE = 0.33            # stripes: the colour times 1 + STRIPE and 1 - STRIPE, alternately
SHADE = 0.7              # objects: the palette's colours times SHADE, room for the stripes
                         # ((1 + STRIPE) * SHADE * (250 + 12) < 255)
SPLITS = synthetic.SPLITS
UNSEEN_START = synthetic.UNSEEN_START
# Unordered shape pairs absent from 'train' (shape s with shape s + 3): every shape in one.
HELDOUT_PAIRS = tuple((s, s + len(SHAPES) // 2) for s in range(len(SHAPES) // 2))
TEMPLATES = (
    'a {pattern_a} {colour_a} {shape_a} {relation} a {pattern_b} {colour_b} {shape_b}.',
    'a photo of a {pattern_a} {colour_a} {shape_a} {relation} a {pattern_b} {colour_b} '
    '{shape_b}.',
    'a {shape_a} {relation} a {shape_b}.',
    'a {colour_a} shape {relation} a {colour_b} shape.',
    'a {pattern_a} shape {relation} a {pattern_b} shape.',
)
OBJECT_LABELS = ('shape', 'colour', 'pattern')
VOCABULARY = {'shape': SHAPES, 'colour': COLOURS, 'pattern': PATTERNS}
LABELS = ('bucket', 'axis', *(f'{name}_{o}' for name in OBJECT_LABELS
                              for o in ('first', 'second')), 'swap', 'template')
_SALT = 0x4C41594F5554   # 'LAYOUT': other keys than synthetic.py's for the same seed


def bucket_size(bucket, resolution):
  """(height, width) in pixels of `bucket` (an index of BUCKETS) for a `resolution` square."""
  w, h = BUCKETS[bucket]
  return round(resolution * math.sqrt(h / w)), round(resolution * math.sqrt(w / h))


def _second_shape(key, idx, first, split):
  """The second object's shape: any other ('all'), not first's held-out partner ('train'), or
  only that partner ('heldout')."""
  half = len(SHAPES) // 2
  if split == 'heldout':
    return (first + half) % len(SHAPES)
  if split == 'all':
    return (first + 1 + _pick(key, idx, 3, len(SHAPES) - 1)) % len(SHAPES)
  offset = 1 + _pick(key, idx, 3, len(SHAPES) - 2)        # 1, 2, 3, 4 -> skip `half`
  return (first + offset + (offset >= half)) % len(SHAPES)


def _parse_object(phrase, text):
  """{'shape', 'colour', 'pattern'} of an object's phrase ('a striped red circle', 'a red shape',
  'a photo of a circle'): the words after its last 'a', -1 for what it leaves out."""
  words = phrase.split()
  words = words[len(words) - words[::-1].index('a'):] if 'a' in words else []
  named = {name: [vocab.index(w) for w in words if w in vocab]
           for name, vocab in VOCABULARY.items()}
  known = sum(len(v) for v in named.values()) + words.count('shape')
  if not words or known != len(words) or any(len(v) > 1 for v in named.values()):
    raise ValueError(f'not a layout caption: {text!r} (object {phrase!r})')
  return {name: v[0] if v else -1 for name, v in named.items()}


class LayoutCaptions:
  """Two captioned shapes per scene at five aspect ratios, deterministic from `seed`; `split` in
  'train', 'heldout', 'all'; `resolution` the side of the square bucket (R), the model's
  `image_resolution` (the fixed-resolution view squashes every scene to R x R)."""

  def __init__(self, seed=0, resolution=64, split='train'):
    if split not in SPLITS:
      raise ValueError(f'split must be one of {SPLITS}, got {split!r}')
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 32:
      raise ValueError(f'resolution must be an int >= 32 (the 1:4 bucket is R/2 wide), got '
                       f'{resolution!r}')
    self.seed, self.resolution, self.split = int(seed), resolution, split
    self._key = int(_mix(np.uint64(self.seed) * np.uint64(len(SPLITS))
                         + np.uint64(SPLITS.index(split)) + np.uint64(_SALT)))

  # ---------------------------------------------------------------- attributes and captions

  def attributes(self, indices):
    """Labels of samples `indices`: {name: int32 (N,)} for LABELS. 'first' is the left (or top)
    object; 'swap' 1 when the caption names the second one first."""
    idx = np.asarray(indices, np.int64).reshape(-1)
    if idx.size and idx.min() < 0:
      raise ValueError(f'sample indices must be >= 0, got {idx.min()}')
    k = self._key
    bucket = (idx % len(BUCKETS)).astype(np.int32)
    wide = np.array([w > h for w, h in BUCKETS])[bucket]
    tall = np.array([w < h for w, h in BUCKETS])[bucket]
    axis = np.where(wide, 0, np.where(tall, 1, _pick(k, idx, 1, len(AXES))))
    first = _pick(k, idx, 2, len(SHAPES))
    colour = _pick(k, idx, 4, len(COLOURS))
    return {'bucket': bucket, 'axis': axis.astype(np.int32), 'shape_first': first,
            'shape_second': _second_shape(k, idx, first, self.split).astype(np.int32),
            'colour_first': colour,
            'colour_second': (colour + 1 + _pick(k, idx, 5, len(COLOURS) - 1)) % len(COLOURS),
            'pattern_first': _pick(k, idx, 8, len(PATTERNS)),
            'pattern_second': _pick(k, idx, 9, len(PATTERNS)),
            'swap': _pick(k, idx, 6, 2), 'template': _pick(k, idx, 7, len(TEMPLATES))}

  @staticmethod
  def captions(attrs):
    """Captions for `attributes(...)` (any dict of int arrays with LABELS' keys but 'bucket')."""
    out = []
    for i in range(len(attrs['axis'])):
      swap = int(attrs['swap'][i])
      words = {f'{name}_{ab}': VOCABULARY[name][attrs[f'{name}_{o}'][i]]
               for name in OBJECT_LABELS
               for ab, o in (('a', ('first', 'second')[swap]), ('b', ('second', 'first')[swap]))}
      out.append(TEMPLATES[attrs['template'][i]].format(
          relation=RELATIONS[attrs['axis'][i]][swap], **words))
    return out

  @staticmethod
  def parse_caption(text):
    """A caption's labels back: {'axis', 'swap', '<shape|colour|pattern>_<first|second>'}, -1
    for what it leaves out. ValueError for a text no template wrote."""
    relation = [r for r in sum(RELATIONS, ()) if f' {r} ' in text]
    if len(relation) != 1 or not text.endswith('.'):
      raise ValueError(f'not a layout caption: {text!r}')
    axis = next(i for i, pair in enumerate(RELATIONS) if relation[0] in pair)
    swap = RELATIONS[axis].index(relation[0])
    named = [_parse_object(part, text) for part in text[:-1].split(f' {relation[0]} ')]
    first, second = named[::-1] if swap else named
    out = {'axis': axis, 'swap': swap}
    for name in OBJECT_LABELS:
      out.update({f'{name}_first': first[name], f'{name}_second': second[name]})
    return out

  # ----------------------------------------------------------------------------- drawing

  def _centres(self, idx, attrs):
    """Pixel centres (N, 2, 2) (object, (y, x)) and radii (N,): along the long axis the first
    object in the first half, the second in the other, each within +-12% of the side of its
    quarter; across it near the middle (at most 10% of the long side off, so that the long axis
    is always the layout's)."""
    k = self._key
    radius_N = RADIUS * self.resolution * (0.85 + 0.3 * _uniform(k, idx, 10))
    sizes_Nx2 = np.array([bucket_size(b, self.resolution) for b in range(len(BUCKETS))]
                         )[attrs['bucket']].astype(np.float64)
    vertical = attrs['axis'] == 1
    long_N = np.where(vertical, sizes_Nx2[:, 0], sizes_Nx2[:, 1])
    short_N = np.where(vertical, sizes_Nx2[:, 1], sizes_Nx2[:, 0])
    centres = np.zeros((len(idx), 2, 2))
    for slot, middle in enumerate((0.25, 0.75)):
      along = long_N * (middle + 0.12 * (2 * _uniform(k, idx, 11 + slot) - 1))
      along = np.clip(along, radius_N + 1, long_N - radius_N - 1)
      spread = np.maximum(np.minimum(short_N / 2 - radius_N - 1, 0.1 * long_N), 0)
      across = short_N / 2 + spread * (2 * _uniform(k, idx, 13 + slot) - 1)
      centres[:, slot] = np.where(vertical[:, None], np.stack([along, across], -1),
                                  np.stack([across, along], -1))
    return centres, radius_N

  def _colours(self, idx, attrs):
    """Object RGB (N, 2, 3) float, the palette's (+-12) times SHADE; a plain dark muted
    background (N, 3) uint8."""
    k = self._key
    jitter = np.stack([_uniform(k, idx, 20 + c) for c in range(6)], -1).reshape(-1, 2, 3)
    palette = synthetic.RGB[np.stack([attrs['colour_first'], attrs['colour_second']], -1)]
    obj = SHADE * np.clip(palette + jitter * 24 - 12, 0, 255)
    tint = np.stack([_uniform(k, idx, 26 + c) for c in range(3)], -1) * 30 - 15
    background = 45 + _uniform(k, idx, 29)[:, None] * 60 + tint
    return obj, np.clip(background, 0, 255).astype(np.uint8)

  def _draw(self, idx, attrs):
    obj, background = self._colours(idx, attrs)
    centres, radius_N = self._centres(idx, attrs)
    images = []
    for i in range(len(idx)):
      height, width = bucket_size(attrs['bucket'][i], self.resolution)
      image = np.empty((height, width, 3), np.uint8)
      image[:] = background[i]
      # Across the layout axis: alternate columns (rows, for a vertical layout) of each stripe.
      along = np.arange(width)[None, :] if attrs['axis'][i] == 0 else np.arange(height)[:, None]
      stripes = np.broadcast_to(1 + STRIPE * (1 - 2 * (along % 2)), (height, width))
      for slot, (cy, cx) in enumerate(centres[i]):
        o = ('first', 'second')[slot]
        dy = (np.arange(height) + 0.5 - cy)[:, None]
        dx = (np.arange(width) + 0.5 - cx)[None, :]
        inside = _shape_mask(attrs[f'shape_{o}'][i], dy, dx, radius_N[i])
        factor = stripes[inside] if attrs[f'pattern_{o}'][i] else 1.0
        image[inside] = np.rint(np.outer(factor, obj[i, slot])).astype(np.uint8)
      images.append(image)
    return images

  def get(self, indices):
    """Samples `indices`: {'image': list of uint8 (H, W, 3) (each its bucket's size,
    `bucket_size`), 'caption': list of str, 'index': int64 (N,), and LABELS as int32 (N,)}."""
    idx = np.asarray(indices, np.int64).reshape(-1)
    attrs = self.attributes(idx)
    out = {'image': self._draw(idx, attrs), 'caption': self.captions(attrs), 'index': idx}
    out.update(attrs)
    return out

  # ---------------------------------------------------------------------- model batches

  def batches_naflex(self, batching, *, tokenize, preprocess, start_step=0, process_index=None,
                     process_count=None):
    """Endless NaFlex batches, this process's share of each global one: step g (from
    `start_step`) has `batching.step_shape(g)` = (B, S) and samples [e, e + B) with e =
    `batching.examples_before(g)`; {'patches': float32 (B', S, P*P*3), 'spatial_shapes': int32
    (B', 2), 'tokens': int32 (B', L)}, B' = B / process_count, the patches
    `clip.naflex_preprocess(images, P, S, preprocess)` (P = `batching.patch_size`).

    `tokenize`: the model's tokenizer, texts -> int (N, L); `preprocess`: its
    `clip.PreprocessConfig` (mean, std, interpolation). Checked here, before any batch: TypeError
    for another tokenize or preprocess, ValueError for a B of the plan that the process count
    does not divide or a negative start_step."""
    model_inputs.check_tokenize(tokenize)
    model_inputs.check_preprocess(preprocess)
    index, count = processes.process_share(process_index, process_count)
    for global_batch, _ in batching.shapes():
      processes.local_batch_size(global_batch, count)
    if start_step < 0:
      raise ValueError(f'start_step must be >= 0, got {start_step}')
    return self._naflex_stream(batching, tokenize, preprocess, start_step, index, count)

  def _naflex_stream(self, batching, tokenize, preprocess, step, index, count):
    first = batching.examples_before(step)
    while True:
      global_batch, seq_len = batching.step_shape(step)
      local = global_batch // count
      sample = self.get(np.arange(first + index * local, first + (index + 1) * local))
      patches, _, shapes = naflex.naflex_preprocess(sample['image'], batching.patch_size,
                                                    seq_len, preprocess)
      yield {'patches': patches, 'spatial_shapes': shapes,
             'tokens': np.asarray(tokenize(sample['caption']), np.int32)}
      step, first = step + 1, first + global_batch

  def batches(self, global_batch_size, *, tokenize, preprocess, start_example=None,
              start_step=0, process_index=None, process_count=None):
    """Endless fixed-resolution batches (the baseline's view), this process's share:
    {'image': float32 normalised (B', R, R, 3), 'tokens': int32 (B', L)}; the k-th holds samples
    [first + k * B, first + (k + 1) * B), first = `start_example` or `start_step * B`. Each scene
    is resized to R x R as `clip.preprocess_images` does with `preprocess`: 'squash' (SigLIP's),
    or 'longest' (letterboxed). Checked here, before any batch: ValueError for 'shortest' (its
    centre crop would cut the objects of a wide or tall scene out of the image its caption
    describes), a batch the process count does not divide, a bad start."""
    model_inputs.check_tokenize(tokenize)
    model_inputs.check_preprocess(preprocess)
    check_resize_mode(preprocess)
    index, count = processes.process_share(process_index, process_count)
    local = processes.local_batch_size(global_batch_size, count)
    if start_step < 0 or (start_example is not None and (start_step or start_example < 0)):
      raise ValueError('give start_step >= 0 or start_example >= 0 (not both), got start_step='
                       f'{start_step}, start_example={start_example}')
    first = start_step * global_batch_size if start_example is None else start_example
    return self._fixed_stream(global_batch_size, tokenize, preprocess, first, index, local)

  def _fixed_stream(self, global_batch_size, tokenize, preprocess, first, index, local):
    while True:
      sample = self.get(np.arange(first + index * local, first + (index + 1) * local))
      yield {'image': image_preprocess.preprocess(sample['image'], self.resolution, preprocess),
             'tokens': np.asarray(tokenize(sample['caption']), np.int32)}
      first += global_batch_size


def check_resize_mode(preprocess):
  """ValueError unless `preprocess.resize_mode` keeps both objects of every scene in view."""
  if preprocess.resize_mode == 'shortest':
    raise ValueError("the layout set's fixed-resolution view needs resize_mode 'squash' or "
                     "'longest': 'shortest' centre-crops a 4:1 scene to its middle half, cutting "
                     'out the objects its caption names')
