"""clip/train/state_store.py: a sharded train state saved through orbax and restored exactly
(values and shardings) on its own mesh and on others, the newest `keep` kept, a state that does
not match refused; `read` without an abstract state (a workdir's model: tests/formats/
test_workdirs.py); folders of the pre-orbax format read as they were (clip/train/legacy_store.py).
Several processes and a kill mid-save: tests/experiments/test_train_job.py."""
import json
import os

import chex
import jax
import numpy as np
import pytest

from clip import sharding
from clip.train import state_store
from clip.train import training
from tests.train.test_training import STEPS
from tests.train.test_training import TINY
from tests.train.test_training import batches
from tests.train.test_training import run

TCFG = training.TrainConfig(batch_size=16, total_steps=STEPS, warmup_steps=1)


@pytest.fixture(scope='module')
def trained():
  """A state trained 3 steps on an FSDP mesh (2 data x 4 fsdp), and its abstract tree."""
  state, _ = run(TINY, TCFG, sharding.make_mesh(2, 4, 1), batches(TINY, 16, 1))
  return state, jax.eval_shape(lambda: state)


def test_checkpoint_round_trip_is_exact_and_keeps_the_newest(tmp_path, trained):
  state, abstract = trained
  shardings = training.setup(TINY, TCFG, sharding.make_mesh(2, 4, 1)).shardings
  store = state_store.Store(tmp_path, keep=2)
  for step in (1, 2, 3, 4):
    store.save(step, state, {'data': {'example': step * 16}})
  store.close()
  assert state_store.steps(tmp_path) == [3, 4]
  restored, meta = state_store.restore(tmp_path, abstract, shardings)
  assert meta == {'step': 4, 'data': {'example': 64}}
  chex.assert_trees_all_equal(jax.device_get(restored), jax.device_get(state))
  chex.assert_trees_all_equal(jax.tree.map(lambda x: x.sharding, restored), shardings)
  _, meta = state_store.restore(tmp_path, abstract, shardings, step=3)
  assert meta['step'] == 3
  with pytest.raises(FileNotFoundError, match=r'no checkpoint for step 1 .* have \[3, 4\]'):
    state_store.restore(tmp_path, abstract, shardings, step=1)


@pytest.mark.parametrize('mesh_shape', [(8, 1, 1), (1, 2, 4), None])
def test_a_checkpoint_restores_on_any_mesh(tmp_path, trained, mesh_shape):
  """Saved from 2 x 4 (data x fsdp), restored onto 8 data shards, onto fsdp x tensor, and onto
  one device (no shardings): the same values, placed as asked."""
  state, abstract = trained
  state_store.save(tmp_path, 3, state)
  shardings = (None if mesh_shape is None else
               training.setup(TINY, TCFG, sharding.make_mesh(*mesh_shape)).shardings)
  restored, _ = state_store.restore(tmp_path, abstract, shardings)
  chex.assert_trees_all_equal(jax.device_get(restored), jax.device_get(state))
  if shardings is not None:
    chex.assert_trees_all_equal(jax.tree.map(lambda x: x.sharding, restored), shardings)


def test_another_state_is_refused_naming_its_leaves(tmp_path, trained):
  state, abstract = trained
  state_store.save(tmp_path, 3, state)
  with pytest.raises(ValueError, match=r"does not hold this train state.*missing \[\].*"
                     r"unexpected \['opt/.*mismatched \(stored != wanted\) \[\] \(first 8 of each\)"):
    state_store.restore(tmp_path, {'params': abstract['params']})
  wider = jax.tree.map(lambda x: x, abstract)
  wider['params']['positional_embedding'] = jax.ShapeDtypeStruct((99, 64), np.float32)
  with pytest.raises(ValueError, match=r'params/positional_embedding: \(16, 32\) float32 != '
                     r'\(99, 64\) float32'):
    state_store.restore(tmp_path, wider)


