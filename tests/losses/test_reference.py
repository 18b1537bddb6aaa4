"""losses/reference.py: the single-device references against float64 numpy (values,
finite-difference gradients, stability; with and without jit), closed forms and input checks, and
the helpers the other loss tests share. Each shard_map body against its reference:
tests/losses/test_allgather.py; every registered loss through `make_loss` on every mesh:
tests/losses/test_make.py."""
import functools

import chex
import jax
import numpy as np
import pytest
from absl.testing import parameterized
from jax.sharding import Mesh

import losses

FP32_RTOL = 1e-5  # max |sharded - reference| / max |reference|, per leaf
FD_RTOL = 1e-5  # fp32 autodiff of the references against float64 central differences
LOG_SCALE, BIAS = np.log(10.0), -2.0
SIGMOID = ('sigmoid', 'ring_sigmoid')

# (mesh shape, mesh axis names, batch axes): the batch over one axis, over two, over one of two.
MESHES = {
    '8': ((8,), ('data',), ('data',)),
    '4x2': ((4, 2), ('data', 'fsdp'), ('data', 'fsdp')),
    '2x4_tensor': ((2, 4), ('data', 'tensor'), ('data',)),
    '1': ((1,), ('data',), ('data',)),
}


def embeddings(rng, n, d):
  x_NxD = rng.standard_normal((n, d))
  return (x_NxD / np.linalg.norm(x_NxD, axis=1, keepdims=True)).astype(np.float32)


def pairs(kind, n=32, d=16, seed=0):
  """(img, txt): random, or with the second half of the batch a copy of the first (ties across
  devices), or every row the same vector."""
  rng = np.random.default_rng(seed)
  img, txt = embeddings(rng, n, d), embeddings(rng, n, d)
  if kind == 'duplicate':
    img[n // 2:], txt[n // 2:] = img[:n // 2], txt[:n // 2]
  elif kind == 'identical':
    img[:], txt[:] = img[0], img[0]
  return img, txt


def rel_err(actual, expected):
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  return float(np.abs(actual - expected).max() / np.abs(expected).max())


def assert_rel_close(actual, expected, rtol):
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
    chex.assert_equal_shape([a, e])
    assert rel_err(a, e) < rtol, (rel_err(a, e), rtol)


# float64 numpy, written from the definitions, independent of the jax code.
def np_contrastive(img, txt, log_scale):
  logits = np.exp(log_scale) * img @ txt.T
  lse = lambda x, axis: x.max(axis) + np.log(np.exp(x - x.max(axis, keepdims=True)).sum(axis))
  return np.mean((lse(logits, 1) - np.diag(logits) + lse(logits, 0) - np.diag(logits)) / 2)


def np_sigmoid(img, txt, log_scale, bias):
  x = (2 * np.eye(len(img)) - 1) * (np.exp(log_scale) * img @ txt.T + bias)
  log_sigmoid = np.minimum(x, 0) - np.log1p(np.exp(-np.abs(x)))
  return -log_sigmoid.sum() / len(img)


def finite_difference_grads(fn, args, eps=1e-6):
  args = [np.asarray(a, np.float64) for a in args]
  grads = []
  for i, a in enumerate(args):
    g = np.zeros_like(a)
    for idx in np.ndindex(a.shape):
      up, down = [x.copy() for x in args], [x.copy() for x in args]
      up[i][idx] += eps
      down[i][idx] -= eps
      g[idx] = (fn(*up) - fn(*down)) / (2 * eps)
    grads.append(g)
  return grads


class ReferenceTest(chex.TestCase):
  """The single-device references, called directly and under jit."""

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(('contrastive', 'contrastive'), ('sigmoid', 'sigmoid'))
  def test_reference_matches_float64_definition(self, name):
    img, txt = pairs('random', n=6, d=4)
    args = (img, txt, LOG_SCALE, BIAS) if name == 'sigmoid' else (img, txt, LOG_SCALE)
    ref, np_fn = (losses.sigmoid_loss, np_sigmoid) if name == 'sigmoid' else (
        losses.contrastive_loss, np_contrastive)
    value, grads = self.variant(jax.value_and_grad(ref, argnums=tuple(range(len(args)))))(*args)
    assert rel_err(value, np_fn(*args)) < FP32_RTOL
    assert_rel_close(grads, finite_difference_grads(np_fn, args), FD_RTOL)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(('contrastive', 'contrastive'), ('sigmoid', 'sigmoid'))
  def test_reference_is_stable_at_large_logits(self, name):
    """exp(1000) overflows fp32: log-sum-exp and log_sigmoid must not."""
    img, txt = pairs('duplicate', n=8, d=4)
    args = (img, txt, np.log(1000.0), 5.0) if name == 'sigmoid' else (img, txt, np.log(1000.0))
    ref, np_fn = (losses.sigmoid_loss, np_sigmoid) if name == 'sigmoid' else (
        losses.contrastive_loss, np_contrastive)
    value, grads = self.variant(jax.value_and_grad(ref, argnums=(0, 1, 2)))(*args)
    assert np.isfinite(value) and all(np.isfinite(g).all() for g in grads)
    assert rel_err(value, np_fn(*args)) < FP32_RTOL


def test_identical_embeddings_have_closed_form_losses():
  img, txt = pairs('identical', n=8, d=4)
  s = np.exp(LOG_SCALE)  # every logit is s: softmax is uniform, every sigmoid pair alike
  np.testing.assert_allclose(losses.contrastive_loss(img, txt, LOG_SCALE), np.log(8), rtol=1e-6)
  expected = -(np.log(1 / (1 + np.exp(-(s + BIAS)))) + 7 * np.log(1 / (1 + np.exp(s + BIAS))))
  np.testing.assert_allclose(losses.sigmoid_loss(img, txt, LOG_SCALE, BIAS), expected, rtol=1e-6)


@functools.lru_cache(maxsize=None)
def mesh_of(mesh_name):
  shape, names, batch_axes = MESHES[mesh_name]
  devices = np.asarray(jax.devices()[:int(np.prod(shape))]).reshape(shape)
  return Mesh(devices, names), batch_axes


def reference_value_and_grad(name, args):
  ref = losses.sigmoid_loss if name in SIGMOID else losses.contrastive_loss
  return jax.value_and_grad(ref, argnums=tuple(range(len(args))))(*args)


def loss_args(name, img, txt):
  return (img, txt, LOG_SCALE, BIAS) if name in SIGMOID else (img, txt, LOG_SCALE)


def test_references_reject_bad_input():
  img, txt = pairs('random', n=8, d=4)
  with pytest.raises(ValueError, match=r'same \(batch, dim\) shape, got \(8, 4\) and \(8, 3\)'):
    losses.contrastive_loss(img, txt[:, :3], LOG_SCALE)
  with pytest.raises(ValueError, match=r'img must be \(batch, dim\), got shape \(8, 4, 1\)'):
    losses.contrastive_loss(img[..., None], txt[..., None], LOG_SCALE)
  with pytest.raises(TypeError, match='txt must be a float array, got dtype int32'):
    losses.sigmoid_loss(img, txt.astype(np.int32), LOG_SCALE, BIAS)
  with pytest.raises(ValueError, match=r'logit_bias must be a scalar, got shape \(1,\)'):
    losses.sigmoid_loss(img, txt, LOG_SCALE, np.zeros(1))
  with pytest.raises(TypeError, match='axis_name must be a mesh axis name or a tuple'):
    losses.ring_contrastive_loss(img, txt, LOG_SCALE, ['data'])
