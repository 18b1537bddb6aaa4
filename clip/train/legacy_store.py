"""Checkpoints as this project wrote them before orbax (read only): a folder `step_00001234/`
holding `state.npz` (every leaf under its pytree path, pickle-free) and `meta.json` (the step, the
data position). `clip.train.state_store` reads them through this module where a checkpoint folder
holds no orbax checkpoint, so old workdirs resume, evaluate and export as they did; the next save
writes orbax's format beside them.
"""
import json
import os
import re

import jax
import numpy as np

_NAME = re.compile(r'step_(\d{8})')
_DICT_KEY = re.compile(r"\['([^'\\]*)'\]")  # one level of jax.tree_util.keystr of a dict path


def steps(directory):
  """Steps of the complete checkpoints in `directory`, ascending."""
  if not os.path.isdir(directory):
    return []
  return sorted(int(m.group(1)) for name in os.listdir(directory)
                if (m := _NAME.fullmatch(name)))


def _folder(directory, step):
  """The folder of checkpoint `step` (default: the newest)."""
  available = steps(directory)
  if not available:
    raise FileNotFoundError(f'no checkpoints (step_XXXXXXXX folders) in {directory!r}')
  step = available[-1] if step is None else step
  if step not in available:
    raise FileNotFoundError(f'no checkpoint for step {step} in {directory!r}; have {available}')
  return os.path.join(directory, f'step_{step:08d}')


def meta(directory, step=None):
  """The meta.json of checkpoint `step` (default: the newest)."""
  with open(os.path.join(_folder(directory, step), 'meta.json')) as f:
    return json.load(f)


def _read(directory, step):
  """(folder, {keystr: numpy leaf}, meta) of checkpoint `step` (default: the newest)."""
  folder = _folder(directory, step)
  with np.load(os.path.join(folder, 'state.npz'), allow_pickle=False) as data:
    stored = {k: data[k] for k in data.files}
  return folder, stored, meta(directory, step)


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
