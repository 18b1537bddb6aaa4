"""clip/layers.py against float64 numpy: RMSNorm, RoPE (with and without jit), the sin-cos table,
tanh GELU, the norm epsilon; conv2d on both of its formulations; attention through
`jax.nn.dot_product_attention` against the einsum reference for every mask kind, fp32 and bf16,
values and gradients, with and without jit."""
import dataclasses
import functools

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


# ---------------------------------------------------------------- attention implementations

ATT_N, ATT_HEADS, ATT_DIM, ATT_LEN = 3, 4, 16, 7
KV_LENGTHS = np.array([7, 4, 1])
ATT_RTOL = 1e-5  # dot_product_attention against the einsum, both fp32
# bf16 keeps 8 significant bits (2^-8 = 0.4% per rounding) and the softmax amplifies the logits'
# rounding: measured up to 1.6% of the largest output over 20 seeds, at these shapes.
BF16_RTOL = 3e-2
_CAUSAL = np.tril(np.ones((ATT_LEN, ATT_LEN), bool))
_PADDED = (np.arange(ATT_LEN) < KV_LENGTHS[:, None])[:, None, None, :]
_DENSE = np.random.default_rng(5).random((ATT_N, 1, ATT_LEN, ATT_LEN)) < 0.5
_DENSE[..., 0] = True  # every query sees a key, also under a causal and a padding mask

# name: (query length, the mask as attention_heads takes it, the same as numpy booleans or None)
ATTENTION_MASKS = {
    'none': (ATT_LEN, None, None),
    'causal': (ATT_LEN, layers.Mask(causal=True), _CAUSAL),
    'key-padding': (ATT_LEN, layers.Mask(kv_lengths_N=KV_LENGTHS), _PADDED),
    'causal-and-padding': (ATT_LEN, layers.Mask(causal=True, kv_lengths_N=KV_LENGTHS),
                           _CAUSAL & _PADDED),
    'dense-booleans': (ATT_LEN, _DENSE, _DENSE),
    'all-three-cross': (3, layers.Mask(True, KV_LENGTHS, _DENSE[:, :, :3]),
                        _CAUSAL[:3] & _PADDED & _DENSE[:, :, :3]),
}


def np_attention(q, k, v, mask):
  """softmax(q k^T / sqrt(d)) v per head in float64, masked keys at -inf."""
  q, k, v = (np.asarray(t, np.float64) for t in (q, k, v))
  scores = np.einsum('nqhd,nkhd->nhqk', q, k) / np.sqrt(q.shape[-1])
  if mask is not None:
    scores = np.where(mask, scores, -np.inf)
  probs = np.exp(scores - scores.max(-1, keepdims=True))
  return np.einsum('nhqk,nkhd->nqhd', probs / probs.sum(-1, keepdims=True), v)


def attention_inputs(q_len, seed=0):
  rng = np.random.default_rng(seed)
  shape = lambda length: (ATT_N, length, ATT_HEADS, ATT_DIM)
  return tuple(rng.standard_normal(shape(length)).astype(np.float32)
               for length in (q_len, ATT_LEN, ATT_LEN))


attention_jit = jax.jit(layers.attention_heads, static_argnames='implementation')


@functools.cache
def attention_results():
  """`{mask kind: {(implementation, dtype): (output, gradients of <output, cotangent> for q, k
  and v, or None in bf16)}}` of 'einsum' and 'xla', from one jitted function."""
  def run(inputs, cotangents):
    results = {name: {} for name in ATTENTION_MASKS}
    for name, (_, mask, _) in ATTENTION_MASKS.items():
      qkv = inputs[name]
      for impl in ('einsum', 'xla'):
        attend = lambda *t, impl=impl, mask=mask: layers.attention_heads(*t, mask, impl)
        out, vjp = jax.vjp(attend, *qkv)
        results[name][impl, 'float32'] = out, vjp(cotangents[name])
        results[name][impl, 'bfloat16'] = attend(*(t.astype(jnp.bfloat16) for t in qkv)), None
    return results

  inputs = {name: attention_inputs(q_len) for name, (q_len, _, _) in ATTENTION_MASKS.items()}
  cotangents = {name: np.random.default_rng(1).standard_normal(qkv[0].shape).astype(np.float32)
                for name, qkv in inputs.items()}
  return jax.jit(run)(inputs, cotangents)


