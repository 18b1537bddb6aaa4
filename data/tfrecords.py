"""img2dataset tfrecords: a writer of its schema and the tf.data pipeline that trains on them.

img2dataset (`output_format="tfrecord"`) writes one `tf.train.Example` per sample: `key` (bytes),
the encoded image under its format's name (`jpg`, `png` or `webp`), the caption under `txt`, and
every metadata field as a feature of its own (ints as int64_list, strings as bytes_list): `url`,
`caption`, `width`, `height`, `original_width`, `original_height`, `sha256`, `status`, `exif`,
`error_message`, plus any column the user asked it to keep. Shards are `00000.tfrecord`, ...,
sample keys the shard id followed by the index in the shard (`000000012`).

`Pipeline` reads them for training or evaluation:

  files (glob or list; this process's share: files[process_index::process_count])
    -> interleaved reads (a truncated or corrupt file ends early and is reported)
    -> shuffle (training) -> decode, crop, resize, normalise: each record guarded so that a
       bad one becomes a counted skip instead of an error -> batch -> tokenise -> prefetch
    -> numpy {'image': float32 (B, n, n, 3), 'tokens': int32 (B, L)}

It is deterministic given the seed (file order, shuffle and crops are all seeded; the crop of a
sample depends only on the seed, the epoch and its position, never on thread timing), and it
resumes exactly from `state()` (a record position, so even with another batch size). Skipped
records are counted in `stats`, logged at the end of each epoch, and raise instead when
`on_error='raise'`.
"""
import dataclasses
import functools
import io
import logging
import os
import threading

import numpy as np
import tensorflow as tf

from data import transforms

IMAGE_FORMATS = ('jpg', 'png', 'webp')
# img2dataset's metadata fields and their feature types.
METADATA_TYPES = {
    'url': 'bytes', 'caption': 'bytes', 'status': 'bytes', 'error_message': 'bytes',
    'exif': 'bytes', 'sha256': 'bytes', 'md5': 'bytes', 'width': 'int', 'height': 'int',
    'original_width': 'int', 'original_height': 'int',
}
FEATURE_TYPES = {'int': tf.int64, 'float': tf.float32, 'bytes': tf.string}
ON_ERROR = ('skip', 'raise')
# Why a record was skipped; the status a record carries through the pipeline is its index.
REASONS = ('ok', 'missing_image', 'empty_caption', 'invalid_utf8_caption', 'undecodable_image',
           'unparseable_record')
OK, MISSING_IMAGE, EMPTY_CAPTION, INVALID_CAPTION, UNDECODABLE, UNPARSEABLE = range(len(REASONS))
TFRECORD_OVERHEAD = 16  # bytes around each record: length (8), its crc (4), the data's crc (4)
MAX_EXAMPLES = 10  # keys kept per skip reason, for the summary

log = logging.getLogger(__name__)


class CorruptDataError(ValueError):
  """A record or file could not be used and the pipeline was asked to raise (`on_error='raise'`)."""


# ----------------------------------------------------------------------------------- writer


def _feature(name, value):
  """One img2dataset feature: ints as int64_list, floats as float_list, str/bytes/None as bytes."""
  if isinstance(value, (list, tuple)):
    values = list(value)
  else:
    values = [value]
  if all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values):
    return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(v) for v in values]))
  if all(isinstance(v, (float, np.floating)) for v in values):
    return tf.train.Feature(float_list=tf.train.FloatList(value=[float(v) for v in values]))
  if all(v is None or isinstance(v, (str, bytes)) for v in values):
    values = [b'' if v is None else v.encode() if isinstance(v, str) else v for v in values]
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=values))
  raise TypeError(f'metadata {name!r} must be int, float, str, bytes or None (or a list of one '
                  f'of them), got {value!r}')


