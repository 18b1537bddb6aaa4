"""`make_loss`: a sharded loss as a function on globally sharded arrays, for a mesh and its batch
axes. The batch may be split over one or several mesh axes (`('data',)`, `('data', 'fsdp')`);
other mesh axes (`'tensor'`) see the embeddings replicated. The loss comes back replicated, and
gradients w.r.t. the embeddings, the scale and the bias are those of the reference on the global
batch.
"""
import typing

import jax
import numpy as np
from jax.sharding import PartitionSpec as P

from losses.allgather import allgather_contrastive_loss
from losses.allgather import allgather_sigmoid_loss
from losses.reference import check_embeddings
from losses.reference import check_scalar
from losses.ring import ring_contrastive_loss
from losses.ring import ring_sigmoid_loss



class Loss(typing.NamedTuple):
  """A registered loss: its shard_map body and whether it takes SigLIP's `logit_bias`."""
  body: typing.Callable
  takes_bias: bool


# The one registry of loss names: training, the scripts and the benchmarks all read it.
LOSSES = {
    'contrastive': Loss(allgather_contrastive_loss, takes_bias=False),
    'sigmoid': Loss(allgather_sigmoid_loss, takes_bias=True),
    'ring_contrastive': Loss(ring_contrastive_loss, takes_bias=False),
    'ring_sigmoid': Loss(ring_sigmoid_loss, takes_bias=True),
}


def check_name(name):
  if name not in LOSSES:
    raise ValueError(f'loss must be one of {sorted(LOSSES)}, got {name!r}')


def takes_bias(name):
  """Whether loss `name` takes a `logit_bias` (the sigmoid losses): the model it trains must have
  one (`CLIPConfig.logit_bias=True`), and the others must not."""
  check_name(name)
  return LOSSES[name].takes_bias


def _batch_axes(mesh, batch_axes):
  axes = (batch_axes,) if isinstance(batch_axes, str) else tuple(batch_axes)
  if not axes or not all(isinstance(a, str) for a in axes) or len(set(axes)) != len(axes):
    raise ValueError(f'batch_axes must be distinct mesh axis names, got {batch_axes!r}')
  unknown = [a for a in axes if a not in mesh.axis_names]
  if unknown:
    raise ValueError(f'batch_axes {unknown} are not axes of the mesh {dict(mesh.shape)}')
  return axes


def make_loss(name, mesh, batch_axes=('data',)):
  """`loss(img, txt, logit_scale)` ('contrastive', 'ring_contrastive') or
  `loss(img, txt, logit_scale, logit_bias)` ('sigmoid', 'ring_sigmoid'), jitted, on global
  `(batch, dim)` embeddings whose batch is split over `batch_axes` of `mesh`."""
  check_name(name)
  body, has_bias = LOSSES[name]
  axes = _batch_axes(mesh, batch_axes)
  ways = int(np.prod([mesh.shape[a] for a in axes]))
  scalars = (P(), P()) if has_bias else (P(),)
  sharded = jax.shard_map(lambda img, txt, *s: body(img, txt, *s, axis_name=axes), mesh=mesh,
                          in_specs=(P(axes, None), P(axes, None), *scalars), out_specs=P())

  def loss(img, txt, *scalars_):
    if len(scalars_) != len(scalars):
      expected = 'logit_scale, logit_bias' if has_bias else 'logit_scale'
      raise TypeError(f'{name} loss takes (img, txt, {expected}), got {2 + len(scalars_)} '
                      'arguments')
    check_embeddings(img, txt)
    for scalar_name, s in zip(('logit_scale', 'logit_bias'), scalars_):
      check_scalar(scalar_name, s)
    if img.shape[0] % ways:
      raise ValueError(f'global batch {img.shape[0]} must be divisible by the {ways} devices '
                       f'of batch axes {axes} in mesh {dict(mesh.shape)}')
    return sharded(img, txt, *scalars_)

  loss.__name__ = f'{name}_loss'
  return jax.jit(loss)
