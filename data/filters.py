"""DataComp-style filtering of img2dataset shards from the `.parquet` written beside each shard.

img2dataset writes `00042.parquet` next to `00042.tar` / `00042.tfrecord`: one row per URL it
tried, with `key`, `status` ('success' for the samples in the shard), `original_width`,
`original_height` and the kept columns (DataComp's `uid`). A `MetadataFilter` turns those rows
into the set of samples to keep; `data.shards.Pipeline(keep=...)` leaves the others out and counts
them (`stats.filtered`), before decoding.

DataComp's subset files (the output of its baselines, the `--subset_file` of its resharder) are
`.npy` arrays of dtype `u8,u8`: each 128-bit uid as two 64-bit halves of its 32-hex-digit string
(DataComp's `baselines/utils.py`); `load_uids` reads those, `.npy` string arrays, and text files
of one uid per line.

  keep = MetadataFilter(uids='datacomp_subset.npy', min_image_size=200)
  pipeline = Pipeline('shards/*.tar', ..., keep=keep)
"""
import dataclasses
import io
import os

import numpy as np
import pyarrow.parquet as pq
import tensorflow as tf

UID_DTYPE = np.dtype('u8,u8')


def load_uids(uids):
  """A DataComp subset -> frozenset of 32-hex-digit uid strings (lower case).

  `uids`: a path (`.npy` of dtype u8,u8 or of strings; any other file: one uid per line) or an
  iterable of uid strings. Raises ValueError on an entry that is not 32 hex digits."""
  if isinstance(uids, (str, os.PathLike)):
    path = os.fspath(uids)
    if path.endswith('.npy'):
      with tf.io.gfile.GFile(path, 'rb') as f:
        array = np.load(f, allow_pickle=False)
      if array.dtype.names is not None and len(array.dtype.names) == 2:
        hi, lo = (array[name].astype(np.uint64) for name in array.dtype.names)
        return frozenset(f'{int(a):016x}{int(b):016x}' for a, b in zip(hi, lo))
      uids = array.astype(str).tolist()
    else:
      with tf.io.gfile.GFile(path, 'r') as f:
        uids = [line.strip() for line in f if line.strip()]
  out = frozenset(str(u).lower() for u in uids)
  bad = [u for u in out if len(u) != 32 or any(c not in '0123456789abcdef' for c in u)]
  if bad:
    raise ValueError(f'uids must be 32 hex digits (DataComp\'s 128-bit uid), got {bad[:3]}')
  return out


def parquet_path(shard_path):
  """img2dataset's metadata file of a shard: `00042.tar` -> `00042.parquet`."""
  return os.path.splitext(shard_path)[0] + '.parquet'


@dataclasses.dataclass(frozen=True)
class MetadataFilter:
  """Which samples of img2dataset shards to keep, from the parquet beside each shard.

  Attributes:
    uids: keep only these (a `load_uids` argument: DataComp's `.npy` subset, a text file or an
      iterable of 32-hex-digit strings), matched against the `uid_column`.
    min_image_size: keep only images whose shorter original side (`original_width`,
      `original_height`) is at least this many pixels (DataComp's basic filter uses 200).
    uid_column: the parquet column holding the uid (DataComp: 'uid').
  """
  uids: object = None
  min_image_size: int | None = None
  uid_column: str = 'uid'

  def __post_init__(self):
    if self.uids is None and self.min_image_size is None:
      raise ValueError('MetadataFilter needs uids= or min_image_size= (else it keeps everything)')
    if self.min_image_size is not None and (isinstance(self.min_image_size, bool) or not
                                            isinstance(self.min_image_size, int) or
                                            self.min_image_size < 1):
      raise ValueError(f'min_image_size must be a positive int, got {self.min_image_size!r}')
    if self.uids is not None and not isinstance(self.uids, frozenset):
      object.__setattr__(self, 'uids', load_uids(self.uids))

  def kept_keys(self, shard_path):
    """The keys of the shard's samples that pass, from its parquet (FileNotFoundError if absent,
    ValueError naming a missing column)."""
    path = parquet_path(shard_path)
    if not tf.io.gfile.exists(path):
      raise FileNotFoundError(f'filtering needs img2dataset\'s metadata beside each shard: no '
                              f'{path} for {shard_path}')
    columns = ['key', 'status']
    if self.uids is not None:
      columns.append(self.uid_column)
    if self.min_image_size is not None:
      columns += ['original_width', 'original_height']
    with tf.io.gfile.GFile(path, 'rb') as f:
      parquet = pq.ParquetFile(io.BytesIO(f.read()))
    names = parquet.schema_arrow.names
    missing = [c for c in columns if c not in names]
    if missing:
      raise ValueError(f'{path} has no column {missing}; its columns: {names}')
    rows = parquet.read(columns=columns).to_pydict()  # only these: captions, exif stay unread
    keep = np.asarray([s == 'success' for s in rows['status']], bool)
    if self.uids is not None:
      keep &= np.asarray([str(u).lower() in self.uids for u in rows[self.uid_column]], bool)
    if self.min_image_size is not None:
      sides = np.minimum(np.asarray(rows['original_width'], float),
                         np.asarray(rows['original_height'], float))
      keep &= np.nan_to_num(sides, nan=0) >= self.min_image_size
    return [k for k, kept in zip(rows['key'], keep) if kept]

  def table(self, shard_paths):
    """A tf lookup table 'path<TAB>key' -> kept, over the given shards (absent: not kept)."""
    entries = [f'{path}\t{key}' for path in shard_paths for key in self.kept_keys(path)]
    if not entries:
      return _table([''], [False])
    return _table(entries, [True] * len(entries))


def _table(keys, values):
  init = tf.lookup.KeyValueTensorInitializer(tf.constant(keys, tf.string),
                                             tf.constant(values, tf.bool))
  return tf.lookup.StaticHashTable(init, default_value=False)
