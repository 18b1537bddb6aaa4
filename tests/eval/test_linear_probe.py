"""clip/eval/linear_probe.py: the probe solves its convex problem (against scipy's L-BFGS on the
same objective), the sweep picks the regularisation, non-finite features are refused, and on a
random tower's frozen features it beats chance by far."""
import chex
import numpy as np
import pytest
import scipy.optimize

import clip
from clip.eval import linear_probe
from data import synthetic
from tests.experiments.test_evaluate import CFG
# the perturbed tiny model, a module-scoped fixture
from tests.experiments.test_evaluate import params  # pylint: disable=unused-import


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


def test_probe_refuses_non_finite_features():
  x, y = np.ones((4, 3), np.float32), np.array([0, 1, 0, 1])
  with pytest.raises(ValueError, match='training features must be finite'):
    linear_probe.fit(np.where(x > 0, np.inf, x), y, 2, 1.0)
  probe = linear_probe.fit(x, y, 2, 1.0)
  with pytest.raises(ValueError, match='features must be finite'):
    linear_probe.accuracy(probe, x * np.nan, y)
  with pytest.raises(ValueError, match='validation features must be finite'):
    linear_probe.sweep(x, y, x * np.nan, y, 2)


def test_probe_on_frozen_features_beats_chance_by_far(params):
  ds = synthetic.SyntheticCaptions(seed=0, resolution=CFG.image_resolution)
  sample = ds.get(np.arange(600))
  images = clip.normalize_image(sample['image'].astype(np.float32) / 255)
  feats = linear_probe.image_features(params, images, CFG, batch_size=128)
  chex.assert_trees_all_close(feats[:3], np.asarray(clip.encode_image(params, images[:3], CFG)),
                              rtol=1e-5, atol=1e-6)
  y = ds.labels(sample, 'colour')
  probe = linear_probe.sweep(feats[:400], y[:400], feats[400:500], y[400:500], 8)
  # Random 32-d features of a random tower: far from perfect, but 3x chance (0.125).
  assert linear_probe.accuracy(probe, feats[500:], y[500:]) > 0.35
