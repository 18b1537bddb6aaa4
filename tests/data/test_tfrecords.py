"""The img2dataset tfrecord reader: schema round trip, corrupt input, sharding, determinism, resume,
and a model's own processing (a SigLIP model's tokens and pixels, not OpenAI's).

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


def test_process_shares_are_disjoint_and_complete(tmp_path):
  samples = write_shards(str(tmp_path), num_shards=7, per_shard=3)
  shares = []
  for index in range(3):
    p = pipeline(str(tmp_path), global_batch_size=6, process_index=index, process_count=3,
                 fields=('key',))
    assert p.batch_size == 2 and len(p.files) in (2, 3)
    shares.append({k.decode() for k in read_all(p)['key']})
  assert set.union(*shares) == set(samples)
  assert sum(len(s) for s in shares) == len(samples)


@pytest.mark.parametrize('num_files, processes', [(3, 2), (5, 4)])
def test_training_refuses_files_the_processes_cannot_share_evenly(tmp_path, num_files, processes):
  """Each process cycles its own files in training: with 3 files and 2 processes, process 1's
  examples would be seen twice as often as process 0's (webdataset#434). Every process refuses,
  naming the counts and the way out; evaluation (one pass) still shares them."""
  write_shards(str(tmp_path), num_shards=num_files, per_shard=2)
  shares = {(3, 2): r'process 0 would read 2 files, process 1 1; ',
            (5, 4): r'process 0 would read 2 files, processes 1\.\.3 1; '}
  message = (rf'{num_files} files cannot be shared evenly by {processes} processes: '
             rf'{shares[num_files, processes]}.* seen 2\.00x as often'
             r'.*resampled=True \(--data-resampled\)')
  for index in range(processes):
    with pytest.raises(ValueError, match=message):
      pipeline(str(tmp_path), train=True, global_batch_size=processes, process_index=index,
               process_count=processes)
    assert pipeline(str(tmp_path), global_batch_size=processes, process_index=index,
                    process_count=processes).files == shards.expand_files(str(tmp_path))[
                        index::processes]


@pytest.mark.parametrize('num_files, processes', [(4, 2)])
def test_processes_sharing_files_evenly_see_each_example_equally_often(tmp_path, num_files,
                                                                      processes):
  """The divisible case as before: each process cycles files[index::processes]; over the same
  steps (two epochs each) every example is seen exactly twice."""
  samples = write_shards(str(tmp_path), num_shards=num_files, per_shard=2)
  seen = []
  for index in range(processes):
    p = pipeline(str(tmp_path), train=True, global_batch_size=2 * processes,
                 process_index=index, process_count=processes, fields=('key',), seed=index)
    assert p.files == shards.expand_files(str(tmp_path))[index::processes]
    it = iter(p)
    seen += [k.decode() for _ in range(2 * num_files // processes) for k in next(it)['key']]
  assert sorted(seen) == sorted(list(samples) * 2)


@pytest.mark.parametrize('num_files, processes', [(3, 2), (5, 4), (2, 3)])
def test_resampled_processes_draw_every_file_equally_often(tmp_path, num_files, processes):
  """resampled=True (webdataset's, open_clip's --dataset-resampled): any file count feeds any
  process count. Each process's epoch draws ceil(files / processes) files with replacement from
  all of them, seeded by (seed, epoch, process): over many epochs every file is drawn equally
  often in every process."""
  write_shards(str(tmp_path), num_shards=num_files, per_shard=1)
  everything = shards.expand_files(str(tmp_path))
  draws, epochs = -(-num_files // processes), 2000
  counts = np.zeros((processes, num_files))
  for index in range(processes):
    p = pipeline(str(tmp_path), train=True, resampled=True, global_batch_size=processes,
                 process_index=index, process_count=processes, seed=1)
    assert p.files == everything
    for epoch in range(epochs):
      files = p.epoch_files(epoch)
      assert len(files) == draws
      np.add.at(counts[index], [everything.index(f) for f in files], 1)
  expected = epochs * draws / num_files
  np.testing.assert_allclose(counts, expected, rtol=0.1)
  np.testing.assert_allclose(counts.sum(0), expected * processes, rtol=0.05)


def test_resampled_draws_are_read_counted_reported_and_resumed(tmp_path, caplog):
  """A resampled process reads the files it drew (3 files, 2 processes: 2 draws an epoch), the
  draws counted in the stats and the epoch log; a resumed pipeline continues the same draws."""
  write_shards(str(tmp_path), num_shards=3, per_shard=2)
  kwargs = dict(train=True, resampled=True, global_batch_size=2, process_index=1,
                process_count=2, fields=('key',), seed=1)
  p = pipeline(str(tmp_path), **kwargs)
  assert p.epoch_files(0) != pipeline(str(tmp_path), **{**kwargs, 'process_index': 0}
                                      ).epoch_files(0)
  it = iter(p)
  with caplog.at_level('INFO', logger='data.shards'):
    batches = [next(it) for _ in range(9)]  # 2 epochs of 4 batches of 1, and one more
  drawn = p.epoch_files(0) + p.epoch_files(1)
  keys = [k.decode() for b in batches[:8] for k in b['key']]
  assert sorted(keys) == sorted(f'{os.path.basename(f)[:5]}{i:04d}' for f in drawn
                                for i in range(2))
  assert sum(p.last_epoch_stats.drawn.values()) == 2
  assert sum(p.stats.drawn.values()) == 6  # the third epoch begun
  assert 'resampled: 6 draws' in p.stats.summary() and 'resampled: 2 draws' in caplog.text
  resumed = pipeline(str(tmp_path), **kwargs, resume=p.state())
  chex.assert_trees_all_equal(next(iter(resumed)), next(it))


def test_resampling_is_for_training(png_dir):
  out, _ = png_dir
  with pytest.raises(ValueError, match='resampled=True draws training files'):
    pipeline(out, resampled=True)
  with pytest.raises(ValueError, match='resume from state'):
    pipeline(out, train=True, resampled=True, start_step=3)


def train_batches(files, n, **kwargs):
  p = pipeline(files, train=True, shuffle_buffer=8, fields=('key',), **kwargs)
  it = iter(p)
  return [next(it) for _ in range(n)], p


def test_training_is_deterministic_given_the_seed(png_dir):
  out, _ = png_dir
  first, _ = train_batches(out, 5, seed=3)
  again, _ = train_batches(out, 5, seed=3)
  other, _ = train_batches(out, 5, seed=4)
  chex.assert_trees_all_equal(first, again)
  assert not all(np.array_equal(a['image'], b['image']) for a, b in zip(first, other))
  # 15 samples, batches of 4: 3 per epoch; the next epoch is reshuffled and recropped.
  assert not np.array_equal(first[0]['key'], first[3]['key'])
  assert not np.array_equal(first[0]['image'], first[3]['image'])


def test_resume_from_state_and_from_step(png_dir):
  out, _ = png_dir
  reference, p = train_batches(out, 7, seed=1)
  _, partial = train_batches(out, 4, seed=1)
  state = partial.state()
  assert state == {'epoch': 1, 'record': 4, 'step': 4}
  resumed, _ = train_batches(out, 3, seed=1, resume=state)
  chex.assert_trees_all_equal(resumed, reference[4:])
  from_step, _ = train_batches(out, 3, seed=1, start_step=4)
  chex.assert_trees_all_equal(from_step, reference[4:])
  assert p.stats.remainder_dropped == 3 * 2  # 15 = 3 * 4 + 3, twice


def test_bad_arguments_raise(png_dir, tmp_path):
  out, _ = png_dir
  with pytest.raises(FileNotFoundError, match='no file matches'):
    pipeline(str(tmp_path / 'none-*.tfrecord'))
  with pytest.raises(ValueError, match='multiple of the process count 2'):
    pipeline(out, global_batch_size=5, process_index=0, process_count=2)
  with pytest.raises(ValueError, match='3 files cannot feed 4 processes'):
    pipeline(out, global_batch_size=4, process_index=0, process_count=4)
  with pytest.raises(ValueError, match='unknown metadata'):
    pipeline(out, fields=('colour',))
  with pytest.raises(ValueError, match='tokenize'):
    pipeline(out, tokenize=lambda texts: np.zeros(len(texts), np.int32))
  with pytest.raises(TypeError, match='image_format'):   # found per record, not a flag
    pipeline(out, image_format='png')


def test_uint8_output_and_custom_metadata(tmp_path):
  with tf.io.TFRecordWriter(str(tmp_path / '00000.tfrecord')) as writer:
    image = np.arange(24 * 24 * 3, dtype=np.uint8).reshape(24, 24, 3)
    writer.write(tfrecords.serialize_example('000000000', encode(image, 'png'), 'x', 'png',
                                             colour=5, score=0.25))
  got = read_all(pipeline(str(tmp_path), image_dtype='uint8',
                          fields={'colour': 'int', 'score': 'float'}))
  np.testing.assert_array_equal(got['image'][0], image)
  assert got['colour'][0] == 5 and got['score'][0] == np.float32(0.25)


def test_transparency_as_the_models_processor(tmp_path):
  """A Hugging Face model's preprocessing (`convert_first`: transparency onto white before the
  resize, `crop_rounding='floor'`) on RGBA PNG records: evaluation equals `clip.preprocess`
  within one uint8 level; a training crop of the whole image is the image on white."""
  rng = np.random.default_rng(5)
  alpha = np.linspace(0, 255, 24)[None, :, None] * np.ones((24, 1, 1))
  rgba = np.concatenate([smooth_image(rng, 24, 24), alpha.astype(np.uint8)], -1)
  buffer = io.BytesIO()
  Image.fromarray(rgba, 'RGBA').save(buffer, 'PNG')
  with tf.io.TFRecordWriter(str(tmp_path / '00000.tfrecord')) as writer:
    for i in range(2):
      writer.write(img2dataset_example(f'{i:09d}', buffer.getvalue(), b'a cat'))
  config = clip.PreprocessConfig(convert_first=True, crop_rounding='floor')
  image = Image.open(io.BytesIO(buffer.getvalue()))
  got = read_all(pipeline(str(tmp_path), resolution=15, preprocess=config))['image']
  chex.assert_trees_all_close(got[0], preprocess.preprocess_image(image, 15, config),
                              atol=one_level(config))
  whole = next(iter(pipeline(str(tmp_path), global_batch_size=2, train=True, preprocess=config,
                             image_dtype='uint8', scale=(1.0, 1.0), ratio=(1.0, 1.0))))['image']
  np.testing.assert_array_equal(whole[0], np.asarray(preprocess.rgb_on_white(image)))


def test_tokenize_and_preprocess_are_the_models_and_required(png_dir):
  """No OpenAI default: a pipeline without the model's tokenizer or preprocessing is a TypeError
  naming it; with an OpenAI model's, its tokens are `clip.tokenize(truncate=True)`."""
  out, _ = png_dir
  kwargs = dict(global_batch_size=8, resolution=24, train=False, process_index=0,
                process_count=1)
  for missing in ('tokenize', 'preprocess'):
    given = {'tokenize': fake_tokenize, 'preprocess': OPENAI}
    del given[missing]
    with pytest.raises(TypeError, match=missing):
      shards.Pipeline(out, **kwargs, **given)
  cfg = siglip_small.get_config().model  # OpenAI's tokenizer and preprocessing by default
  with pytest.raises(TypeError, match=r'cfg\.preprocess'):
    shards.Pipeline(out, **kwargs, tokenize=fake_tokenize, preprocess=cfg)
  with pytest.raises(TypeError, match='get_tokenizer'):
    shards.Pipeline(out, **kwargs, tokenize=None, preprocess=OPENAI)
  got = read_all(shards.Pipeline(out, **kwargs, tokenize=model_tokenize(cfg),
                                 preprocess=cfg.preprocess, fields=('caption',)))
  captions = [c.decode() for c in got['caption']]
  np.testing.assert_array_equal(got['tokens'],
                                clip.tokenize(captions, cfg.context_length, truncate=True))


