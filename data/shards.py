"""The training and evaluation pipeline over img2dataset shards: tfrecord or webdataset tars.

  files (glob, folder or list of `.tfrecord` or `.tar`; this process's share:
         files[process_index::process_count], or with `resampled=True` files drawn with
         replacement from all of them, seeded by process and epoch)
    -> interleaved reads (`data.tfrecords` / `data.webdataset_tars`: every sample becomes a record
       of img2dataset's tfrecord schema; a truncated or corrupt file ends early and is reported)
    -> shuffle (training) -> decode, crop, resize, normalise (the model's eval resize and mean /
       std, `preprocess`): each record guarded so that a bad one becomes a counted skip instead of
       an error -> batch -> tokenise (the model's tokenizer, `tokenize`) -> prefetch
    -> numpy {'image': float32 (B, n, n, 3), 'tokens': int32 (B, L)} (distillation: plus a
       teacher's view and tokens, or stored teacher outputs: `data.teacher_views`)

It is deterministic given the seed (file order, shuffle and crops are all seeded; the crop of a
sample depends only on the seed, the epoch and its position, never on thread timing), and it
resumes exactly from `state()` (a record position, so even with another batch size). Skipped
records are counted in `stats`, logged at the end of each epoch, and raise instead when
`on_error='raise'`. An epoch that yields no batch raises `EmptyEpochError`: a source whose every
record is bad never turns into an endless loop of empty epochs.

Training cycles each process's own files, which the processes must share evenly, unless
`resampled=True` draws them with replacement (`data.processes` says why), its draws counted.
"""
import functools
import logging
import os

import numpy as np
import tensorflow as tf

from data import model_inputs
from data import naflex_transforms
from data import pipeline_stats
from data import processes
from data import shard_files
from data import teacher_views
from data import tfrecords
from data import transforms

ON_ERROR = ('skip', 'raise')
# Why a record was not used; the status a record carries through the pipeline is its index.
REASONS = ('ok', 'missing_image', 'several_images', 'empty_caption', 'invalid_utf8_caption',
           'undecodable_image', 'unparseable_record', 'filtered', 'image_smaller_than_a_patch')
(OK, MISSING_IMAGE, SEVERAL_IMAGES, EMPTY_CAPTION, INVALID_CAPTION, UNDECODABLE, UNPARSEABLE,
 FILTERED, TOO_SMALL) = range(len(REASONS))
# The pipeline's own outputs: metadata of these names come back as 'metadata_<name>'.
OUTPUTS = ('image', 'tokens', 'patches', 'spatial_shapes', *teacher_views.OUTPUTS)
METADATA_PREFIX = 'metadata_'

log = logging.getLogger(__name__)


class CorruptDataError(ValueError):
  """A record or file could not be used and the pipeline was asked to raise (`on_error='raise'`)."""


class EmptyEpochError(CorruptDataError):
  """A whole epoch yielded no batch: every record was bad, filtered, or too few for one batch."""


def output_name(name):
  """The batch key of a metadata field: its name, or 'metadata_<name>' where the pipeline's
  own outputs (or its internal '_' names) already use it."""
  return METADATA_PREFIX + name if name in OUTPUTS or name.startswith('_') else name


def _ignore(reason, example):
  del reason, example


# --------------------------------------------------------------------------------- pipeline


