"""Weighted mixtures of shard sources: the `--data` spec, per-batch counts, stratified batches of
a tar and a tfrecord source, determinism, resume, resampling, errors."""
import json
import os

import chex
import numpy as np
import pytest

from data import mixture
from data import shards
from data import tfrecords
from tests.data.test_tfrecords import EXACT
from tests.data.test_tfrecords import OPENAI
from tests.data.test_tfrecords import SIGLIP
from tests.data.test_tfrecords import fake_tokenize
from tests.data.test_tfrecords import smooth_image
from tests.data.test_webdataset_tars import RES
from tests.data.test_webdataset_tars import write_shards as write_tars


# ----------------------------------------------------------------------------- the spec


def test_parse_sources():
  assert mixture.parse_sources('a/*.tar:0.7, b/*.tfrecord:0.3') == [('a/*.tar', 0.7),
                                                                   ('b/*.tfrecord', 0.3)]
  assert mixture.parse_sources('shards/*.tar') == [('shards/*.tar', 1.0)]
  assert mixture.parse_sources('gs://bucket/x/*.tar') == [('gs://bucket/x/*.tar', 1.0)]
  assert mixture.parse_sources('gs://b/x/*.tar:2,gs://b/y/*.tfrecord:1') == [
      ('gs://b/x/*.tar', 2.0), ('gs://b/y/*.tfrecord', 1.0)]


@pytest.mark.parametrize('spec, message', [
    ('a/*.tar:0.5,b/*.tar', r"needs a weight.*\['b/\*\.tar'\]"),
    ('a/*.tar:0.5,b/*.tar:0', r"must be positive.*\('b/\*\.tar', 0\.0\)"),
    ('a/*.tar:-1,b/*.tar:1', r"must be positive.*\('a/\*\.tar', -1\.0\)"),
    ('  ', 'file pattern'),
])
def test_parse_sources_errors(spec, message):
  with pytest.raises(ValueError, match=message):
    mixture.parse_sources(spec)


def test_batch_counts_largest_remainder():
  assert mixture.batch_counts([0.7, 0.3], 256) == [179, 77]
  assert mixture.batch_counts([5, 2.5, 2.5], 10) == [5, 3, 2]  # a tie: the earlier source
  assert mixture.batch_counts([1, 1, 1], 4) == [2, 1, 1]
  rng = np.random.default_rng(0)
  for _ in range(50):
    weights = rng.uniform(0.01, 1, rng.integers(2, 6))
    batch = int(rng.integers(len(weights), 300))
    counts = np.asarray(mixture.batch_counts(weights, batch))
    exact = weights / weights.sum() * batch
    assert counts.sum() == batch and np.all(np.abs(counts - exact) < 1)
    up = counts > np.floor(exact)  # rounded up: no remainder smaller than one rounded down
    if up.any() and (~up).any():
      assert (exact - np.floor(exact))[up].min() >= (exact - np.floor(exact))[~up].max()


# ------------------------------------------------------------------------ mixed sources


def write_tfrecords(out_dir, num_shards, per_shard, prefix, seed=1):
  """img2dataset-style tfrecords; returns {key: (image uint8, caption)}."""
  rng = np.random.default_rng(seed)
  written = {}
  os.makedirs(out_dir, exist_ok=True)
  for shard in range(num_shards):
    examples = []
    for i in range(per_shard):
      key = f'{prefix}{shard:05d}{i:04d}'
      written[key] = image, caption = smooth_image(rng, RES, RES), f'{prefix} {shard} {i}'
      examples.append(tfrecords.serialize_example(
          key, tfrecords.encode_image(image, 'png'), caption, 'png', status='success'))
    tfrecords.write_tfrecord(tfrecords.shard_path(out_dir, shard), examples)
  return written


@pytest.fixture(scope='module')
def sources(tmp_path_factory):
  """12 samples in tars (keys 'a...'), 6 in tfrecords (keys 'b...'): {key: (image, caption)}."""
  root = tmp_path_factory.mktemp('mixture')
  tars = {k: (image, sample['txt'])
          for k, (image, sample) in write_tars(str(root / 'a'), 3, 4, prefix='a').items()}
  records = write_tfrecords(str(root / 'b'), 2, 3, prefix='b')
  return f'{root}/a/*.tar', f'{root}/b/*.tfrecord', {**tars, **records}


def make(data, **kwargs):
  kwargs = {'global_batch_size': 8, 'resolution': RES, 'tokenize': fake_tokenize,
            'preprocess': OPENAI, 'process_index': 0, 'process_count': 1, 'fields': ('key',),
            'shuffle_buffer': 8,
            'image_dtype': 'uint8', 'scale': (1.0, 1.0), 'ratio': (1.0, 1.0), **kwargs}
  return mixture.make_pipeline(data, **kwargs)


def take(pipeline, n):
  it = iter(pipeline)
  return [next(it) for _ in range(n)]


def keys_of(batch):
  return [k.decode() for k in batch['key']]


