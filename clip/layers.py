"""Pure primitives over torch-layout parameters; the layouts are absorbed by einsum / conv dims.

Shapes live in names: `x_NxLxD` is (batch, length, width), `w_OxI` a torch Linear weight.
Initialisers mirror torch's defaults so a model trained from scratch starts like OpenAI's.
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from clip import rope2d
from clip.config_checks import one_of
from clip.tower_configs import ATTENTIONS


# ---------------------------------------------------------------- initialisers (torch defaults)

def uniform(key, shape, bound):
  return jax.random.uniform(key, shape, jnp.float32, -bound, bound)


def normal(key, shape, std):
  return std * jax.random.normal(key, shape, jnp.float32)


def init_linear(key, d_in, d_out, bias=True, std=None):
  """nn.Linear: kaiming-uniform(a=sqrt 5) weight, i.e. U(+-1/sqrt(d_in)), unless `std` is given."""
  k_w, k_b = jax.random.split(key)
  bound = 1 / np.sqrt(d_in)
  w = uniform(k_w, (d_out, d_in), bound) if std is None else normal(k_w, (d_out, d_in), std)
  params = {'weight': w}
  if bias:
    params['bias'] = uniform(k_b, (d_out,), bound)
  return params


def init_conv(key, c_in, c_out, k):
  """nn.Conv2d without bias: OIHW weight, U(+-1/sqrt(fan_in))."""
  return {'weight': uniform(key, (c_out, c_in, k, k), 1 / np.sqrt(c_in * k * k))}


def init_layer_norm(d):
  return {'weight': jnp.ones((d,), jnp.float32), 'bias': jnp.zeros((d,), jnp.float32)}


def init_norm(d, kind='layernorm', bias=True):
  """LayerNorm (weight and bias) or RMSNorm (weight only); `bias=False` drops LayerNorm's bias."""
  p = init_layer_norm(d)
  if kind == 'rmsnorm' or not bias:
    del p['bias']
  return p


def init_batch_norm(c, zero_scale=False):
  scale = jnp.zeros if zero_scale else jnp.ones
  return {'weight': scale((c,), jnp.float32), 'bias': jnp.zeros((c,), jnp.float32),
          'running_mean': jnp.zeros((c,), jnp.float32), 'running_var': jnp.ones((c,), jnp.float32),
          'num_batches_tracked': jnp.zeros((), jnp.int32)}


# ---------------------------------------------------------------- layers

def linear(p, x_NxI):
  y_NxO = jnp.einsum('...i,oi->...o', x_NxI, p['weight'].astype(x_NxI.dtype))
  if 'bias' in p:
    y_NxO = y_NxO + p['bias'].astype(x_NxI.dtype)
  return y_NxO


def layer_norm(p, x, eps=1e-5):
  """LayerNorm computed in fp32 whatever the compute dtype (as OpenAI's fp16-safe LayerNorm)."""
  x32 = x.astype(jnp.float32)
  mean = x32.mean(-1, keepdims=True)
  var = jnp.square(x32 - mean).mean(-1, keepdims=True)
  y = (x32 - mean) * jax.lax.rsqrt(var + eps) * p['weight']
  if 'bias' in p:
    y = y + p['bias']
  return y.astype(x.dtype)


def rms_norm(p, x, eps=1e-6):
  """RMSNorm (Zhang & Sennrich, 2019): x / sqrt(mean(x^2) + eps) * weight, in fp32."""
  x32 = x.astype(jnp.float32)
  y = x32 * jax.lax.rsqrt(jnp.square(x32).mean(-1, keepdims=True) + eps) * p['weight']
  return y.astype(x.dtype)


def norm(p, x, kind='layernorm', eps=None):
  """LayerNorm or RMSNorm; `eps` None is each kind's default (1e-5 as torch's LayerNorm, 1e-6)."""
  if kind == 'rmsnorm':
    return rms_norm(p, x) if eps is None else rms_norm(p, x, eps)
  return layer_norm(p, x) if eps is None else layer_norm(p, x, eps)


def quick_gelu(x):
  return x * jax.nn.sigmoid(1.702 * x)


# 'gelu' is exact (erf; torch's nn.GELU(), HF 'gelu'); 'gelu_tanh' the tanh approximation
# (nn.GELU(approximate='tanh'), HF 'gelu_pytorch_tanh', flax's default used by big_vision's SigLIP).
ACTIVATIONS = {'quick_gelu': quick_gelu, 'gelu': functools.partial(jax.nn.gelu, approximate=False),
               'gelu_tanh': functools.partial(jax.nn.gelu, approximate=True),
               'geglu': functools.partial(jax.nn.gelu, approximate=False), 'swiglu': jax.nn.silu}


