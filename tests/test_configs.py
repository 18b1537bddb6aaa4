"""Configs: the nine OpenAI models have the reference's exact parameter tree; bad configs raise, and
so do bad combinations of the custom-architecture options."""
import dataclasses

import chex
import jax
import numpy as np
import pytest
import torch

import clip
from clip import configs
from clip.formats import weights
from tests.numpy_reference import TEXT
from tests.numpy_reference import VISION


def reference_shapes(openai_model, cfg):
  """The torch state dict's {key: shape} of OpenAI's model, built on the meta device (no memory)."""
  v, t = cfg.vision, cfg.text
  with torch.device('meta'):
    m = openai_model.CLIP(cfg.embed_dim, v.image_resolution, v.layers, v.width, v.patch_size,
                          t.context_length, t.vocab_size, t.width, t.heads, t.layers)
  return {k: tuple(p.shape) for k, p in m.state_dict().items()}


@pytest.mark.parametrize('name', sorted(clip.MODELS))
def test_init_has_the_reference_state_dict(openai_model, name):
  cfg = clip.MODELS[name]
  abstract = jax.eval_shape(clip.init, jax.random.PRNGKey(0), cfg)
  ours = {k: tuple(v.shape) for k, v in weights.flatten(abstract).items()}
  assert ours == reference_shapes(openai_model, cfg)
  # and the config is recovered from the shapes alone
  assert weights.infer_config(weights.flatten(abstract)) == cfg


def test_init_params_composes_inside_jit():
  """`clip.init` carries compiler options and so cannot nest; `init_params` is its jittable body."""
  cfg = clip.MODELS['RN50']
  nested = jax.eval_shape(jax.jit(clip.init_params, static_argnames='cfg'),
                          jax.random.PRNGKey(0), cfg=cfg)
  chex.assert_trees_all_equal_shapes_and_dtypes(nested,
                                                jax.eval_shape(clip.init, jax.random.PRNGKey(0), cfg))


def test_official_hyper_parameters():
  rn50x64, l336 = clip.MODELS['RN50x64'], clip.MODELS['ViT-L/14@336px']
  assert (rn50x64.embed_dim, rn50x64.image_resolution, rn50x64.vision.layers,
          rn50x64.vision.width, rn50x64.vision.heads) == (1024, 448, (3, 15, 36, 10), 128, 64)
  assert (l336.image_resolution, l336.vision.patch_size, l336.vision.layers, l336.vision.heads,
          l336.text.width, l336.text.heads) == (336, 14, 24, 16, 768, 12)
  assert {cfg.context_length for cfg in clip.MODELS.values()} == {77}


def test_init_statistics_follow_openai():
  cfg = clip.CLIPConfig(64, clip.VisionConfig('resnet', 8, (1, 1, 1, 1), 4, 64),
                        clip.TextConfig(128, 4, 2, 16, 1000))
  params = clip.init(jax.random.PRNGKey(0), cfg)
  chex.assert_tree_all_finite(params)
  np.testing.assert_allclose(params['logit_scale'], np.log(1 / 0.07), rtol=1e-6)
  assert np.all(np.asarray(params['visual']['layer1']['0']['bn3']['weight']) == 0)
  np.testing.assert_allclose(np.std(params['token_embedding']['weight']), 0.02, rtol=0.05)
  proj_std = 128 ** -0.5 * (2 * 4) ** -0.5
  np.testing.assert_allclose(
      np.std(params['transformer']['resblocks']['0']['mlp']['c_proj']['weight']), proj_std, rtol=0.05)


def test_init_is_deterministic_and_keyed():
  cfg = clip.CLIPConfig(16, clip.VisionConfig('vit', 32, 1, 2, 16, 8), clip.TextConfig(32, 1, 2, 8, 50))
  a, b = clip.init(jax.random.PRNGKey(0), cfg), clip.init(jax.random.PRNGKey(0), cfg)
  chex.assert_trees_all_equal(a, b)
  c = clip.init(jax.random.PRNGKey(1), cfg)
  assert not np.allclose(a['visual']['proj'], c['visual']['proj'])


@pytest.mark.parametrize('make, message', [
    (lambda: clip.VisionConfig('vit', 64, 2, 3, 224, 32), 'not divisible by heads'),
    (lambda: clip.VisionConfig('vit', 64, 2, 2, 224, 30), 'not a multiple of patch_size'),
    (lambda: clip.VisionConfig('vit', 64, 2, 2, 224), 'patch_size'),
    (lambda: clip.VisionConfig('resnet', 64, (3, 4, 6), 32, 224), '4 positive block counts'),
    (lambda: clip.VisionConfig('resnet', 64, (3, 4, 6, 3), 32, 200), 'multiple of 32'),
    (lambda: clip.VisionConfig('convnext', 64, 2, 2, 224, 32), 'arch'),
    (lambda: clip.TextConfig(512, 12, 0), 'heads must be > 0'),
    (lambda: clip.CLIPConfig(0, clip.MODELS['RN50'].vision, clip.MODELS['RN50'].text), 'embed_dim'),
    (lambda: dataclasses.replace(clip.MODELS['RN50'], dtype='int8'), 'dtype'),
])
def test_bad_configs_raise(make, message):
  with pytest.raises(ValueError, match=message):
    make()


