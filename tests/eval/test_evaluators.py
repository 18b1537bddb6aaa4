"""Evaluators during training: features embedded on a mesh of 8 simulated devices (data=4,
fsdp=2) equal the unsharded towers; every evaluator's metrics equal a one-device evaluation of the
same data by the existing functions (`experiments/evaluate.py`'s scores, `data.synthetic_eval`);
spec parsing, bad data before training, the best-and-last tracker."""
import json
import os

import chex
import jax
import numpy as np
from PIL import Image
import pytest

import clip
from clip import processing
from clip import sharding
from clip.eval import evaluators
from clip.eval import retrieval
from clip.eval import sharded_features
from clip.eval import zero_shot
from clip.eval import metrics as eval_metrics
from data import synthetic
from data import synthetic_eval
from experiments import evaluate
from experiments.configs import cappa_small
from experiments.configs import tiny
from tests.data.test_tfds import TinyShapes

CFG = tiny.get_config().model
BATCH = 8  # one row per device; every set below leaves a padded last batch
FLOAT32 = 1e-5  # float32 features: the FSDP split sums the contractions in another order


@pytest.fixture(scope='module')
def mesh():
  return sharding.make_mesh(4, 2, 1)


@pytest.fixture(scope='module')
def params(mesh):
  """(host params, the same placed by the partition rules on the mesh: FSDP-sharded)."""
  host = clip.init(jax.random.PRNGKey(0), CFG)
  return host, jax.device_put(host, sharding.param_shardings(mesh, host))


def samples(n, resolution=32, start=0):
  return synthetic.SyntheticCaptions(seed=5, resolution=resolution).get(np.arange(start,
                                                                                  start + n))


def one_device_scores(host, images, labels, classnames, templates=zero_shot.DEFAULT_TEMPLATES):
  """The one-process evaluation: experiments/evaluate.py's cosine scores, clip_benchmark's
  metrics."""
  flat = zero_shot.prompts(classnames, templates)
  prompts = [flat[i:i + len(templates)] for i in range(0, len(flat), len(templates))]
  scores = evaluate.zero_shot_scores(host, images, prompts, CFG, BATCH)
  return eval_metrics.classification_metrics(scores, labels)


def test_sharded_features_equal_the_unsharded_towers_in_tag_order(mesh, params):
  """13 rows in steps of 8 (3 padding rows masked and counted), tags given in reverse: the rows
  come back sorted by tag, each equal to its unsharded feature (float32)."""
  host, placed = params
  sample = samples(13)
  encoder = sharded_features.ShardedEncoder(CFG, mesh, BATCH)
  tags = np.stack([np.zeros(13), np.arange(13)[::-1], np.arange(13)], 1)
  images = encoder.share(sample['image'], tags)
  assert (images.steps, images.total) == (2, 13)
  features, got_tags = encoder.images(placed, images)
  reference = clip.encode_image(host, processing.normalize(sample['image'] / np.float32(255), CFG),
                                CFG)
  chex.assert_trees_all_close(features, np.asarray(reference)[::-1], atol=FLOAT32, rtol=FLOAT32)
  np.testing.assert_array_equal(got_tags[:, 2], np.arange(13)[::-1])
  tokens = processing.get_tokenizer(CFG)(sample['caption'])
  text_features, _ = encoder.texts(placed, encoder.share(tokens, tags))
  chex.assert_trees_all_close(text_features, np.asarray(clip.encode_text(host, tokens, CFG))[::-1],
                              atol=FLOAT32, rtol=FLOAT32)


def write_folder(root, per_class):
  """Class subfolders of PNGs (48 px, resized by the model's transform) and a stray file."""
  names = ['blue_square', 'green_triangle', 'red_circle']
  start = 0
  for name, n in zip(names, per_class):
    os.makedirs(root / name)
    for i, image in enumerate(samples(n, 48, start)['image']):
      Image.fromarray(image).save(root / name / f'{i:03d}.png')
    start += n
  (root / 'red_circle' / 'notes.txt').write_text('not an image')
  return [n.replace('_', ' ') for n in names]


