"""Writes reinforced shards (`data.reinforced`: the format) from img2dataset shards and a teacher's
two embedding functions; `experiments/reinforce.py` is its command line.

  sidecar = reinforced_writer.write(
      'shards/*.tar', 'reinforced/', embed_images, embed_texts, embed_dim=512,
      resolution=224, preprocess=tcfg.preprocess, augmentations=5, seed=0)

Every record of every source is read in order; one that cannot be used (no image or several, an
empty or invalid caption, an image that does not decode, an unparseable record, a truncated file)
is counted by its reason, reported, and not written. For each usable record K crop windows are
drawn (`transforms.random_crop`, stateless: seeded by `seed`, the augmentation index and the
record's key, or its position in the shard when it has none), each window's view is cropped,
resized to the teacher's resolution and normalised with its mean and std, and the record is
written again with the teacher's embeddings and the windows. Files are written beside, then
renamed: a shard appears whole or not at all; sources are never written over.
"""
import dataclasses
import json
import os

import numpy as np
import tensorflow as tf
from tqdm import tqdm

from data import filters
from data import pipeline_stats
from data import reinforced
from data import shard_files
from data import tfrecords
from data import transforms
from data import webdataset_tars


def view(image_bytes, window, resolution, preprocess):
  """The teacher's view of one stored window: float32 (resolution, resolution, 3), normalised."""
  crop = transforms.crop_at(image_bytes, window, preprocess.convert_first)
  return transforms.normalize_image(transforms.resize_crop(crop, resolution), preprocess.mean,
                                    preprocess.std)


def targets(sources, out_dir, overwrite=False):
  """The output path of each source: `out_dir/<its name>`. ValueError when one would be written
  over a source, two sources share a name, or `out_dir` holds reinforced shards already (unless
  `overwrite`)."""
  if not overwrite and tf.io.gfile.exists(os.path.join(out_dir, reinforced.SIDECAR)):
    raise ValueError(f'--out {out_dir} holds reinforced shards already ({reinforced.SIDECAR}): '
                     'write into another folder, or pass --overwrite to replace them')
  outs = [os.path.join(out_dir, os.path.basename(s)) for s in sources]
  real = {os.path.realpath(s) for s in sources}
  over = [o for o in outs if os.path.realpath(o) in real]
  if over:
    raise ValueError(f'--out {out_dir} would write over the source shards ({over[:3]}): write '
                     'reinforced shards into another folder')
  if len(set(outs)) != len(outs):
    raise ValueError('two source shards share a name, which one folder of outputs cannot hold: '
                     f'{sorted(o for o in outs if outs.count(o) > 1)[:3]}')
  return outs


# ----------------------------------------------------------------------------------- reading


def _with_sample(sample, path, report):
  record = webdataset_tars.sample_record(sample, path, report)
  return None if record is None else (sample, record)


def source_records(path, stats):
  """One source shard's records in order: `(original, key, caption, image bytes)` of each usable
  one (`original`: the record bytes of a tfrecord, the member dict of a tar sample); the others
  counted in `stats`."""
  if shard_files.reader_for(path) is webdataset_tars:
    for item, is_end, _, problem in webdataset_tars.samples(path, stats.skip, _with_sample):
      if is_end and problem:
        stats.truncated(path, problem.decode(errors='replace'))
      elif not is_end:
        yield from _usable(*item, path, stats)
    return
  size = tf.io.gfile.stat(path).length
  for record, is_end, bytes_read, _ in tfrecords.file_records(path).as_numpy_iterator():
    if is_end and bytes_read != size:
      stats.truncated(path, f'stopped at byte {bytes_read} of {size}')
    elif not is_end:
      yield from _usable(record, record, path, stats)


def _usable(original, record, path, stats):
  """`(original, key, caption, image bytes)` if the record passes the pipeline's checks."""
  try:
    feature = tf.train.Example.FromString(record).features.feature
  except Exception:  # pylint: disable=broad-except  # protobuf's DecodeError, by any name
    stats.skip('unparseable_record', f'a record in {path}')
    return
  first = lambda name: (feature[name].bytes_list.value[:1] or [b''])[0] if name in feature else b''
  key = first('key').decode(errors='replace')
  where = f'{key} in {path}' if key else f'a record in {path}'
  if reinforced.IMAGE_EMBEDDING in feature or (
      isinstance(original, dict) and reinforced.TAR_MEMBER in original):
    raise ValueError(f'{where} is reinforced already: give the original shards')
  images = [first(fmt) for fmt in tfrecords.IMAGE_FORMATS if first(fmt)]
  caption = first('txt')
  reason = ('missing_image' if not images else 'several_images' if len(images) > 1 else
            'empty_caption' if not caption.strip() else None)
  try:
    text = caption.decode('utf-8')
  except UnicodeDecodeError:
    reason = reason or 'invalid_utf8_caption'
  if reason:
    stats.skip(reason, where)
    return
  yield original, key, text, images[0]


