"""OpenAI's ModifiedResNet image tower: 3-conv stem, anti-aliased bottlenecks, attention pool.

`apply` normalises with the running statistics (inference); `apply_train` with batch statistics,
returning the updated running buffers as a nested dict mirroring params beside the features.
"""
import jax
import jax.numpy as jnp

from clip import configs
from clip import layers
from clip import transformer

EXPANSION = 4


def _stages(cfg):
  """(name, planes, blocks, stride) of the four residual stages."""
  return [(f'layer{i + 1}', cfg.width * 2 ** i, n, 1 if i == 0 else 2)
          for i, n in enumerate(cfg.layers)]


def _init_bottleneck(key, inplanes, planes, stride):
  k = lambda i: jax.random.fold_in(key, i)
  p = {
      'conv1': layers.init_conv(k(0), inplanes, planes, 1), 'bn1': layers.init_batch_norm(planes),
      'conv2': layers.init_conv(k(1), planes, planes, 3), 'bn2': layers.init_batch_norm(planes),
      'conv3': layers.init_conv(k(2), planes, planes * EXPANSION, 1),
      # OpenAI zero-initialises the last BN scale of every block.
      'bn3': layers.init_batch_norm(planes * EXPANSION, zero_scale=True),
  }
  if stride > 1 or inplanes != planes * EXPANSION:
    p['downsample'] = {'0': layers.init_conv(k(3), inplanes, planes * EXPANSION, 1),
                       '1': layers.init_batch_norm(planes * EXPANSION)}
  return p


def _init_attnpool(key, cfg, embed_dim):
  d = cfg.feature_width
  k = lambda i: jax.random.fold_in(key, i)
  std = d ** -0.5
  return {
      'positional_embedding': layers.normal(k(0), (cfg.grid_size ** 2 + 1, d), d ** -0.5),
      'k_proj': layers.init_linear(k(1), d, d, std=std),
      'q_proj': layers.init_linear(k(2), d, d, std=std),
      'v_proj': layers.init_linear(k(3), d, d, std=std),
      'c_proj': layers.init_linear(k(4), d, embed_dim, std=std),
  }


