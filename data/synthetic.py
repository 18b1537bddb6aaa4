"""A built-in captioned dataset: drawn shapes described by templated captions (numpy only).

Each sample shows `count` (1-3) objects of one `shape` (circle, square, triangle, diamond,
cross, hexagon), `colour` (8 hues) and `size` (small, medium, large), stacked in one column
(`position`: left, middle, right) over a background `texture` (plain, striped, checkered,
dotted, speckled) of a random muted colour. Its caption says so in one of several templates,
some of which leave attributes out, as alt-text does.

Everything about sample `i` is a hash of (seed, split, i): any sample can be drawn on its own, a
global batch is the same whatever the number of processes, and resuming needs nothing but the
index of the next sample (at any batch size). Six (shape, colour) pairs never occur in the
'train' split; the 'heldout' split holds only them, so zero-shot accuracy on it measures
composition, not memory. `classnames` and `prompts` give the classification views (e.g. "a photo
of a red triangle.").

  ds = SyntheticCaptions(seed=0, resolution=cfg.image_resolution)
  b = ds.batch(256, step=0)       # {'image': uint8 (256, R, R, 3), 'caption': [...], ...}
  tokenize = functools.partial(clip.get_tokenizer(cfg), truncate=True)
  for batch in ds.batches(256, tokenize=tokenize, preprocess=cfg.preprocess):
    ...                           # model-ready: {'image': float32 normalised, 'tokens': int32}
  ds.write_tfrecords('shards/', num_examples=10_000, num_shards=8)   # img2dataset's shards
  ds.write_webdataset('shards/', num_examples=10_000, num_shards=8)   # ... or its tars
"""
import numpy as np

from data import model_inputs
from data import processes

SHAPES = ('circle', 'square', 'triangle', 'diamond', 'cross', 'hexagon')
SHAPES_PLURAL = ('circles', 'squares', 'triangles', 'diamonds', 'crosses', 'hexagons')
COLOURS = ('red', 'orange', 'yellow', 'green', 'blue', 'purple', 'pink', 'white')
RGB = np.array([(220, 30, 30), (250, 135, 10), (245, 225, 20), (30, 165, 50), (30, 70, 225),
                (135, 40, 190), (250, 120, 190), (250, 250, 250)], np.int32)
SIZES = ('small', 'medium', 'large')
RADII = (0.07, 0.10, 0.14)          # fraction of the image side
COUNTS = ('one', 'two', 'three')    # count c is stored as the label c - 1
POSITIONS = ('left', 'middle', 'right')
POSITION_WORDS = ('on the left', 'in the middle', 'on the right')
TEXTURES = ('plain', 'striped', 'checkered', 'dotted', 'speckled')
ATTRIBUTES = {'shape': SHAPES, 'colour': COLOURS, 'size': SIZES, 'count': COUNTS,
              'position': POSITIONS, 'texture': TEXTURES}
