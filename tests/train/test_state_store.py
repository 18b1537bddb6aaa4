"""clip/train/checkpoint.py: a sharded train state saved and restored exactly (values and shardings),
the newest `keep` kept; a state that does not match is refused; `read` without an abstract state;
the model config a workdir holds (with its tokenizer file) round-trips."""
import dataclasses
import json

import chex
import jax
import pytest

import clip
from clip.formats import workdirs
from clip.train import checkpoint
from clip import configs
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
  tree, meta = checkpoint.read(tmp_path, ('params', 'batch_stats'))  # no abstract state needed
  assert meta['step'] == 4 and set(tree) == {'params'}  # a ViT has no BatchNorm buffers
  chex.assert_trees_all_equal(tree['params'], jax.device_get(state['params']))
  with pytest.raises(ValueError, match='not under dict keys'):
    checkpoint.read(tmp_path, ('opt',))


def _siglip_tokenized(model_file):
  from experiments.configs import siglip_small  # pylint: disable=g-import-not-at-top
  cfg = siglip_small.get_config().model
  return dataclasses.replace(
      cfg, tokenizer=clip.TokenizerConfig('siglip', model_file, 'canonicalize'),
      preprocess=clip.PreprocessConfig((0.5,) * 3, (0.5,) * 3, 'squash', 'bilinear'))


def test_model_config_round_trips_with_its_tokenizer_file(tmp_path):
  from experiments.configs import cappa_small  # pylint: disable=g-import-not-at-top
  spm = tmp_path / 'src' / 'spiece.model'
  spm.parent.mkdir()
  spm.write_bytes(b'not parsed here')
  for i, cfg in enumerate([clip.MODELS['RN50'], clip.MODELS['ViT-L/14@336px'],
                           cappa_small.get_config().model, _siglip_tokenized(str(spm))]):
    workdir = tmp_path / f'w{i}'
    workdirs.save_model_config(workdir, cfg)
    again = workdirs.load_model_config(workdir)
    if cfg.tokenizer.model_file:  # copied into the workdir, which is a model on its own
      assert again.tokenizer.model_file == str(workdir / workdirs.TOKENIZER_FILE)
      assert (workdir / workdirs.TOKENIZER_FILE).read_bytes() == spm.read_bytes()
      again = dataclasses.replace(again, tokenizer=cfg.tokenizer)
    assert again == cfg


def test_model_config_refuses_unknown_fields_and_a_missing_file(tmp_path):
  with pytest.raises(FileNotFoundError, match='no model_config.json'):
    workdirs.load_model_config(tmp_path)
  values = configs.to_dict(clip.MODELS['RN50'])
  values['vision']['depth'] = 3
  (tmp_path / workdirs.MODEL_CONFIG).write_text(json.dumps(values))
  with pytest.raises(ValueError, match=r"config.vision: VisionConfig has no fields \['depth'\]"):
    workdirs.load_model_config(tmp_path)
