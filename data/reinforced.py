"""Reinforced shards (MobileCLIP's "reinforced data", arXiv:2311.17049, its DataCompDR): img2dataset
shards whose every record also stores a teacher's outputs, so that training distils from them
without running the teacher. Written by `experiments/reinforce.py` (`data.reinforced_writer`),
read by `data.shards.Pipeline(..., reinforced=ReinforcedSpec(embed_dim, augmentations))`.

Each record is a copy of the original (image bytes, caption, key, metadata) plus, for K stored
augmentations of its image and a teacher of embedding width E:

  teacher_image_embedding  float32 (K, E)  the teacher's L2-normalised embedding of each view
  teacher_text_embedding   float32 (E,)    the teacher's L2-normalised embedding of the caption
  augmentation_windows     int (K, 4)      each view's random-resized-crop window (top, left,
                                           height, width) in the original image's pixels

tfrecord: three features of those names (float_list / int64_list, row-major). webdataset tar: one
member `{key}.teacher.npz` (numpy's uncompressed `.npz` of the three arrays, read with
`allow_pickle=False`: loading a file never runs code). Shards keep their names, each `.parquet`
copied beside, and `reinforced.json` in the folder states the teacher (as given), `embed_dim`,
`augmentations`, its `logit_scale` (log space), the crop `scale` and `ratio`, the `seed`, the
sources and the record counts.

A view is `data.transforms.crop_at(image, window)` resized to the teacher's resolution
(`transforms.resize_crop`) and normalised with the teacher's mean and std; a student replays the
same window at its own resolution, so its image and the stored embedding are of one crop.
"""
import io
import json
import os
from typing import NamedTuple

import numpy as np
import tensorflow as tf

from data import shard_files
from data import tfrecords
from data import webdataset_tars

SIDECAR = 'reinforced.json'
FORMAT = 'reinforced-shards-v1'
IMAGE_EMBEDDING = 'teacher_image_embedding'
TEXT_EMBEDDING = 'teacher_text_embedding'
WINDOWS = 'augmentation_windows'
ARRAYS = (IMAGE_EMBEDDING, TEXT_EMBEDDING, WINDOWS)
TAR_MEMBER = 'teacher.npz'  # a tar sample's `{key}.teacher.npz`


class ReinforcedSpec(NamedTuple):
  """What a run reading reinforced shards expects: the teacher's embedding width E (the width of
  the run's KD targets) and the augmentation count K stored per image. `return_index`: batches
  also hold 'augmentation_index' int32 (B,), which stored augmentation each image replays."""
  embed_dim: int
  augmentations: int
  return_index: bool = False


