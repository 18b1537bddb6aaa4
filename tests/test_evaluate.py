"""Evaluation: the linear probe solves its convex problem (against scipy's L-BFGS) and beats
chance by far; experiments/evaluate.py's metrics equal a direct computation and its JSON has
clip_benchmark's format, for checkpoint files and training workdirs."""
import json

import chex
import jax
import numpy as np
import pytest
import scipy.optimize

import clip
from clip import checkpoint
from clip import linear_probe
from clip import weights
from clip import zero_shot
from data import synthetic
from experiments import evaluate
from experiments.configs import tiny

CFG = tiny.get_config().model


@pytest.fixture(scope='module')
def params():
  """A random tiny model whose biases and norms are perturbed (OpenAI's init zeroes them)."""
  p = clip.init(jax.random.PRNGKey(0), CFG)
  flat = weights.flatten(p)
  rng = np.random.default_rng(0)
  flat = {k: np.asarray(v) + (0.1 * rng.standard_normal(v.shape).astype(np.float32)
                              if v.ndim == 1 else 0) for k, v in flat.items()}
  return weights.nest(flat)


def test_probe_matches_scipy_on_the_same_objective():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((200, 6)).astype(np.float32)
  y = (x[:, 0] + 0.5 * rng.standard_normal(200) > 0).astype(np.int32) + 2 * (x[:, 1] > 0.5)
  l2 = 0.01
  probe = linear_probe.fit(x, y, 4, l2, tol=1e-7)
  assert probe['grad_norm'] < 1e-4
  xs = np.concatenate([(x - x.mean(0)) / (x.std(0) + 1e-6), np.ones((200, 1), np.float32)], 1)

  def objective(w_flat):
    w = w_flat.reshape(7, 4)
    logits = xs @ w
    logits = logits - logits.max(1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    p = np.exp(logp)
    onehot = np.eye(4)[y]
    grad = xs.T @ (p - onehot) / 200
    grad[:-1] += l2 * w[:-1]
    return -logp[np.arange(200), y].mean() + 0.5 * l2 * np.sum(w[:-1] ** 2), grad.ravel()

  ref = scipy.optimize.minimize(objective, np.zeros(28), jac=True, method='L-BFGS-B',
                                options={'gtol': 1e-10, 'ftol': 1e-14, 'maxiter': 5000})
  np.testing.assert_allclose(np.asarray(probe['weights']).ravel(), ref.x, atol=2e-3)
  np.testing.assert_allclose(linear_probe.predict(probe, x), xs @ ref.x.reshape(7, 4), atol=1e-2)


def test_sweep_prefers_weak_regularisation_on_separable_data_and_rejects_bad_labels():
  rng = np.random.default_rng(1)
  x = rng.standard_normal((300, 4)).astype(np.float32)
  y = (x[:, 0] > 0).astype(np.int32)
  probe = linear_probe.sweep(x[:200], y[:200], x[200:250], y[200:250], 2, l2_values=(1e-4, 1e2))
  assert probe['l2'] == 1e-4 and probe['sweep'][1e-4] > probe['sweep'][1e2]
  assert linear_probe.accuracy(probe, x[250:], y[250:]) > 0.95
  with pytest.raises(ValueError, match=r'labels must lie in \[0, 2\)'):
    linear_probe.fit(x, y + 1, 2, 1.0)


def test_classification_metrics_against_their_definition():
  scores = np.array([[0.9, 0.1, 0.0, 0.2, 0.3, 0.4],
                     [0.1, 0.2, 0.9, 0.0, 0.0, 0.0],
                     [0.5, 0.4, 0.3, 0.2, 0.1, 0.0],
                     [0.0, 0.1, 0.2, 0.3, 0.4, 0.5]])
  labels = np.array([0, 1, 5, 5])
  m = evaluate.classification_metrics(scores, labels)
  assert m['acc1'] == 0.25 + 0.25  # rows 0 and 3
  lp = evaluate.linear_probe_metrics(scores, labels)
  assert lp == {f'lp_{k}': v for k, v in m.items()}  # clip_benchmark's probe names
  assert m['acc5'] == 0.75         # row 2's label 5 ranks last
  assert m['mean_per_class_recall'] == np.mean([1.0, 0.0, 0.5])
  assert m['per_class_acc1'] == {'0': 1.0, '1': 0.0, '5': 0.5}
  named = evaluate.classification_metrics(scores, labels, list('abcdef'))['per_class_acc1']
  assert named == {'a': 1.0, 'b': 0.0, 'f': 0.5}
  assert np.isnan(evaluate.classification_metrics(scores[:, :4], labels % 4)['acc5'])
  # clip_benchmark's probe takes top-5 only where a label >= 5 occurs
  assert np.isnan(evaluate.linear_probe_metrics(scores, labels % 4)['lp_acc5'])
  # equal scores: the lower class first (`zero_shot.top_k`, as torch's first maximum)
  tied = evaluate.classification_metrics(np.array([[1.0, 1.0], [1.0, 1.0]]), np.array([0, 1]))
  assert tied['acc1'] == 0.5 and tied['per_class_acc1'] == {'0': 1.0, '1': 0.0}


def test_probe_on_frozen_features_beats_chance_by_far(params):
  ds = synthetic.SyntheticCaptions(seed=0, resolution=CFG.image_resolution)
  sample = ds.get(np.arange(600))
  images = clip.normalize_image(sample['image'].astype(np.float32) / 255)
  feats = linear_probe.image_features(params, CFG, images, batch_size=128)
  chex.assert_trees_all_close(feats[:3], np.asarray(clip.encode_image(params, images[:3], CFG)),
                              rtol=1e-5, atol=1e-6)
  y = ds.labels(sample, 'colour')
  probe = linear_probe.sweep(feats[:400], y[:400], feats[400:500], y[400:500], 8)
  # Random 32-d features of a random tower: far from perfect, but 3x chance (0.125).
  assert linear_probe.accuracy(probe, feats[500:], y[500:]) > 0.35


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


def test_metrics_refuse_non_finite_scores_and_features():
  with pytest.raises(ValueError, match='scores must be finite, got 1 non-finite'):
    evaluate.classification_metrics(np.array([[0.1, np.nan]]), np.array([0]))
  with pytest.raises(ValueError, match=r'labels must lie in \[0, 2\), got \[0, 2\]'):
    evaluate.linear_probe_metrics(np.zeros((2, 2)), np.array([0, 2]))
  x, y = np.ones((4, 3), np.float32), np.array([0, 1, 0, 1])
  with pytest.raises(ValueError, match='training features must be finite'):
    linear_probe.fit(np.where(x > 0, np.inf, x), y, 2, 1.0)
  probe = linear_probe.fit(x, y, 2, 1.0)
  with pytest.raises(ValueError, match='features must be finite'):
    linear_probe.accuracy(probe, x * np.nan, y)
  with pytest.raises(ValueError, match='validation features must be finite'):
    linear_probe.sweep(x, y, x * np.nan, y, 2)


def test_zero_shot_json_equals_a_direct_computation(params, tmp_path):
  path = tmp_path / 'model.npz'
  np.savez(path, **weights.flatten(params))
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
  checkpoint.save(str(tmp_path / 'run' / 'checkpoints'), 5,
                  {'params': params, 'batch_stats': {}, 'step': np.int32(5)})
  result = evaluate.main(['--model', str(tmp_path / 'run'), '--config', 'tiny', '--dataset',
                          'synthetic', '--task', 'zeroshot_retrieval', '--examples', '48',
                          '--output', str(tmp_path / 'r.json')])
  _check_format(result, 'zeroshot_retrieval')
  ds = synthetic.SyntheticCaptions(seed=1, resolution=CFG.image_resolution, split='heldout')
  sample = ds.get(np.arange(48))
  recall = zero_shot.retrieval_metrics(
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


def test_a_stacked_sigmoid_workdir_loads_with_its_config(tmp_path):
  """A scan-layout checkpoint with SigLIP's bias loads with its config; without one, the OpenAI
  architecture the shapes suggest is refused, naming the missing keys."""
  from experiments.configs import siglip_small  # pylint: disable=g-import-not-at-top
  cfg = siglip_small.get_config().model
  params = clip.init(jax.random.PRNGKey(0), cfg)
  assert 'attn' in params['transformer']['resblocks']  # stacked
  checkpoint.save(tmp_path / 'checkpoints', 1, {'params': params, 'batch_stats': {}})
  loaded, loaded_cfg = evaluate.load_model(str(tmp_path), 'siglip_small')
  assert loaded_cfg == cfg
  chex.assert_trees_all_equal(loaded, jax.device_get(params))
  with pytest.raises(weights.CheckpointError, match='missing'):  # shapes alone: OpenAI's blocks
    evaluate.load_model(str(tmp_path))
