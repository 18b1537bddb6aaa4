"""Which shard files a source names: a glob, a folder or a list of them (brace ranges expanded,
any tf.io path), all of one format, and the module that reads that format's records."""
import collections
import os

import braceexpand
import tensorflow as tf

from data import tfrecords
from data import webdataset_tars

# File suffix -> the module that reads such a file's records.
READERS = {'.tfrecord': tfrecords, '.tar': webdataset_tars}


def _suffix(path):
  return os.path.splitext(path)[1].lower()


def expand_files(files):
  """A glob, a folder (its `*.tfrecord` and `*.tar`) or a list of them -> sorted unique paths of
  one format (tf.io.gfile: gs:// works). Brace ranges are expanded first, as webdataset and
  open_clip write them (`shards/{00000..00099}.tar`). Anything else matched is an error naming
  what it is."""
  if isinstance(files, (str, os.PathLike)):
    files = [files]
  if not isinstance(files, (list, tuple)) or not files:
    raise ValueError('files must be a glob, a directory or a non-empty list of them, got '
                     f'{files!r}')
  paths = set()
  patterns = [p for f in map(os.fspath, files) for p in braceexpand.braceexpand(f)]
  for pattern in patterns:
    if tf.io.gfile.isdir(pattern):
      matched = [p for suffix in READERS for p in tf.io.gfile.glob(os.path.join(pattern,
                                                                               '*' + suffix))]
      if not matched:
        found = collections.Counter(_suffix(p) or p for p in tf.io.gfile.listdir(pattern))
        raise FileNotFoundError(f'folder {pattern!r} holds no {" or ".join(READERS)} shard; '
                                f'found {dict(found) or "nothing"}')
    else:
      matched = tf.io.gfile.glob(pattern)
      if not matched:
        raise FileNotFoundError(f'no file matches {pattern!r}')
    paths.update(matched)
  return _one_format(sorted(paths))


def _one_format(paths):
  kinds = collections.Counter(_suffix(p) for p in paths)
  wrong = {k or '(no suffix)': n for k, n in kinds.items() if k not in READERS}
  if wrong:
    examples = [p for p in paths if _suffix(p) not in READERS][:3]
    raise ValueError(f'expected img2dataset shards ({" or ".join(READERS)} files), but the '
                     f'pattern also matched {wrong}, e.g. {examples}: point it at the shards '
                     'only (e.g. "<dir>/*.tar")')
  if len(kinds) > 1:
    raise ValueError(f'one source reads one format, got {dict(kinds)}: give them as a mixture '
                     '(data.mixture, --data "a/*.tar:0.5,b/*.tfrecord:0.5")')
  return paths


def reader_for(path):
  """The module that reads the records of a shard file like `path` (`READERS`, by suffix)."""
  return READERS[_suffix(path)]
