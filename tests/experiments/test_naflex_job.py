"""The main job in NaFlex mode (`siglip2_naflex_small` on the built-in layout captions, in this
process): a run resumed from its step-2 checkpoint ends bit-identical to the uninterrupted run
(the plan gives each step's shapes, the checkpoint the next unseen example), and a checkpoint
whose data position the plan does not reach is refused."""
import json
import os
import shutil

import chex
import jax
import pytest

from clip.train import state_store
from experiments import train

# A one-block NaFlex model and two lengths: two step shapes to compile.
ARGS = ['--config', 'siglip2_naflex_small:batch=8,steps=4,lengths=8/16', '--eval-examples', '0',
        '--checkpoint-every', '2', '--set', 'model.vision.layers=1', '--set',
        'model.text.layers=1', '--set', 'model.vision.width=32', '--set', 'model.text.width=32',
        '--set', 'model.embed_dim=32']
KEYS = ('params', 'opt', 'step', 'rng')


def _state(workdir, step):
  tree, meta = state_store.read(os.path.join(workdir, 'checkpoints'), KEYS, step)
  return jax.device_get(tree), meta


@pytest.mark.slow
def test_a_resumed_naflex_run_is_bit_identical(tmp_path):
  whole, part = str(tmp_path / 'whole'), str(tmp_path / 'part')
  train.main(ARGS + ['--workdir', whole])
  final, meta = _state(whole, 4)
  os.makedirs(part)
  shutil.copytree(os.path.join(whole, 'checkpoints', '2'), os.path.join(part, 'checkpoints', '2'))
  for name in os.listdir(whole):  # the workdir's model config, beside the checkpoints
    if name.endswith('.json') and name != 'eval.json':
      shutil.copy(os.path.join(whole, name), part)
  train.main(ARGS + ['--workdir', part])
  resumed, resumed_meta = _state(part, 4)
  chex.assert_trees_all_equal(resumed, final)
  assert resumed_meta['data'] == meta['data']
  with open(os.path.join(whole, 'metrics.jsonl')) as f:
    lines = [json.loads(line) for line in f]
  assert {line['step'] for line in lines if 'loss' in line} >= {4}


def test_a_checkpoint_off_the_plan_is_refused(tmp_path):
  """The same workdir resumed with another batch: the plan puts step 2 elsewhere."""
  workdir = str(tmp_path / 'w')
  train.main(ARGS[:1] + ['siglip2_naflex_small:batch=8,steps=2,lengths=8/16'] + ARGS[2:]
             + ['--workdir', workdir])
  with pytest.raises(ValueError, match='is not where the NaFlex plan puts step 2'):
    train.main(ARGS[:1] + ['siglip2_naflex_small:batch=16,steps=4,lengths=8/16'] + ARGS[2:]
               + ['--workdir', workdir])
