"""NaFlex batches from the input pipelines (`data.naflex_transforms` in `data.shards.Pipeline`,
`data.mixture`, `data.tfds`): each image equals `clip.naflex_preprocess` (PIL, transformers'
processor) of the same decoded PNG on wide, tall, square, large and small images at several
sequence lengths; the steps' shapes follow the `NaFlexBatching` (fixed and token budget) and
resume exactly; images smaller than a patch are counted skips; bad arguments fail at
construction. Shards are written here by hand (tfrecord records and webdataset tars).
"""
# pylint: disable=redefined-outer-name
import os

import numpy as np
import pytest
import tensorflow as tf

from clip import naflex
from data import mixture
from data import naflex_transforms
from data import shards
from data import tfds as data_tfds
from data import webdataset_tars
from data.naflex_batching import NaFlexBatching
from tests.data.test_tfds import TinyShapes
from tests.data.test_tfrecords import OPENAI
from tests.data.test_tfrecords import encode
from tests.data.test_tfrecords import fake_tokenize
from tests.data.test_tfrecords import img2dataset_example
from tests.data.test_tfrecords import one_level
from tests.data.test_tfrecords import smooth_image

P = 8
SIGLIP2 = naflex.NAFLEX_PREPROCESS  # mean / std 0.5, PIL's bilinear
# (height, width): wide, tall, square, large, exactly one patch, very wide; the last two have a
# side below one patch (skipped).
SHAPES = [(10, 56), (52, 9), (24, 24), (120, 96), (8, 8), (13, 200), (31, 17), (1, 30), (30, 5)]
TOO_SMALL = 2


def write(out_dir, fmt, shapes, seed=0, per_shard=5, prefix=''):
  """PNG samples of the given shapes in shards of `fmt` ('tfrecord' or 'tar'); returns
  {key: uint8 image}."""
  rng = np.random.default_rng(seed)
  images = {f'{prefix}{i:05d}': smooth_image(rng, h, w) for i, (h, w) in enumerate(shapes)}
  keys = sorted(images)
  os.makedirs(out_dir, exist_ok=True)
  for shard, first in enumerate(range(0, len(keys), per_shard)):
    chunk = keys[first:first + per_shard]
    if fmt == 'tar':
      webdataset_tars.write_tar(webdataset_tars.shard_path(out_dir, shard), [
          {'__key__': k, 'png': encode(images[k], 'png'), 'txt': f'a picture {k}'} for k in chunk])
    else:
      with tf.io.TFRecordWriter(os.path.join(out_dir, f'{shard:05d}.tfrecord')) as writer:
        for k in chunk:
          writer.write(img2dataset_example(k, encode(images[k], 'png'), f'a picture {k}'.encode()))
  return images


def naflex_pipeline(files, batching, **kwargs):
  kwargs = {'train': False, 'tokenize': fake_tokenize, 'preprocess': SIGLIP2,
            'process_index': 0, 'process_count': 1, 'fields': ('key',), **kwargs}
  return shards.Pipeline(files, naflex=batching, **kwargs)


def assert_naflex_equal(images_N, patches_NxSxK, shapes_Nx2, config):
  """Each image's patches equal `clip.naflex_preprocess`'s within one uint8 level; grids and the
  zero padding exactly."""
  want, mask_NxS, want_shapes = naflex.naflex_preprocess(images_N, P, patches_NxSxK.shape[1],
                                                        config)
  np.testing.assert_array_equal(shapes_Nx2, want_shapes)
  real_NxS = mask_NxS.astype(bool)
  np.testing.assert_allclose(patches_NxSxK[real_NxS], want[real_NxS], rtol=0,
                             atol=one_level(config))
  np.testing.assert_array_equal(patches_NxSxK[~real_NxS], 0.0)


@pytest.mark.parametrize('fmt, config', [('tfrecord', SIGLIP2), ('tar', OPENAI)],
                         ids=['tfrecord-siglip2', 'tar-openai'])
def test_eval_batches_equal_naflex_preprocess(tmp_path, fmt, config):
  """Evaluation: every image whole, at the S of its step (several S), with the config's
  interpolation (SigLIP 2's bilinear, OpenAI's bicubic), mean and std; the two images smaller
  than a patch are counted skips; the last batch is smaller."""
  images = write(str(tmp_path), fmt, SHAPES)
  batching = NaFlexBatching(P, (4, 16, 64), batch_size=2, seed=3)
  p = naflex_pipeline(str(tmp_path), batching, preprocess=config)
  batches = list(p)
  lengths = [b['patches'].shape[1] for b in batches]
  assert lengths == [batching.seq_len(g) for g in range(len(batches))]
  assert len(set(lengths)) >= 2
  assert [len(b['tokens']) for b in batches] == [2, 2, 2, 1]
  for b in batches:
    assert b['patches'].dtype == np.float32 and b['spatial_shapes'].dtype == np.int32
    assert sorted(b) == ['key', 'patches', 'spatial_shapes', 'tokens']
    assert_naflex_equal([images[k.decode()] for k in b['key']], b['patches'],
                        b['spatial_shapes'], config)
  keys = [k.decode() for b in batches for k in b['key']]
  assert sorted(keys) == sorted(images)[:-TOO_SMALL]
  assert p.stats.skipped == {'image_smaller_than_a_patch': TOO_SMALL}


