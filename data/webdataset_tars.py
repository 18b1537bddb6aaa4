"""img2dataset's and DataComp's webdataset shards: a writer and the reader of one tar's samples.

img2dataset (`output_format="webdataset"`, also what DataComp's download script and open_clip's
training read) writes tar files `00000.tar`, ... whose members are grouped into samples by key:
`{key}.jpg` (or `.png` / `.webp`, its `encode_format`), `{key}.txt` (the caption) and
`{key}.json` (the metadata: `url`, `caption`, `key`, `status`, `error_message`, `width`,
`height`, `original_width`, `original_height`, `exif`, `sha256` and any kept column, DataComp's
`uid` among them), with `00000.parquet` (the same metadata, one row per URL tried) beside each tar.

Reading: Python's `tarfile` (the standard library's reader, the one webdataset itself uses) walks
the members in order, webdataset's own `group_by_keys` groups them into samples with webdataset's
key rules (the name up to the first dot of its last path part), and each sample becomes a record
in img2dataset's tfrecord schema (`data.tfrecords.example_bytes`), so the tar and tfrecord
formats share the pipeline's parser, checks and batching. A tar cut anywhere (inside a member,
inside a header, at a member boundary: the end-of-archive block is missing) is reported as
truncated with the byte where reading stopped; a `.json` that is not a JSON object (or holds a
number beyond int64), a member whose name has no extension, and a member whose name repeats in
its sample (the first is kept) are counted skips. A metadata field comes back in the type its
JSON value has (a JSON int asked for as 'float' makes the record unparseable, counted).
"""
import json
import os
import tarfile

import numpy as np
import tensorflow as tf
import webdataset
from webdataset import tariterators

from data import tfrecords

BLOCK = 512  # tar's block; the archive ends with zero blocks
CHUNK = 64   # records per generator call: tf.data's from_generator costs ~0.25 ms a call
# webdataset suffix -> the schema's image feature.
IMAGE_SUFFIXES = {'jpg': 'jpg', 'jpeg': 'jpg', 'png': 'png', 'webp': 'webp'}
SIGNATURE = (tf.TensorSpec([None], tf.string), tf.TensorSpec([None], tf.bool),
             tf.TensorSpec([None], tf.int64), tf.TensorSpec([None], tf.string))


class _Problem(Exception):
  """A file that cannot be read on: the message says where and why."""


# ------------------------------------------------------------------------------------ writer


def shard_path(out_dir, shard_id, digits=5):
  """img2dataset's shard name: `{out_dir}/00042.tar`."""
  return os.path.join(out_dir, f'{shard_id:0{digits}d}.tar')


def write_tar(path, samples, encoder=True):
  """Writes samples to one tar with webdataset's own `TarWriter` (what img2dataset uses): each
  a dict `{'__key__': str, 'jpg' | 'png' | 'webp': bytes, 'txt': str, 'json': dict}` (with
  `encoder=False`, bytes only, written as they are: a copy of read members). Returns how many
  were written. The file appears complete or not at all (written beside, then renamed)."""
  tmp = f'{path}.tmp'
  n = 0
  with tf.io.gfile.GFile(tmp, 'wb') as stream:
    # An integer mtime: plain ustar headers (a float one adds a PAX header, ~3 KB, per member)
    # and the same bytes on every write.
    writer = webdataset.TarWriter(stream, mtime=0, encoder=encoder)
    for sample in samples:
      writer.write(sample)
      n += 1
    writer.close()
  tf.io.gfile.rename(tmp, path, overwrite=True)
  return n


# ------------------------------------------------------------------------------------ reader


def _open(path):
  return open(path, 'rb') if '://' not in path else tf.io.gfile.GFile(path, 'rb')


def _members(tar, path, report):
  """The archive's regular files as webdataset's `{'fname', 'data', '__url__'}` dicts."""
  for info in tar:
    if not info.isfile():
      continue
    if tariterators.base_plus_ext(info.name)[0] is None:
      report('unrecognised_member', f'{info.name} in {path}')
      continue
    try:
      data = tar.extractfile(info).read()
    except (tarfile.TarError, OSError, EOFError) as e:
      raise _Problem(f'member {info.name}: {e}') from e
    yield {'fname': info.name, 'data': data, '__url__': path}


def _duplicate_handler(path, report):
  """webdataset's handler for a member whose name repeats in its sample: count it, keep the
  first, read on (anything else is raised: the file cannot be read on)."""
  def handler(error):
    if isinstance(error, ValueError) and 'duplicate file name' in str(error.args[0]):
      report('duplicate_member', f'{str(error.args[0]).split(":")[0]} in {path}')
      return True
    raise error
  return handler