def test_every_batch_holds_each_sources_count(sources):
  """0.7 / 0.3 of 8 -> 6 tar and 2 tfrecord samples in each batch; each source walks its own
  epochs (2 batches cover the tars, 3 the tfrecords); pixels and tokens stay with their key;
  the stats name each source."""
  a, b, written = sources
  m = make(f'{a}:0.7,{b}:0.3', seed=5)
  assert isinstance(m, mixture.Mixture) and m.counts == [6, 2]
  batches = take(m, 4)
  for batch in batches:
    keys = keys_of(batch)
    assert sum(k.startswith('a') for k in keys) == 6 and sum(k.startswith('b') for k in keys) == 2
    np.testing.assert_array_equal(batch['image'], np.stack([written[k][0] for k in keys]))
    np.testing.assert_array_equal(batch['tokens'], fake_tokenize([written[k][1] for k in keys]))
  from_a = lambda bs: sorted(k for b in bs for k in keys_of(b) if k.startswith('a'))
  from_b = lambda bs: sorted(k for b in bs for k in keys_of(b) if k.startswith('b'))
  assert from_a(batches[:2]) == from_a(batches[2:4]) == sorted(k for k in written if k[0] == 'a')
  assert from_b(batches[:3]) == sorted(k for k in written if k[0] == 'b')
  # The sources are shuffled together, not concatenated.
  assert any(k.startswith('b') for b in batches for k in keys_of(b)[:6])
  assert m.stats.samples == 32 and m.stats.num_skipped == 0
  summary = m.stats.summary()
  assert f'{a}: 24 samples in 4 batches' in summary and f'{b}: 8 samples in 4 batches' in summary


def test_deterministic_given_the_seed_and_resumes_exactly(sources):
  a, b, _ = sources
  spec = f'{a}:0.7,{b}:0.3'
  m = make(spec, seed=3)
  it = iter(m)
  reference = [next(it) for _ in range(2)]
  state = json.loads(json.dumps(m.state()))
  assert state['step'] == 2 and len(state['sources']) == 2
  reference.append(next(it))
  chex.assert_trees_all_equal(take(make(spec, seed=3), 3), reference)
  other = take(make(spec, seed=4), 1)
  assert keys_of(other[0]) != keys_of(reference[0])
  chex.assert_trees_all_equal(take(make(spec, seed=3, resume=state), 1), reference[2:])


def test_mixture_errors(sources):
  a, b, _ = sources
  with pytest.raises(ValueError, match='get no sample in a per-process batch of 4'):
    make(f'{a}:0.99,{b}:0.01', global_batch_size=4)
  with pytest.raises(ValueError, match='for training'):
    make(f'{a}:0.5,{b}:0.5', train=False)
  with pytest.raises(ValueError, match='holds 1 sources, the mixture has 2'):
    make(f'{a}:0.5,{b}:0.5', resume={'step': 1, 'sources': [{}]})


def test_make_pipeline_one_source_or_several(sources):
  a, b, _ = sources
  assert type(make(a, train=False)) is shards.Pipeline
  assert type(make(f'{b}:0.3', train=True)) is shards.Pipeline
  assert type(make([a], train=True)) is shards.Pipeline
  assert type(make(f'{a}:1,{b}:1')) is mixture.Mixture


def test_every_source_is_read_with_the_models_processing(sources):
  """A mixture's sources all get the model's tokenizer and preprocessing (here SigLIP's mean and
  std 0.5; whole-image crops at the stored size keep the pixels); neither has a default."""
  a, b, written = sources
  tokenize = lambda texts: fake_tokenize(texts)[:, :5] + 1000
  batch = take(make(f'{a}:0.5,{b}:0.5', tokenize=tokenize, preprocess=SIGLIP,
                    image_dtype='float32'), 1)[0]
  keys = keys_of(batch)
  images = np.stack([written[k][0] for k in keys]).astype(np.float32) / 255
  chex.assert_trees_all_close(batch['image'], (images - 0.5) / 0.5, atol=EXACT)
  np.testing.assert_array_equal(batch['tokens'], tokenize([written[k][1] for k in keys]))
  for data in (f'{a}:0.5,{b}:0.5', a):
    for missing in ('tokenize', 'preprocess'):
      kwargs = {'global_batch_size': 8, 'resolution': RES, 'train': True, 'process_index': 0,
                'process_count': 1, 'tokenize': fake_tokenize, 'preprocess': OPENAI}
      del kwargs[missing]
      with pytest.raises(TypeError, match=missing):
        mixture.make_pipeline(data, **kwargs)


def test_a_mixture_of_finite_sources_ends_with_the_first(sources):
  """With num_epochs=1 the tars (2 batches of 6) end before the tfrecords (3 batches of 2)."""
  a, b, _ = sources
  batches = list(make(f'{a}:0.7,{b}:0.3', num_epochs=1))
  assert len(batches) == 2 and all(len(x['key']) == 8 for x in batches)


def test_resampling_reaches_every_source(sources):
  """3 tars and 2 tfrecords over 2 processes: the tars cannot be shared evenly (refused, with
  the counts); resampled=True has every source draw its files per process, counted per source."""
  a, b, _ = sources
  with pytest.raises(ValueError, match='3 files cannot be shared evenly by 2 processes'):
    make(f'{a}:0.5,{b}:0.5', process_index=1, process_count=2)
  m = make(f'{a}:0.5,{b}:0.5', process_index=1, process_count=2, resampled=True)
  assert [p.resampled for p in m.pipelines] == [True, True]
  assert len(take(m, 1)[0]['key']) == 4
  assert m.stats.summary().count('resampled: ') == 2
