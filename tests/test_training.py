"""The train step: every sharding strategy follows the single-device loss trajectory; bad configs
raise before anything compiles; checkpoints restore the state exactly."""
import dataclasses

import chex
import jax
import numpy as np
import pytest

import clip
from clip import checkpoint
from clip import sharding
from clip import training
from experiments import openai_reference

TINY = clip.CLIPConfig(32, clip.VisionConfig('vit', 64, 2, 2, 32, 8),
                       clip.TextConfig(32, 2, 2, context_length=16, vocab_size=128))
STEPS = 3


def batches(cfg, batch_size, n, seed=0):
  rng = np.random.default_rng(seed)
  r = cfg.image_resolution
  return [{'image': rng.standard_normal((batch_size, r, r, 3)).astype(np.float32),
           'tokens': openai_reference.random_tokens(rng, batch_size, cfg)} for _ in range(n)]


def run(cfg, tcfg, mesh, data):
  optimizer, schedule = training.make_optimizer(tcfg)
  state, shardings = training.create_state(cfg, tcfg, mesh, optimizer)
  step = training.make_train_step(cfg, tcfg, mesh, optimizer, schedule, shardings)
  history = []
  for batch in data:
    state, metrics = step(state, training.global_batch(mesh, batch))
    history.append(jax.device_get(metrics))
  return state, history


def single_device_mesh():
  return sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])


@pytest.mark.parametrize('loss', ['contrastive', 'ring_sigmoid'])
def test_strategies_follow_the_single_device_trajectory(loss):
  tcfg = training.TrainConfig(batch_size=16, total_steps=STEPS, warmup_steps=1, loss=loss)
  data = batches(TINY, 16, STEPS)
  _, reference = run(TINY, tcfg, single_device_mesh(), data)
  for sizes in [(8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 2, 4)]:
    _, history = run(TINY, tcfg, sharding.make_mesh(*sizes), data)
    for key in ('loss', 'grad_norm', 'logit_scale'):
      np.testing.assert_allclose([h[key] for h in history], [h[key] for h in reference],
                                 rtol=2e-5, err_msg=f'{key} on mesh {sizes}')
  assert reference[-1]['loss'] < reference[0]['loss']


@pytest.mark.parametrize('change,message', [
    ({'loss': 'hinge'}, 'loss must be one of'),
    ({'optimizer': 'sgd'}, 'optimizer must be one of'),
    ({'batch_size': 0}, 'batch_size must be'),
    ({'warmup_steps': 5, 'total_steps': 5}, 'warmup_steps must be'),
    ({'mesh': (1, 1)}, 'mesh must be'),
])
def test_bad_train_config_raises(change, message):
  with pytest.raises(ValueError, match=message):
    dataclasses.replace(training.TrainConfig(), **change)


def test_batch_not_divisible_by_mesh_raises_before_compiling():
  tcfg = training.TrainConfig(batch_size=12, total_steps=2, warmup_steps=0)
  with pytest.raises(ValueError, match='batch_size 12 is not divisible by the 8 batch shards'):
    tcfg.check_mesh(sharding.make_mesh(8, 1, 1))


def test_checkpoint_round_trip_is_exact(tmp_path):
  tcfg = training.TrainConfig(batch_size=16, total_steps=STEPS, warmup_steps=1)
  mesh = sharding.make_mesh(2, 4, 1)
  state, _ = run(TINY, tcfg, mesh, batches(TINY, 16, 1))
  optimizer, _ = training.make_optimizer(tcfg)
  _, shardings = training.create_state(TINY, tcfg, mesh, optimizer)
  for step in (1, 2, 3, 4):
    checkpoint.save(tmp_path, step, state, {'data_position': step * 16}, keep=2)
  assert checkpoint.steps(tmp_path) == [3, 4]
  abstract = jax.eval_shape(lambda: state)
  restored, meta = checkpoint.restore(tmp_path, abstract, shardings)
  assert meta == {'step': 4, 'data_position': 64}
  chex.assert_trees_all_equal(jax.device_get(restored), jax.device_get(state))
  assert restored['params']['visual']['conv1']['weight'].sharding == \
      shardings['params']['visual']['conv1']['weight']
  with pytest.raises(ValueError, match='does not match the train state'):
    checkpoint.restore(tmp_path, {'params': abstract['params']})
