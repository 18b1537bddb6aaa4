"""clip/formats/workdirs.py: the model config a workdir holds (with its tokenizer file)
round-trips; a workdir loads as its model (its saved config, or a given one of the same
architecture; a stacked SigLIP state included); a config of another architecture is refused,
naming each difference, and how a model runs or reads its inputs is no difference."""
import dataclasses
import json

import chex
import jax
import numpy as np
import pytest

import clip
from clip import configs
from clip.formats import files
from clip.formats import workdirs
from clip.train import state_store
from experiments.configs import cappa_small
from experiments.configs import siglip_small
from experiments.configs import small
from tests.experiments.test_evaluate import CFG
# the perturbed tiny model, a module-scoped fixture
from tests.experiments.test_evaluate import params  # pylint: disable=unused-import


def _siglip_tokenized(model_file):
  cfg = siglip_small.get_config().model
  return dataclasses.replace(
      cfg, tokenizer=clip.TokenizerConfig('siglip', model_file, 'canonicalize'),
      preprocess=clip.PreprocessConfig((0.5,) * 3, (0.5,) * 3, 'squash', 'bilinear'))


def test_model_config_round_trips_with_its_tokenizer_file(tmp_path):
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


def test_a_stacked_sigmoid_workdir_loads_with_its_config(tmp_path):
  """A scan-layout checkpoint with SigLIP's bias loads with its config; without one, the OpenAI
  architecture the shapes suggest is refused, naming the missing keys."""
  cfg = siglip_small.get_config().model
  params = clip.init(jax.random.PRNGKey(0), cfg)  # pylint: disable=redefined-outer-name
  assert 'attn' in params['transformer']['resblocks']  # stacked
  state_store.save(tmp_path / 'checkpoints', 1, {'params': params, 'batch_stats': {}})
  loaded, loaded_cfg = workdirs.load_model(str(tmp_path), cfg, config_name='siglip_small')
  assert loaded_cfg == cfg
  chex.assert_trees_all_equal(loaded, jax.device_get(params))
  with pytest.raises(files.CheckpointError, match='missing'):  # shapes alone: OpenAI's blocks
    workdirs.load_model(str(tmp_path))


# pylint: disable-next=redefined-outer-name
def test_a_workdirs_model_config_is_its_model(params, tmp_path):
  """A workdir holding the `model_config.json` its run saved loads as that model, preprocessing
  included, without a config; a config of the same architecture loads it too; one of another
  architecture is refused, naming each difference."""
  cfg = dataclasses.replace(CFG, preprocess=clip.PreprocessConfig((0.5,) * 3, (0.5,) * 3,
                                                                  'squash'))
  state_store.save(str(tmp_path / 'checkpoints'), 1, {'params': params, 'batch_stats': {}})
  workdirs.save_model_config(str(tmp_path), cfg)
  assert workdirs.is_workdir(str(tmp_path)) and not workdirs.is_workdir(str(tmp_path / 'x'))
  loaded_params, loaded = workdirs.load_model(str(tmp_path))
  assert loaded == cfg
  chex.assert_trees_all_equal(loaded_params, jax.device_get(params))
  assert workdirs.load_model(str(tmp_path), CFG, config_name='tiny')[1] == cfg  # not tiny's
  with pytest.raises(ValueError, match=r"--config small is not the model .* trained: embed_dim: "
                     r"--config says 128, the workdir's model_config.json says 32; vision.width: "
                     r"--config says 128, the workdir's model_config.json says 64; .*Leave "
                     r"--config out"):
    workdirs.load_model(str(tmp_path), small.get_config().model, config_name='small')
  for named in (str(tmp_path), 'ViT-B/32'):  # each names its own tokenizer
    with pytest.raises(ValueError, match='is a training workdir or an official model'):
      workdirs.load_model(named, tokenizer='spiece.model')
  # clip.load takes a workdir as one public call, floating weights in the dtype asked for.
  by_clip_load, loaded = clip.load(str(tmp_path), dtype=np.float16)
  assert loaded == cfg
  chex.assert_trees_all_equal(by_clip_load, jax.tree.map(lambda x: np.asarray(x, np.float16),
                                                         jax.device_get(params)))
  with pytest.raises(ValueError, match='is a training workdir, whose model_config.json states'):
    clip.load(str(tmp_path), preprocess=clip.PreprocessConfig())


def test_architecture_differences_leave_out_how_a_model_runs_and_reads():
  runs = dataclasses.replace(CFG, dtype='bfloat16', remat='block', scan=True,
                             init_logit_scale=1.0, tokenizer=clip.TokenizerConfig('siglip'),
                             preprocess=clip.PreprocessConfig(resize_mode='squash'))
  assert workdirs.architecture_differences(runs, CFG) == []
  other = dataclasses.replace(CFG, logit_bias=True,
                              text=dataclasses.replace(CFG.text, pool='last', causal=False))
  assert workdirs.architecture_differences(other, CFG) == [
      "text.pool: --config says 'last', the workdir's model_config.json says 'eot'",
      "text.causal: --config says False, the workdir's model_config.json says True",
      "logit_bias: --config says True, the workdir's model_config.json says False"]
