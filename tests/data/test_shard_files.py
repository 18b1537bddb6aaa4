"""Which shard files a source names: globs, folders, brace ranges and lists, sorted and unique,
of one format, anything else refused naming what it found."""
import glob
import os

import pytest

from data import shard_files
from data import tfrecords
from data import webdataset_tars


def touch(folder, *names):
  os.makedirs(folder, exist_ok=True)
  for name in names:
    open(os.path.join(folder, name), 'wb').close()
  return str(folder)


def test_globs_folders_braces_and_lists_name_the_same_sorted_files(tmp_path):
  folder = touch(tmp_path / 'a', '00002.tar', '00000.tar', '00001.tar')
  expected = sorted(glob.glob(os.path.join(folder, '*.tar')))
  assert len(expected) == 3
  assert shard_files.expand_files(folder) == expected
  assert shard_files.expand_files(tmp_path / 'a') == expected  # a Path
  assert shard_files.expand_files(os.path.join(folder, '*.tar')) == expected
  assert shard_files.expand_files(os.path.join(folder, '{00000..00002}.tar')) == expected
  assert shard_files.expand_files([expected[2], os.path.join(folder, '0000[01].tar'),
                                   expected[0]]) == expected  # sorted, unique


def test_what_is_not_one_format_of_shards_is_refused_naming_it(tmp_path):
  folder = touch(tmp_path / 'b', '00000.tar', '00000.parquet', '00001.tfrecord')
  with pytest.raises(ValueError, match=r"pattern also matched \{'\.parquet': 1\}"):
    shard_files.expand_files(os.path.join(folder, '*'))
  with pytest.raises(ValueError, match=r"one format, got \{'\.tar': 1, '\.tfrecord': 1\}"):
    shard_files.expand_files(folder)
  with pytest.raises(FileNotFoundError, match=r"no \.tfrecord or \.tar shard; found \{'\.json': 1\}"):
    shard_files.expand_files(touch(tmp_path / 'c', 'stats.json'))
  with pytest.raises(FileNotFoundError, match='no file matches'):
    shard_files.expand_files(str(tmp_path / 'none-*.tar'))
  with pytest.raises(ValueError, match='non-empty list'):
    shard_files.expand_files([])


def test_reader_for_is_the_format_s_module():
  assert shard_files.reader_for('gs://bucket/00000.tfrecord') is tfrecords
  assert shard_files.reader_for('shards/00000.TAR') is webdataset_tars
