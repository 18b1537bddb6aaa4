"""The built-in captioned shapes written as img2dataset shards (tfrecords and webdataset tars,
each with its parquet) and read back by the shard pipeline: every sample once, with its image,
caption, labels and img2dataset's metadata."""
import hashlib
import json

import numpy as np
import pyarrow.parquet as pq
import tensorflow as tf

from data import filters
from data import shards
from data import synthetic_shards
from data import webdataset_tars
from data.synthetic import SyntheticCaptions
from tests.data.test_synthetic import fake_tokenize
from tests.data.test_tfrecords import OPENAI


def test_tfrecord_export_round_trips_through_the_reader(tmp_path):
  """The synthetic set written as img2dataset shards (PNG: lossless) and read back by the
  tfrecord pipeline gives the same images, captions and attribute labels."""
  ds = SyntheticCaptions(4, 32)
  paths = synthetic_shards.write_tfrecords(ds, str(tmp_path), num_examples=10, num_shards=3, image_format='png')
  assert [p.rsplit('/', 1)[1] for p in paths] == ['00000.tfrecord', '00001.tfrecord',
                                                  '00002.tfrecord']
  example = tf.train.Example.FromString(next(iter(tf.data.TFRecordDataset(paths[1]))).numpy())
  assert example.features.feature['key'].bytes_list.value[0] == b'000010000'
  assert example.features.feature['status'].bytes_list.value[0] == b'success'
  assert filters.MetadataFilter(min_image_size=32).kept_keys(paths[1]) == [
      '000010000', '000010001', '000010002']  # from img2dataset's parquet beside the shard
  p = shards.Pipeline(str(tmp_path), global_batch_size=4, resolution=32, train=False,
                      tokenize=fake_tokenize, preprocess=OPENAI, image_dtype='uint8',
                      fields={'caption': None, 'sample_index': 'int', 'shape': 'int',
                              'colour': 'int'}, process_index=0, process_count=1)
  got = list(p)
  index = np.concatenate([b['sample_index'] for b in got])
  assert sorted(index) == list(range(10))
  reference = ds.get(index)
  np.testing.assert_array_equal(np.concatenate([b['image'] for b in got]), reference['image'])
  assert [c.decode() for b in got for c in b['caption']] == reference['caption']
  for name in ('shape', 'colour'):
    np.testing.assert_array_equal(np.concatenate([b[name] for b in got]), reference[name])


def test_webdataset_export_round_trips_through_the_reader(tmp_path):
  """The synthetic set written as img2dataset webdataset tars (PNG: lossless) and read back by
  the pipeline gives every sample once with its image, caption, labels and metadata; the parquet
  beside each tar holds the same rows as its `.json` members, and MetadataFilter reads it."""
  ds = SyntheticCaptions(4, 32)
  paths = ds.write_webdataset(str(tmp_path), num_examples=10, num_shards=3, image_format='png')
  assert [p.rsplit('/', 1)[1] for p in paths] == ['00000.tar', '00001.tar', '00002.tar']
  members = webdataset_tars.read_tar(paths[1])
  assert [(s['__key__'], sorted(k for k in s if not k.startswith('__'))) for s in members] == [
      (f'0000100{i:02d}', ['json', 'png', 'txt']) for i in range(3)]
  for path in paths:
    metadata = [json.loads(s['json']) for s in webdataset_tars.read_tar(path)]
    assert pq.read_table(filters.parquet_path(path)).to_pylist() == metadata
    assert filters.MetadataFilter(min_image_size=32).kept_keys(path) == [m['key'] for m in metadata]
    assert not filters.MetadataFilter(min_image_size=33).kept_keys(path)
  first = json.loads(members[0]['json'])
  assert first['sha256'] == hashlib.sha256(members[0]['png']).hexdigest()
  assert (first['status'], first['error_message'], first['exif']) == ('success', None, None)
  p = shards.Pipeline(str(tmp_path), global_batch_size=4, resolution=32, train=False,
                      tokenize=fake_tokenize, preprocess=OPENAI, image_dtype='uint8',
                      fields={'key': None, 'caption': None, 'url': 'bytes', 'width': 'int',
                              'sample_index': 'int', 'shape': 'int', 'colour': 'int'},
                      process_index=0, process_count=1)
  batches = list(p)
  got = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
  index = got['sample_index']
  assert sorted(index) == list(range(10))
  reference = ds.get(index)
  np.testing.assert_array_equal(got['image'], reference['image'])
  assert [c.decode() for c in got['caption']] == reference['caption']
  assert [u.decode() for u in got['url']] == [f'synthetic://train/4/{i}' for i in index]
  assert set(got['key']) == {s['__key__'].encode() for path in paths
                             for s in webdataset_tars.read_tar(path)}
  assert set(got['width']) == {32}
  for name in ('shape', 'colour'):
    np.testing.assert_array_equal(got[name], reference[name])