def init(key, cfg, embed_dim):
  """`cfg` is a VisionConfig with arch 'resnet'; keys and shapes are torch's `visual.*`."""
  k = lambda i: jax.random.fold_in(key, i)
  w = cfg.width
  params = {
      'conv1': layers.init_conv(k(0), 3, w // 2, 3), 'bn1': layers.init_batch_norm(w // 2),
      'conv2': layers.init_conv(k(1), w // 2, w // 2, 3), 'bn2': layers.init_batch_norm(w // 2),
      'conv3': layers.init_conv(k(2), w // 2, w, 3), 'bn3': layers.init_batch_norm(w),
  }
  inplanes = w
  for s, (name, planes, blocks, stride) in enumerate(_stages(cfg)):
    stage = {}
    for b in range(blocks):
      key_b = jax.random.fold_in(k(3 + s), b)
      stage[str(b)] = _init_bottleneck(key_b, inplanes, planes, stride if b == 0 else 1)
      inplanes = planes * EXPANSION
    params[name] = stage
  params['attnpool'] = _init_attnpool(k(7), cfg, embed_dim)
  return params


class _Stats:
  """Collects updated BN buffers under their parameter paths (training mode only)."""

  def __init__(self):
    self.tree = {}

  def conv_bn(self, p, path, x, train, stride=1, padding=0):
    conv, bn = path
    x = layers.conv2d(p[conv]['weight'], x, stride, padding)
    x, stats = layers.batch_norm(p[bn], x, train)
    if stats is not None:
      self.tree[bn] = stats
    return x


def _bottleneck(p, x, stride, train):
  s = _Stats()
  out = jax.nn.relu(s.conv_bn(p, ('conv1', 'bn1'), x, train))
  out = jax.nn.relu(s.conv_bn(p, ('conv2', 'bn2'), out, train, padding=1))
  out = layers.avg_pool(out, stride)
  out = s.conv_bn(p, ('conv3', 'bn3'), out, train)
  identity = x
  if 'downsample' in p:
    d = _Stats()
    identity = d.conv_bn(p['downsample'], ('0', '1'), layers.avg_pool(x, stride), train)
    if d.tree:
      s.tree['downsample'] = d.tree
  return jax.nn.relu(out + identity), s.tree


def _attnpool(p, x_NxHxWxC, heads, implementation):
  n, h, w, c = x_NxHxWxC.shape
  x_NxLxC = x_NxHxWxC.reshape(n, h * w, c)
  x_NxLxC = jnp.concatenate([x_NxLxC.mean(1, keepdims=True), x_NxLxC], axis=1)
  x_NxLxC = x_NxLxC + p['positional_embedding'].astype(x_NxLxC.dtype)
  q = layers.linear(p['q_proj'], x_NxLxC[:, :1])
  k = layers.linear(p['k_proj'], x_NxLxC)
  v = layers.linear(p['v_proj'], x_NxLxC)
  return layers.linear(p['c_proj'], layers.attention(q, k, v, heads, None, implementation))[:, 0]


def _remat_stage(p, x, blocks, stride, train):
  """A stage with every bottleneck recomputed in the backward pass: the first (it changes the
  shape) on its own, the others as one `lax.scan` over their stacked weights, which is what makes
  XLA keep only the block inputs (see `transformer.apply`). Returns (x, per-block stats)."""
  bottleneck = jax.checkpoint(_bottleneck, static_argnums=(2, 3))
  x, first = bottleneck(p['0'], x, stride, train)
  stats = {'0': first}
  if blocks > 1:
    stacked = transformer.stack_blocks([p[str(b)] for b in range(1, blocks)])
    x, rest = jax.lax.scan(lambda h, bp: bottleneck(bp, h, 1, train), x, stacked)
    stats.update({str(b): jax.tree.map(lambda leaf, i=b - 1: leaf[i], rest)  # {} in eval mode
                  for b in range(1, blocks)})
  return x, stats


def apply(params, images_NxHxWx3, cfg, execution=configs.Execution()):
  """Normalised NHWC images -> (N, embed_dim), BatchNorm on its running statistics. Any
  `execution.remat` but 'none' recomputes each bottleneck in the backward pass instead of
  storing its activations (a ResNet has no 'dots' policy of its own)."""
  return _forward(params, images_NxHxWx3, cfg, execution, train=False)[0]


def apply_train(params, images_NxHxWx3, cfg, execution=configs.Execution()):
  """`apply` with BatchNorm on batch statistics: `(features (N, embed_dim), batch_stats)`, the
  updated running buffers (torch's momentum 0.1, unbiased variance) under their parameter
  paths, for `clip.update_batch_stats`."""
  return _forward(params, images_NxHxWx3, cfg, execution, train=True)


def _forward(params, images_NxHxWx3, cfg, execution, train):
  images_NxHxWx3 = images_NxHxWx3.astype(execution.dtype)
  remat = execution.remat != 'none'
  s = _Stats()
  x = jax.nn.relu(s.conv_bn(params, ('conv1', 'bn1'), images_NxHxWx3, train, 2, 1))
  x = jax.nn.relu(s.conv_bn(params, ('conv2', 'bn2'), x, train, padding=1))
  x = jax.nn.relu(s.conv_bn(params, ('conv3', 'bn3'), x, train, padding=1))
  x = layers.avg_pool(x, 2)
  for name, _, blocks, stride in _stages(cfg):
    with jax.named_scope(name):
      if remat:
        x, stats = _remat_stage(params[name], x, blocks, stride, train)
        if train:
          s.tree[name] = stats
        continue
      for b in range(blocks):
        x, stats = _bottleneck(params[name][str(b)], x, stride if b == 0 else 1, train)
        if train:
          s.tree.setdefault(name, {})[str(b)] = stats
  return _attnpool(params['attnpool'], x, cfg.heads, execution.attention), s.tree
