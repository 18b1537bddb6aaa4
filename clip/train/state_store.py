"""The train-state store: a run's checkpoints through orbax-checkpoint's `CheckpointManager`.

A checkpoint is orbax's step folder `<directory>/<step>/` with two items: `state`, the train
state, each array written in parallel by the processes holding its shards (one copy of a
replicated array), as tensorstore OCDBT files; and `meta`, JSON: the step, the data position, the
model and train configs (what `meta` is given). `directory` is any path orbax takes: a local
folder, `gs://bucket/run/checkpoints`.

  store = state_store.Store(directory, keep=3)
  store.save(step, state, meta)       # returns once the arrays are off the devices
  ...                                 # the next steps run while it writes
  store.close()                       # waits for the save in flight

Saving is asynchronous: `save` copies this process's shards to host memory and returns; the write
goes on in a background thread; the next `save`, `wait` and `close` wait for it. A checkpoint is
written into a temporary folder and renamed when every process has finished, so a run killed
mid-save keeps the previous checkpoint as its newest (the leftover is removed at the next start).
`restore` places every array on the current mesh (the abstract state's shardings) whatever mesh
or process count saved it: each process reads only the slices its devices hold.

Checkpoint folders written before orbax (`step_00001234/state.npz`, `clip.train.legacy_store`)
are read where a folder holds no orbax checkpoint: old workdirs resume, evaluate and export as
they did, and their next checkpoint is orbax's.
"""
import contextlib
import logging
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from clip.train import legacy_store

_ITEMS = ('state', 'meta')


def to_host(tree):
  """numpy copies of every leaf, gathered from all processes where a leaf spans several (every
  process then holds the whole tree: for the final weights, not for checkpoints)."""
  def fetch(leaf):
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
      leaf = multihost_utils.process_allgather(leaf, tiled=True)
    return np.asarray(leaf)
  return jax.tree.map(fetch, tree)


class Store:
  """The checkpoints in `directory`: `keep` newest kept (None: all), saved asynchronously unless
  `async_save=False`. Every process of a run makes one and calls `save` at the same steps."""

  def __init__(self, directory, keep=3, async_save=True):
    self.directory = _absolute(directory)
    self._manager = ocp.CheckpointManager(
        epath.Path(self.directory),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True),
        item_handlers={'state': ocp.PyTreeCheckpointHandler(),
                       'meta': ocp.JsonCheckpointHandler()})

  def steps(self):
    """The steps of the complete orbax checkpoints, ascending."""
    return sorted(self._manager.all_steps())

  def save(self, step, state, meta=None):
    """Starts writing `state` (a pytree of arrays) and `{'step': step, **meta}` (JSON) as
    checkpoint `step`; waits first for a save in flight. Returns once the arrays are copied off
    the devices (they may be donated to the next step then)."""
    meta = {'step': int(step), **(meta or {})}
    self._manager.save(int(step), args=ocp.args.Composite(
        state=ocp.args.PyTreeSave(state), meta=ocp.args.JsonSave(meta)))

  def wait(self):
    """Blocks until the save in flight (if any) is complete on every process."""
    self._manager.wait_until_finished()

  def close(self):
    """Waits for the save in flight, then releases the manager's threads."""
    self._manager.close()

  def meta(self, step=None):
    """The JSON `meta` of checkpoint `step` (default: the newest)."""
    step = self._step(step)
    return dict(self._manager.restore(step, args=ocp.args.Composite(
        meta=ocp.args.JsonRestore()))['meta'])

  def restore(self, abstract_state, shardings=None, step=None):
    """(state, meta) of checkpoint `step` (default: the newest): the tree, shapes and dtypes of
    `abstract_state` (e.g. `jax.eval_shape` of the init) placed by `shardings` (a matching tree
    of `jax.sharding.Sharding`; None: each leaf on the default device). ValueError naming every
    missing, unexpected and mismatched leaf when the checkpoint holds another state."""
    step = self._step(step)
    _check_structure(self._stored_leaves(step), abstract_state, f'{self.directory}/{step}')
    if shardings is None:
      shardings = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]),
                               abstract_state)
    target = jax.tree.map(
        lambda leaf, s: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=s),
        abstract_state, shardings)
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(target, ocp.checkpoint_utils.construct_restore_args(target)),
        meta=ocp.args.JsonRestore()))
    return restored['state'], dict(restored['meta'])

  def read(self, keys, step=None):
    """(tree, meta): the top-level entries `keys` of checkpoint `step` (default: the newest), e.g.
    ('params', 'batch_stats'), as nested containers of numpy arrays in the layout orbax stored
    (dicts stay dicts), read whole on this process without an abstract state (to evaluate or
    export a workdir)."""
    step = self._step(step)
    stored = self._manager.item_metadata(step)['state'].tree
    missing = [key for key in keys if key not in stored]
    if missing:
      raise KeyError(f'{self.directory}/{step} holds no {missing}; it has {sorted(stored)}')
    wanted = {key: stored[key] for key in keys}
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), wanted)
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(item=wanted, restore_args=restore_args,
                                     partial_restore=True),
        meta=ocp.args.JsonRestore()))
    return restored['state'], dict(restored['meta'])

  def _step(self, step):
    available = self.steps()
    if not available:
      raise FileNotFoundError(f'no checkpoints in {self.directory!r}')
    step = available[-1] if step is None else step
    if step not in available:
      raise FileNotFoundError(f'no checkpoint for step {step} in {self.directory!r}; have '
                              f'{available}')
    return step

  def _stored_leaves(self, step):
    tree = self._manager.item_metadata(step)['state'].tree
    return _leaf_types(tree)