def test_a_training_crop_of_the_whole_image_is_the_eval_transform(tmp_path):
  """scale = ratio = (1, 1): the crop is the whole image, so training batches (shuffled, fixed
  batching) equal naflex_preprocess too, each step at its own S."""
  images = write(str(tmp_path), 'tfrecord', SHAPES[:7])
  batching = NaFlexBatching(P, (16, 32), batch_size=3, seed=4)
  p = naflex_pipeline(str(tmp_path), batching, train=True, scale=(1, 1), ratio=(1, 1))
  it = iter(p)
  for g in range(2):
    b = next(it)
    assert b['patches'].shape[:2] == batching.step_shape(g)
    assert_naflex_equal([images[k.decode()] for k in b['key']], b['patches'],
                        b['spatial_shapes'], SIGLIP2)


def test_target_size_is_naflex_bisection():
  """Equal to clip.naflex.target_size (Siglip2ImageProcessor's) on sizes from 1 px to 5000 px,
  budgets from one patch to 4096."""
  rng = np.random.default_rng(0)
  sizes = tf.function(naflex_transforms.target_size)
  for patch in (8, 14, 16):
    for h, w, s in zip(*rng.integers(1, 5000, (2, 60)), rng.integers(1, 4096, 60)):
      want = naflex.target_size(int(h), int(w), patch, int(s))
      assert tuple(int(x) for x in sizes(tf.constant(h), tf.constant(w), patch, tf.constant(s))) \
          == want, (h, w, patch, s)


def test_crop_window_keeps_the_aspect_ratio():
  """Area within `scale` and aspect ratio within `ratio` times the image's own (up to rounding
  to whole pixels), inside the image; the same seed gives the same crop."""
  scale, ratio = (0.5, 0.9), (0.8, 1.25)
  for i, (h, w) in enumerate([(40, 300), (300, 40), (64, 64), (17, 900)]):
    for j in range(20):
      begin, size = (x.numpy() for x in naflex_transforms.crop_window(h, w, [i, j], scale, ratio))
      assert (begin >= 0).all() and (begin + size <= [h, w]).all()
      area = size.prod() / (h * w)
      assert scale[0] * 0.9 <= area <= scale[1] * 1.1, (h, w, size)
      relative = (size[1] / size[0]) / (w / h)
      assert ratio[0] * 0.85 <= relative <= ratio[1] / 0.85, (h, w, size)
    again = naflex_transforms.crop_window(h, w, [i, 19], scale, ratio)
    np.testing.assert_array_equal(np.concatenate(again), np.concatenate([begin, size]))


def test_budget_steps_follow_the_batching_and_resume_exactly(tmp_path):
  """Token-budget batching: step g has S = seq_len(g) and batch_size_for(S) images, across an
  epoch's end (7 images; the rest of an epoch too few for a step's batch is dropped); resuming
  from state() or from start_step gives the same batches."""
  write(str(tmp_path), 'tfrecord', SHAPES[:7])
  batching = NaFlexBatching(P, (8, 16, 32), tokens_per_batch=48, seed=6)
  assert [batching.step_shape(g) for g in range(4)] == [(6, 8), (1, 32), (3, 16), (3, 16)]
  p = naflex_pipeline(str(tmp_path), batching, train=True, seed=5)
  it = iter(p)
  head = [next(it) for _ in range(3)]
  state = p.state()
  tail = [next(it)]
  for g, b in enumerate(head + tail):
    assert b['patches'].shape[:2] == tuple(batching.step_shape(g))
  assert state == {'epoch': 1, 'record': 3, 'step': 3}
  assert p.state() == {'epoch': 1, 'record': 6, 'step': 4}
  it = iter(naflex_pipeline(str(tmp_path), batching, train=True, seed=5, resume=state))
  for want in tail:
    got = next(it)
    for key in ('key', 'patches', 'spatial_shapes', 'tokens'):
      np.testing.assert_array_equal(got[key], want[key])
  # start_step finds the same place; epoch 0 holds steps 0 and 1 (6 + 1 images), epoch 1 steps 2
  # and 3 (3 + 3), its last image too few for step 4's 6.
  assert naflex_pipeline(str(tmp_path), batching, train=True, seed=5, start_step=3).state() == state
  assert [p.plan.start_of(g, records_per_epoch=7) for g in (1, 2, 4)] == [(0, 6), (1, 0), (2, 0)]