# ----------------------------------------------------------------------------------- writing


class _Shard:
  """One source shard through the teacher: its usable records, their views and embeddings."""

  def __init__(self, path, embed_images, embed_texts, embed_dim, options, stats, bar):
    self.path, self.embed_images, self.embed_texts = path, embed_images, embed_texts
    self.embed_dim, self.options, self.stats, self.bar = embed_dim, options, stats, bar
    self.pending = {}  # position -> (original, key, caption), until its views come back
    self.error = None  # what stopped reading the source: raised after tf.data ends

  def _inputs(self):
    # An exception raised here would end the dataset inside `ignore_errors` (meant for images
    # that do not decode) unsaid: it is kept and raised by `outputs`.
    try:
      for i, (original, key, caption, image_bytes) in enumerate(
          source_records(self.path, self.stats)):
        self.pending[i] = (original, key, caption)
        yield i, image_bytes, key.encode() or b'#%d' % i
    except Exception as e:  # pylint: disable=broad-except
      self.error = e

  def _views(self, i, image_bytes, identity):
    o = self.options
    base = tf.stack([tf.constant(o['seed'], tf.int64),
                     tf.strings.to_hash_bucket_fast(identity, 2**62)])
    crops = [transforms.random_crop(image_bytes,
                                    tf.random.experimental.stateless_fold_in(base, j),
                                    o['scale'], o['ratio'], o['preprocess'].convert_first)
             for j in range(o['augmentations'])]
    images = [transforms.normalize_image(transforms.resize_crop(crop, o['resolution']),
                                         o['preprocess'].mean, o['preprocess'].std)
              for crop, _ in crops]
    return i, tf.stack(images), tf.stack([window for _, window in crops])

  def _undecodable(self, before):
    for i in sorted(p for p in self.pending if p < before):
      _, key, _ = self.pending.pop(i)
      self.stats.skip('undecodable_image', f'{key or "a record"} in {self.path}')

  def outputs(self):
    """Yields `(original, arrays)` per usable record, in order."""
    signature = (tf.TensorSpec([], tf.int64), tf.TensorSpec([], tf.string),
                 tf.TensorSpec([], tf.string))
    ds = (tf.data.Dataset.from_generator(self._inputs, output_signature=signature)
          .map(self._views, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
          .ignore_errors(log_warning=False).batch(self.options['batch_size']))
    k, e = self.options['augmentations'], self.embed_dim
    for index_B, views_BxKxRxRx3, windows_BxKx4 in ds.as_numpy_iterator():
      rows = [self.pending.pop(i) for i in index_B]
      self._undecodable(index_B[-1])
      n = len(rows)
      views_NxRxRx3 = views_BxKxRxRx3.reshape(n * k, *views_BxKxRxRx3.shape[2:])
      image_NxE = np.asarray(self.embed_images(views_NxRxRx3))
      text_BxE = np.asarray(self.embed_texts([caption for _, _, caption in rows]))
      if image_NxE.shape != (n * k, e) or text_BxE.shape != (n, e):
        raise ValueError(f'the embedding functions must return (N, {e}) arrays, got image '
                         f'{image_NxE.shape} for {n * k} views, text {text_BxE.shape} for {n}')
      image_BxKxE = image_NxE.reshape(n, k, e)
      for b, (original, _, _) in enumerate(rows):
        yield original, {reinforced.IMAGE_EMBEDDING: image_BxKxE[b],
                         reinforced.TEXT_EMBEDDING: text_BxE[b],
                         reinforced.WINDOWS: windows_BxKx4[b]}
      self.bar.update(n)
    if self.error is not None:
      raise self.error
    self._undecodable(float('inf'))


def _tar_sample(original, arrays):
  out = {name: data for name, data in original.items() if not name.startswith('__')}
  out['__key__'] = original['__key__']
  out[reinforced.TAR_MEMBER] = reinforced.npz_bytes(*(arrays[n] for n in reinforced.ARRAYS))
  return out


def _write_shard(shard, out_path):
  """The shard's reinforced records into `out_path` (beside, then renamed); returns how many."""
  outputs = shard.outputs()
  if out_path.endswith('.tar'):
    return webdataset_tars.write_tar(out_path, (_tar_sample(o, a) for o, a in outputs),
                                     encoder=False)
  n = tfrecords.write_tfrecord(f'{out_path}.tmp',
                               (reinforced.add_features(o, a) for o, a in outputs))
  tf.io.gfile.rename(f'{out_path}.tmp', out_path, overwrite=True)
  return n


def _copy(src, dst):
  tf.io.gfile.copy(src, f'{dst}.tmp', overwrite=True)
  tf.io.gfile.rename(f'{dst}.tmp', dst, overwrite=True)


def write(files, out_dir, embed_images, embed_texts, *, embed_dim, resolution, preprocess,
          augmentations, seed=0, batch_size=64, scale=transforms.TRAIN_SCALE,
          ratio=transforms.TRAIN_RATIO, info=None, progress=True, overwrite=False):
  """Writes the reinforced copy of each shard of `files` (a glob, folder or list, tfrecord or tar)
  into `out_dir` under its own name, its `.parquet` copied beside, then `reinforced.json`.

  Args:
    embed_images: float32 (N, resolution, resolution, 3) views normalised with `preprocess`'s
      mean and std -> (N, embed_dim) L2-normalised image embeddings.
    embed_texts: N captions (str) -> (N, embed_dim) L2-normalised text embeddings.
    embed_dim, resolution, preprocess: the teacher's width, image resolution and
      `clip.PreprocessConfig`.
    augmentations: K, the windows drawn per image; seed, scale, ratio: how (`transforms`).
    batch_size: records per call of the embedding functions (N = batch_size * K views).
    info: more sidecar entries (the teacher, its logit scale).

  Returns the sidecar (a dict) and the `pipeline_stats.Stats` of what was skipped. Raises
  ValueError, before writing, when an output would replace a source, two share a name, or
  `out_dir` holds reinforced shards (unless `overwrite`); while reading, when a source is
  reinforced already; after, when no record was usable (no sidecar is written then).
  """
  if augmentations < 1 or batch_size < 1:
    raise ValueError(f'augmentations and batch_size must be >= 1, got {augmentations}, '
                     f'{batch_size}')
  sources = shard_files.expand_files(files)
  outs = targets(sources, out_dir, overwrite)
  tf.io.gfile.makedirs(out_dir)
  options = dict(seed=seed, scale=tuple(scale), ratio=tuple(ratio), preprocess=preprocess,
                 resolution=resolution, augmentations=augmentations, batch_size=batch_size)
  stats, shards = pipeline_stats.Stats(), {}
  with tqdm(desc='reinforcing', unit=' records', disable=not progress) as bar:
    for source, out in zip(sources, outs):
      shard = _Shard(source, embed_images, embed_texts, embed_dim, options, stats, bar)
      shards[os.path.basename(out)] = {'source': source, 'records': _write_shard(shard, out)}
      if tf.io.gfile.exists(filters.parquet_path(source)):
        _copy(filters.parquet_path(source), filters.parquet_path(out))
  if not sum(s['records'] for s in shards.values()):
    raise ValueError(f'no usable record in {files} (skipped: {stats.summary()}): nothing '
                     'reinforced, no reinforced.json written')
  sidecar = {'format': reinforced.FORMAT, **(info or {}), 'embed_dim': embed_dim,
             'augmentations': augmentations, 'scale': list(scale), 'ratio': list(ratio),
             'seed': seed, 'teacher_resolution': resolution,
             'teacher_preprocess': dataclasses.asdict(preprocess), 'sources': sources,
             'shards': shards, 'records': sum(s['records'] for s in shards.values()),
             'skipped': dict(stats.skipped), 'skipped_examples': dict(stats.examples)}
  text = json.dumps(sidecar, indent=2)
  path = os.path.join(out_dir, reinforced.SIDECAR)
  with tf.io.gfile.GFile(f'{path}.tmp', 'w') as f:
    f.write(text)
  tf.io.gfile.rename(f'{path}.tmp', path, overwrite=True)
  return json.loads(text), stats
