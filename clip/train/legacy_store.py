"""The train-state store: checkpoints of a run's state, atomic, pickle-free, the last K kept,
restored into their shardings.

A checkpoint is a folder `step_00001234/` holding `state.npz` (every leaf under its pytree path,
saved with `allow_pickle=False`) and `meta.json` (the step and whatever the caller adds, e.g. the
data position). It is written under a temporary name and renamed into place, so a run killed
mid-write leaves the previous checkpoint intact. In a multi-process run every process joins the
gather and process 0 writes.
"""
import json
import os
import re
import shutil
import tempfile

import jax
import numpy as np
from jax.experimental import multihost_utils

_NAME = re.compile(r'step_(\d{8})')
_DICT_KEY = re.compile(r"\['([^'\\]*)'\]")  # one level of jax.tree_util.keystr of a dict path


def to_host(tree):
  """numpy copies of every leaf, gathered from all processes where a leaf spans several."""
  def fetch(leaf):
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
      leaf = multihost_utils.process_allgather(leaf, tiled=True)
    return np.asarray(leaf)
  return jax.tree.map(fetch, tree)


def _host_leaves(state):
  flat, _ = jax.tree_util.tree_flatten_with_path(to_host(state))
  return {jax.tree_util.keystr(path): leaf for path, leaf in flat}


def steps(directory):
  """Steps of the complete checkpoints in `directory`, ascending."""
  if not os.path.isdir(directory):
    return []
  return sorted(int(m.group(1)) for name in os.listdir(directory)
                if (m := _NAME.fullmatch(name)))


def save(directory, step, state, meta=None, keep=3):
  """Writes `state` (a pytree of arrays) at `step`; keeps the newest `keep` checkpoints."""
  leaves = _host_leaves(state)
  if jax.process_index() == 0:
    os.makedirs(directory, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=directory, prefix='.tmp-')
    with open(os.path.join(tmp, 'state.npz'), 'wb') as f:
      np.savez(f, **leaves)
    with open(os.path.join(tmp, 'meta.json'), 'w') as f:
      json.dump({'step': int(step), **(meta or {})}, f)
    final = os.path.join(directory, f'step_{int(step):08d}')
    if os.path.exists(final):
      shutil.rmtree(final)
    os.rename(tmp, final)
    for old in steps(directory)[:-keep]:
      shutil.rmtree(os.path.join(directory, f'step_{old:08d}'))
  multihost_utils.sync_global_devices(f'checkpoint {step}')


def _read(directory, step):
  """(folder, {keystr: numpy leaf}, meta) of checkpoint `step` (default: the newest)."""
  available = steps(directory)
  if not available:
    raise FileNotFoundError(f'no checkpoints (step_XXXXXXXX folders) in {directory!r}')
  step = available[-1] if step is None else step
  if step not in available:
    raise FileNotFoundError(f'no checkpoint for step {step} in {directory!r}; have {available}')
  folder = os.path.join(directory, f'step_{step:08d}')
  with np.load(os.path.join(folder, 'state.npz'), allow_pickle=False) as data:
    stored = {k: data[k] for k in data.files}
  with open(os.path.join(folder, 'meta.json')) as f:
    meta = json.load(f)
  return folder, stored, meta


def read(directory, keys, step=None):
  """(tree, meta): the top-level entries `keys` of checkpoint `step` (default: the newest), e.g.
  ('params', 'batch_stats') of a train state, as nested dicts of numpy arrays, without knowing
  the state's structure first (to evaluate a workdir). An entry holding other containers than
  dicts (an optimizer state) raises ValueError: `restore` it with its abstract state instead."""
  folder, stored, meta = _read(directory, step)
  tree = {}
  for path, leaf in stored.items():
    if not any(path.startswith(f"['{key}']") for key in keys):
      continue
    names = _DICT_KEY.findall(path)
    if ''.join(f"['{name}']" for name in names) != path:
      raise ValueError(f'{folder}: leaf {path!r} is not under dict keys; restore() it with the '
                       'abstract state instead')
    node = tree
    for name in names[:-1]:
      node = node.setdefault(name, {})
    node[names[-1]] = leaf
  return tree, meta


def restore(directory, abstract_state, shardings=None, step=None):
  """(state, meta) of checkpoint `step` (default: the newest), with the tree, shapes and dtypes
  of `abstract_state` (e.g. `jax.eval_shape` of the init) placed by `shardings`."""
  folder, stored, meta = _read(directory, step)
  flat, treedef = jax.tree_util.tree_flatten_with_path(abstract_state)
  wanted = {jax.tree_util.keystr(p): leaf for p, leaf in flat}
  missing, unexpected = sorted(set(wanted) - set(stored)), sorted(set(stored) - set(wanted))
  bad = [f'{k}: {stored[k].shape} {stored[k].dtype} != {tuple(v.shape)} {v.dtype}'
         for k, v in wanted.items() if k in stored
         and (stored[k].shape != tuple(v.shape) or stored[k].dtype != v.dtype)]
  if missing or unexpected or bad:
    raise ValueError(f'checkpoint {folder} does not match the train state: missing {missing}, '
                     f'unexpected {unexpected}, mismatched {bad}')
  shard_leaves = (jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
                  if shardings is not None else [None] * len(flat))
  leaves = [_place(stored[jax.tree_util.keystr(p)], s) for (p, _), s in zip(flat, shard_leaves)]
  return jax.tree_util.tree_unflatten(treedef, leaves), meta


def _place(array, sharding):
  if sharding is None:
    return jax.device_put(array)
  return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])
