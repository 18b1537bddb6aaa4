"""The model config: the nine OpenAI models have the reference's exact parameter tree; bad
CLIPConfigs raise; a config survives JSON. (The towers' configs: `test_tower_configs.py`; the
tokenizer's and preprocessing's: `test_processing_configs.py`.)"""
import dataclasses
import json

import chex
import jax
import numpy as np
import pytest
import torch

import clip
from clip import configs
from clip.formats import files
from clip.formats import openai
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
  ours = {k: tuple(v.shape) for k, v in files.flatten(abstract).items()}
  assert ours == reference_shapes(openai_model, cfg)
  # and the config is recovered from the shapes alone
  assert openai.infer_config(files.flatten(abstract)) == cfg


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
    (lambda: clip.CLIPConfig(0, clip.MODELS['RN50'].vision, clip.MODELS['RN50'].text), 'embed_dim'),
    (lambda: dataclasses.replace(clip.MODELS['RN50'], dtype='int8'), 'dtype'),
])
def test_bad_configs_raise(make, message):
  with pytest.raises(ValueError, match=message):
    make()


@pytest.mark.parametrize('make, message', [
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


def test_a_config_survives_json_and_unknown_fields_are_named():
  cfg = dataclasses.replace(
      clip.MODELS['ViT-B/32'], logit_bias=True, remat='dots',
      decoder=configs.DecoderConfig(512, 2, 8, output_ids=(3, 5, 49407)),
      text=dataclasses.replace(clip.MODELS['ViT-B/32'].text, pool='last', mlp='swiglu'),
      tokenizer=configs.TokenizerConfig('siglip', 'spm.model'),
      preprocess=configs.PreprocessConfig((0.5,) * 3, (0.5,) * 3, 'squash'))
  values = json.loads(json.dumps(configs.to_dict(cfg)))
  assert values['decoder']['output_ids'] == [3, 5, 49407]
  assert values['text']['mlp'] == 'swiglu' and values['tokenizer']['model_file'] == 'spm.model'
  assert configs.from_dict(values) == cfg
  rn50 = json.loads(json.dumps(configs.to_dict(clip.MODELS['RN50'])))
  assert rn50['vision']['layers'] == [3, 4, 6, 3] and configs.from_dict(rn50) == clip.MODELS['RN50']
  with pytest.raises(ValueError, match=r"config.text: TextConfig has no fields \['depth'\]"):
    configs.from_dict({**values, 'text': {**values['text'], 'depth': 3}})
  with pytest.raises(TypeError, match='to_dict takes a CLIPConfig, got dict'):
    configs.to_dict(values)