def test_read_takes_entries_without_an_abstract_state(tmp_path, trained):
  state, _ = trained
  state_store.save(tmp_path, 3, state, {'data': {'example': 48}})
  tree, meta = state_store.read(tmp_path, ('params', 'batch_stats'))
  assert meta == {'step': 3, 'data': {'example': 48}}
  assert set(tree) == {'params', 'batch_stats'} and tree['batch_stats'] == {}  # a ViT has none
  chex.assert_trees_all_equal(tree['params'], jax.device_get(state['params']))
  assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(tree))
  opt, _ = state_store.read(tmp_path, ('opt',))  # optax's tuples come back as orbax stored them
  np.testing.assert_array_equal(
      np.concatenate([np.ravel(x) for x in jax.tree.leaves(opt)]),
      np.concatenate([np.ravel(x) for x in jax.tree.leaves(jax.device_get(state['opt']))]))
  with pytest.raises(KeyError, match=r"holds no \['ema'\]"):
    state_store.read(tmp_path, ('ema',))


def test_a_relative_directory_is_the_one_below_the_working_directory(tmp_path, trained,
                                                                    monkeypatch):
  """The main job's default workdir is relative (results/train/<config>): orbax, which takes
  absolute paths only, gets it made absolute."""
  state, abstract = trained
  monkeypatch.chdir(tmp_path)
  store = state_store.Store('run/checkpoints', keep=2)
  store.save(3, state)
  store.close()
  assert store.directory == str(tmp_path / 'run' / 'checkpoints')
  assert state_store.steps('run/checkpoints') == [3] and (tmp_path / 'run/checkpoints/3').is_dir()
  restored, _ = state_store.restore('run/checkpoints', abstract)
  chex.assert_trees_all_equal(jax.device_get(restored), jax.device_get(state))


def test_an_unfinished_save_is_not_a_checkpoint(tmp_path, trained):
  """What a process killed mid-save leaves (orbax's temporary folder) is neither listed nor
  restored, and is removed when the next run opens the folder."""
  state, abstract = trained
  state_store.save(tmp_path, 3, state)
  leftover = tmp_path / '6.orbax-checkpoint-tmp'
  leftover.mkdir()
  (leftover / 'partial').write_text('x')
  assert state_store.steps(tmp_path) == [3]
  _, meta = state_store.restore(tmp_path, abstract)
  assert meta['step'] == 3
  state_store.Store(tmp_path).close()
  assert not leftover.exists()


def write_legacy(directory, step, state, meta):
  """The pre-orbax format (clip/train/legacy_store.py), as that store wrote it."""
  folder = os.path.join(directory, f'step_{step:08d}')
  os.makedirs(folder)
  flat, _ = jax.tree_util.tree_flatten_with_path(jax.device_get(state))
  np.savez(os.path.join(folder, 'state.npz'),
           **{jax.tree_util.keystr(p): np.asarray(x) for p, x in flat})
  with open(os.path.join(folder, 'meta.json'), 'w') as f:
    json.dump({'step': step, **meta}, f)


def test_a_pre_orbax_folder_is_read_as_it_was(tmp_path, trained, caplog):
  state, abstract = trained
  write_legacy(tmp_path, 3, state, {'data': {'example': 48}})
  assert state_store.steps(tmp_path) == [3]
  restored, meta = state_store.restore(tmp_path, abstract)
  assert meta == {'step': 3, 'data': {'example': 48}}
  assert 'pre-orbax format' in caplog.text
  chex.assert_trees_all_equal(jax.device_get(restored), jax.device_get(state))
  tree, _ = state_store.read(tmp_path, ('params',))
  chex.assert_trees_all_equal(tree['params'], jax.device_get(state['params']))
  state_store.save(tmp_path, 4, state)  # the next checkpoint is orbax's, and the newest
  assert state_store.steps(tmp_path) == [4]
  assert sorted(os.listdir(tmp_path)) == ['4', 'step_00000003']