def _check_end(tar, stream, size):
  """After the last member: a zero block must follow (tarfile stops silently at a cut header)."""
  stream.seek(tar.offset)
  if stream.read(BLOCK) != bytes(BLOCK):
    raise _Problem(f'no end-of-archive block after the last member (byte {tar.offset} of {size})')


def _metadata(sample, path, report):
  """The `.json` member as a dict of schema features (None if it is not a JSON object)."""
  if 'json' not in sample:
    return {}
  try:
    meta = json.loads(sample['json'])
  except (ValueError, UnicodeDecodeError):
    meta = None
  if not isinstance(meta, dict):
    report('invalid_metadata', f'{sample["__key__"]} in {path}')
    return None
  out = {}
  for name, value in meta.items():
    if name in ('key', 'txt', *tfrecords.IMAGE_FORMATS) or value is None:
      continue  # the member key is the key; a null is an absent feature (its default)
    if isinstance(value, bool):
      value = int(value)
    elif isinstance(value, (list, dict)):
      value = json.dumps(value)
    out[name] = value
  return out


def sample_record(sample, path, report):
  """One webdataset sample -> a serialized record of img2dataset's tfrecord schema (None when
  its metadata is unusable: counted by `report`)."""
  meta = _metadata(sample, path, report)
  if meta is None:
    return None
  found = [suffix for suffix in IMAGE_SUFFIXES if suffix in sample]
  if len(found) > 1:
    report('several_images', f'{sample["__key__"]} ({", ".join(found)}) in {path}')
    return None
  images = {IMAGE_SUFFIXES[suffix]: sample[suffix] for suffix in found}
  try:
    return tfrecords.example_bytes(sample['__key__'], images, sample.get('txt', b''), meta)
  except ValueError as e:  # a value no feature holds (an int beyond int64): this sample only
    report('invalid_metadata', f'{sample["__key__"]} ({e}) in {path}')
    return None


def samples(path, report, to_record=sample_record):
  """Yields `(record, is_end, bytes_read, problem)`: each sample of one tar as a record
  (`to_record(sample, path, report)`, None to leave it out), then the end marker (`bytes_read`
  the file size when the archive was whole, `problem` else)."""
  size = tf.io.gfile.stat(path).length
  problem, bytes_read = b'', size
  with _open(path) as stream:
    try:
      with tarfile.open(fileobj=stream, mode='r:') as tar:
        for sample in tariterators.group_by_keys(_members(tar, path, report),
                                                 handler=_duplicate_handler(path, report)):
          record = to_record(sample, path, report)
          if record is not None:
            yield record, False, np.int64(0), b''
        _check_end(tar, stream, size)
    except (_Problem, tarfile.TarError, ValueError, OSError, EOFError) as e:
      problem = str(e.args[0] if e.args else e).encode()
      bytes_read = stream.tell()
  yield b'', True, np.int64(bytes_read), problem


def _chunks(items):
  """`samples`' tuples in columns of up to CHUNK rows (order kept)."""
  chunk = []
  for item in items:
    chunk.append(item)
    if len(chunk) == CHUNK:
      yield _columns(chunk)
      chunk = []
  if chunk:
    yield _columns(chunk)


def _columns(rows):
  records, ends, read, problems = zip(*rows)
  return (np.array(records, object), np.array(ends, bool), np.array(read, np.int64),
          np.array(problems, object))


def file_records(path, report, to_record=sample_record):
  """One tar -> a dataset of `(record, is_end, bytes_read, problem)` (see `samples`); `report`
  (reason, example) counts a skipped member or sample. The Python reader hands them to tf.data
  in chunks (then unbatched, in order): one generator call per record cost more than reading."""
  return tf.data.Dataset.from_generator(
      lambda p: _chunks(samples(p.decode(), report, to_record)), args=(path,),
      output_signature=SIGNATURE).unbatch()


def read_tar(path):
  """A tar's samples as webdataset groups them (tests, tools): [{'__key__', suffix: bytes}]."""
  with _open(os.fspath(path)) as stream, tarfile.open(fileobj=stream, mode='r:') as tar:
    members = ({'fname': i.name, 'data': tar.extractfile(i).read(), '__url__': path}
               for i in tar if i.isfile())
    return list(tariterators.group_by_keys(members))


def encode_json(metadata):
  """Metadata as img2dataset writes its `.json` member (indented, nulls kept)."""
  return json.dumps(metadata, indent=4).encode()

