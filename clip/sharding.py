"""Mesh construction and parameter partition rules: data parallel, FSDP, tensor parallel.

The mesh always has the axes `('data', 'fsdp', 'tensor')`; a strategy is its shape. `(8, 1, 1)` is
pure data parallelism, `(1, 8, 1)` ZeRO-3 style FSDP (parameters and optimizer state split over
`fsdp`), `(1, 1, 8)` Megatron-style tensor parallelism, and any product is their combination. The
batch is split over `('data', 'fsdp')`. Parameters are placed by regex rules on their torch path
(`visual.transformer.resblocks.3.mlp.c_fc.weight`) in torch's own layout: the first rule that
matches gives the PartitionSpec, and a parameter no rule covers is an error, never silently
replicated. Sharding over an axis of size 1 is a no-op, so one rule table serves every strategy.
"""
import re

import jax
import numpy as np
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ('data', 'fsdp', 'tensor')
BATCH_AXES = ('data', 'fsdp')

# (regex on the '.'-joined parameter path, PartitionSpec in torch layout); first match wins.
# Column-parallel weights (out, in) split `out` over tensor, row-parallel ones split `in`; the
# other dimension goes to fsdp.
DEFAULT_RULES = (
    (r'(.*\.)?(cross_)?attn\.in_proj_weight', P('tensor', 'fsdp')),
    (r'(.*\.)?(cross_)?attn\.in_proj_bias', P('tensor')),
    (r'(.*\.)?(cross_)?attn\.out_proj\.weight', P('fsdp', 'tensor')),
    (r'(.*\.)?mlp\.c_(fc|gate)\.weight', P('tensor', 'fsdp')),
    (r'(.*\.)?mlp\.c_(fc|gate)\.bias', P('tensor')),
    (r'(.*\.)?mlp\.c_proj\.weight', P('fsdp', 'tensor')),
    (r'visual\.attnpool\.[qkv]_proj\.weight', P('tensor', 'fsdp')),
    (r'visual\.attnpool\.[qkv]_proj\.bias', P('tensor')),
    (r'visual\.attnpool\.c_proj\.weight', P('fsdp', 'tensor')),
    (r'visual\.(.*\.)?(conv\d|downsample\.0)\.weight', P('fsdp')),
    (r'(text_decoder\.)?token_embedding\.weight', P('tensor', 'fsdp')),
    (r'(visual\.(attnpool\.)?|text_decoder\.)?positional_embedding', P(None, 'fsdp')),
    # The captioning decoder: image tokens in (column-parallel), vocabulary scores out (the
    # vocabulary split over tensor, as the token embedding it may share).
    (r'text_decoder\.(image_proj|head)\.weight', P('tensor', 'fsdp')),
    (r'text_decoder\.head\.bias', P('tensor')),
    (r'visual\.proj\.weight', P(None, 'fsdp')),  # a biased projection (timm's head), (out, in)
    (r'visual\.proj|text_projection', P('fsdp', None)),
    (r'text_projection\.weight', P(None, 'fsdp')),  # a biased projection, nn.Linear (out, in)
    (r'head\.weight', P(None, 'fsdp')),  # a fine-tuning classifier (classes, embed_dim)
    # Small or scalar leaves: norms, BN buffers, biases, the class token, registers, the MAP probe,
    # NormFormer's head scale, the logit scale/bias.
    (r'(.*\.)?(ln_\w+|bn\d|downsample\.1|mlp\.ln|(cross_)?attn\.[qk]_norm)\.\w+', P()),
    (r'.*\.bias|visual\.(class_embedding|registers)|(.*\.)?(probe|head_scale)', P()),
    (r'(.*\.)?attn\.[qv]_bias', P()),  # EVA's q and v biases (no k bias)
    (r'text_decoder\.mask_embedding', P()),
    (r'logit_scale|logit_bias', P()),
)


# A stacked block's leaf (scan layout): `resblocks.` followed by a block key, not a layer index.
STACKED = re.compile(r'(^|\.)resblocks\.(?!\d+\.)')


class ShardingError(ValueError):
  """A parameter no rule covers, or a dimension its mesh axes do not divide."""


def make_mesh(data=-1, fsdp=1, tensor=1, devices=None):
  """A `('data', 'fsdp', 'tensor')` mesh; `-1` on one axis takes the devices the others leave."""
  devices = jax.devices() if devices is None else list(devices)
  sizes = [data, fsdp, tensor]
  if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f'mesh sizes must be positive with at most one -1, got data={data}, '
                     f'fsdp={fsdp}, tensor={tensor}')
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f'{len(devices)} devices cannot be split into fsdp*tensor*data with '
                       f'data={data}, fsdp={fsdp}, tensor={tensor}')
    sizes[sizes.index(-1)] = len(devices) // known
  if int(np.prod(sizes)) != len(devices):
    raise ValueError(f'mesh data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} needs '
                     f'{int(np.prod(sizes))} devices, {len(devices)} are available')
  return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