def test_mixture_splits_each_process_step_among_the_sources(tmp_path):
  """Process 1 of 2 reads half of each step's images, split among the sources by
  batch_counts, every source at the step's S."""
  write(str(tmp_path / 'a'), 'tfrecord', SHAPES[:7] * 2, prefix='a', per_shard=7)
  write(str(tmp_path / 'b'), 'tar', SHAPES[:7] * 2, seed=1, prefix='b', per_shard=7)
  batching = NaFlexBatching(P, (8, 16), tokens_per_batch=128, batch_multiple=2, seed=2)
  data = f'{tmp_path}/a/*.tfrecord:0.7,{tmp_path}/b/*.tar:0.3'
  m = mixture.make_pipeline(data, naflex=batching, train=True, tokenize=fake_tokenize,
                            preprocess=SIGLIP2, process_index=1, process_count=2,
                            fields=('key',))
  it = iter(m)
  for g in range(2):
    b, s = batching.step_shape(g)
    batch = next(it)
    assert batch['patches'].shape[:2] == (b // 2, s)
    assert batch['spatial_shapes'].shape == (b // 2, 2)
    assert [p.state()['step'] for p in m.pipelines] == [g + 1, g + 1]
    sources = [k[:1] for k in batch['key']]
    assert [sources.count(b'a'), sources.count(b'b')] == mixture.batch_counts([0.7, 0.3], b // 2)


def test_tfds_eval_batches_equal_naflex_preprocess(tmp_path):
  TinyShapes(data_dir=str(tmp_path)).download_and_prepare()
  data = data_tfds.TFDSClassification('tiny_shapes', 'test', data_dir=str(tmp_path),
                                      process_index=0, process_count=1)
  batching = NaFlexBatching(P, (12, 30), batch_size=3, seed=0)
  batches = list(data.batches(None, None, preprocess=SIGLIP2, naflex=batching))
  stored = [x['image'] for x in data.builder.as_dataset(split='test').as_numpy_iterator()]
  assert [b['patches'].shape[:2] for b in batches] == [
      (n, batching.seq_len(g)) for g, n in enumerate([3, 3, 1])]
  start = 0
  for b in batches:
    assert_naflex_equal(stored[start:start + len(b['label'])], b['patches'],
                        b['spatial_shapes'], SIGLIP2)
    start += len(b['label'])
  train = data.batches(None, None, preprocess=SIGLIP2, naflex=batching, train=True, num_epochs=1)
  assert [b['patches'].shape[:2] for b in train] == [batching.step_shape(g) for g in (0, 1)]
  with pytest.raises(tf.errors.InvalidArgumentError, match='side below one patch'):
    list(data.batches(None, None, preprocess=SIGLIP2,
                      naflex=NaFlexBatching(64, (4,), batch_size=2)))


def test_images_smaller_than_a_patch_raise_when_asked(tmp_path):
  write(str(tmp_path), 'tfrecord', SHAPES[-3:])
  p = naflex_pipeline(str(tmp_path), NaFlexBatching(P, (8,), batch_size=1), on_error='raise')
  with pytest.raises(shards.CorruptDataError, match='image_smaller_than_a_patch'):
    list(p)


@pytest.mark.parametrize('kwargs, error, message', [
    (dict(naflex=NaFlexBatching(P, (8, 16), batch_size=3)), ValueError,
     r'NaFlex batches \[\(3, 8\), \(3, 16\)\].*cannot be shared by 2 processes'),
    (dict(resolution=32), ValueError, 'pass resolution=None'),
    (dict(global_batch_size=8), ValueError, 'pass global_batch_size=None'),
    (dict(naflex=None, global_batch_size=4), ValueError, 'needs global_batch_size and resolution'),
    (dict(image_dtype='uint8'), ValueError, "image_dtype must be 'float32'"),
    (dict(naflex=(8, 16)), TypeError, 'NaFlexBatching'),
    (dict(naflex=None, resolution=None), ValueError, 'needs global_batch_size and resolution'),
    (dict(train=True, scale=(0.5, 1.5)), ValueError, 'scale must be'),
    (dict(train=True, ratio=(1.2, 2)), ValueError, 'ratio must be'),
])
def test_bad_arguments_fail_at_construction(tmp_path, kwargs, error, message):
  """Before any tf.data graph is built (no file needs to exist to fail)."""
  kwargs = {'naflex': NaFlexBatching(P, (8, 16), batch_size=2), 'train': False,
            'tokenize': fake_tokenize, 'preprocess': SIGLIP2, 'process_index': 0,
            'process_count': 2, **kwargs}
  with pytest.raises(error, match=message):
    shards.Pipeline(str(tmp_path / 'none'), **kwargs)


def test_naflex_batching_errors_come_first():
  with pytest.raises(ValueError, match='seq_lengths must be a non-empty'):
    NaFlexBatching(P, (), batch_size=2)
  with pytest.raises(ValueError, match='at least one patch per image'):
    NaFlexBatching(P, (0, 16), batch_size=2)
