"""The built-in captioned shapes (`data.synthetic`) written as img2dataset writes a dataset:
tfrecord shards or webdataset tars, each with its `.parquet` of metadata beside it, so that the
shard pipelines (`data.shards`) read them as they read a downloaded set.

  ds = synthetic.SyntheticCaptions(seed=0, resolution=64)
  synthetic_shards.write_tfrecords(ds, 'shards/', num_examples=10_000, num_shards=8)
  ds.write_webdataset('shards/', num_examples=10_000, num_shards=8)   # the same, as a method
"""
import hashlib
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from data import filters
from data import tfrecords
from data import webdataset_tars
from data.synthetic import ATTRIBUTES


def write_tfrecords(ds, out_dir, num_examples, num_shards, image_format='jpg', quality=95,
                    start=0, batch_size=256):
  """Samples [start, start + num_examples) as img2dataset tfrecord shards `00000.tfrecord`...
  with img2dataset's metadata and the attribute labels as int64 features, and its `.parquet`
  beside each shard; returns the shard paths."""
  paths = []
  for shard, samples in _shards(ds, out_dir, num_examples, num_shards, image_format, quality,
                                start, batch_size, 'tfrecords'):
    paths.append(tfrecords.shard_path(out_dir, shard))
    tfrecords.write_tfrecord(paths[-1], [
        tfrecords.serialize_example(key, image, caption, image_format, **meta)
        for key, image, caption, meta in samples])
    _write_parquet(paths[-1], samples)
  return paths


def write_webdataset(ds, out_dir, num_examples, num_shards, image_format='jpg', quality=95,
                     start=0, batch_size=256):
  """Samples [start, start + num_examples) as img2dataset webdataset shards `00000.tar`...:
  `{key}.{image_format}`, `{key}.txt` and `{key}.json` (img2dataset's metadata and the attribute
  labels), and its `.parquet` beside each shard; returns the tar paths."""
  paths = []
  for shard, samples in _shards(ds, out_dir, num_examples, num_shards, image_format, quality,
                                start, batch_size, 'tars'):
    paths.append(webdataset_tars.shard_path(out_dir, shard))
    webdataset_tars.write_tar(paths[-1], [
        {'__key__': key, image_format: image, 'txt': caption,
         'json': webdataset_tars.encode_json(_row(key, meta))}
        for key, image, caption, meta in samples])
    _write_parquet(paths[-1], samples)
  return paths


def _shards(ds, out_dir, num_examples, num_shards, image_format, quality, start, batch_size,
            what):
  """Per shard: (shard id, its samples as `_img2dataset_samples` gives them)."""
  if num_shards < 1 or num_examples < num_shards:
    raise ValueError(f'need 1 <= num_shards <= num_examples, got {num_shards}, {num_examples}')
  if image_format not in tfrecords.IMAGE_FORMATS:
    raise ValueError(f'image_format must be one of {tfrecords.IMAGE_FORMATS}, got '
                     f'{image_format!r}')
  os.makedirs(out_dir, exist_ok=True)
  bounds = np.linspace(0, num_examples, num_shards + 1).astype(int)
  digits = max(4, len(str(int(np.diff(bounds).max()))))
  with tqdm(total=num_examples, desc=f'writing {what}', disable=num_examples < 4096) as bar:
    for shard in range(num_shards):
      samples = list(_img2dataset_samples(ds, start + bounds[shard], start + bounds[shard + 1],
                                          shard, digits, image_format, quality, batch_size))
      bar.update(len(samples))
      yield shard, samples


def _img2dataset_samples(ds, lo, hi, shard, digits, image_format, quality, batch_size):
  """Samples [lo, hi), shard `shard`'s, as img2dataset stores them: (key, encoded image,
  caption, metadata), the metadata img2dataset's fields then the labels (not the key)."""
  for first in range(lo, hi, batch_size):
    sample = ds.get(np.arange(first, min(first + batch_size, hi)))
    for j, index in enumerate(sample['index']):
      image = tfrecords.encode_image(sample['image'][j], image_format, quality)
      meta = {'url': f'synthetic://{ds.split}/{ds.seed}/{int(index)}',
              'caption': sample['caption'][j], 'width': ds.resolution,
              'height': ds.resolution, 'original_width': ds.resolution,
              'original_height': ds.resolution, 'sha256': hashlib.sha256(image).hexdigest(),
              'status': 'success', 'error_message': None, 'exif': None,
              'sample_index': int(index)}
      meta.update({name: int(sample[name][j]) for name in ATTRIBUTES})
      key = tfrecords.sample_key(shard, first + j - lo, index_digits=digits)
      yield key, image, sample['caption'][j], meta


def _row(key, meta):
  """img2dataset's metadata of one sample, as its `.json` member and its parquet row hold it."""
  return {'key': key, **meta}


def _write_parquet(shard_path, samples):
  """img2dataset's `.parquet` beside a shard: one row per sample, its columns typed as
  img2dataset's (sizes int32, the rest strings; null where absent), the labels int64."""
  rows = [_row(key, meta) for key, _, _, meta in samples]
  types = {name: pa.int32() for name in ('width', 'height', 'original_width', 'original_height')}
  types.update({name: pa.int64() for name in ('sample_index', *ATTRIBUTES)})
  schema = pa.schema([(name, types.get(name, pa.string())) for name in rows[0]])
  pq.write_table(pa.Table.from_pylist(rows, schema), filters.parquet_path(shard_path))
