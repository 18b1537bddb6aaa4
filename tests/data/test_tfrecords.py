"""The img2dataset tfrecord reader and writer: schema round trip and corrupt input (the shard
pipeline's behaviour over such shards: `test_shards.py`, with the helpers here).

Shards are written here with `tf.train.Example` directly, in img2dataset's schema, so the reader
is checked against the format and not against our own writer. Images are compared with
`clip.preprocess` (PIL preprocessing: OpenAI's, and the other resize modes) as the independent
reference.
"""
# pylint: disable=redefined-outer-name
import dataclasses
import functools
import io
import os

import chex
import numpy as np
from PIL import Image
import pytest
import sentencepiece
import tensorflow as tf

import clip
from clip import preprocess
from data import shards
from data import tfrecords
from experiments.configs import siglip_small
from tests.test_siglip_tokenizer import SIGLIP_SPEC
from tests.test_siglip_tokenizer import training_texts

CONTEXT = 16
OPENAI = clip.PreprocessConfig()
SIGLIP = clip.PreprocessConfig((0.5,) * 3, (0.5,) * 3, 'squash')
EXACT = 1e-5


def one_level(config):
  """One uint8 level after normalisation with `config`'s std: PIL and tf's resize may round one
  level apart."""
  return 1.0 / 255 / min(config.std) + 1e-5


ONE_LEVEL = one_level(OPENAI)


@pytest.fixture(scope='module')
def siglip_cfg(tmp_path_factory):
  """`siglip_small`'s model as SigLIP reads: a SentencePiece tokenizer with SigLIP's conventions
  (a tiny one, tests/test_siglip_tokenizer.py's `SIGLIP_SPEC`: `</s>` = 1 ends and pads), pooled
  at the last position, images squashed and normalised with mean and std 0.5."""
  folder = tmp_path_factory.mktemp('spm')
  (folder / 'corpus.txt').write_text('\n'.join(training_texts(600)), encoding='utf-8')
  sentencepiece.SentencePieceTrainer.train(
      input=str(folder / 'corpus.txt'), model_prefix=str(folder / 'siglip'),
      character_coverage=0.995, minloglevel=2, **SIGLIP_SPEC)
  base = siglip_small.get_config().model
  text = dataclasses.replace(base.text, vocab_size=SIGLIP_SPEC['vocab_size'],
                             eot_token_id=SIGLIP_SPEC['eos_id'], pool='last', mask_padding=False)
  return dataclasses.replace(
      base, text=text, preprocess=SIGLIP,
      tokenizer=clip.TokenizerConfig('siglip', model_file=str(folder / 'siglip.model')))


def model_tokenize(cfg):
  """What a job hands the pipelines: the model's tokenizer, truncating."""
  return functools.partial(clip.get_tokenizer(cfg), truncate=True)


def fake_tokenize(texts):
  """A deterministic stand-in for the BPE tokenizer: UTF-8 bytes + 1, zero padded."""
  out = np.zeros((len(texts), CONTEXT), np.int32)
  for i, text in enumerate(texts):
    ids = [b + 1 for b in text.encode()][:CONTEXT]
    out[i, :len(ids)] = ids
  return out


def _bytes(v):
  return tf.train.Feature(bytes_list=tf.train.BytesList(value=[v]))


def _int(v):
  return tf.train.Feature(int64_list=tf.train.Int64List(value=[v]))


def img2dataset_example(key, image_bytes, caption, fmt='png', width=0, height=0):
  """A record exactly as img2dataset's TFRecordSampleWriter writes it."""
  feature = {'key': _bytes(key.encode()), fmt: _bytes(image_bytes), 'txt': _bytes(caption),
             'url': _bytes(f'https://example.com/{key}.jpg'.encode()), 'caption': _bytes(caption),
             'width': _int(width), 'height': _int(height), 'original_width': _int(2 * width),
             'original_height': _int(2 * height), 'status': _bytes(b'success'),
             'error_message': _bytes(b''), 'exif': _bytes(b''),
             'sha256': _bytes(b'0' * 64)}
  return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def encode(image, fmt):
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, {'png': 'PNG', 'jpg': 'JPEG'}[fmt], quality=92)
  return buffer.getvalue()