def serialize_example(key, image_bytes, txt, /, image_format='jpg', **metadata):
  """One sample in img2dataset's tfrecord schema -> the serialized `tf.train.Example`: `key`,
  the image under `image_format`, the caption under `txt`, each metadata field on its own."""
  if image_format not in IMAGE_FORMATS:
    raise ValueError(f'image_format must be one of {IMAGE_FORMATS}, got {image_format!r}')
  if not isinstance(image_bytes, bytes):
    raise TypeError(f'image_bytes must be the encoded image as bytes, got '
                    f'{type(image_bytes).__name__}')
  reserved = {'key', 'txt', *IMAGE_FORMATS} & set(metadata)
  if reserved:
    raise ValueError('metadata may not use the schema\'s own feature names, got '
                     f'{sorted(reserved)}')
  feature = {'key': _feature('key', key), image_format: _feature(image_format, image_bytes),
             'txt': _feature('txt', txt)}
  feature.update({name: _feature(name, value) for name, value in metadata.items()})
  return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def encode_image(image_HxWx3, image_format='jpg', quality=95):
  """uint8 (H, W, 3) RGB -> encoded bytes (PIL), as img2dataset stores them."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  image = np.asarray(image_HxWx3)
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(f'encode_image expects uint8 (H, W, 3), got {image.dtype} {image.shape}')
  buffer = io.BytesIO()
  pil_format = {'jpg': 'JPEG', 'png': 'PNG', 'webp': 'WEBP'}[image_format]
  options = {'quality': quality} if image_format in ('jpg', 'webp') else {}
  Image.fromarray(image, 'RGB').save(buffer, pil_format, **options)
  return buffer.getvalue()


def shard_path(out_dir, shard_id, digits=5):
  """img2dataset's shard name: `{out_dir}/00042.tfrecord`."""
  return os.path.join(out_dir, f'{shard_id:0{digits}d}.tfrecord')


def sample_key(shard_id, index, shard_digits=5, index_digits=4):
  """img2dataset's key: the shard id then the index within the shard, zero padded."""
  return f'{shard_id:0{shard_digits}d}{index:0{index_digits}d}'


def write_tfrecord(path, examples):
  """Writes serialized examples to one tfrecord file (local or any tf.io path); returns how many."""
  n = 0
  with tf.io.TFRecordWriter(os.fspath(path)) as writer:
    for example in examples:
      writer.write(example)
      n += 1
  return n


# ------------------------------------------------------------------------------------ stats


@dataclasses.dataclass
class Stats:
  """What the pipeline yielded and skipped. tf.data's threads update it (under the lock)."""
  samples: int = 0
  batches: int = 0
  files_read: int = 0
  skipped: dict = dataclasses.field(default_factory=dict)   # reason -> count
  examples: dict = dataclasses.field(default_factory=dict)  # reason -> first keys / paths
  truncated_files: list = dataclasses.field(default_factory=list)
  remainder_dropped: int = 0   # samples of an incomplete last batch in training
  full_captions: int = 0       # captions that filled the context (truncated, or exactly full)
  _lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False,
                                            compare=False)

  def add(self, **counts):
    with self._lock:
      for name, n in counts.items():
        setattr(self, name, getattr(self, name) + n)

  def skip(self, reason, example):
    with self._lock:
      self.skipped[reason] = self.skipped.get(reason, 0) + 1
      keys = self.examples.setdefault(reason, [])
      if len(keys) < MAX_EXAMPLES:
        keys.append(example)

  def truncated(self, path, detail):
    with self._lock:
      self.truncated_files.append(f'{path} ({detail})')
    self.skip('truncated_file', path)

  @property
  def num_skipped(self):
    """Records skipped (truncated files count once each: what followed the break is unknown)."""
    return sum(self.skipped.values())

  def summary(self):
    lines = [f'{self.samples} samples in {self.batches} batches from {self.files_read} files']
    for reason, count in sorted(self.skipped.items()):
      lines.append(f'skipped {count} x {reason}, e.g. {", ".join(self.examples[reason][:3])}')
    if self.remainder_dropped:
      lines.append(f'{self.remainder_dropped} samples of incomplete last batches dropped')
    if self.full_captions:
      lines.append(f'{self.full_captions} captions filled the context (truncated or exactly full)')
    return '; '.join(lines)


# --------------------------------------------------------------------------------- pipeline