@pytest.mark.parametrize('name', sorted(ATTENTION_MASKS))
def test_dot_product_attention_equals_the_einsum_reference_in_fp32(name):
  """The einsum against float64 numpy (and the mask matters), then XLA's dot_product_attention
  against the einsum, jitted: values, and gradients for q, k and v."""
  q_len, _, np_mask = ATTENTION_MASKS[name]
  q, k, v = attention_inputs(q_len)
  results = attention_results()[name]
  reference, reference_grads = results['einsum', 'float32']
  assert rel_err(reference, np_attention(q, k, v, np_mask)) < RTOL
  if np_mask is not None:
    assert rel_err(reference, np_attention(q, k, v, None)) > MUST_DIFFER
  out, grads = results['xla', 'float32']
  assert out.dtype == jnp.float32 and out.shape == q.shape
  assert rel_err(out, np.asarray(reference, np.float64)) < ATT_RTOL
  for got, want in zip(grads, reference_grads):
    assert rel_err(got, np.asarray(want, np.float64)) < ATT_RTOL


def test_dot_product_attention_without_jit_equals_the_einsum():
  q_len, mask, _ = ATTENTION_MASKS['causal-and-padding']
  reference = attention_results()['causal-and-padding']['einsum', 'float32'][0]
  out = layers.attention_heads(*attention_inputs(q_len), mask, 'xla')
  assert rel_err(out, np.asarray(reference, np.float64)) < ATT_RTOL


@pytest.mark.parametrize('name', sorted(ATTENTION_MASKS))
def test_bf16_attention_is_within_bf16_tolerance_of_the_references(name):
  """In bf16 both implementations stay within `BF16_RTOL` of the fp32 einsum and of each other,
  and return bf16."""
  results = attention_results()[name]
  reference = np.asarray(results['einsum', 'float32'][0], np.float64)
  outs = {impl: results[impl, 'bfloat16'][0] for impl in ('einsum', 'xla')}
  for out in outs.values():
    assert out.dtype == jnp.bfloat16 and rel_err(out, reference) < BF16_RTOL
  assert rel_err(outs['xla'], np.asarray(outs['einsum'], np.float64)) < BF16_RTOL


def test_cudnn_attention_runs_on_a_cuda_gpu_and_is_an_error_elsewhere():
  """'cudnn' never falls back: off a CUDA GPU JAX raises; on one it equals the einsum in bf16."""
  qkv = [jnp.asarray(t, jnp.bfloat16) for t in attention_inputs(ATT_LEN, seed=3)]
  masks = [None, layers.Mask(causal=True), layers.Mask(causal=True, kv_lengths_N=KV_LENGTHS)]
  if jax.default_backend() != 'gpu':
    with pytest.raises(RuntimeError, match='cuDNN'):
      attention_jit(*qkv, masks[1], implementation='cudnn')
    return
  for mask in masks:
    reference = np.asarray(attention_jit(*qkv, mask, implementation='einsum'), np.float64)
    assert rel_err(attention_jit(*qkv, mask, implementation='cudnn'), reference) < BF16_RTOL


def test_an_unknown_attention_implementation_is_an_error():
  q, k, v = attention_inputs(ATT_LEN)
  with pytest.raises(ValueError, match=r"the attention implementation must be one of "
                                       r"\('xla', 'cudnn', 'einsum'\), got 'flash'"):
    layers.attention_heads(q, k, v, None, 'flash')
