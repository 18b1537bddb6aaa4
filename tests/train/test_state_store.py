"""clip/train/state_store.py: a sharded train state saved and restored exactly (values and
shardings), the newest `keep` kept; a state that does not match is refused; `read` without an
abstract state (a workdir's model config: tests/formats/test_workdirs.py)."""
import chex
import jax
import pytest

from clip.train import state_store
from clip import sharding
from clip.train import training
from tests.train.test_training import STEPS
from tests.train.test_training import TINY
from tests.train.test_training import batches
from tests.train.test_training import run


def test_checkpoint_round_trip_is_exact(tmp_path):
  tcfg = training.TrainConfig(batch_size=16, total_steps=STEPS, warmup_steps=1)
  mesh = sharding.make_mesh(2, 4, 1)
  state, _ = run(TINY, tcfg, mesh, batches(TINY, 16, 1))
  shardings = training.setup(TINY, tcfg, mesh).shardings
  for step in (1, 2, 3, 4):
    state_store.save(tmp_path, step, state, {'data_position': step * 16}, keep=2)
  assert state_store.steps(tmp_path) == [3, 4]
  abstract = jax.eval_shape(lambda: state)
  restored, meta = state_store.restore(tmp_path, abstract, shardings)
  assert meta == {'step': 4, 'data_position': 64}
  chex.assert_trees_all_equal(jax.device_get(restored), jax.device_get(state))
  assert restored['params']['visual']['conv1']['weight'].sharding == \
      shardings['params']['visual']['conv1']['weight']
  with pytest.raises(ValueError, match='does not match the train state'):
    state_store.restore(tmp_path, {'params': abstract['params']})
  tree, meta = state_store.read(tmp_path, ('params', 'batch_stats'))  # no abstract state needed
  assert meta['step'] == 4 and set(tree) == {'params'}  # a ViT has no BatchNorm buffers
  chex.assert_trees_all_equal(tree['params'], jax.device_get(state['params']))
  with pytest.raises(ValueError, match='not under dict keys'):
    state_store.read(tmp_path, ('opt',))