class Pipeline:
  """Batches of img2dataset shards for one process: iterate it for numpy dicts
  `{'image': float32 (B, n, n, 3), 'tokens': int32 (B, L)}` (plus `fields`).

  Args:
    files: a glob, a folder (its `*.tfrecord` or `*.tar`) or a list of them, all of one format;
      local or any tf.io path. Each record's image is found under whichever of img2dataset's keys
      it has (`jpg`, `png`, `webp`); one with none or several is a counted skip.
    global_batch_size: batch over all processes; each process yields its share.
    resolution: the model's image_resolution (the side of the square crop).
    train: random resized crop, shuffling and endless epochs (else the model's eval resize,
      `preprocess.resize_mode`; files in order, one epoch, the last batch possibly smaller).
    tokenize: the model's tokenizer, texts -> int (N, L), e.g.
      `functools.partial(clip.get_tokenizer(cfg), truncate=True)`; L is read from its output.
    preprocess: the model's `clip.PreprocessConfig` (`cfg.preprocess`): the eval resize and
      interpolation, and the mean and std every image is normalised with.
    seed: file order, shuffle and crops are functions of it (and of the epoch).
    image_dtype: 'float32' (normalised) or 'uint8' (raw pixels, 4x less to copy and transfer;
      normalise on the device with `clip.processing.normalize(images / 255, cfg)`).
    fields: extra outputs: 'key', 'caption', and metadata names (img2dataset's, or a dict
      name -> 'int' | 'float' | 'bytes' for others); strings come back as bytes. A metadata name
      the pipeline uses itself ('image', 'tokens') comes back as 'metadata_<name>'.
    keep: a `data.filters.MetadataFilter` (DataComp-style: a uid list, a minimum image size),
      applied from the `.parquet` img2dataset writes beside each shard; left-out records are
      counted in `stats.filtered`.
    on_error: 'skip' counts bad records in `stats` and goes on; 'raise' raises CorruptDataError.
    process_index, process_count: default `jax.process_index()`, `jax.process_count()`. In
      training, a file count the process count does not divide is refused (ValueError naming
      the counts; the processes with fewer files would see their examples more often) unless
      `resampled`.
    resampled: training only: each epoch of each process reads ceil(files / processes) files
      drawn with replacement from all of them, seeded by (seed, epoch, process_index), as
      webdataset's `resampled=True` and open_clip's `--dataset-resampled`; any file count feeds
      any process count, every example equally likely in every process. Draws are counted in
      `stats.drawn` and the epoch log.
    num_epochs: default endless in training, 1 in evaluation.
    resume: a `state()` dict to continue from exactly; start_step: continue after that many
      batches (exact when no record was skipped before it; else use `resume`; not resampled).
    name: how the epoch log names this source (default: the files argument).
    naflex: a `data.naflex_batching.NaFlexBatching` (no global_batch_size, resolution, 'uint8'):
      `{'patches': float32 (B, S, P*P*3), 'spatial_shapes': int32 (B, 2), 'tokens'}` instead, by
      `data.naflex_transforms` (`ratio` relative to each image's own); an image with a side below
      one patch is a counted skip.
    teacher, reinforced: distillation (`data.teacher_views`; not with naflex): a
      `data.model_inputs.TeacherInputs` adds 'teacher_image' and 'teacher_tokens'; a
      `data.reinforced.ReinforcedSpec` reads reinforced shards (ValueError here for another
      width or augmentation count) and adds 'teacher_image_embedding', 'teacher_text_embedding'.

  Raises:
    EmptyEpochError: an epoch yielded no batch (every record bad or filtered, or fewer good
      samples than one batch in training): the message names the files and the skip counts.
  """

  def __init__(self, files, *, global_batch_size=None, resolution=None, train, tokenize,
               preprocess, seed=0, fields=(), image_dtype='float32', on_error='skip', keep=None,
               shuffle_buffer=10_000, process_index=None, process_count=None, resampled=False,
               num_epochs=None, resume=None, start_step=0, num_parallel_reads=8,
               scale=transforms.TRAIN_SCALE, ratio=transforms.TRAIN_RATIO, name=None,
               naflex=None, teacher=None, reinforced=None):
    process_index, process_count = processes.process_share(process_index, process_count)
    model_inputs.check_image_dtype(image_dtype)
    teacher_views.check_options(naflex, teacher, reinforced)
    self.plan = naflex_transforms.plan_for(naflex, process_count, global_batch_size, resolution,
                                           image_dtype)
    self.batch_size = (None if self.plan else
                       processes.local_batch_size(global_batch_size, process_count))
    if on_error not in ON_ERROR:
      raise ValueError(f'on_error must be one of {ON_ERROR}, got {on_error!r}')
    if self.plan:
      scale, ratio = naflex_transforms.check_crop(scale, ratio)
    elif isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 1:
      raise ValueError(f'resolution must be a positive int, got {resolution!r}')
    if resampled and not train:
      raise ValueError('resampled=True draws training files with replacement; an evaluation '
                       '(train=False) reads each file once')
    self.preprocess = model_inputs.check_preprocess(preprocess)
    all_files = shard_files.expand_files(files)
    self.name = name or (os.fspath(files) if isinstance(files, (str, os.PathLike))
                         else f'{len(files)} file patterns')
    self.resampled = resampled
    self.process_index, self.process_count = process_index, process_count
    self.files = all_files if resampled else processes.process_files(all_files, process_index,
                                                                     process_count, train)
    self.resolution, self.train, self.seed, self.on_error = resolution, train, seed, on_error
    self.image_dtype = tf.as_dtype(image_dtype)
    self.shuffle_buffer, self.num_parallel_reads = shuffle_buffer, num_parallel_reads
    self.scale, self.ratio = scale, ratio
    self.num_epochs = num_epochs if num_epochs is not None or train else 1
    self.extra = [f for f in ('key', 'caption') if f in fields]
    self.metadata = tfrecords.metadata_spec({k: fields[k] for k in fields if k not in self.extra}
                                  if isinstance(fields, dict)
                                  else [f for f in fields if f not in self.extra])
    self.kept = keep.table(self.files) if keep is not None else None
    self.tokenize = tokenize
    self.context_length, self._padding = model_inputs.tokenizer_layout(tokenize)
    self.stats, self.epoch_stats = pipeline_stats.Stats(), pipeline_stats.Stats()
    self.last_epoch_stats = None
    self.views = None if self.plan else teacher_views.Views(
        all_files, resolution, self.preprocess, self.image_dtype, train, seed, scale, ratio,
        teacher, reinforced)
    self.reader = (self.views and self.views.reader) or shard_files.reader_for(all_files[0])
    self._state = dict(resume) if resume else self._state_at_step(start_step)

  # ------------------------------------------------------------------ the tf.data graph

  def _file_records(self, path, report=None):
    """One file's records, then an end marker: `(record, path, is_end, bytes_read, problem)`."""
    ds = self.reader.file_records(path, report or self._report_member)
    return ds.map(lambda r, e, b, p: (r, path, e, b, p))

  def _report_member(self, reason, example):
    """A member or sample a reader left out (Python, from the reader's generator)."""
    for stats in (self.stats, self.epoch_stats):
      stats.skip(reason, example)

  def _end_of_file(self, path, bytes_read, problem):
    """At a file's end marker (Python, once per file): was all of it read?"""
    path = path.numpy().decode()
    size = tf.io.gfile.stat(path).length
    bytes_read, problem = int(bytes_read.numpy()), problem.numpy().decode(errors='replace')
    for stats in (self.stats, self.epoch_stats):
      stats.add(files_read=1)
      if problem or bytes_read != size:
        stats.truncated(path, problem or f'stopped at byte {bytes_read} of {size}')
    return False

  def _keep_record(self, record, path, is_end, bytes_read, problem):
    del record
    return tf.cond(is_end, lambda: tf.reshape(tf.py_function(
        self._end_of_file, [path, bytes_read, problem], tf.bool), []), lambda: tf.constant(True))

  def _parse(self, record):
    spec = {name: tf.io.FixedLenFeature([], tf.string, default_value='')
            for name in ('key', 'txt', *tfrecords.IMAGE_FORMATS)}
    defaults = {tf.int64: 0, tf.float32: float('nan'), tf.string: ''}
    spec.update({name: tf.io.FixedLenFeature([], dtype, default_value=defaults[dtype])
                 for name, dtype in self.metadata.items()})
    spec.update(self.views.features() if self.views else {})
    return tf.io.parse_single_example(record, spec)

  def _sample(self, ex, views, status, index, path):
    out = {**views, '_status': tf.cast(status, tf.int32), '_index': index, '_path': path,
           'key': ex['key'], 'caption': ex['txt']}
    out.update({output_name(name): ex[name] for name in self.metadata})
    return out

  def _blank(self):  # NaFlex: a uint8 image of any size, patchified after the filter
    return {'image': tf.zeros([0, 0, 3], tf.uint8)} if self.plan else self.views.blank()

  def _transform(self, ex, image_bytes, index, epoch):
    """-> (outputs, status): OK, or TOO_SMALL for a NaFlex image with a side below one patch."""
    if not self.plan:
      return self.views(ex, image_bytes, index, epoch), tf.constant(OK)
    seed = teacher_views.crop_seed(self.seed, epoch, index) if self.train else None
    image, small = naflex_transforms.decode_and_crop(image_bytes, self.plan.patch_size, seed,
                                                     self.scale, self.ratio,
                                                     self.preprocess.convert_first)
    return {'image': image}, tf.where(small, TOO_SMALL, OK)

  def _kept(self, key, path):
    if self.kept is None:
      return tf.constant(True)
    return self.kept.lookup(tf.strings.join([path, key], '\t'))

  def _decoded(self, epoch, index, record, path):
    """Parse, check, decode and crop one record; its status says why it is unusable, if it is."""
    ex = self._parse(record)
    present = [tf.strings.length(ex[fmt]) > 0 for fmt in tfrecords.IMAGE_FORMATS]
    num_images = tf.add_n([tf.cast(p, tf.int32) for p in present])
    image_bytes = tf.strings.join([ex[fmt] for fmt in tfrecords.IMAGE_FORMATS])  # the one there
    caption = ex['txt']
    utf8 = tf.strings.unicode_transcode(caption, 'UTF-8', 'UTF-8', errors='replace')
    status = tf.case([
        (tf.logical_not(self._kept(ex['key'], path)), lambda: FILTERED),
        (tf.equal(num_images, 0), lambda: MISSING_IMAGE),
        (tf.greater(num_images, 1), lambda: SEVERAL_IMAGES),
        (tf.equal(tf.strings.length(tf.strings.strip(caption)), 0), lambda: EMPTY_CAPTION),
        (tf.not_equal(utf8, caption), lambda: INVALID_CAPTION)], default=lambda: OK)
    views, status = tf.cond(tf.equal(status, OK),
                            lambda: self._transform(ex, image_bytes, index, epoch),
                            lambda: (self._blank(), status))
    return self._sample(ex, views, status, index, path)

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
    """A record not used (Python, only for those): count it, keep its key for the summary."""
    reason = REASONS[int(status.numpy())]
    key, path = key.numpy().decode(errors='replace'), path.numpy().decode(errors='replace')
    for stats in (self.stats, self.epoch_stats):
      if reason == 'filtered':
        stats.add(filtered=1)
      else:
        stats.skip(reason, f'{key} in {path}' if key else f'a record in {path}')
    return False

  def _keep_sample(self, sample):
    return tf.cond(tf.equal(sample['_status'], OK), lambda: tf.constant(True),
                   lambda: tf.reshape(tf.py_function(
                       self._report, [sample['_status'], sample['key'], sample['_path']],
                       tf.bool), []))

  def _tokenize(self, captions_B):
    texts = [c.decode('utf-8') for c in captions_B]
    tokens = np.asarray(self.tokenize(texts), np.int32)
    full = int(np.count_nonzero(model_inputs.filled_rows(tokens, *self._padding)))
    for stats in (self.stats, self.epoch_stats):
      stats.add(full_captions=full)
    return tokens

  def _finish(self, batch):
    tokens = tf.numpy_function(self._tokenize, [batch['caption']], tf.int32, stateful=False)
    tokens.set_shape([None, self.context_length])
    out = {'tokens': tokens, '_index': batch['_index']}
    out.update({k: batch[k] for k in (('patches', 'spatial_shapes', '_size') if self.plan
                                      else self.views.outputs)})
    out.update(self.views.batch_outputs(batch['caption']) if self.views else {})
    out.update({name: batch[name] for name in self.extra})
    out.update({output_name(name): batch[output_name(name)] for name in self.metadata})
    return out

  def epoch_files(self, epoch):
    """The files epoch `epoch` reads, in order: this process's share (shuffled by the seed and
    the epoch in training), or its draws when resampled."""
    files = list(self.files)
    if self.resampled:
      return processes.resampled_files(files, self.seed, epoch, self.process_index,
                                       self.process_count)
    if self.train:
      files = [files[i] for i in np.random.default_rng([self.seed, epoch]).permutation(len(files))]
    return files

  def dataset(self, epoch, start_record=0, start_step=0):
    """The tf.data pipeline of one epoch, from record `start_record` of its (shuffled) order
    (NaFlex: its first batch is step `start_step`'s)."""
    files = self.epoch_files(epoch)
    if self.resampled:
      for stats in (self.stats, self.epoch_stats):
        stats.draw(files)
    ds = tf.data.Dataset.from_tensor_slices(files).interleave(
        self._file_records, cycle_length=min(self.num_parallel_reads, len(files)),
        num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.filter(self._keep_record).map(lambda r, p, e, b, q: (r, p))
    if self.train and self.shuffle_buffer > 1:
      ds = ds.shuffle(self.shuffle_buffer, seed=self.seed * 100_003 + epoch,
                      reshuffle_each_iteration=False)
    ds = ds.enumerate().skip(start_record)
    ds = ds.interleave(lambda i, x: self._guarded(epoch, i, *x), cycle_length=16,
                       num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.filter(self._keep_sample)
    ds = (naflex_transforms.batches(ds, self.plan, start_step, self.preprocess) if self.plan
          else ds.batch(self.batch_size, drop_remainder=False))
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
    """Readable records in this process's files, all of them when resampled (one pass over
    them, no decoding)."""
    ds = tf.data.Dataset.from_tensor_slices(self.files).flat_map(
        lambda p: self._file_records(p, _ignore))
    return int(ds.reduce(np.int64(0), lambda n, x: n + tf.cast(tf.logical_not(x[2]),
                                                               tf.int64)).numpy())

  def _state_at_step(self, step):
    if step < 0:
      raise ValueError(f'start_step must be >= 0, got {step}')
    if step == 0:
      return {'epoch': 0, 'record': 0, 'step': 0}
    if self.resampled:
      raise ValueError('start_step with resampled=True: its epochs differ in length; resume from '
                       'state() instead')
    if self.plan and self.train:
      epoch, record = self.plan.start_of(step, self.records_per_epoch)
      return {'epoch': epoch, 'record': record, 'step': step}
    per_epoch = self.records_per_epoch // self.batch_size if self.train else None
    if not per_epoch:
      raise ValueError('start_step needs training mode with at least one full batch per epoch')
    return {'epoch': step // per_epoch, 'record': step % per_epoch * self.batch_size, 'step': step}

  def __iter__(self):
    while self.num_epochs is None or self._state['epoch'] < self.num_epochs:
      epoch, start_record = self._state['epoch'], self._state['record']
      for batch in self.dataset(epoch, start_record, self._state['step']).as_numpy_iterator():
        self._check_errors()
        n = len(batch['_index'])
        if n < (int(batch.pop('_size')[0]) if self.plan else self.batch_size) and self.train:
          for stats in (self.stats, self.epoch_stats):
            stats.add(remainder_dropped=n)
          continue
        self._state = {'epoch': epoch, 'record': int(batch.pop('_index')[-1]) + 1,
                       'step': self._state['step'] + 1}
        for stats in (self.stats, self.epoch_stats):
          stats.add(samples=n, batches=1)
        yield batch
      self._check_errors()
      self._end_epoch(epoch, whole=start_record == 0)

  def _check_errors(self):
    if self.on_error == 'raise' and self.stats.skipped:
      raise CorruptDataError(f'corrupt input (on_error="raise"): {self.stats.summary()}')

  def _end_epoch(self, epoch, whole):
    stats = self.epoch_stats
    level = logging.WARNING if stats.skipped else logging.INFO
    log.log(level, '%s epoch %d: %s', self.name, epoch, stats.summary())
    self.last_epoch_stats, self.epoch_stats = stats, pipeline_stats.Stats()
    self._state = {'epoch': epoch + 1, 'record': 0, 'step': self._state['step']}
    if whole and not stats.batches:
      files = ', '.join(self.files[:3]) + (f' and {len(self.files) - 3} more'
                                           if len(self.files) > 3 else '')
      size = self.batch_size or 'a step\'s'
      need = (f'; training needs {size} good samples per batch in this process'
              if self.train else '')
      raise EmptyEpochError(f'epoch {epoch} of {self.name!r} yielded no batch ({files}): '
                            f'{stats.summary()}{need}')