def _expand_files(files):
  """A glob, a directory, or a list of them -> sorted unique paths (tf.io.gfile: gs:// works)."""
  if isinstance(files, (str, os.PathLike)):
    files = [files]
  if not isinstance(files, (list, tuple)) or not files:
    raise ValueError('files must be a glob, a directory or a non-empty list of them, got '
                     f'{files!r}')
  paths = set()
  for pattern in map(os.fspath, files):
    if tf.io.gfile.isdir(pattern):
      pattern = os.path.join(pattern, '*.tfrecord')
    matched = tf.io.gfile.glob(pattern)
    if not matched:
      raise FileNotFoundError(f'no tfrecord file matches {pattern!r}')
    paths.update(matched)
  return sorted(paths)


def process_files(files, process_index, process_count):
  """This process's share of the files: every `process_count`-th one from `process_index`."""
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index must be in [0, {process_count}), got {process_index}')
  if len(files) < process_count:
    raise ValueError(f'{len(files)} files cannot feed {process_count} processes: each process '
                     'reads whole files; write at least one shard per process')
  return files[process_index::process_count]


def _metadata_spec(metadata):
  """('width', 'url') or {'name': 'int' | 'float' | 'bytes'} -> {name: tf dtype}."""
  if isinstance(metadata, dict):
    items = metadata.items()
  else:
    unknown = [m for m in metadata if m not in METADATA_TYPES]
    if unknown:
      raise ValueError(f'unknown metadata {unknown}: img2dataset\'s fields are '
                       f'{sorted(METADATA_TYPES)}; give others as a dict name -> int/float/bytes')
    items = [(m, METADATA_TYPES[m]) for m in metadata]
  spec = {}
  for name, kind in items:
    if kind not in FEATURE_TYPES:
      raise ValueError(f'metadata {name!r}: type must be one of {sorted(FEATURE_TYPES)}, '
                       f'got {kind!r}')
    if name in ('key', 'txt', 'image', 'tokens', 'index', 'status', *IMAGE_FORMATS):
      raise ValueError(f'metadata {name!r} collides with a field of the pipeline')
    spec[name] = FEATURE_TYPES[kind]
  return spec


def _default_tokenize(context_length):
  from clip import tokenizer  # pylint: disable=g-import-not-at-top
  return functools.partial(tokenizer.tokenize, context_length=context_length, truncate=True)


def _check_tokenize(tokenize):
  """Calls `tokenize` once, so that a wrong one fails here and not inside tf.data."""
  tokens = np.asarray(tokenize(['a photo of a cat', 'a dog']))
  if tokens.ndim != 2 or tokens.shape[0] != 2 or not np.issubdtype(tokens.dtype, np.integer):
    raise ValueError('tokenize(list of 2 str) must return int (2, context_length), got '
                     f'{tokens.dtype} {tokens.shape}')
  return tokens.shape[1]


