"""What "frozen" means, in one place: a frozen parameter or BatchNorm buffer leaves a training step
bit-identical, whatever the optimiser, the accumulation or the layout. No gradient step, no
weight decay, no logit-scale clamp, no running-statistics update.

Freeze patterns are regexes over the per-layer torch keys, the names `clip.to_torch_state_dict`
gives (`transformer.resblocks.0.attn.in_proj_weight`, `visual.bn1.running_mean`), and each must
fully match at least one of them. In the stacked layout (`CLIPConfig(scan=True)`: each
transformer's blocks under `resblocks.<key>` with a leading layer axis L) the patterns still see
the per-layer names: layer i of a stacked leaf is frozen iff `...resblocks.i.<key>` matches, so a
stacked leaf can be frozen in some layers only. Its mask is then a boolean array over the layer
axis; otherwise a leaf's mask is a boolean scalar (numpy, known when tracing).

The optimiser zeroes the gradients and the updates of what is frozen (`optim.make_optimizer`),
and the train step keeps the old values of frozen parameters and buffers after the update, the
logit-scale clamp and the BatchNorm statistics (`training.make_train_step`), both through `keep`.
"""
import difflib
import re

import jax
import jax.numpy as jnp
import numpy as np

from clip import sharding


def layer_names(path, leaf):
  """The per-layer torch keys a leaf holds: `[path]`, or for a stacked leaf
  (`...resblocks.<key>`, leading axis L) `...resblocks.0.<key>` ... `...resblocks.{L-1}.<key>`."""
  stacked = sharding.STACKED.search(path)
  if not stacked:
    return [path]
  head, tail = path[:stacked.end()], path[stacked.end():]
  return [f'{head}{i}.{tail}' for i in range(leaf.shape[0])]


def _named_leaves(tree):
  return [(sharding.dotted_path(p), x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]]


def compile_patterns(patterns):
  """The compiled regexes; ValueError naming a pattern that is not a valid regex."""
  if isinstance(patterns, str) or not all(isinstance(p, str) for p in patterns):
    raise ValueError(f'freeze patterns must be a tuple of regexes, got {patterns!r}')
  compiled = []
  for pattern in patterns:
    try:
      compiled.append(re.compile(pattern))
    except re.error as e:
      raise ValueError(f'freeze pattern {pattern!r} is not a valid regex: {e}') from None
  return compiled


def leaf_masks(patterns, tree):
  """A tree like `tree` (parameters, BN buffers or updates, either layout) of numpy bool masks:
  shape () for a plain leaf, (L,) over the layers of a stacked one; True where frozen."""
  compiled = compile_patterns(patterns)

  def mask(key_path, leaf):
    path = sharding.dotted_path(key_path)
    frozen = np.array([any(c.fullmatch(n) for c in compiled) for n in layer_names(path, leaf)])
    return frozen if sharding.STACKED.search(path) else frozen[0]
  return jax.tree_util.tree_map_with_path(mask, tree)


def check(patterns, *trees):
  """Raises ValueError for a pattern that fully matches no per-layer name of the trees (the
  parameters and the BN buffers), naming it and the nearest names."""
  compiled = compile_patterns(patterns)
  names = [n for t in trees for path, x in _named_leaves(t) for n in layer_names(path, x)]
  for pattern, c in zip(patterns, compiled):
    if not any(c.fullmatch(n) for n in names):
      near = difflib.get_close_matches(pattern, names, n=4, cutoff=0.0) or names[:4]
      raise ValueError(
          f'freeze pattern {pattern!r} matches no parameter or BatchNorm buffer; patterns fully '
          f'match per-layer torch keys in every layout, e.g. {", ".join(near)}')


def masks(patterns, *trees):
  """`check`, then one `leaf_masks` tree per tree."""
  check(patterns, *trees)
  return tuple(leaf_masks(patterns, t) for t in trees)


def _by_layer(frozen, x):
  """A stacked leaf's (L,) mask broadcast against the leaf."""
  return frozen.reshape(frozen.shape + (1,) * (x.ndim - frozen.ndim))


def keep(mask_tree, old, new):
  """`new` where not frozen, `old` where frozen (whole leaves, or the frozen layers of a stacked
  one). A leaf with nothing frozen is `new` itself, so no patterns cost no operations."""
  def pick(frozen, o, n):
    if not frozen.any():
      return n
    return o if frozen.all() else jnp.where(_by_layer(frozen, n), o, n)
  return jax.tree.map(pick, mask_tree, old, new)


def zero(mask_tree, updates):
  """`updates` with what is frozen set to zero (whole leaves, or the frozen layers)."""
  def pick(frozen, u):
    if not frozen.any():
      return u
    return jnp.zeros_like(u) if frozen.all() else jnp.where(_by_layer(frozen, u), 0, u)
  return jax.tree.map(pick, mask_tree, updates)