def test_a_siglip_model_gets_its_own_tokens_and_pixels(tmp_path, siglip_cfg):
  """A SigLIP model's pipeline: its SentencePiece tokens (`clip.get_tokenizer(cfg)`), its
  squashed pixels normalised with mean and std 0.5 (`clip.preprocess_images` of the decoded
  JPEGs, within one uint8 level), not OpenAI's; training crops normalise with its mean and std."""
  samples = write_shards(str(tmp_path), num_shards=2, per_shard=3, fmt='jpg', size=None)
  res = siglip_cfg.image_resolution
  p = pipeline(str(tmp_path), resolution=res, tokenize=model_tokenize(siglip_cfg),
               preprocess=siglip_cfg.preprocess, fields=('key',))
  got = read_all(p)
  keys = [k.decode() for k in got['key']]
  assert sorted(keys) == sorted(samples) and p.context_length == siglip_cfg.context_length
  np.testing.assert_array_equal(got['tokens'], clip.get_tokenizer(siglip_cfg)(
      [samples[k][1] for k in keys], truncate=True))
  assert p.stats.full_captions == 0  # `</s>` pads: a padded row is not a full one
  decoded = [Image.open(io.BytesIO(samples[k][2])) for k in keys]
  own = clip.preprocess_images(decoded, siglip_cfg)
  chex.assert_trees_all_close(got['image'], own, atol=one_level(SIGLIP))
  openai = preprocess.preprocess(decoded, res)
  assert np.abs(got['image'] - openai).max() > 0.5  # another crop and normalisation
  train = {dtype: next(iter(pipeline(str(tmp_path), resolution=res, train=True, seed=1,
                                     tokenize=model_tokenize(siglip_cfg), preprocess=SIGLIP,
                                     image_dtype=dtype)))['image']
           for dtype in ('float32', 'uint8')}
  chex.assert_trees_all_close(train['float32'], clip.processing.normalize(
      train['uint8'].astype(np.float32) / 255, siglip_cfg), atol=EXACT)