def dotted_path(key_path):
  """A tree path as the '.'-joined torch key (`visual.conv1.weight`)."""
  return '.'.join(str(getattr(k, 'key', getattr(k, 'idx', k))) for k in key_path)


def param_specs(params, rules=DEFAULT_RULES):
  """PartitionSpec for every leaf of `params` (arrays or ShapeDtypeStructs) by the first rule
  whose regex matches its whole path. Raises ShardingError listing every uncovered path.
  Stacked blocks (`resblocks.<key>`, scan layout) get the rule of their per-layer path with the
  leading layer axis unsplit."""
  compiled = [(re.compile(pattern), spec) for pattern, spec in rules]
  uncovered = []

  def spec_of(key_path, leaf):
    path = dotted_path(key_path)
    stacked = STACKED.search(path)
    for pattern, spec in compiled:
      if pattern.fullmatch(path):
        if stacked:
          spec = P(None, *spec)
        if len(spec) > np.ndim(leaf):
          raise ShardingError(f'rule {pattern.pattern!r} gives {spec} to {path} of rank '
                              f'{np.ndim(leaf)}')
        return spec
    uncovered.append(path)
    return P()

  specs = jax.tree_util.tree_map_with_path(spec_of, params)
  if uncovered:
    raise ShardingError(f'no partition rule covers {len(uncovered)} parameter(s): '
                        f'{", ".join(uncovered[:20])}{" ..." if len(uncovered) > 20 else ""}; '
                        'add a (regex, PartitionSpec) rule for them (P() to replicate)')
  return specs


def split_ways(mesh, axes):
  """How many pieces a dimension is cut into by a PartitionSpec entry (None, a name, a tuple)."""
  axes = (axes,) if isinstance(axes, str) else (axes or ())
  return int(np.prod([mesh.shape[a] for a in axes]))


def divides(mesh, shape, spec):
  """Whether `spec` fits an array of `shape` on `mesh`: no more entries than dimensions, and
  each dimension split evenly by its mesh axes."""
  return len(spec) <= len(shape) and all(
      dim % split_ways(mesh, axes) == 0 for dim, axes in zip(shape, spec))


def check_divisible(mesh, params, specs):
  """Raises ShardingError naming each parameter that its spec's mesh axes do not split evenly."""
  errors = []

  def check(key_path, leaf, spec):
    if not divides(mesh, np.shape(leaf), spec):
      ways = [split_ways(mesh, axes) for axes in spec]
      errors.append(f'{dotted_path(key_path)} {tuple(np.shape(leaf))} by {spec} ({ways}-way)')

  jax.tree_util.tree_map_with_path(check, params, specs)
  if errors:
    raise ShardingError(f'mesh {dict(mesh.shape)} does not divide: {"; ".join(errors)}; choose '
                        'other mesh sizes or give these parameters rules of their own')


def param_shardings(mesh, params, rules=DEFAULT_RULES):
  """NamedShardings for `params` under `rules`, checked for coverage and divisibility."""
  specs = param_specs(params, rules)
  check_divisible(mesh, params, specs)
  return jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs,
                      is_leaf=lambda x: isinstance(x, P))


def batch_sharding(mesh):
  """Leading (batch) dimension split over `('data', 'fsdp')`, the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh):
  return NamedSharding(mesh, P())


def constrain(x, spec):
  """`with_sharding_constraint(x, spec)` while a mesh is the abstract mesh of the trace (the train
  step sets its own); a no-op without one (inference, plain jit), so the towers can call it
  unconditionally. A mesh without the batch axes `('data', 'fsdp')` raises ShardingError: the
  constraint would not mean what the towers ask for, and skipping it silently would hide that."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  if not set(BATCH_AXES) <= set(mesh.axis_names):
    raise ShardingError(f'the towers pin activations\' batch to the mesh axes {BATCH_AXES}, but '
                        f'the mesh of this trace has axes {mesh.axis_names}: build it with '
                        'clip.sharding.make_mesh (data, fsdp, tensor)')
  return jax.lax.with_sharding_constraint(x, spec)


def constrain_batch(x):
  """Pins an activation's leading (batch) dimension to `('data', 'fsdp')` (see `constrain`).

  The towers call it on the residual stream between blocks: without that anchor GSPMD may choose,
  in the backward pass of a tensor-parallel mesh, a layout it then cannot leave without
  replicating the whole activation ("involuntary full rematerialization")."""
  return constrain(x, P(BATCH_AXES))
