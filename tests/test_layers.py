"""layers.conv2d against a float64 numpy convolution, on both of its formulations."""
import chex
import jax
import numpy as np
import pytest

from clip import layers

RTOL = 1e-5


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
  np.testing.assert_allclose(actual, expected, rtol=RTOL, atol=RTOL * np.abs(expected).max())


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