class Pipeline:
  """Batches of img2dataset tfrecords for one process: iterate it for numpy dicts
  `{'image': float32 (B, n, n, 3), 'tokens': int32 (B, L)}` (plus `fields`).

  Args:
    files: a glob, a directory (its `*.tfrecord`) or a list of them; local or any tf.io path.
    global_batch_size: batch over all processes; each process yields its share.
    resolution: the model's image_resolution (the side of the square crop).
    train: random resized crop, shuffling and endless epochs (else OpenAI's resize + centre crop,
      files in order, one epoch, the last batch possibly smaller).
    seed: file order, shuffle and crops are functions of it (and of the epoch).
    image_format: the image feature: 'jpg', 'png' or 'webp'.
    tokenize: texts -> int (N, L); default `clip.tokenizer.tokenize(truncate=True)`.
    image_dtype: 'float32' (normalised) or 'uint8' (raw pixels, 4x less to copy and transfer;
      normalise on the device with `clip.normalize_image(images / 255)`).
    fields: extra outputs: 'key', 'caption', and metadata names (img2dataset's, or a dict
      name -> 'int' | 'float' | 'bytes' for others); strings come back as bytes.
    on_error: 'skip' counts bad records in `stats` and goes on; 'raise' raises CorruptDataError.
    process_index, process_count: default `jax.process_index()`, `jax.process_count()`.
    num_epochs: default endless in training, 1 in evaluation.
    resume: a `state()` dict to continue from exactly; start_step: continue after that many
      batches (exact when no record was skipped before it; else use `resume`).
  """

  def __init__(self, files, *, global_batch_size, resolution, train, seed=0, image_format='jpg',
               tokenize=None, context_length=77, fields=(), image_dtype='float32', on_error='skip',
               shuffle_buffer=10_000, process_index=None, process_count=None, num_epochs=None,
               resume=None, start_step=0, num_parallel_reads=8, scale=transforms.TRAIN_SCALE,
               ratio=transforms.TRAIN_RATIO):
    if process_index is None or process_count is None:
      import jax  # pylint: disable=g-import-not-at-top
      process_index, process_count = jax.process_index(), jax.process_count()
    if global_batch_size < 1 or global_batch_size % process_count:
      raise ValueError(f'global_batch_size must be a positive multiple of the process count '
                       f'{process_count}, got {global_batch_size}')
    if image_format not in IMAGE_FORMATS:
      raise ValueError(f'image_format must be one of {IMAGE_FORMATS}, got {image_format!r}')
    if image_dtype not in ('float32', 'uint8'):
      raise ValueError(f"image_dtype must be 'float32' or 'uint8', got {image_dtype!r}")
    if on_error not in ON_ERROR:
      raise ValueError(f'on_error must be one of {ON_ERROR}, got {on_error!r}')
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 1:
      raise ValueError(f'resolution must be a positive int, got {resolution!r}')
    self.files = process_files(_expand_files(files), process_index, process_count)
    self.batch_size = global_batch_size // process_count
    self.resolution, self.train, self.seed = resolution, train, seed
    self.image_format, self.on_error = image_format, on_error
    self.image_dtype = tf.as_dtype(image_dtype)
    self.shuffle_buffer, self.num_parallel_reads = shuffle_buffer, num_parallel_reads
    self.scale, self.ratio = scale, ratio
    self.num_epochs = num_epochs if num_epochs is not None or train else 1
    self.extra = [f for f in ('key', 'caption') if f in fields]
    self.metadata = _metadata_spec({k: fields[k] for k in fields if k not in self.extra}
                                   if isinstance(fields, dict)
                                   else [f for f in fields if f not in self.extra])
    self.tokenize = tokenize or _default_tokenize(context_length)
    self.context_length = _check_tokenize(self.tokenize)
    self.stats, self.epoch_stats, self.last_epoch_stats = Stats(), Stats(), None
    self._state = dict(resume) if resume else self._state_at_step(start_step)

  # ------------------------------------------------------------------ the tf.data graph

  def _file_records(self, path):
    """A file's records, then one end marker that says whether the file was read to its end.

    A truncated or corrupt file makes TFRecordDataset fail; `ignore_errors` ends the file there,
    and the byte count of what was read, compared with the file size, tells that it happened."""
    records = tf.data.TFRecordDataset(path, buffer_size=1 << 20).ignore_errors()
    end = tf.data.Dataset.from_tensors(tf.constant(b''))
    tagged = records.map(lambda r: (r, False)).concatenate(end.map(lambda r: (r, True)))

    def count(total, x):
      record, is_end = x
      size = tf.cast(tf.strings.length(record), tf.int64) + TFRECORD_OVERHEAD
      total = total + tf.where(is_end, tf.constant(0, tf.int64), size)
      return total, (record, path, is_end, total)

    return tagged.scan(tf.constant(0, tf.int64), count)

  def _end_of_file(self, path, bytes_read):
    """At a file's end marker (Python, once per file): was all of it read?"""
    path = path.numpy().decode()
    size = tf.io.gfile.stat(path).length
    bytes_read = int(bytes_read.numpy())
    for stats in (self.stats, self.epoch_stats):
      stats.add(files_read=1)
      if bytes_read != size:
        stats.truncated(path, f'stopped at byte {bytes_read} of {size}')
    return False

  def _keep_record(self, record, path, is_end, bytes_read):
    del record
    return tf.cond(is_end, lambda: tf.reshape(tf.py_function(
        self._end_of_file, [path, bytes_read], tf.bool), []), lambda: tf.constant(True))

  def _parse(self, record):
    spec = {'key': tf.io.FixedLenFeature([], tf.string, default_value=''),
            'txt': tf.io.FixedLenFeature([], tf.string, default_value=''),
            self.image_format: tf.io.FixedLenFeature([], tf.string, default_value='')}
    defaults = {tf.int64: 0, tf.float32: float('nan'), tf.string: ''}
    spec.update({name: tf.io.FixedLenFeature([], dtype, default_value=defaults[dtype])
                 for name, dtype in self.metadata.items()})
    return tf.io.parse_single_example(record, spec)

  def _sample(self, ex, image, status, index, path):
    out = {'image': image, 'status': tf.cast(status, tf.int32), 'index': index, 'path': path,
           'key': ex['key'], 'caption': ex['txt']}
    out.update({name: ex[name] for name in self.metadata})
    return out

  def _blank(self):
    return tf.zeros([self.resolution, self.resolution, 3], self.image_dtype)

  def _output(self, image_u8):
    # Per image, in the parallel map: a whole batch at once runs out of cache (2x slower).
    return transforms.normalize(image_u8) if self.image_dtype == tf.float32 else image_u8

  def _transform(self, image_bytes, index, epoch):
    if self.train:
      seed = tf.random.experimental.stateless_fold_in(
          tf.constant([self.seed, epoch], tf.int64), index)
      return transforms.random_resized_crop(image_bytes, self.resolution, seed, self.scale,
                                            self.ratio)
    return transforms.center_crop(transforms.decode(image_bytes), self.resolution)

  def _decoded(self, epoch, index, record, path):
    """Parse, check, decode and crop one record; its status says why it is unusable, if it is."""
    ex = self._parse(record)
    image_bytes, caption = ex[self.image_format], ex['txt']
    utf8 = tf.strings.unicode_transcode(caption, 'UTF-8', 'UTF-8', errors='replace')
    status = tf.case([
        (tf.equal(tf.strings.length(image_bytes), 0), lambda: MISSING_IMAGE),
        (tf.equal(tf.strings.length(tf.strings.strip(caption)), 0), lambda: EMPTY_CAPTION),
        (tf.not_equal(utf8, caption), lambda: INVALID_CAPTION)], default=lambda: OK)
    image = tf.cond(tf.equal(status, OK),
                    lambda: self._output(self._transform(image_bytes, index, epoch)), self._blank)
    return self._sample(ex, image, status, index, path)

  def _guarded(self, epoch, index, record, path):
    """`_decoded`, with every failure turned into a status: a dataset of exactly one sample.

    tf.data has no try/except, but a failing map inside `ignore_errors` yields nothing, and
    `concatenate(...).take(1)` then falls back to the next attempt."""
    def attempt(fn):
      return tf.data.Dataset.from_tensors((index, record, path)).map(fn).ignore_errors()
    parsed_only = lambda i, r, p: self._sample(self._parse(r), self._blank(), UNDECODABLE, i, p)
    empty = {'key': tf.constant(b''), 'txt': tf.constant(b'')}
    empty.update({name: tf.zeros([], dtype) for name, dtype in self.metadata.items()})
    unparseable = tf.data.Dataset.from_tensors(
        self._sample(empty, self._blank(), UNPARSEABLE, index, path))
    return (attempt(functools.partial(self._decoded, epoch)).concatenate(attempt(parsed_only))
            .concatenate(unparseable).take(1))

  def _report(self, status, key, path):
    """A skipped record (Python, only for bad records): count it, keep its key for the summary."""
    reason = REASONS[int(status.numpy())]
    key, path = key.numpy().decode(errors='replace'), path.numpy().decode(errors='replace')
    example = f'{key} in {path}' if key else f'a record in {path}'
    for stats in (self.stats, self.epoch_stats):
      stats.skip(reason, example)
    return False

  def _keep_sample(self, sample):
    return tf.cond(tf.equal(sample['status'], OK), lambda: tf.constant(True),
                   lambda: tf.reshape(tf.py_function(
                       self._report, [sample['status'], sample['key'], sample['path']],
                       tf.bool), []))

  def _tokenize(self, captions_B):
    texts = [c.decode('utf-8') for c in captions_B]
    tokens = np.asarray(self.tokenize(texts), np.int32)
    full = int(np.count_nonzero(tokens[:, -1]))
    for stats in (self.stats, self.epoch_stats):
      stats.add(full_captions=full)
    return tokens

  def _finish(self, batch):
    tokens = tf.numpy_function(self._tokenize, [batch['caption']], tf.int32, stateful=False)
    tokens.set_shape([None, self.context_length])
    out = {'image': batch['image'], 'tokens': tokens, 'index': batch['index']}
    out.update({name: batch[name] for name in [*self.extra, *self.metadata]})
    return out

  def dataset(self, epoch, start_record=0):
    """The tf.data pipeline of one epoch, from record `start_record` of its (shuffled) order."""
    files = list(self.files)
    if self.train:
      files = [files[i] for i in np.random.default_rng([self.seed, epoch]).permutation(len(files))]
    ds = tf.data.Dataset.from_tensor_slices(files).interleave(
        self._file_records, cycle_length=min(self.num_parallel_reads, len(files)),
        num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.filter(self._keep_record).map(lambda r, p, e, b: (r, p))
    if self.train and self.shuffle_buffer > 1:
      ds = ds.shuffle(self.shuffle_buffer, seed=self.seed * 100_003 + epoch,
                      reshuffle_each_iteration=False)
    ds = ds.enumerate().skip(start_record)
    ds = ds.interleave(lambda i, x: self._guarded(epoch, i, *x), cycle_length=16,
                       num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.filter(self._keep_sample).batch(self.batch_size, drop_remainder=False)
    ds = ds.map(self._finish, num_parallel_calls=2, deterministic=True)
    options = tf.data.Options()
    options.deterministic = True
    options.threading.max_intra_op_parallelism = 1
    return ds.with_options(options).prefetch(tf.data.AUTOTUNE)

  # ---------------------------------------------------------------- the Python iterator

  def state(self):
    """Where the next batch starts: {'epoch', 'record', 'step'}; JSON-serialisable."""
    return dict(self._state)

  @functools.cached_property
  def records_per_epoch(self):
    """Readable records in this process's files (one pass over them, no decoding)."""
    ds = tf.data.TFRecordDataset(self.files).ignore_errors()
    return int(ds.reduce(np.int64(0), lambda n, _: n + 1).numpy())

  def _state_at_step(self, step):
    if step < 0:
      raise ValueError(f'start_step must be >= 0, got {step}')
    if step == 0:
      return {'epoch': 0, 'record': 0, 'step': 0}
    per_epoch = self.records_per_epoch // self.batch_size if self.train else None
    if not per_epoch:
      raise ValueError('start_step needs training mode with at least one full batch per epoch')
    return {'epoch': step // per_epoch, 'record': step % per_epoch * self.batch_size, 'step': step}

  def __iter__(self):
    while self.num_epochs is None or self._state['epoch'] < self.num_epochs:
      epoch = self._state['epoch']
      for batch in self.dataset(epoch, self._state['record']).as_numpy_iterator():
        self._check_errors()
        n = len(batch['index'])
        if n < self.batch_size and self.train:
          for stats in (self.stats, self.epoch_stats):
            stats.add(remainder_dropped=n)
          continue
        self._state = {'epoch': epoch, 'record': int(batch.pop('index')[-1]) + 1,
                       'step': self._state['step'] + 1}
        for stats in (self.stats, self.epoch_stats):
          stats.add(samples=n, batches=1)
        yield batch
      self._check_errors()
      self._end_epoch(epoch)

  def _check_errors(self):
    if self.on_error == 'raise' and self.stats.skipped:
      raise CorruptDataError(f'corrupt input (on_error="raise"): {self.stats.summary()}')

  def _end_epoch(self, epoch):
    level = logging.WARNING if self.epoch_stats.skipped else logging.INFO
    log.log(level, 'epoch %d: %s', epoch, self.epoch_stats.summary())
    self.last_epoch_stats, self.epoch_stats = self.epoch_stats, Stats()
    self._state = {'epoch': epoch + 1, 'record': 0, 'step': self._state['step']}