def init_mlp(k_fc, k_proj, d, hidden, kind='quick_gelu', bias=True, fc_std=None, proj_std=None,
             norm_kind=None):
  """`c_fc (hidden, d)`, `c_proj (d, hidden)`; gated kinds add `c_gate (hidden, d)`; `norm_kind`
  adds NormFormer's norm `ln` on the hidden activations."""
  p = {'c_fc': init_linear(k_fc, d, hidden, bias, fc_std),
       'c_proj': init_linear(k_proj, hidden, d, bias, proj_std)}
  if kind in ('geglu', 'swiglu'):
    p['c_gate'] = init_linear(jax.random.fold_in(k_fc, 1), d, hidden, bias, fc_std)
  if norm_kind:
    p['ln'] = init_norm(hidden, norm_kind, bias)
  return p


def mlp(p, x, kind='quick_gelu', norm_kind='layernorm', norm_eps=None):
  """OpenAI's `c_proj(act(c_fc(x)))`; gated: `c_proj(act(c_gate(x)) * c_fc(x))` (GeGLU, SwiGLU,
  Shazeer 2020); NormFormer normalises the hidden activations when `ln` is present."""
  h = ACTIVATIONS[kind](linear(p['c_gate' if 'c_gate' in p else 'c_fc'], x))
  if 'c_gate' in p:
    h = h * linear(p['c_fc'], x)
  if 'ln' in p:
    h = norm(p['ln'], h, norm_kind, norm_eps)
  return linear(p['c_proj'], h)


def rope(x_NxLxHxd, positions_NxL, theta=10000.0):
  """Rotary position embedding (Su et al., 2021) in the split-halves convention: dimension i and
  i + d/2 form a pair rotated by the angle `position * theta^(-2i/d)`; computed in fp32."""
  half = x_NxLxHxd.shape[-1] // 2
  freqs = theta ** (-np.arange(half, dtype=np.float32) / half)
  angles_NxLx1xh = (positions_NxL.astype(jnp.float32)[..., None] * freqs)[..., None, :]
  cos, sin = jnp.cos(angles_NxLx1xh), jnp.sin(angles_NxLx1xh)
  x1, x2 = jnp.split(x_NxLxHxd.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_NxLxHxd.dtype)


def sincos_2d(grid, width, temperature=10000.0):
  """Fixed 2-D sin-cos position table (grid*grid, width), rows in raster order (MoCo v3,
  big_vision): a quarter of the channels each for sin(x), cos(x), sin(y), cos(y) at `width/4`
  frequencies `temperature^(-k / (width/4 - 1))`."""
  y, x = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32),
                     indexing='ij')
  quarter = width // 4
  omega = 1.0 / temperature ** (np.arange(quarter, dtype=np.float32) / max(quarter - 1, 1))
  x_G2xq = x.reshape(-1, 1) * omega
  y_G2xq = y.reshape(-1, 1) * omega
  return np.concatenate([np.sin(x_G2xq), np.cos(x_G2xq), np.sin(y_G2xq), np.cos(y_G2xq)], 1)


def conv2d(w_OxIxHxW, x_NxHxWxC, stride=1, padding=0):
  """nn.Conv2d on NHWC activations with a torch OIHW kernel.

  XLA's CPU convolution wants an HWIO kernel, so it copies the weight into that layout on every
  call. Where that copy moves more bytes than the image patches do, the convolution runs instead
  as one matmul of the patches with the OIHW weight as stored: always for 1x1 kernels (all of a
  bottleneck's projections), and for larger kernels when the output has fewer positions than the
  kernel has output channels (a ResNet's last stages at small batch, where the weights dominate).
  """
  o, i, kh, kw = w_OxIxHxW.shape
  w_OxIxHxW = w_OxIxHxW.astype(x_NxHxWxC.dtype)
  if kh == kw == 1 and padding == 0:
    x_NxHxWxC = x_NxHxWxC[:, ::stride, ::stride]
    return jnp.einsum('nhwi,oi->nhwo', x_NxHxWxC, w_OxIxHxW.reshape(o, i))
  n, h, w, _ = x_NxHxWxC.shape
  out_h, out_w = (h + 2 * padding - kh) // stride + 1, (w + 2 * padding - kw) // stride + 1
  if n * out_h * out_w < o:
    patches_NxHxWxK = _patches(x_NxHxWxC, kh, kw, stride, padding, out_h, out_w)
    return jnp.einsum('nhwk,ok->nhwo', patches_NxHxWxK, w_OxIxHxW.reshape(o, i * kh * kw))
  return jax.lax.conv_general_dilated(
      x_NxHxWxC, w_OxIxHxW, (stride, stride), [(padding, padding), (padding, padding)],
      dimension_numbers=('NHWC', 'OIHW', 'NHWC'))


