"""Linear probe: L2-regularised logistic regression on frozen CLIP image features, as in the CLIP
paper (section 3.2): features of the image tower, a multinomial logistic regression fitted to
convergence with L-BFGS (optax), the regularisation strength chosen on a validation split by a
sweep, then refitted on train + validation and scored on the test split.

  feats = linear_probe.image_features(params, images, cfg)         # (N, embed_dim), batched
  probe = linear_probe.sweep(train_x, train_y, val_x, val_y, num_classes)
  accuracy = linear_probe.accuracy(probe['weights'], test_x, test_y)
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from clip import batching
from clip import model
from clip.eval.metrics import check_finite

# The CLIP paper sweeps lambda over [1e-6, 1e6] on a log scale; this grid spans it.
DEFAULT_L2 = tuple(10.0 ** e for e in range(-6, 7))


def image_features(params, images, cfg, batch_size=256):
  """Images `(N, R, R, 3)` prepared by the model's own preprocessing (`clip.preprocess_images(
  images, cfg)`; `clip.processing.normalize(images01, cfg)` for [0, 1] images already at its
  resolution) -> image features `(N, embed_dim)` float32 (not normalised), in fixed-size jitted
  batches with a progress bar."""
  model.check_images(images, cfg)
  return batching.map_batches(lambda batch: model.encode_image(params, batch, cfg), images,
                              batch_size, 'image features', 'images').astype(np.float32)


def _standardize(train_NxD, *others):
  """Zero mean, unit variance per feature from the training features (plus a bias column)."""
  mean, std = train_NxD.mean(0), train_NxD.std(0) + 1e-6
  return [jnp.concatenate([(x - mean) / std, jnp.ones((x.shape[0], 1), x.dtype)], axis=1)
          for x in (train_NxD, *others)], (mean, std)


def _objective(w_DxC, x_NxD, y_N, l2):
  """Mean cross-entropy + l2/2 * |W|^2 (the bias row, the last, is not regularised)."""
  logits = x_NxD @ w_DxC
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, y_N).mean()
  return ce + 0.5 * l2 * jnp.sum(jnp.square(w_DxC[:-1]))


@functools.partial(jax.jit, static_argnames=('num_classes', 'max_steps'))
def _fit(x_NxD, y_N, l2, num_classes, max_steps, tol):
  fun = lambda w: _objective(w, x_NxD, y_N, l2)
  opt = optax.lbfgs()
  value_and_grad = optax.value_and_grad_from_state(fun)

  def step(carry):
    w, state, _ = carry
    value, grad = value_and_grad(w, state=state)
    updates, state = opt.update(grad, state, w, value=value, grad=grad, value_fn=fun)
    return optax.apply_updates(w, updates), state, optax.tree.norm(grad)

  def running(carry):
    _, state, grad_norm = carry
    return (optax.tree.get(state, 'count') < max_steps) & (grad_norm > tol)

  w0 = jnp.zeros((x_NxD.shape[1], num_classes), jnp.float32)
  w, state, _ = jax.lax.while_loop(running, step, (w0, opt.init(w0), jnp.asarray(jnp.inf)))
  return w, jnp.linalg.norm(jax.grad(fun)(w)), optax.tree.get(state, 'count')


def fit(train_x, train_y, num_classes, l2, max_steps=1000, tol=1e-5):
  """Fits the probe: `{'weights': (D + 1, C) on standardised features, 'mean', 'std', 'l2',
  'grad_norm' (of the objective at the solution), 'steps'}`."""
  x = jnp.asarray(check_finite(train_x, 'training features'), jnp.float32)
  y = jnp.asarray(train_y, jnp.int32)
  if x.ndim != 2 or y.shape != (x.shape[0],):
    raise ValueError(f'need features (N, D) and labels (N,), got {x.shape} and {y.shape}')
  if int(y.min()) < 0 or int(y.max()) >= num_classes:
    raise ValueError(f'labels must lie in [0, {num_classes}), got [{int(y.min())}, '
                     f'{int(y.max())}]')
  (xs,), (mean, std) = _standardize(x)
  w, grad_norm, steps = _fit(xs, y, jnp.float32(l2), num_classes, max_steps, tol)
  return {'weights': w, 'mean': mean, 'std': std, 'l2': float(l2),
          'grad_norm': float(grad_norm), 'steps': int(steps)}


def predict(probe, x):
  """Class scores (N, C) of features `x` (N, D)."""
  x = jnp.asarray(check_finite(x, 'features'), jnp.float32)
  x = (x - probe['mean']) / probe['std']
  x = jnp.concatenate([x, jnp.ones((x.shape[0], 1), x.dtype)], axis=1)
  return check_finite(np.asarray(x @ probe['weights']), 'probe scores')


def accuracy(probe, x, y):
  """Top-1 accuracy; `argmax` takes the lower class among equal scores, as `metrics.top_k`."""
  return float(np.mean(predict(probe, x).argmax(-1) == np.asarray(y)))


def sweep(train_x, train_y, val_x, val_y, num_classes, l2_values=DEFAULT_L2, max_steps=1000):
  """Chooses the L2 strength with the best validation accuracy (the larger on ties), then refits
  on train + validation. Returns the refitted probe with `'sweep': {l2: val accuracy}`."""
  check_finite(train_x, 'training features')
  check_finite(val_x, 'validation features')
  scores = {}
  for l2 in l2_values:
    scores[float(l2)] = accuracy(fit(train_x, train_y, num_classes, l2, max_steps), val_x, val_y)
  best = max(scores, key=lambda l2: (scores[l2], l2))
  probe = fit(np.concatenate([train_x, val_x]), np.concatenate([train_y, val_y]), num_classes,
              best, max_steps)
  probe['sweep'] = scores
  return probe