SPLITS = ('train', 'heldout', 'all')
# Where each use of a seed reads in a split, so that its uses never share a sample: pre-training
# streams from index 0 (a run here sees far fewer than 10^9 samples), the others start beyond.
UNSEEN_START = 10**9            # pre-training never saw these: evaluation, probe fits, fine-tuning
FINETUNE_UNSEEN_START = 2 * 10**9   # fine-tuning (which reads from UNSEEN_START) never saw these
LIT_START_STEP = 10**6          # LiT's text-tower batches: steps beyond any pre-training run
# (shape, colour) pairs absent from 'train': every shape once, six different colours.
HELDOUT = tuple((s, (3 * s + 1) % len(COLOURS)) for s in range(len(SHAPES)))
TASKS = ('colour_shape', *ATTRIBUTES)
TEMPLATES = (
    '{count} {size} {colour} {shapes} {position} on a {texture} background.',
    'a photo of {count} {size} {colour} {shapes} {position}.',
    '{count} {colour} {shapes}, {size}, {position}, {texture} background.',
    'a {texture} background with {count} {size} {colour} {shapes} {position}.',
    '{count} {size} {colour} {shapes}.',
    '{position}: {count} {colour} {shapes} on a {texture} background.',
)
PROMPTS = {
    'colour_shape': 'a photo of a {}.', 'shape': 'a photo of a {}.',
    'colour': 'a photo of a {} shape.', 'size': 'a photo of a {} shape.',
    'count': 'a photo of {}.', 'position': 'a photo of a shape {}.',
    'texture': 'a photo of a shape on a {} background.',
}

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _mix(x):
  """splitmix64's finaliser on uint64 arrays: a bijection that scrambles all bits."""
  with np.errstate(over='ignore'):
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _uniform(key, index_N, stream):
  """Uniform floats in [0, 1), a pure function of (key, index, stream)."""
  with np.errstate(over='ignore'):
    x = _mix(np.uint64(key) ^ _mix(index_N.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
                                   + np.uint64(stream)))
  return (x >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def _pick(key, index_N, stream, n):
  return np.minimum((_uniform(key, index_N, stream) * n).astype(np.int32), n - 1)


def _texture_masks(resolution):
  """Boolean (H, W) patterns, a few variants of each texture; index 0 of 'plain' is all False."""
  yy, xx = np.mgrid[0:resolution, 0:resolution] + 0.5
  masks = {'plain': [np.zeros((resolution, resolution), bool)]}
  periods = [max(2.0, resolution / k) for k in (6, 9, 12)]
  masks['striped'] = [((coord / p) % 2) < 1 for p in periods for coord in (yy, xx, xx + yy)]
  masks['checkered'] = [((yy // p + xx // p) % 2) == 1 for p in periods]
  masks['dotted'] = [((yy % p - p / 2) ** 2 + (xx % p - p / 2) ** 2) < (p / 5) ** 2 + 0.3
                     for p in periods]
  rng = np.random.default_rng(0)
  masks['speckled'] = []
  for cell in (1, 2, 3):
    small = rng.random((-(-resolution // cell),) * 2) < 0.5
    masks['speckled'].append(np.kron(small, np.ones((cell, cell), bool))[:resolution, :resolution])
  return [np.stack(masks[t]) for t in TEXTURES]


def _shape_mask(shape, dy, dx, r):
  """Pixels inside a shape of 'radius' r centred at 0 (dy, dx: offsets of pixel centres)."""
  ay, ax = np.abs(dy), np.abs(dx)
  if shape == 0:                                        # circle
    return dy * dy + dx * dx <= r * r
  if shape == 1:                                        # square (same area scale as the circle)
    return np.maximum(ay, ax) <= 0.85 * r
  if shape == 2:                                        # triangle, apex up
    h = 1.5 * r
    return (dy <= 0.5 * r) & (dy >= -r) & (ax <= (dy + r) / h * r * 1.15)
  if shape == 3:                                        # diamond
    return ay + ax <= 1.15 * r
  if shape == 4:                                        # cross
    arm = 0.35 * r
    return ((ay <= arm) & (ax <= r)) | ((ax <= arm) & (ay <= r))
  s3 = np.sqrt(3) / 2                                   # hexagon, flat top
  return (ay <= s3 * r) & (s3 * ax + 0.5 * ay <= s3 * r)


class SyntheticCaptions:
  """Captioned shapes, deterministic from `seed`; `split` in 'train', 'heldout', 'all'."""

  def __init__(self, seed=0, resolution=64, split='train'):
    if split not in SPLITS:
      raise ValueError(f'split must be one of {SPLITS}, got {split!r}')
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 16:
      raise ValueError(f'resolution must be an int >= 16, got {resolution!r}')
    self.seed, self.resolution, self.split = int(seed), resolution, split
    self._key = int(_mix(np.uint64(self.seed) * np.uint64(len(SPLITS))
                         + np.uint64(SPLITS.index(split))))
    self._textures = _texture_masks(resolution)

  # ---------------------------------------------------------------- attributes and captions

  def attributes(self, indices):
    """Labels of samples `indices`: {name: int32 (N,)} for shape, colour, size, count (c - 1),
    position, texture, and the drawing parameters (template, jitter) used by `get`."""
    idx = np.asarray(indices, np.int64).reshape(-1)
    if idx.size and idx.min() < 0:
      raise ValueError(f'sample indices must be >= 0, got {idx.min()}')
    k = self._key
    shape = _pick(k, idx, 0, len(SHAPES))
    heldout = np.array([c for _, c in HELDOUT], np.int32)[shape]
    if self.split == 'heldout':
      colour = heldout
    else:
      colour = _pick(k, idx, 1, len(COLOURS) - (self.split == 'train'))
      if self.split == 'train':  # skip the held-out colour of this shape
        colour = colour + (colour >= heldout)
    return {'shape': shape, 'colour': colour, 'size': _pick(k, idx, 2, len(SIZES)),
            'count': _pick(k, idx, 3, len(COUNTS)), 'position': _pick(k, idx, 4, len(POSITIONS)),
            'texture': _pick(k, idx, 5, len(TEXTURES)),
            'template': _pick(k, idx, 6, len(TEMPLATES))}

  def captions(self, attrs):
    """Captions for `attributes(...)`."""
    out = []
    for i in range(len(attrs['shape'])):
      count = int(attrs['count'][i])
      shape = int(attrs['shape'][i])
      out.append(TEMPLATES[attrs['template'][i]].format(
          count='a' if count == 0 else COUNTS[count], size=SIZES[attrs['size'][i]],
          colour=COLOURS[attrs['colour'][i]],
          shapes=SHAPES[shape] if count == 0 else SHAPES_PLURAL[shape],
          position=POSITION_WORDS[attrs['position'][i]], texture=TEXTURES[attrs['texture'][i]]))
    return out

  # ----------------------------------------------------------------------------- drawing

  def _layout(self, idx, attrs):
    """Object centres (N, 3, 2) in [0, 1] (y, x) and radii (N,); slots >= count are unused."""
    k, n = self._key, len(idx)
    r = np.asarray(RADII)[attrs['size']]
    count = attrs['count'] + 1
    margin = 0.02
    col = (attrs['position'] + 0.5) / 3
    slack_x = np.maximum(1 / 6 - r - margin, 0)
    centres = np.zeros((n, 3, 2))
    for slot in range(3):
      jx = _uniform(k, idx, 10 + slot) * 2 - 1
      jy = _uniform(k, idx, 20 + slot) * 2 - 1
      cell = 1 / count
      slack_y = np.maximum(cell / 2 - r - margin, 0)
      centres[:, slot, 0] = (slot + 0.5) * cell + jy * slack_y
      centres[:, slot, 1] = col + jx * slack_x
    return centres, r

  def _colours(self, idx, attrs):
    """Object RGB (N, 3) with a little jitter; background pair (N, 2, 3), muted, contrasting."""
    k = self._key
    jitter = np.stack([_uniform(k, idx, 30 + c) for c in range(3)], -1) * 24 - 12
    obj = np.clip(RGB[attrs['colour']] + jitter, 0, 255)
    grey = 85 + _uniform(k, idx, 33) * 80
    tint = np.stack([_uniform(k, idx, 34 + c) for c in range(3)], -1) * 30 - 15
    base = grey[:, None] + tint
    sign = np.where(_uniform(k, idx, 37) < 0.5, -1.0, 1.0)[:, None]
    second = base + sign * 40
    bg = np.clip(np.stack([base, second], 1), 0, 255)
    return obj.astype(np.uint8), bg.astype(np.uint8)

  def _draw(self, idx, attrs):
    n, res = len(idx), self.resolution
    centres, radii = self._layout(idx, attrs)
    obj, bg = self._colours(idx, attrs)
    variant = _uniform(self._key, idx, 40)
    images = np.empty((n, res, res, 3), np.uint8)
    for i in range(n):
      masks = self._textures[attrs['texture'][i]]
      pattern = masks[int(variant[i] * len(masks))]
      np.take(bg[i], pattern.view(np.uint8), axis=0, out=images[i])
      r = radii[i] * res
      for slot in range(attrs['count'][i] + 1):
        cy, cx = centres[i, slot] * res
        y0, y1 = max(int(cy - r) - 1, 0), min(int(cy + r) + 2, res)
        x0, x1 = max(int(cx - r) - 1, 0), min(int(cx + r) + 2, res)
        dy = (np.arange(y0, y1) + 0.5 - cy)[:, None]
        dx = (np.arange(x0, x1) + 0.5 - cx)[None, :]
        window = images[i, y0:y1, x0:x1]
        window[_shape_mask(attrs['shape'][i], dy, dx, r)] = obj[i]
    return images

  def get(self, indices):
    """Samples `indices`: {'image': uint8 (N, H, W, 3), 'caption': list of str, 'index': int64
    (N,), and one int32 (N,) label per attribute (see ATTRIBUTES; count is c - 1)}."""
    idx = np.asarray(indices, np.int64).reshape(-1)
    attrs = self.attributes(idx)
    out = {'image': self._draw(idx, attrs), 'caption': self.captions(attrs), 'index': idx}
    out.update({name: attrs[name] for name in ATTRIBUTES})
    return out

  def batch(self, batch_size, step=0):
    """Samples [step * batch_size, (step + 1) * batch_size), as `get`."""
    if batch_size < 1 or step < 0:
      raise ValueError(f'need batch_size >= 1 and step >= 0, got {batch_size}, {step}')
    return self.get(np.arange(step * batch_size, (step + 1) * batch_size))

  def batches(self, global_batch_size, *, tokenize, preprocess, start_step=0, start_example=None,
              num_steps=None, process_index=0, process_count=1, image_dtype='float32',
              teacher=None):
    """Model-ready batches, this process's share of each global batch:
    {'image': float32 normalised (or uint8) (B, H, W, 3), 'tokens': int32 (B, L)}. Endless unless
    `num_steps`. The k-th batch yielded holds samples [first + k * global_batch_size,
    first + (k + 1) * global_batch_size), where `first` is `start_example`, or else
    `start_step * global_batch_size`: a run resumed at another batch size continues at the next
    unseen sample when given that sample's index (`start_example`).

    `tokenize` is the model's tokenizer, texts -> int (N, L) (e.g.
    `functools.partial(clip.get_tokenizer(cfg), truncate=True)`), `preprocess` its
    `clip.PreprocessConfig` (`cfg.preprocess`). The images are drawn at the set's resolution,
    the model's, so only its mean and std apply: its resize mode and interpolation do not (every
    mode leaves an image already at the model's size as it is).

    `teacher`: a distillation teacher's `data.model_inputs.TeacherInputs`; batches then add
    `'teacher_image'` (the same samples drawn at the teacher's resolution, normalised with its
    mean and std, or uint8) and `'teacher_tokens'` (the captions through its tokenizer)."""
    model_inputs.check_tokenize(tokenize)
    model_inputs.check_preprocess(preprocess)
    if teacher is not None:
      teacher_set = SyntheticCaptions(self.seed, teacher.checked().resolution, self.split)
    local = processes.local_batch_size(global_batch_size, process_count)
    model_inputs.check_image_dtype(image_dtype)
    if start_step < 0 or (start_example is not None and (start_step or start_example < 0)):
      raise ValueError('give start_step >= 0 or start_example >= 0 (not both), got start_step='
                       f'{start_step}, start_example={start_example}')
    first = start_step * global_batch_size if start_example is None else start_example
    step = 0
    while num_steps is None or step < num_steps:
      start = first + step * global_batch_size + process_index * local
      indices = np.arange(start, start + local)
      sample = self.get(indices)
      out = {'image': _model_pixels(sample['image'], preprocess, image_dtype),
             'tokens': np.asarray(tokenize(sample['caption']), np.int32)}
      if teacher is not None:
        out['teacher_image'] = _model_pixels(teacher_set.get(indices)['image'],
                                             teacher.preprocess, image_dtype)
        out['teacher_tokens'] = np.asarray(teacher.tokenize(sample['caption']), np.int32)
      yield out
      step += 1

  # ------------------------------------------------------------------ classification views

  @staticmethod
  def classnames(task='colour_shape'):
    """Class names of a task: 'colour_shape' ('red circle', ... colour-major) or an attribute."""
    if task == 'colour_shape':
      return [f'{c} {s}' for c in COLOURS for s in SHAPES]
    if task in ATTRIBUTES:
      return list(POSITION_WORDS if task == 'position' else ATTRIBUTES[task])
    raise ValueError(f'task must be one of {TASKS}, got {task!r}')

  @classmethod
  def prompts(cls, task='colour_shape', template=None):
    """One prompt per class, e.g. 'a photo of a red circle.'."""
    template = template or PROMPTS.get(task, '{}')
    names = ('one shape', 'two shapes', 'three shapes') if task == 'count' else cls.classnames(task)
    return [template.format(name) for name in names]

  @staticmethod
  def labels(sample, task='colour_shape'):
    """The int32 (N,) labels of `sample` (from `get` / `batch`) for `task`."""
    if task == 'colour_shape':
      return (sample['colour'] * len(SHAPES) + sample['shape']).astype(np.int32)
    if task in ATTRIBUTES:
      return sample[task]
    raise ValueError(f'task must be one of {TASKS}, got {task!r}')

  # ------------------------------------------------------------------ captions as text

  @classmethod
  def texts(cls):
    """Every word and punctuation the set writes, in context: per template and count, each
    attribute value once (the others fixed), and every prompt of every task. Tokenizers split words
    independently, so their tokens are those of every caption (`caption_token_ids`)."""
    out = []
    for template in range(len(TEMPLATES)):
      for name in ('shape', 'colour', 'size', 'count', 'position', 'texture'):
        for value in range(len(ATTRIBUTES[name])):
          for count in range(len(COUNTS)):  # nouns are singular or plural by the count
            attrs = {k: np.zeros(1, np.int32) for k in ATTRIBUTES}
            attrs.update(template=np.full(1, template), count=np.full(1, count))
            attrs[name] = np.full(1, value)
            out += cls.captions(cls, attrs)
    return out + [p for task in TASKS for p in cls.prompts(task)]

  @staticmethod
  def parse_caption(text):
    """A caption's (shape, colour, size, count) as the set's labels, -1 where the text names
    none or several (a generated caption is scored by them): the shape from its singular or
    plural noun, the count from 'two' / 'three', else one when the noun is singular."""
    words = text.lower().replace(',', ' ').replace('.', ' ').replace(':', ' ').split()
    def one(names):
      found = {i for i, n in enumerate(names) if n in words}
      return found.pop() if len(found) == 1 else -1
    singular, plural = one(SHAPES), one(SHAPES_PLURAL)
    shape = singular if plural == -1 else (plural if singular == -1 else -1)
    number = one(COUNTS[1:])  # 'two' -> 0, 'three' -> 1
    count = -1
    if singular >= 0 and plural == -1 and number == -1:
      count = 0
    elif plural >= 0 and singular == -1 and number >= 0:
      count = number + 1
    return {'shape': shape, 'colour': one(COLOURS), 'size': one(SIZES), 'count': count}

  # ------------------------------------------------------------------- img2dataset export

  def write_tfrecords(self, out_dir, num_examples, num_shards, image_format='jpg', quality=95,
                      start=0, batch_size=256):
    """Samples [start, start + num_examples) as img2dataset tfrecord shards `00000.tfrecord`...
    with img2dataset's metadata and the attribute labels as int64 features, and its `.parquet`
    beside each shard; returns the shard paths (`data.synthetic_shards`, needs tensorflow)."""
    # Local: it needs tensorflow, which this module does not, and it imports this module.
    from data import synthetic_shards  # pylint: disable=g-import-not-at-top
    return synthetic_shards.write_tfrecords(self, out_dir, num_examples, num_shards, image_format,
                                            quality, start, batch_size)

  def write_webdataset(self, out_dir, num_examples, num_shards, image_format='jpg', quality=95,
                       start=0, batch_size=256):
    """Samples [start, start + num_examples) as img2dataset webdataset shards `00000.tar`...:
    `{key}.{image_format}`, `{key}.txt` and `{key}.json` (img2dataset's metadata and the attribute
    labels), and its `.parquet` beside each shard; returns the tar paths
    (`data.synthetic_shards`, needs tensorflow)."""
    # Local: it needs tensorflow, which this module does not, and it imports this module.
    from data import synthetic_shards  # pylint: disable=g-import-not-at-top
    return synthetic_shards.write_webdataset(self, out_dir, num_examples, num_shards,
                                             image_format, quality, start, batch_size)


def caption_token_ids(tokenize, eot_id):
  """The sorted ids `tokenize(texts)` (rows: start token, ids, end-of-text token `eot_id`,
  padding) gives the set's captions and prompts, up to each row's first `eot_id`: a decoder's
  `output_ids` shortlist for this set (`DecoderConfig.output_ids`). Raises ValueError if a row
  has no `eot_id` (a tokenizer that truncated it, or another end-of-text id)."""
  rows = np.asarray(tokenize(SyntheticCaptions.texts()))
  is_eot = rows == eot_id
  if not is_eot.any(axis=1).all():
    row = int(np.argmin(is_eot.any(axis=1)))
    raise ValueError(f'tokenized row {row} has no end-of-text id {eot_id}: {rows[row].tolist()}')
  caption = np.cumsum(is_eot, axis=1) - is_eot == 0  # up to and including the first eot_id
  return tuple(sorted(int(t) for t in np.unique(rows[caption])))


def _model_pixels(image_u8, preprocess, image_dtype):
  """uint8 images as a model reads them: normalised float32 with its mean and std, or as they
  are (`image_dtype='uint8'`)."""
  if image_dtype != 'float32':
    return image_u8
  mean = np.asarray(preprocess.mean, np.float32)
  std = np.asarray(preprocess.std, np.float32)
  return (image_u8.astype(np.float32) / np.float32(255) - mean) / std
