"""clip/layers.py against float64 numpy: RMSNorm, RoPE (with and without jit), the sin-cos table,
tanh GELU, the norm epsilon; conv2d on both of its formulations."""
import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clip import configs
from clip import layers
from clip import transformer
from tests.numpy_reference import ACT_TOL
from tests.numpy_reference import MUST_DIFFER
from tests.numpy_reference import RTOL
from tests.numpy_reference import TEXT
from tests.numpy_reference import np_act
from tests.numpy_reference import np_block
from tests.numpy_reference import np_norm
from tests.numpy_reference import np_rope
from tests.numpy_reference import np_sincos
from tests.numpy_reference import perturbed
from tests.numpy_reference import rel_err
from tests.numpy_reference import to_np

CONV_RTOL = 1e-5


def numpy_conv2d(w_OxIxHxW, x_NxHxWxC, stride, padding):
  """torch's nn.Conv2d (cross-correlation, zero padding, no bias) in float64, loop over taps."""
  o, _, kh, kw = w_OxIxHxW.shape
  x = np.pad(x_NxHxWxC.astype(np.float64), ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  n, h, w, _ = x.shape
  out_h, out_w = (h - kh) // stride + 1, (w - kw) // stride + 1
  out = np.zeros((n, out_h, out_w, o))
  for dy in range(kh):
    for dx in range(kw):
      rows, cols = slice(dy, dy + stride * (out_h - 1) + 1, stride), slice(
          dx, dx + stride * (out_w - 1) + 1, stride)
      window = x[:, rows, cols]
      out += np.einsum('nhwi,oi->nhwo', window, w_OxIxHxW[:, :, dy, dx].astype(np.float64))
  return out


def uses_conv_op(w, x, stride, padding):
  jaxpr = jax.make_jaxpr(layers.conv2d, static_argnums=(2, 3))(w, x, stride, padding)
  return any(e.primitive.name == 'conv_general_dilated' for e in jaxpr.jaxpr.eqns)


# (batch, size, in, out, kernel, stride, padding, runs as a matmul of patches)
CASES = [
    (2, 9, 5, 7, 3, 1, 1, False),    # 162 output positions >= 7 channels: XLA's convolution
    (1, 3, 6, 16, 3, 1, 1, True),    # 9 positions < 16 channels: patches @ OIHW weight
    (1, 7, 4, 32, 3, 2, 1, True),    # strided and padded window arithmetic
    (3, 4, 3, 40, 3, 1, 0, True),    # no padding
    (1, 8, 3, 6, 3, 2, 1, False),    # the stem's strided conv
    (2, 5, 8, 12, 1, 1, 0, True),    # 1x1 kernels always run as a matmul
    (1, 6, 8, 12, 1, 2, 0, True),
]


@pytest.mark.parametrize('n,size,c_in,c_out,k,stride,padding,as_matmul', CASES)
def test_conv2d_matches_numpy(n, size, c_in, c_out, k, stride, padding, as_matmul):
  rng = np.random.default_rng(0)
  w = rng.standard_normal((c_out, c_in, k, k)).astype(np.float32)
  x = rng.standard_normal((n, size, size, c_in)).astype(np.float32)
  assert uses_conv_op(w, x, stride, padding) != as_matmul
  expected = numpy_conv2d(w, x, stride, padding)
  actual = jax.jit(layers.conv2d, static_argnums=(2, 3))(w, x, stride, padding)
  chex.assert_shape(actual, expected.shape)
  np.testing.assert_allclose(actual, expected, rtol=CONV_RTOL,
                             atol=CONV_RTOL * np.abs(expected).max())


@pytest.mark.parametrize('n,size,c_in,c_out,k,stride,padding,as_matmul', CASES[:4])
def test_conv2d_gradients_match_xla_convolution(n, size, c_in, c_out, k, stride, padding,
                                                as_matmul):
  """Both formulations give XLA's own convolution gradients (weights and inputs), so ResNets
  train the same whichever one a layer takes."""
  del as_matmul
  rng = np.random.default_rng(1)
  w = rng.standard_normal((c_out, c_in, k, k)).astype(np.float32)
  x = rng.standard_normal((n, size, size, c_in)).astype(np.float32)

  def xla_conv(w, x):
    return jax.lax.conv_general_dilated(x, w, (stride, stride), [(padding, padding)] * 2,
                                        dimension_numbers=('NHWC', 'OIHW', 'NHWC'))

  def loss(conv):
    return lambda w, x: (conv(w, x) ** 2).sum()

  ours = jax.grad(loss(lambda w, x: layers.conv2d(w, x, stride, padding)), (0, 1))(w, x)
  expected = jax.grad(loss(xla_conv), (0, 1))(w, x)
  chex.assert_trees_all_close(ours, expected, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- primitives

class PrimitivesTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_rms_norm_matches_its_definition(self):
    x = np.random.default_rng(0).standard_normal((3, 5, 16)).astype(np.float32)
    p = {'weight': np.linspace(0.5, 2, 16).astype(np.float32)}
    np.testing.assert_allclose(self.variant(layers.rms_norm)(p, x),
                               np_norm(p, x.astype(np.float64), 'rmsnorm'), rtol=1e-5, atol=1e-6)
    assert layers.init_norm(16, 'rmsnorm').keys() == {'weight'}

  @chex.variants(with_jit=True, without_jit=True)
  def test_rope_matches_the_complex_definition_and_scores_depend_on_offsets_only(self):
    rope = self.variant(layers.rope)
    rng = np.random.default_rng(0)
    q, k = rng.standard_normal((2, 1, 6, 2, 8)).astype(np.float32)
    pos = np.arange(6)
    np.testing.assert_allclose(rope(q, pos), np_rope(q.astype(np.float64), pos), atol=1e-5)
    score = lambda m, n: float(jnp.vdot(rope(q[:, :1], jnp.array([m]))[0, 0, 0],
                                        rope(k[:, :1], jnp.array([n]))[0, 0, 0]))
    for m, n, shift in ((3, 1, 5), (0, 4, 11), (7, 7, 2)):
      assert score(m, n) == pytest.approx(score(m + shift, n + shift), abs=1e-4)
    assert abs(score(3, 1) - score(3, 2)) > 1e-3  # and the offset does matter
    np.testing.assert_allclose(np.linalg.norm(rope(q, pos), axis=-1),
                               np.linalg.norm(q, axis=-1), rtol=1e-5)  # a rotation


def test_sincos_table_matches_its_formula():
  np.testing.assert_allclose(layers.sincos_2d(5, 24), np_sincos(5, 24), atol=1e-6)


def test_gelu_tanh_is_the_tanh_formula_not_the_exact_gelu():
  x = np.linspace(-6, 6, 1201).astype(np.float32)
  x64 = x.astype(np.float64)
  for kind in ('gelu_tanh', 'gelu'):
    np.testing.assert_allclose(layers.ACTIVATIONS[kind](x), np_act(kind, x64), rtol=0, atol=ACT_TOL)
  gap = np.abs(np_act('gelu_tanh', x64) - np_act('gelu', x64)).max()  # 4.7e-4 at |x| = 2.7
  assert gap > 100 * ACT_TOL
  # and a block would notice the swap
  cfg = configs.TextConfig(**TEXT, mlp='gelu_tanh', causal=False)
  p = perturbed(transformer.init_block(jax.random.PRNGKey(0), cfg, cfg.layers))
  x = np.random.default_rng(1).standard_normal((2, 7, 32)).astype(np.float32)
  out = transformer.block(p, x, cfg)
  assert rel_err(out, np_block(to_np(p), x.astype(np.float64), cfg)) < RTOL
  exact = dataclasses.replace(cfg, mlp='gelu')
  assert rel_err(out, np_block(to_np(p), x.astype(np.float64), exact)) > MUST_DIFFER


def test_norm_epsilon_matters_on_small_variance_rows():
  """Rows of variance ~1e-6, where 1e-6 and 1e-5 give different norms: the epsilon given is used,
  and None is each kind's default (LayerNorm 1e-5 as torch, RMSNorm 1e-6)."""
  x = (1e-3 * (np.random.default_rng(0).standard_normal((4, 16)) + 0.5)).astype(np.float32)
  x64 = x.astype(np.float64)
  for kind in ('layernorm', 'rmsnorm'):
    p = perturbed(layers.init_norm(16, kind))
    for eps in (None, 1e-6, 1e-5):
      assert rel_err(layers.norm(p, x, kind, eps), np_norm(p, x64, kind, eps)) < RTOL
    assert rel_err(np_norm(p, x64, kind, 1e-6), np_norm(p, x64, kind, 1e-5)) > MUST_DIFFER
  p = perturbed(layers.init_norm(16))
  assert rel_err(layers.norm(p, x), np_norm(p, x64, 'layernorm', 1e-6)) > MUST_DIFFER  # 1e-5
