"""img2dataset's tfrecord shards: a writer of its schema and the reader of one file's records.

img2dataset (`output_format="tfrecord"`) writes one `tf.train.Example` per sample: `key` (bytes),
the encoded image under its format's name (`jpg`, `png` or `webp`), the caption under `txt`, and
every metadata field as a feature of its own (ints as int64_list, strings as bytes_list): `url`,
`caption`, `width`, `height`, `original_width`, `original_height`, `sha256`, `status`, `exif`,
`error_message`, plus any column the user asked it to keep. Shards are `00000.tfrecord`, ...,
sample keys the shard id followed by the index in the shard (`000000012`).

This schema is also the record format inside `data.shards.Pipeline`: webdataset samples are
turned into the same `tf.train.Example` (`data.webdataset_tars`), so both formats share one
parser, one set of checks and one batching path.
"""
import io
import os

import numpy as np
from PIL import Image
import tensorflow as tf

from data import transforms

IMAGE_FORMATS = ('jpg', 'png', 'webp')
# img2dataset's metadata fields (and DataComp's kept `uid` column) and their feature types.
METADATA_TYPES = {
    'uid': 'bytes', 'url': 'bytes', 'caption': 'bytes', 'status': 'bytes', 'error_message': 'bytes',
    'exif': 'bytes', 'sha256': 'bytes', 'md5': 'bytes', 'width': 'int', 'height': 'int',
    'original_width': 'int', 'original_height': 'int',
}
FEATURE_TYPES = {'int': tf.int64, 'float': tf.float32, 'bytes': tf.string}
TFRECORD_OVERHEAD = 16  # bytes around each record: length (8), its crc (4), the data's crc (4)


def metadata_spec(metadata):
  """('width', 'url') or {'name': 'int' | 'float' | 'bytes'} -> {name: tf dtype}."""
  if isinstance(metadata, dict):
    items = metadata.items()
  else:
    unknown = [m for m in metadata if m not in METADATA_TYPES]
    if unknown:
      raise ValueError(f'unknown metadata {unknown}: img2dataset\'s fields are '
                       f'{sorted(METADATA_TYPES)}; give others as a dict name -> '
                       'int/float/bytes')
    items = [(m, METADATA_TYPES[m]) for m in metadata]
  spec = {}
  for name, kind in items:
    if kind not in FEATURE_TYPES:
      raise ValueError(f'metadata {name!r}: type must be one of '
                       f'{sorted(FEATURE_TYPES)}, got {kind!r}')
    if name in ('txt', *IMAGE_FORMATS):
      raise ValueError(f'{name!r} is the schema\'s own {"caption" if name == "txt" else "image"}'
                       ", not metadata: ask for fields=('caption',) or use the 'image' output")
    spec[name] = FEATURE_TYPES[kind]
  return spec


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
  return example_bytes(key, {image_format: image_bytes}, txt, metadata)


def example_bytes(key, images, txt, metadata):
  """The schema's `tf.train.Example` with any number of image features (`images`: format ->
  bytes; the reader counts a record with none or several as unusable), serialized."""
  reserved = {'key', 'txt', *IMAGE_FORMATS} & set(metadata)
  if reserved:
    raise ValueError('metadata may not use the schema\'s own feature names, got '
                     f'{sorted(reserved)}')
  feature = {'key': _feature('key', key), 'txt': _feature('txt', txt)}
  feature.update({fmt: _feature(fmt, data) for fmt, data in images.items()})
  feature.update({name: _feature(name, value) for name, value in metadata.items()})
  return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def encode_image(image_HxWx3, image_format='jpg', quality=95):
  """uint8 (H, W, 3) RGB -> encoded bytes (PIL), as img2dataset stores them."""
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




# ------------------------------------------------------------------------------------ reader


def file_records(path, report=None):
  """One tfrecord file -> a dataset of `(record, is_end, bytes_read, problem)`: its records, then
  one end marker whose `bytes_read` the pipeline compares with the file size.

  A truncated or corrupt file makes TFRecordDataset fail; `ignore_errors` ends the file there, and
  the byte count of what was read tells that it happened (`problem` is always empty here, and
  nothing is left out before the pipeline's checks, so `report` is not called)."""
  del report
  records = tf.data.TFRecordDataset(path, buffer_size=1 << 20).ignore_errors()
  end = tf.data.Dataset.from_tensors(tf.constant(b''))
  tagged = records.map(lambda r: (r, False)).concatenate(end.map(lambda r: (r, True)))

  def count(total, x):
    record, is_end = x
    size = tf.cast(tf.strings.length(record), tf.int64) + TFRECORD_OVERHEAD
    total = total + tf.where(is_end, tf.constant(0, tf.int64), size)
    return total, (record, is_end, total, tf.constant(b''))

  return tagged.scan(tf.constant(0, tf.int64), count)
