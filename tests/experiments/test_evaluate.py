"""experiments/evaluate.py: its metrics equal a direct computation and its JSON has
clip_benchmark's format, for checkpoint files and training workdirs (the metrics themselves:
tests/eval/test_metrics.py; loading a workdir: tests/formats/test_workdirs.py)."""
import json

import jax
import numpy as np
import pytest

import clip
from clip.train import state_store
from clip.formats import files
from clip.eval import retrieval
from data import synthetic
from experiments import evaluate
from experiments.configs import tiny

CFG = tiny.get_config().model


@pytest.fixture(scope='module')
def params():
  """A random tiny model whose biases and norms are perturbed (OpenAI's init zeroes them)."""
  p = clip.init(jax.random.PRNGKey(0), CFG)
  flat = files.flatten(p)
  rng = np.random.default_rng(0)
  flat = {k: np.asarray(v) + (0.1 * rng.standard_normal(v.shape).astype(np.float32)
                              if v.ndim == 1 else 0) for k, v in flat.items()}
  return files.nest(flat)


def _check_format(result, task, templates=False):
  keys = {'dataset', 'model', 'pretrained', 'task', 'metrics', 'language'}
  assert set(result) == keys | ({'templates'} if templates else set())
  assert result['task'] == task and result['language'] == 'en'
  json.dumps(result)


def test_names_follow_clip_benchmark(tmp_path):
  assert evaluate.model_name('ViT-B/32') == ('ViT-B-32', 'openai')
  assert evaluate.model_name('ViT-L/14@336px') == ('ViT-L-14@336px', 'openai')
  path = str(tmp_path / 'model.npz')
  assert evaluate.model_name(path, 'tiny') == ('tiny', path)
  assert evaluate.model_name(path) == ('model.npz', path)
  args = lambda *a: evaluate.parse_args(['--model', 'x', *a])
  assert evaluate.dataset_name(args('--task', 'zeroshot_retrieval', '--captions', 'c/*.tfr')) == (
      'c/*.tfr')
  assert evaluate.dataset_name(args('--task', 'zeroshot_retrieval')) == 'synthetic'
  assert evaluate.dataset_name(args('--dataset', 'tfds/cifar10')) == 'cifar10'
  assert evaluate.dataset_name(args('--dataset', 'synthetic/shape')) == 'synthetic/shape'


def test_zero_shot_json_equals_a_direct_computation(params, tmp_path):
  path = tmp_path / 'model.npz'
  np.savez(path, **files.flatten(params))
  out = tmp_path / 'zs.json'
  result = evaluate.main(['--model', str(path), '--config', 'tiny', '--dataset',
                          'synthetic/colour', '--examples', '64', '--output', str(out)])
  _check_format(result, 'zeroshot_classification')
  assert json.loads(out.read_text()) == json.loads(json.dumps(result))
  ds = synthetic.SyntheticCaptions(seed=1, resolution=CFG.image_resolution, split='heldout')
  sample = ds.get(np.arange(64))
  img = np.asarray(clip.encode_image(params, clip.normalize_image(
      sample['image'].astype(np.float32) / 255), CFG))
  txt = np.asarray(clip.encode_text(params, clip.tokenize(ds.prompts('colour'),
                                                          CFG.context_length), CFG))
  scores = (img / np.linalg.norm(img, axis=1, keepdims=True)) @ (
      txt / np.linalg.norm(txt, axis=1, keepdims=True)).T
  expected = np.mean(scores.argmax(1) == sample['colour'])
  np.testing.assert_allclose(result['metrics']['acc1'], expected)


def test_retrieval_and_probe_from_a_training_workdir(params, tmp_path):
  state_store.save(str(tmp_path / 'run' / 'checkpoints'), 5,
                  {'params': params, 'batch_stats': {}, 'step': np.int32(5)})
  result = evaluate.main(['--model', str(tmp_path / 'run'), '--config', 'tiny', '--dataset',
                          'synthetic', '--task', 'zeroshot_retrieval', '--examples', '48',
                          '--output', str(tmp_path / 'r.json')])
  _check_format(result, 'zeroshot_retrieval')
  ds = synthetic.SyntheticCaptions(seed=1, resolution=CFG.image_resolution, split='heldout')
  sample = ds.get(np.arange(48))
  recall = retrieval.retrieval_metrics(
      clip.encode_image(params, clip.normalize_image(sample['image'].astype(np.float32) / 255),
                        CFG),
      clip.encode_text(params, clip.tokenize(sample['caption'], CFG.context_length), CFG))
  for k in (1, 5, 10):
    np.testing.assert_allclose(result['metrics'][f'image_retrieval_recall@{k}'],
                               recall[f'text_to_image_R@{k}'])
    np.testing.assert_allclose(result['metrics'][f'text_retrieval_recall@{k}'],
                               recall[f'image_to_text_R@{k}'])
  probe = evaluate.main(['--model', str(tmp_path / 'run'), '--config', 'tiny', '--dataset',
                         'synthetic/colour', '--task', 'linear_probe', '--examples', '400',
                         '--output', str(tmp_path / 'p.json')])
  _check_format(probe, 'linear_probe')
  assert probe['metrics']['lp_acc1'] > 0.3  # chance 0.125, random features
  assert probe['model'] == 'tiny' and probe['pretrained'] == str(tmp_path / 'run')
  assert result['dataset'] == 'synthetic'  # the captions, not a label task


def test_bad_model_and_dataset_explain_themselves(tmp_path):
  with pytest.raises(ValueError, match='official model'):
    evaluate.load_model('not-a-model')
  with pytest.raises(FileNotFoundError, match='no checkpoints'):
    (tmp_path / 'run' / 'checkpoints').mkdir(parents=True)
    evaluate.load_model(str(tmp_path / 'run'))
  with pytest.raises(ValueError, match='--dataset must be'):
    evaluate.classification_data(evaluate.parse_args(['--model', 'x', '--dataset', 'mnist']),
                                 CFG, None)
