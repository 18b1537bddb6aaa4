"""The shard pipeline (`data.shards.Pipeline`) over img2dataset tfrecords: the processes' shares
(even in training, or resampled), determinism, resume, bad arguments, uint8 output and custom
metadata, transparency, and a model's own processing (a SigLIP model's tokens and pixels, not
OpenAI's). Shards are written with `tf.train.Example` directly (`test_tfrecords.py`'s helpers);
images are compared with `clip.preprocess` (PIL) as the independent reference.
"""
# pylint: disable=redefined-outer-name
import io
import os

import chex
import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

import clip
from clip import preprocess
from data import shard_files
from data import shards
from data import tfrecords
from experiments.configs import siglip_small
from tests.data.test_tfrecords import EXACT
from tests.data.test_tfrecords import OPENAI
from tests.data.test_tfrecords import SIGLIP
from tests.data.test_tfrecords import encode
from tests.data.test_tfrecords import fake_tokenize
from tests.data.test_tfrecords import img2dataset_example
from tests.data.test_tfrecords import model_tokenize
from tests.data.test_tfrecords import one_level
from tests.data.test_tfrecords import pipeline
from tests.data.test_tfrecords import png_dir  # pylint: disable=unused-import
from tests.data.test_tfrecords import read_all
from tests.data.test_tfrecords import siglip_cfg  # pylint: disable=unused-import
from tests.data.test_tfrecords import smooth_image
from tests.data.test_tfrecords import write_shards


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
                    process_count=processes).files == shard_files.expand_files(str(tmp_path))[
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
    assert p.files == shard_files.expand_files(str(tmp_path))[index::processes]
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
  everything = shard_files.expand_files(str(tmp_path))
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