def _patches(x_NxHxWxC, kh, kw, stride, padding, out_h, out_w):
  """(N, out_h, out_w, C*kh*kw) windows of a conv, flattened in the OIHW kernel's (I, H, W)
  order so that they contract with `weight.reshape(O, -1)`."""
  n, _, _, c = x_NxHxWxC.shape
  x_NxHxWxC = jnp.pad(x_NxHxWxC, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  taps = [x_NxHxWxC[:, dy:dy + stride * (out_h - 1) + 1:stride,
                    dx:dx + stride * (out_w - 1) + 1:stride]
          for dy in range(kh) for dx in range(kw)]
  return jnp.stack(taps, axis=-1).reshape(n, out_h, out_w, c * kh * kw)


def avg_pool(x_NxHxWxC, k):
  """nn.AvgPool2d(k): window k, stride k, no padding, floor of the output size."""
  if k == 1:
    return x_NxHxWxC
  # A Python 0 lets JAX recognise the differentiable reduce_window_sum.
  summed = jax.lax.reduce_window(x_NxHxWxC, 0., jax.lax.add, (1, k, k, 1), (1, k, k, 1), 'VALID')
  return summed / (k * k)


def batch_norm(p, x_NxHxWxC, train, eps=1e-5, momentum=0.1):
  """nn.BatchNorm2d. Inference uses the running statistics and returns None as new stats;
  training normalises with the batch statistics and returns the updated running buffers
  (torch's rule: momentum 0.1, unbiased variance in the running estimate)."""
  if not train:
    scale = p['weight'] * jax.lax.rsqrt(p['running_var'] + eps)
    shift = p['bias'] - p['running_mean'] * scale
    return x_NxHxWxC * scale.astype(x_NxHxWxC.dtype) + shift.astype(x_NxHxWxC.dtype), None
  x32 = x_NxHxWxC.astype(jnp.float32)
  mean = x32.mean((0, 1, 2))
  var = jnp.square(x32 - mean).mean((0, 1, 2))
  n = x32.size // x32.shape[-1]
  y = (x32 - mean) * jax.lax.rsqrt(var + eps) * p['weight'] + p['bias']
  stats = {
      'running_mean': (1 - momentum) * p['running_mean'] + momentum * jax.lax.stop_gradient(mean),
      'running_var': ((1 - momentum) * p['running_var']
                      + momentum * jax.lax.stop_gradient(var) * n / max(n - 1, 1)),
      'num_batches_tracked': p['num_batches_tracked'] + 1,
  }
  return y.astype(x_NxHxWxC.dtype), stats


def split_heads(x_NxLxD, heads):
  return x_NxLxD.reshape(*x_NxLxD.shape[:-1], heads, x_NxLxD.shape[-1] // heads)


@functools.partial(jax.tree_util.register_dataclass, data_fields=('kv_lengths_N', 'dense'),
                   meta_fields=('causal',))
@dataclasses.dataclass(frozen=True)
class Mask:
  """Which keys each query attends to: a key is attended when every part given allows it.

  `causal`: query i attends to keys 0..i (self-attention, Q == K); `kv_lengths_N` (N,) ints: row
  n attends to its first `kv_lengths_N[n]` keys (key padding after them); `dense` booleans, True
  = attend, broadcast against (N, H, Q, K). The structured parts reach
  `jax.nn.dot_product_attention` as `is_causal` and `key_value_seq_lengths`, which cuDNN's kernel
  applies without a mask in memory (a dense mask it adds as a bias, which its backward pass
  takes only for even lengths). A pytree whose `causal` is static: it can cross `jit`."""
  causal: bool = False
  kv_lengths_N: jax.Array | None = None
  dense: jax.Array | None = None

  def to_dense(self, q_len, k_len):
    """The mask as booleans broadcast against (N, H, Q, K); None where nothing is masked."""
    parts = [] if self.dense is None else [jnp.asarray(self.dense, bool)]
    if self.causal:
      parts.append(jnp.tril(jnp.ones((q_len, k_len), bool)))
    if self.kv_lengths_N is not None:
      parts.append((jnp.arange(k_len) < self.kv_lengths_N[:, None])[:, None, None, :])
    return functools.reduce(jnp.logical_and, parts) if parts else None


def einsum_attention(q_NxQxHxd, k_NxKxHxd, v_NxKxHxd, mask_QxK=None):
  """Scaled dot-product attention as an explicit einsum, softmax, einsum (softmax in fp32);
  `mask_QxK` booleans, True = attend, broadcast against (N, H, Q, K). The reference of
  `attention_heads`'s other implementations."""
  scale = q_NxQxHxd.shape[-1] ** -0.5
  logits_NxHxQxK = jnp.einsum('nqhd,nkhd->nhqk', q_NxQxHxd * scale, k_NxKxHxd)
  logits_NxHxQxK = logits_NxHxQxK.astype(jnp.float32)
  if mask_QxK is not None:
    logits_NxHxQxK = jnp.where(mask_QxK, logits_NxHxQxK, jnp.finfo(jnp.float32).min)
  probs_NxHxQxK = jax.nn.softmax(logits_NxHxQxK, axis=-1).astype(v_NxKxHxd.dtype)
  return jnp.einsum('nhqk,nkhd->nqhd', probs_NxHxQxK, v_NxKxHxd)


def attention_heads(q_NxQxHxd, k_NxKxHxd, v_NxKxHxd, mask=None, implementation='xla'):
  """Scaled dot-product attention softmax(q k^T / sqrt(d)) v on per-head arrays (one dtype)
  -> (N, Q, H, d), the softmax in fp32 (Vaswani et al. 2017).

  `mask`: None, a `Mask`, or booleans (True = attend) broadcast against (N, H, Q, K).
  `implementation` (`clip.tower_configs.ATTENTIONS`, see `Execution`): 'xla' or 'cudnn' run
  `jax.nn.dot_product_attention` with that implementation, 'einsum' runs `einsum_attention`.
  Raises ValueError for another implementation."""
  one_of(implementation, ATTENTIONS, 'the attention implementation')
  mask = mask if isinstance(mask, Mask) else Mask(dense=mask)
  if implementation == 'einsum':
    return einsum_attention(q_NxQxHxd, k_NxKxHxd, v_NxKxHxd,
                            mask.to_dense(q_NxQxHxd.shape[1], k_NxKxHxd.shape[1]))
  dense = None if mask.dense is None else jnp.asarray(mask.dense, bool)
  lengths_N = None if mask.kv_lengths_N is None else mask.kv_lengths_N.astype(jnp.int32)
  return jax.nn.dot_product_attention(q_NxQxHxd, k_NxKxHxd, v_NxKxHxd, mask=dense,
                                      is_causal=mask.causal, key_value_seq_lengths=lengths_N,
                                      implementation=implementation)


def attention(q_NxQxD, k_NxKxD, v_NxKxD, heads, mask=None, implementation='xla'):
  """Scaled dot-product attention over `heads` heads of packed (N, L, D) arrays
  (`attention_heads`)."""
  out_NxQxHxd = attention_heads(split_heads(q_NxQxD, heads), split_heads(k_NxKxD, heads),
                                split_heads(v_NxKxD, heads), mask, implementation)
  return out_NxQxHxd.reshape(q_NxQxD.shape)


def init_multi_head_attention(key, d, attn_std, proj_std, bias=True, heads=None, qk_norm=None,
                              head_scale=False, k_bias=True, inner_norm=None):
  """nn.MultiheadAttention with OpenAI's re-initialisation (biases start at zero, as torch).
  `qk_norm` ('layernorm' / 'rmsnorm') adds `q_norm`, `k_norm` over the head dimension;
  `head_scale` NormFormer's per-head output gain (heads,); `k_bias=False` biases the queries and
  values only, `q_bias`, `v_bias` (d,) (EVA's); `inner_norm` (a norm kind) adds sub-LN's
  `ln_inner` over the heads' concatenated output."""
  k_in, k_out = jax.random.split(key)
  p = {'in_proj_weight': normal(k_in, (3 * d, d), attn_std),
       'out_proj': {'weight': normal(k_out, (d, d), proj_std)}}
  if bias:
    if k_bias:
      p['in_proj_bias'] = jnp.zeros((3 * d,), jnp.float32)
    else:
      p['q_bias'], p['v_bias'] = jnp.zeros((d,), jnp.float32), jnp.zeros((d,), jnp.float32)
    p['out_proj']['bias'] = jnp.zeros((d,), jnp.float32)
  if inner_norm:
    p['ln_inner'] = init_norm(d, inner_norm, bias)
  if qk_norm:
    p['q_norm'] = init_norm(d // heads, qk_norm, bias)
    p['k_norm'] = init_norm(d // heads, qk_norm, bias)
  if head_scale:
    p['head_scale'] = jnp.ones((heads,), jnp.float32)
  return p


def attention_projections(p, x_NxQxD, heads, norm_kind='layernorm', norm_eps=None,
                          kv_NxKxD=None):
  """Per-head queries (N, Q, H, d), keys and values (N, K, H, d) of nn.MultiheadAttention's packed
  `in_proj_weight (3D, D)`: from `x`, or the queries from `x` and keys/values from `kv`; with
  query-key normalisation when `q_norm` / `k_norm` are present; with `q_bias`, `v_bias` in
  place of `in_proj_bias`, the keys unbiased."""
  d = x_NxQxD.shape[-1]
  w, b = p['in_proj_weight'], p.get('in_proj_bias')
  if 'q_bias' in p:
    b = jnp.concatenate([p['q_bias'], jnp.zeros_like(p['q_bias']), p['v_bias']])
  if kv_NxKxD is None:
    q, k, v = jnp.split(linear({'weight': w, **({'bias': b} if b is not None else {})}, x_NxQxD),
                        3, axis=-1)
  else:
    part = lambda s: {'weight': w[s], **({'bias': b[s]} if b is not None else {})}
    q = linear(part(slice(0, d)), x_NxQxD)
    k, v = jnp.split(linear(part(slice(d, 3 * d)), kv_NxKxD), 2, axis=-1)
  q, k, v = split_heads(q, heads), split_heads(k, heads), split_heads(v, heads)
  if 'q_norm' in p:
    q, k = norm(p['q_norm'], q, norm_kind, norm_eps), norm(p['k_norm'], k, norm_kind, norm_eps)
  return q, k, v


def attention_output(p, out_NxQxHxd, norm_kind='layernorm', norm_eps=None):
  """The attention's per-head output -> (N, Q, D): NormFormer's `head_scale` if present, sub-LN's
  `ln_inner` over the concatenated heads if present, then `out_proj`."""
  if 'head_scale' in p:
    out_NxQxHxd = out_NxQxHxd * p['head_scale'].astype(out_NxQxHxd.dtype)[:, None]
  out_NxQxD = out_NxQxHxd.reshape(*out_NxQxHxd.shape[:2], -1)
  if 'ln_inner' in p:
    out_NxQxD = norm(p['ln_inner'], out_NxQxD, norm_kind, norm_eps)
  return linear(p['out_proj'], out_NxQxD)


def multi_head_attention(p, x_NxQxD, heads, mask=None, kv_NxKxD=None, norm_kind='layernorm',
                         q_pos=None, k_pos=None, rope_theta=10000.0, norm_eps=None,
                         implementation='xla', rope_angles=None):
  """nn.MultiheadAttention with the packed `in_proj_weight (3D, D)`: self-attention, or queries
  from `x` and keys/values from `kv`. Optional parts, present by their parameters: query-key
  normalisation (`q_norm`, `k_norm`), NormFormer's `head_scale`, EVA's `q_bias`/`v_bias` and
  sub-LN's `ln_inner`; RoPE when positions are given; `rope_angles` (Q, d/2), for
  self-attention, turns queries and keys as `clip.rope2d.rotate` (EVA's 2-D RoPE).
  `mask` and `implementation` as `attention_heads`'."""
  q, k, v = attention_projections(p, x_NxQxD, heads, norm_kind, norm_eps, kv_NxKxD)
  if q_pos is not None:
    q, k = rope(q, q_pos, rope_theta), rope(k, k_pos, rope_theta)
  if rope_angles is not None:
    q, k = rope2d.rotate(q, rope_angles), rope2d.rotate(k, rope_angles)
  return attention_output(p, attention_heads(q, k, v, mask, implementation), norm_kind, norm_eps)