def test_zero_shot_folder_equals_the_one_device_evaluation(tmp_path, mesh, params):
  host, placed = params
  classnames = write_folder(tmp_path / 'val', (4, 5, 2))
  spec = evaluators.parse_evaluator(f'zero_shot:folder={tmp_path / "val"}')
  results = evaluators.run_evaluators(evaluators.make_evaluators([spec], CFG, mesh, BATCH), placed)
  paths = sorted(str(p) for p in (tmp_path / 'val').glob('*/*.png'))
  labels = np.array([classnames.index(os.path.basename(os.path.dirname(p)).replace('_', ' '))
                     for p in paths])
  reference = one_device_scores(host, clip.preprocess_images(paths, CFG), labels, classnames)
  assert results == {'zero_shot_val/acc1': reference['acc1'],
                     'zero_shot_val/mean_per_class_recall': reference['mean_per_class_recall']}


def test_zero_shot_tfds_with_a_template_file_equals_the_one_device_evaluation(tmp_path, mesh,
                                                                              params):
  from data import tfds  # pylint: disable=g-import-not-at-top
  host, placed = params
  data_dir = str(tmp_path / 'tfds')
  TinyShapes(data_dir=data_dir).download_and_prepare()
  (tmp_path / 'templates.txt').write_text('a photo of a {c}.\n\nan image of the {}.\n')
  spec = (f'zero_shot:tfds=tiny_shapes,split=test,data_dir={data_dir},'
          f'templates={tmp_path / "templates.txt"},name=shapes')
  results = evaluators.run_evaluators(evaluators.make_evaluators([spec], CFG, mesh, BATCH), placed)
  data = tfds.TFDSClassification('tiny_shapes', 'test', data_dir=data_dir)
  images, labels = data.arrays(BATCH, CFG.image_resolution, preprocess=CFG.preprocess)
  reference = one_device_scores(host, images, labels, data.classnames,
                                ['a photo of a {c}.', 'an image of the {}.'])
  assert results == {'shapes/acc1': reference['acc1'],
                     'shapes/mean_per_class_recall': reference['mean_per_class_recall']}


def test_retrieval_on_shards_equals_the_one_device_evaluation(tmp_path, mesh, params):
  """21 records in 3 tfrecord shards (tars are read by the same pipeline); the one-device
  reference reads them with one pipeline, in key order (img2dataset's keys follow the shards and
  their records)."""
  from data import shards  # pylint: disable=g-import-not-at-top
  host, placed = params
  ds = synthetic.SyntheticCaptions(seed=3, resolution=40)
  ds.write_tfrecords(str(tmp_path), 21, 3)
  pattern = str(tmp_path / '*.tfrecord')
  results = evaluators.run_evaluators(
      evaluators.make_evaluators([f'retrieval:shards={pattern}'], CFG, mesh, BATCH), placed)
  tokenize = lambda texts: processing.get_tokenizer(CFG)(texts, truncate=True)
  batches = list(shards.Pipeline(pattern, global_batch_size=BATCH, resolution=32, train=False,
                                 tokenize=tokenize, preprocess=CFG.preprocess, fields=('key',)))
  order = np.argsort(np.concatenate([b['key'] for b in batches]))
  images = np.concatenate([b['image'] for b in batches])[order]
  tokens = np.concatenate([b['tokens'] for b in batches])[order]
  reference = retrieval.retrieval_metrics(clip.encode_image(host, images, CFG),
                                          clip.encode_text(host, tokens, CFG))
  assert len(order) == 21
  assert results == {f'retrieval/{k}': v for k, v in reference.items()}


def test_synthetic_equals_synthetic_eval(mesh, params, monkeypatch):
  """Two of its tasks (each compiles its own classifier in the reference; all take one path)."""
  monkeypatch.setattr(synthetic_eval, 'TASKS', ('colour_shape', 'size'))
  host, placed = params
  results = evaluators.run_evaluators(
      evaluators.make_evaluators(['synthetic:examples=21,seed=4'], CFG, mesh, BATCH), placed)
  reference = synthetic_eval.evaluate(host, CFG, 21, 4)
  expected = {f'synthetic/{k}': v for k, v in reference.items()
              if not k.endswith('_chance') and k != 'num_examples'}
  assert results == expected


def test_parse_evaluator_forms_and_names():
  spec = evaluators.parse_evaluator('zero_shot:tfds=cifar10,split=validation,data_dir=/d')
  assert spec == evaluators.Spec('zero_shot', {'tfds': 'cifar10', 'split': 'validation',
                                               'data_dir': '/d'})
  assert spec.name == 'zero_shot_cifar10'
  folder = evaluators.parse_evaluator('zero_shot:folder=~/imgs/val/,templates=imagenet')
  assert folder.options == {'folder': os.path.expanduser('~/imgs/val/'), 'templates': 'imagenet'}
  assert folder.name == 'zero_shot_val'
  assert evaluators.parse_evaluator('retrieval:shards=/d/*.tar,name=coco').name == 'coco'
  assert evaluators.parse_evaluator('synthetic').options == {}


