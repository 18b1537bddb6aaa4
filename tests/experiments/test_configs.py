"""Experiment configs (`experiments/configs/`): each builds, every parameter has a sharding rule,
`--config name:key=value` and `--set section.field=value` reach their fields and are validated,
and the main job's flags are aliases of them."""
import importlib

import jax
import pytest

import clip
from clip import sharding
from clip.train import optim
from experiments import configs as experiment_configs
from experiments import train
from experiments.configs import small
from experiments.configs import tiny


@pytest.mark.parametrize('name', ['tiny', 'small', 'siglip_small', 'registers_small',
                                  'siglip2_naflex_small', 'vit_b32_datacomp', 'vit_b16_datacomp'])
def test_experiment_configs_build_and_every_parameter_has_a_sharding_rule(name):
  config = importlib.import_module(f'experiments.configs.{name}').get_config()
  cfg, tcfg = config.model, config.train
  abstract = jax.eval_shape(clip.init_params, jax.random.PRNGKey(0), cfg)
  sharding.param_specs(abstract)  # raises on an uncovered parameter
  decays = jax.tree.leaves(optim.decay_mask(abstract))
  assert any(decays) and not all(decays)


def test_experiment_config_arguments_are_honoured():
  """`--config name:key=value,...` reaches the config's fields, the model's SigLIP bias
  following the loss; the defaults give the config unchanged."""
  default = small.get_config()
  assert default == small.get_config('')
  changed = small.get_config('loss=sigmoid,batch=256,steps=400')
  assert (changed.train.loss, changed.train.batch_size, changed.train.total_steps) == (
      'sigmoid', 256, 400)
  assert changed.model.logit_bias and not default.model.logit_bias
  assert changed.train.warmup_steps == 40 and default.train.warmup_steps == 50
  accumulated = small.get_config('batch=1024,accum=8').train
  assert (accumulated.accumulation, accumulated.micro_batch_size, accumulated.total_steps) == (
      'grad_cache', 128, 1000)
  multisteps = small.get_config('accum=8,accumulation=multisteps').train
  assert (multisteps.micro_batch_size, multisteps.total_steps, multisteps.warmup_steps) == (
      128, 8000, 400)  # steps count updates: 8 calls each
  with pytest.raises(ValueError, match="key one of \\['accum', 'accumulation', 'batch', 'loss', "
                                       "'steps'\\]"):
    small.get_config('lr=3')
  with pytest.raises(ValueError, match='batch takes int'):
    small.get_config('batch=big')


def test_set_reaches_any_field_and_validates():
  base = tiny.get_config()
  changed = experiment_configs.override(base, 'model.vision.layers=3')
  assert changed.model.vision.layers == 3 and base.model.vision.layers == 2
  changed = experiment_configs.set_fields(base, {'train.total_steps': 4, 'train.warmup_steps': 1})
  assert (changed.train.total_steps, changed.train.warmup_steps) == (4, 1)
  assert experiment_configs.override(base, 'train.learning_rate=3').train.learning_rate == 3.0
  with pytest.raises(ValueError, match="no field 'lr'"):
    experiment_configs.override(base, 'train.lr=1')
  with pytest.raises(ValueError, match='section.field=value'):
    experiment_configs.override(base, 'layers=3')
  with pytest.raises(ValueError, match='warmup_steps must be'):
    experiment_configs.override(base, 'train.warmup_steps=50')
  with pytest.raises(ValueError, match='run.log_every must be'):
    experiment_configs.override(base, 'run.log_every=0')


def test_main_job_flags_are_aliases_and_implied_changes_are_printed(capsys):
  load = lambda *argv: train.load_config(train.parse_args(['--config', 'tiny', *argv]))
  assert load('--steps', '20') == load('--set', 'train.total_steps=20')
  assert 'train.warmup_steps 5 -> 2' in capsys.readouterr().out
  config = load('--loss', 'sigmoid', '--mesh', '2,2,2', '--set', 'run.log_every=10')
  assert 'model.logit_bias False -> True' in capsys.readouterr().out
  assert config.model.logit_bias and config.train.mesh == (2, 2, 2) and config.run.log_every == 10
  with pytest.raises(ValueError, match='takes no logit_bias'):
    load('--set', 'model.logit_bias=True')