@pytest.mark.parametrize('make, message', [
    (lambda: configs.VisionConfig(**VISION, pool='map', pool_heads=0), 'pool_heads'),
    (lambda: configs.VisionConfig(**VISION, pool='map', pool_heads=3), 'map-pooling heads'),
    (lambda: configs.VisionConfig(**VISION, pool='avg'), "pool must be one of"),
    (lambda: configs.VisionConfig(**{**VISION, 'width': 30, 'heads': 3}, pos_embedding='sincos2d'),
     'divisible by 4'),
    (lambda: configs.VisionConfig(**VISION, registers=2, pool_registers=True), 'pool_registers'),
    (lambda: configs.VisionConfig('resnet', 8, (1, 1, 1, 1), 4, 64, norm='rmsnorm'),
     'not to a ResNet'),
    (lambda: configs.TextConfig(**{**TEXT, 'width': 24, 'heads': 8}, pos_embedding='rope'),
     'must be even'),
    (lambda: configs.TextConfig(**TEXT, pool='first'), 'first token only'),
    (lambda: configs.TextConfig(**TEXT, mlp='relu'), 'mlp must be one of'),
    (lambda: configs.TextConfig(**TEXT, norm='batchnorm'), 'norm must be one of'),
    (lambda: configs.TextConfig(**TEXT, causal=False, mask_padding=False),
     'mask_padding=False would let'),
    (lambda: configs.TextConfig(**TEXT, projection=False, projection_bias=True),
     'projection_bias=True needs projection=True'),
    (lambda: configs.TextConfig(**TEXT, norm_eps=0.0), 'norm_eps must be None'),
    (lambda: configs.VisionConfig('resnet', 8, (1, 1, 1, 1), 4, 64, ln_pre=False),
     r"not to a ResNet: \['ln_pre=False'\]"),
    (lambda: configs.VisionConfig('resnet', 8, (1, 1, 1, 1), 4, 64, patch_bias=True),
     r"not to a ResNet: \['patch_bias=True'\]"),
    (lambda: configs.CLIPConfig(16, configs.VisionConfig(**VISION, projection=False),
                                configs.TextConfig(**TEXT)), 'projection=False'),
    (lambda: configs.CLIPConfig(32, configs.VisionConfig(**VISION), configs.TextConfig(**TEXT),
                                remat='full'), 'remat must be one of'),
])
def test_bad_combinations_are_rejected_when_built(make, message):
  with pytest.raises(ValueError, match=message):
    make()


def test_unknown_model_name():
  with pytest.raises(KeyError, match='known models'):
    clip.get_config('ViT-H/14')


def test_normalize_image():
  images = np.random.default_rng(0).random((2, 4, 4, 3), dtype=np.float32)
  expected = (images - np.array(clip.IMAGE_MEAN)) / np.array(clip.IMAGE_STD)
  np.testing.assert_allclose(clip.normalize_image(images), expected, atol=1e-6)
  np.testing.assert_allclose(clip.normalize_image(jax.numpy.asarray(images)), expected, atol=1e-6)
  with pytest.raises(TypeError, match='uint8'):
    clip.normalize_image((images * 255).astype(np.uint8))
  with pytest.raises(ValueError, match='3'):
    clip.normalize_image(images[..., :2])


@pytest.mark.parametrize('name', ['tiny', 'small', 'siglip_small', 'registers_small',
                                  'vit_b32_datacomp', 'vit_b16_datacomp'])
def test_experiment_configs_build_and_every_parameter_has_a_sharding_rule(name):
  import importlib  # pylint: disable=g-import-not-at-top
  from clip.train import optim  # pylint: disable=g-import-not-at-top
  from clip import sharding  # pylint: disable=g-import-not-at-top
  config = importlib.import_module(f'experiments.configs.{name}').get_config()
  cfg, tcfg = config.model, config.train
  abstract = jax.eval_shape(clip.init_params, jax.random.PRNGKey(0), cfg)
  sharding.param_specs(abstract)  # raises on an uncovered parameter
  decays = jax.tree.leaves(optim.decay_mask(abstract))
  assert any(decays) and not all(decays)


# ------------------------------------------------------------------ experiment configs


def test_experiment_config_arguments_are_honoured():
  """`--config name:key=value,...` reaches the config's fields, the model's SigLIP bias
  following the loss; the defaults give the config unchanged."""
  from experiments.configs import small  # pylint: disable=g-import-not-at-top
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
  from experiments import configs as experiment_configs  # pylint: disable=g-import-not-at-top
  from experiments.configs import tiny  # pylint: disable=g-import-not-at-top
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
  from experiments import train  # pylint: disable=g-import-not-at-top
  load = lambda *argv: train.load_config(train.parse_args(['--config', 'tiny', *argv]))
  assert load('--steps', '20') == load('--set', 'train.total_steps=20')
  assert 'train.warmup_steps 5 -> 2' in capsys.readouterr().out
  config = load('--loss', 'sigmoid', '--mesh', '2,2,2', '--set', 'run.log_every=10')
  assert 'model.logit_bias False -> True' in capsys.readouterr().out
  assert config.model.logit_bias and config.train.mesh == (2, 2, 2) and config.run.log_every == 10
  with pytest.raises(ValueError, match='takes no logit_bias'):
    load('--set', 'model.logit_bias=True')