@pytest.mark.parametrize('text, match', [
    ('imagenet:tfds=x', "unknown evaluator kind 'imagenet'"),
    ('zero_shot', 'exactly one data source, got none'),
    ('zero_shot:tfds=a,folder=/b', r"exactly one data source, got \['tfds', 'folder'\]"),
    ('zero_shot:folder=/b,split=test', 'split= and data_dir= are for tfds'),
    ('retrieval:shards=/a,shards=/b', "bad option 'shards=/b'"),
    ('retrieval:glob=/a', "bad option 'glob=/a'.*takes shards, name"),
    ('synthetic:examples', "bad option 'examples'"),
    ('synthetic:examples=ten', 'examples= must be a non-negative integer'),
    ('synthetic:examples=0', 'examples= must be >= 1'),
])
def test_parse_evaluator_errors_name_the_forms(text, match):
  with pytest.raises(ValueError, match=match) as error:
    evaluators.parse_evaluator(text)
  assert 'retrieval:shards=GLOB' in str(error.value)


def test_bad_data_fails_when_built(tmp_path, mesh):
  build = lambda *specs, batch=BATCH, cfg=CFG: evaluators.make_evaluators(specs, cfg, mesh, batch)
  with pytest.raises(ValueError, match='--eval-every 100 needs at least one --evaluator'):
    evaluators.require_evaluators(100, [])
  evaluators.require_evaluators(0, [])
  with pytest.raises(FileNotFoundError, match='is not a folder'):
    build(f'zero_shot:folder={tmp_path / "missing"}')
  with pytest.raises(FileNotFoundError, match='no file matches'):
    build(f'retrieval:shards={tmp_path / "*.tar"}')
  with pytest.raises(FileNotFoundError, match='not prepared'):
    build(f'zero_shot:tfds=mnist,data_dir={tmp_path}')
  write_folder(tmp_path / 'val', (1, 1, 1))
  with pytest.raises(FileNotFoundError, match="templates='mine.txt': no such file"):
    build(f'zero_shot:folder={tmp_path / "val"},templates=mine.txt')
  (tmp_path / 'names.txt').write_text('a\nb\n')
  with pytest.raises(ValueError, match='3 classes, 2 names'):
    build(f'zero_shot:folder={tmp_path / "val"},classnames={tmp_path / "names.txt"}')
  with pytest.raises(ValueError, match='names must differ'):
    build('synthetic', 'synthetic:examples=4')
  with pytest.raises(ValueError, match='multiple of the mesh\'s 8 batch shards'):
    build('synthetic', batch=12)
  with pytest.raises(ValueError, match='no text tower'):
    build('synthetic', cfg=cappa_small.get_config().model)


def test_best_and_last(tmp_path):
  path = str(tmp_path / 'eval.json')
  tracker = evaluators.BestAndLast(lower_is_better={'a/loss'})
  assert tracker.update(10, {'a/acc1': 0.5, 'a/loss': 2.0, 'a/acc5': float('nan')}) == [
      'a/acc1', 'a/loss']
  assert tracker.update(20, {'a/acc1': 0.4, 'a/loss': 1.0, 'a/acc5': 0.9}) == ['a/loss', 'a/acc5']
  tracker.write(path)
  with open(path) as f:
    assert json.load(f) == {
        'last': {'step': 20, 'metrics': {'a/acc1': 0.4, 'a/loss': 1.0, 'a/acc5': 0.9}},
        'best': {'a/acc1': {'value': 0.5, 'step': 10}, 'a/loss': {'value': 1.0, 'step': 20},
                 'a/acc5': {'value': 0.9, 'step': 20}}}
  resumed = evaluators.BestAndLast.load(path, lower_is_better={'a/loss'})
  assert resumed.update(30, {'a/acc1': 0.45, 'a/loss': 1.5, 'a/acc5': 0.95}) == ['a/acc5']
  assert resumed.best['a/acc1'] == {'value': 0.5, 'step': 10}
  assert evaluators.BestAndLast.load(str(tmp_path / 'none.json')).last is None