def smooth_image(rng, height, width):
  """A photo-like image (smooth, plus noise): JPEG keeps it close, resizing is non-trivial."""
  y, x = np.mgrid[0:height, 0:width] / max(height, width)
  a, b, c = rng.uniform(2, 9, 3)
  image = np.stack([128 + 90 * np.sin(a * x + b * y), 128 + 90 * np.cos(c * x * y * 3),
                    128 + 80 * np.sin(a * (x - y))], -1) + rng.normal(0, 12, (height, width, 3))
  return np.clip(image, 0, 255).astype(np.uint8)


def write_shards(out_dir, num_shards, per_shard, fmt='png', size=(24, 24), seed=0):
  """img2dataset-style shards; returns {key: (image uint8, caption, image bytes)}."""
  rng = np.random.default_rng(seed)
  samples = {}
  os.makedirs(out_dir, exist_ok=True)
  for shard in range(num_shards):
    with tf.io.TFRecordWriter(os.path.join(out_dir, f'{shard:05d}.tfrecord')) as writer:
      for i in range(per_shard):
        key = f'{shard:05d}{i:04d}'
        h, w = size if size else rng.integers(20, 60, 2)
        image = smooth_image(rng, h, w)
        caption = f'a picture {shard} {i} caf\u00e9'
        data = encode(image, fmt)
        samples[key] = (image, caption, data)
        writer.write(img2dataset_example(key, data, caption.encode(), fmt, int(w), int(h)))
  return samples


def read_all(pipeline):
  """All batches, concatenated."""
  batches = list(pipeline)
  return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def pipeline(files, **kwargs):
  kwargs = {'global_batch_size': 4, 'resolution': 24, 'train': False, 'tokenize': fake_tokenize,
            'preprocess': OPENAI, 'process_index': 0, 'process_count': 1, **kwargs}
  return shards.Pipeline(files, **kwargs)


@pytest.fixture(scope='module')
def png_dir(tmp_path_factory):
  out = str(tmp_path_factory.mktemp('png'))
  return out, write_shards(out, num_shards=3, per_shard=5)


def test_png_round_trip_is_exact(png_dir):
  """Lossless images at the model's size come back as exactly `clip.normalize_image(x / 255)`,
  with their captions, keys, tokens and img2dataset metadata."""
  out, samples = png_dir
  got = read_all(pipeline(out, fields=('key', 'caption', 'url', 'width', 'original_height')))
  keys = [k.decode() for k in got['key']]
  assert sorted(keys) == sorted(samples)
  expected = np.stack([samples[k][0] for k in keys]).astype(np.float32) / 255
  chex.assert_shape(got['image'], (15, 24, 24, 3))
  assert got['image'].dtype == np.float32 and got['tokens'].dtype == np.int32
  chex.assert_trees_all_close(got['image'], np.asarray(clip.normalize_image(expected)), atol=EXACT)
  captions = [samples[k][1] for k in keys]
  assert [c.decode() for c in got['caption']] == captions
  np.testing.assert_array_equal(got['tokens'], fake_tokenize(captions))
  assert [u.decode() for u in got['url']] == [f'https://example.com/{k}.jpg' for k in keys]
  np.testing.assert_array_equal(got['width'], 24)
  np.testing.assert_array_equal(got['original_height'], 48)


@pytest.mark.parametrize('config', [
    OPENAI, SIGLIP, clip.PreprocessConfig((0.4, 0.5, 0.6), (0.2, 0.3, 0.25), 'longest',
                                          'bilinear', fill_color=114)],
                         ids=['openai', 'siglip_squash', 'longest_bilinear'])
