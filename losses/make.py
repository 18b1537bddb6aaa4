"""`make_loss`: a sharded loss as a function on globally sharded arrays, for a mesh and its batch
axes. The batch may be split over one or several mesh axes (`('data',)`, `('data', 'fsdp')`);
other mesh axes (`'tensor'`) see the embeddings replicated. The loss comes back replicated, and
gradients w.r.t. the embeddings, the scale and the bias are those of the reference on the global
batch.
"""
import jax
import numpy as np
from jax.sharding import PartitionSpec as P

from losses.allgather import allgather_contrastive_loss
from losses.allgather import allgather_sigmoid_loss
from losses.reference import check_embeddings
from losses.reference import check_scalar
from losses.ring import ring_contrastive_loss
from losses.ring import ring_sigmoid_loss

# name -> (shard_map body, whether it takes a logit_bias)
LOSSES = {
    'contrastive': (allgather_contrastive_loss, False),
    'sigmoid': (allgather_sigmoid_loss, True),
    'ring_contrastive': (ring_contrastive_loss, False),
    'ring_sigmoid': (ring_sigmoid_loss, True),
}


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
  if name not in LOSSES:
    raise ValueError(f'loss name must be one of {sorted(LOSSES)}, got {name!r}')
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
