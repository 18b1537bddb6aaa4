"""Pure primitives over torch-layout parameters; the layouts are absorbed by einsum / conv dims.

Shapes live in names: `x_NxLxD` is (batch, length, width), `w_OxI` a torch Linear weight.
Initialisers mirror torch's defaults so a model trained from scratch starts like OpenAI's.
"""
import jax
import jax.numpy as jnp
import numpy as np


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
  y = (x32 - mean) * jax.lax.rsqrt(var + eps) * p['weight'] + p['bias']
  return y.astype(x.dtype)


def quick_gelu(x):
  return x * jax.nn.sigmoid(1.702 * x)


def mlp(p, x):
  return linear(p['c_proj'], quick_gelu(linear(p['c_fc'], x)))


def conv2d(w_OxIxHxW, x_NxHxWxC, stride=1, padding=0):
  """nn.Conv2d on NHWC activations with a torch OIHW kernel.

  XLA's CPU convolution wants an HWIO kernel and would transpose the weight on every call, so a
  1x1 kernel (all of a bottleneck's projections) runs as a matmul on the OI weight as it is.
  """
  o, i, kh, kw = w_OxIxHxW.shape
  w_OxIxHxW = w_OxIxHxW.astype(x_NxHxWxC.dtype)
  if kh == kw == 1 and padding == 0:
    x_NxHxWxC = x_NxHxWxC[:, ::stride, ::stride]
    return jnp.einsum('nhwi,oi->nhwo', x_NxHxWxC, w_OxIxHxW.reshape(o, i))
  return jax.lax.conv_general_dilated(
      x_NxHxWxC, w_OxIxHxW, (stride, stride), [(padding, padding), (padding, padding)],
      dimension_numbers=('NHWC', 'OIHW', 'NHWC'))


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


def attention(q_NxQxD, k_NxKxD, v_NxKxD, heads, mask_QxK=None):
  """Scaled dot-product attention over `heads` heads; softmax in fp32. mask: True = attend."""
  split = lambda t: t.reshape(*t.shape[:-1], heads, t.shape[-1] // heads)
  q_NxQxHxd, k_NxKxHxd, v_NxKxHxd = split(q_NxQxD), split(k_NxKxD), split(v_NxKxD)
  scale = q_NxQxHxd.shape[-1] ** -0.5
  logits_NxHxQxK = jnp.einsum('nqhd,nkhd->nhqk', q_NxQxHxd * scale, k_NxKxHxd)
  logits_NxHxQxK = logits_NxHxQxK.astype(jnp.float32)
  if mask_QxK is not None:
    logits_NxHxQxK = jnp.where(mask_QxK, logits_NxHxQxK, jnp.finfo(jnp.float32).min)
  probs_NxHxQxK = jax.nn.softmax(logits_NxHxQxK, axis=-1).astype(v_NxKxHxd.dtype)
  out_NxQxHxd = jnp.einsum('nhqk,nkhd->nqhd', probs_NxHxQxK, v_NxKxHxd)
  return out_NxQxHxd.reshape(q_NxQxD.shape)


def init_multi_head_attention(key, d, attn_std, proj_std):
  """nn.MultiheadAttention with OpenAI's re-initialisation (biases start at zero, as torch)."""
  k_in, k_out = jax.random.split(key)
  return {'in_proj_weight': normal(k_in, (3 * d, d), attn_std),
          'in_proj_bias': jnp.zeros((3 * d,), jnp.float32),
          'out_proj': {'weight': normal(k_out, (d, d), proj_std), 'bias': jnp.zeros((d,), jnp.float32)}}


def multi_head_attention(p, x_NxLxD, heads, mask_LxL=None):
  """nn.MultiheadAttention self-attention with the packed `in_proj_weight (3D, D)`."""
  qkv_NxLx3D = linear({'weight': p['in_proj_weight'], 'bias': p['in_proj_bias']}, x_NxLxD)
  q, k, v = jnp.split(qkv_NxLx3D, 3, axis=-1)
  return linear(p['out_proj'], attention(q, k, v, heads, mask_LxL))