def test_jpeg_eval_transform_matches_pil_preprocess(tmp_path, config):
  """JPEGs of assorted sizes, resized as `config` says in tf.data (OpenAI's resize and centre
  crop; SigLIP's squash; the long side and padding, bilinear), equal `clip.preprocess`'s PIL
  preprocessing of the same bytes within one uint8 level."""
  samples = write_shards(str(tmp_path), num_shards=2, per_shard=4, fmt='jpg', size=None)
  got = read_all(pipeline(str(tmp_path), resolution=32, preprocess=config, fields=('key',)))
  for key, image in zip(got['key'], got['image']):
    reference = preprocess.preprocess_image(Image.open(io.BytesIO(samples[key.decode()][2])), 32,
                                            config)
    chex.assert_trees_all_close(image, reference, atol=one_level(config))


def test_writer_writes_img2dataset_schema():
  """`serialize_example` builds the same Example as img2dataset's writer."""
  ours = tfrecords.serialize_example(
      '000010002', b'\x89PNG', b'a cat', 'png', url='https://example.com/000010002.jpg',
      caption='a cat', width=3, height=4, original_width=6, original_height=8, status='success',
      error_message=None, exif=None, sha256='0' * 64)
  theirs = img2dataset_example('000010002', b'\x89PNG', b'a cat', 'png', 3, 4)
  assert tf.train.Example.FromString(ours) == tf.train.Example.FromString(theirs)


def write_corrupt_shards(out_dir):
  """Two shards: one with every kind of bad record, one truncated mid-record."""
  rng = np.random.default_rng(1)
  good = lambda: encode(smooth_image(rng, 24, 24), 'png')
  records = [('00000%04d' % i, good(), b'fine %d' % i) for i in range(6)]
  records[1] = ('000000001', b'not an image at all', b'undecodable')
  records[2] = ('000000002', good()[:60], b'truncated png')
  records[3] = ('000000003', good(), b'   ')
  records[4] = ('000000004', good(), b'bad utf8 \xff\xfe')
  with tf.io.TFRecordWriter(os.path.join(out_dir, '00000.tfrecord')) as writer:
    for key, data, caption in records:
      writer.write(img2dataset_example(key, data, caption))
    writer.write(b'this is no tf.train.Example proto')
    writer.write(tf.train.Example(features=tf.train.Features(feature={
        'key': _bytes(b'000000007'), 'txt': _bytes(b'no image')})).SerializeToString())
  path = os.path.join(out_dir, '00001.tfrecord')
  with tf.io.TFRecordWriter(path) as writer:
    for i in range(4):
      writer.write(img2dataset_example('00001%04d' % i, good(), b'shard one %d' % i))
  with open(path, 'rb') as f:
    data = f.read()
  with open(path, 'wb') as f:
    f.write(data[:-50])  # the last record loses its tail


def test_corrupt_records_are_counted_and_skipped(tmp_path):
  write_corrupt_shards(str(tmp_path))
  p = pipeline(str(tmp_path), fields=('key',))
  got = read_all(p)
  assert sorted(k.decode() for k in got['key']) == [
      '000000000', '000000005', '000010000', '000010001', '000010002']
  assert p.stats.skipped == {'undecodable_image': 2, 'empty_caption': 1,
                             'invalid_utf8_caption': 1, 'unparseable_record': 1,
                             'missing_image': 1, 'truncated_file': 1}
  assert p.stats.examples['undecodable_image'][0].startswith('000000001 in ')
  assert p.stats.truncated_files[0].startswith(os.path.join(str(tmp_path), '00001.tfrecord'))
  assert p.stats.samples == 5 and p.stats.files_read == 2
  assert p.last_epoch_stats.skipped == p.stats.skipped
  assert 'skipped 1 x truncated_file' in p.stats.summary()


def test_corrupt_records_raise_when_asked(tmp_path):
  write_corrupt_shards(str(tmp_path))
  with pytest.raises(shards.CorruptDataError, match='undecodable_image'):
    list(pipeline(str(tmp_path), on_error='raise'))