def _absolute(directory):
  """`directory` as orbax takes it: a local path made absolute (orbax refuses relative ones), a
  URL (gs://...) as it is."""
  directory = str(directory)
  return directory if '://' in directory else os.path.abspath(directory)


def _path(path):
  """A pytree path as '/'-joined names, alike for the dicts orbax stores and the named tuples,
  lists and dicts of a live state (optax's states)."""
  names = []
  for entry in path:
    for attr in ('key', 'name', 'idx'):
      if hasattr(entry, attr):
        names.append(str(getattr(entry, attr)))
        break
  return '/'.join(names)


def _leaf_types(tree):
  """{path: 'shape dtype'} of every leaf of `tree` (arrays, abstract arrays or orbax metadata)."""
  return {_path(p): f'{tuple(leaf.shape)} {np.dtype(leaf.dtype).name}'
          for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _check_structure(stored, abstract_state, where):
  wanted = _leaf_types(abstract_state)
  missing, unexpected = sorted(set(wanted) - set(stored)), sorted(set(stored) - set(wanted))
  bad = [f'{k}: {stored[k]} != {v}' for k, v in wanted.items() if k in stored and stored[k] != v]
  if missing or unexpected or bad:
    raise ValueError(f'checkpoint {where} does not hold this train state (another model or '
                     f'optimizer?): missing {missing[:8]}, unexpected {unexpected[:8]}, mismatched '
                     f'(stored != wanted) {bad[:8]}' + (' (first 8 of each)' if max(
                         len(missing), len(unexpected), len(bad)) > 8 else ''))


@contextlib.contextmanager
def _opened(directory):
  """A `Store` of `directory` for one read, its manager closed after."""
  store = Store(directory)
  try:
    yield store
  finally:
    store.close()


def _is_legacy(directory):
  return not _orbax_steps(directory) and bool(legacy_store.steps(directory))


def _orbax_steps(directory):
  path = epath.Path(str(directory))
  if not path.exists():
    return []
  return sorted(int(p.name) for p in path.iterdir() if p.name.isdigit() and p.is_dir())


def steps(directory):
  """Steps of the complete checkpoints in `directory` (orbax's, or a legacy folder's), ascending;
  [] when it does not exist."""
  if _is_legacy(directory):
    return legacy_store.steps(directory)
  if not epath.Path(str(directory)).exists():
    return []
  with _opened(directory) as store:
    return store.steps()


def meta(directory, step=None):
  """The meta (JSON) of checkpoint `step` (default: the newest) in `directory`, without reading
  the state."""
  if _is_legacy(directory):
    return legacy_store.meta(directory, step)
  with _opened(directory) as store:
    return store.meta(step)


def read(directory, keys, step=None):
  """`Store.read` of `directory` (a legacy folder's by `legacy_store.read`)."""
  if _is_legacy(directory):
    return legacy_store.read(directory, keys, step)
  with _opened(directory) as store:
    return store.read(keys, step)


def restore(directory, abstract_state, shardings=None, step=None):
  """`Store.restore` of `directory` (a legacy folder's by `legacy_store.restore`, said)."""
  if _is_legacy(directory):
    logging.getLogger(__name__).warning(
        '%s holds checkpoints of the pre-orbax format (step_XXXXXXXX/state.npz): read as such; '
        'the next checkpoint is written in orbax\'s format beside them', directory)
    return legacy_store.restore(directory, abstract_state, shardings, step)
  with _opened(directory) as store:
    return store.restore(abstract_state, shardings, step)


def save(directory, step, state, meta=None, keep=3):
  """Writes checkpoint `step` of `state` and waits for it (a one-off save: a run's loop keeps a
  `Store` and saves asynchronously)."""
  store = Store(directory, keep=keep, async_save=False)
  store.save(step, state, meta)
  store.close()