def check_spec(spec):
  """`spec` if it is a ReinforcedSpec of positive ints, else TypeError / ValueError."""
  if not isinstance(spec, ReinforcedSpec):
    raise TypeError('reinforced must be data.reinforced.ReinforcedSpec(embed_dim, augmentations), '
                    f'got {type(spec).__name__}')
  for name in ('embed_dim', 'augmentations'):
    value = getattr(spec, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ValueError(f'ReinforcedSpec.{name} must be a positive int, got {value!r}')
  return spec


# ----------------------------------------------------------------------------------- arrays


def npz_bytes(image_embedding_KxE, text_embedding_E, windows_Kx4):
  """A tar sample's `teacher.npz` member: float32, float32 and int32 arrays, uncompressed."""
  buffer = io.BytesIO()
  np.savez(buffer, **{IMAGE_EMBEDDING: np.asarray(image_embedding_KxE, np.float32),
                      TEXT_EMBEDDING: np.asarray(text_embedding_E, np.float32),
                      WINDOWS: np.asarray(windows_Kx4, np.int32)})
  return buffer.getvalue()


def load_npz(data):
  """A `teacher.npz` member -> {name: array}; never unpickles (ValueError for an object array)."""
  with np.load(io.BytesIO(data), allow_pickle=False) as npz:
    return {name: npz[name] for name in npz.files}


def add_features(record, arrays):
  """A serialized record of img2dataset's schema -> the same with the three arrays as features."""
  example = tf.train.Example.FromString(record)
  feature = example.features.feature
  for name in (IMAGE_EMBEDDING, TEXT_EMBEDDING):
    feature[name].float_list.value[:] = np.asarray(arrays[name], np.float32).ravel().tolist()
  feature[WINDOWS].int64_list.value[:] = np.asarray(arrays[WINDOWS], np.int64).ravel().tolist()
  return example.SerializeToString()


def record_arrays(record):
  """A reinforced tfrecord-schema record -> {name: flat array} of the features it holds."""
  feature = tf.train.Example.FromString(record).features.feature
  out = {name: np.asarray(feature[name].float_list.value, np.float32)
         for name in (IMAGE_EMBEDDING, TEXT_EMBEDDING) if name in feature}
  if WINDOWS in feature:
    out[WINDOWS] = np.asarray(feature[WINDOWS].int64_list.value, np.int64)
  return out


# ----------------------------------------------------------------------------------- reading


def tar_record(sample, path, report):
  """A reinforced tar sample -> a record of the schema with the three features (None, counted
  as 'invalid_teacher_outputs', when its `teacher.npz` is not a readable `.npz`; a sample
  without one becomes a record without them, which the pipeline counts unparseable)."""
  record = webdataset_tars.sample_record(sample, path, report)
  if record is None or TAR_MEMBER not in sample:
    return record
  try:
    arrays = load_npz(sample[TAR_MEMBER])
  except (ValueError, OSError, EOFError) as e:
    report('invalid_teacher_outputs', f'{sample["__key__"]} ({e}) in {path}')
    return None
  return add_features(record, arrays)


class _TarReader:
  """`data.webdataset_tars` as a pipeline's reader, with each sample's teacher outputs."""

  @staticmethod
  def file_records(path, report):
    return webdataset_tars.file_records(path, report, to_record=tar_record)


def reader_for(path):
  """The reader of reinforced shards like `path`: tfrecords hold the features already."""
  reader = shard_files.reader_for(path)
  return _TarReader if reader is webdataset_tars else reader


def features(spec):
  """The parse spec of the three features for `tf.io.parse_single_example` (flat, row-major);
  a record whose lengths differ fails to parse: a counted, unparseable record."""
  k, e = spec.augmentations, spec.embed_dim
  return {IMAGE_EMBEDDING: tf.io.FixedLenFeature([k * e], tf.float32),
          TEXT_EMBEDDING: tf.io.FixedLenFeature([e], tf.float32),
          WINDOWS: tf.io.FixedLenFeature([k * 4], tf.int64)}


def read_sidecar(folder):
  """`folder/reinforced.json` as a dict; ValueError when there is none or it is not ours."""
  path = os.path.join(folder, SIDECAR)
  if not tf.io.gfile.exists(path):
    raise ValueError(f'{folder} holds no {SIDECAR}: these are not reinforced shards (write them '
                     'with python -m experiments.reinforce), or give them without reinforced=')
  with tf.io.gfile.GFile(path) as f:
    sidecar = json.load(f)
  if not isinstance(sidecar, dict) or sidecar.get('format') != FORMAT:
    raise ValueError(f'{path} is not a reinforced-shards sidecar (format {FORMAT!r})')
  return sidecar


def check_source(files, spec):
  """Before any training: every folder of `files` (expanded shard paths) holds a sidecar whose
  `embed_dim` and `augmentations` are the run's and which lists each file, and the first record
  of the first file holds arrays of those shapes. ValueError naming both values otherwise."""
  check_spec(spec)
  for folder in sorted({os.path.dirname(f) for f in files}):
    sidecar = read_sidecar(folder)
    for name, expected in (('embed_dim', spec.embed_dim),
                           ('augmentations', spec.augmentations)):
      if sidecar.get(name) != expected:
        raise ValueError(f'{os.path.join(folder, SIDECAR)}: the shards hold {name}='
                         f'{sidecar.get(name)}, the run expects {name}={expected}')
    listed = set(sidecar.get('shards', {}))
    unlisted = [f for f in files if os.path.dirname(f) == folder
                and os.path.basename(f) not in listed]
    if unlisted:
      raise ValueError(f'{unlisted[:3]} are not among the shards {os.path.join(folder, SIDECAR)} '
                       'lists: not reinforced shards')
  first = next(iter(reader_for(files[0]).file_records(files[0], lambda *_: None).take(1)))
  record, is_end = first[0].numpy(), bool(first[1].numpy())
  if is_end:
    raise ValueError(f'{files[0]}: no readable record to check')
  _check_first(record_arrays(record), spec, f'the first record of {files[0]}')


def _check_first(arrays, spec, where):
  """A record's flat arrays against the run's (K, E): ValueError naming what it stores."""
  missing = [name for name in ARRAYS if name not in arrays]
  if missing:
    raise ValueError(f'{where}: not a reinforced record, it holds no {", ".join(missing)}')
  width = arrays[TEXT_EMBEDDING].size
  count = arrays[IMAGE_EMBEDDING].size // max(width, 1)
  stored = {'embed_dim': width, 'augmentations': count}
  for name, expected in (('embed_dim', spec.embed_dim), ('augmentations', spec.augmentations)):
    if stored[name] != expected:
      raise ValueError(f'{where}: it holds {name}={stored[name]}, the run expects '
                       f'{name}={expected}')
  if arrays[IMAGE_EMBEDDING].size != count * width or arrays[WINDOWS].size != 4 * count:
    raise ValueError(f'{where}: {arrays[IMAGE_EMBEDDING].size} image-embedding values and '
                     f'{arrays[WINDOWS].size} window values are not K x E and K x 4 for '
                     f'E={width}')


def run_spec(data):
  """What a run reading the reinforced shards of `data` (a glob, folder or mixture 'a:0.7,b:0.3',
  as `data.mixture.make_pipeline` takes it) expects: `(ReinforcedSpec(embed_dim, augmentations),
  the teacher's logit_scale)` from the sidecars of its folders, which must all agree (one teacher
  and one augmentation count per run). ValueError naming the two folders otherwise, or when a
  folder holds no sidecar."""
  from data import mixture  # pylint: disable=g-import-not-at-top  # it imports the pipelines
  folders = sorted({os.path.dirname(f) for pattern, _ in mixture.parse_sources(data)
                    for f in shard_files.expand_files(pattern)})
  found = {}
  for folder in folders:
    sidecar = read_sidecar(folder)
    found[folder] = (sidecar.get('embed_dim'), sidecar.get('augmentations'),
                     sidecar.get('logit_scale'))
  first = folders[0]
  for folder, values in found.items():
    if values != found[first]:
      raise ValueError(f'reinforced shards of two teachers in one run: {first} holds (embed_dim, '
                       f'augmentations, logit_scale) {found[first]}, {folder} holds {values}')
  embed_dim, augmentations, logit_scale = found[first]
  return ReinforcedSpec(embed_dim, augmentations), logit_scale
