"""OpenAI's state dict (clip/formats/openai.py): its config from the shapes, every key and shape
checked, dtypes cast, torch state dicts written back, and the official files' cache and SHA256."""
import dataclasses
import hashlib

import chex
import jax
import numpy as np
import pytest
import safetensors.numpy
import torch

import clip
from clip.formats import files
from clip.formats import openai
from experiments.references import openai as reference
from tests.numpy_reference import perturbed
from tests.test_model import SCAN_CASE

CFG = clip.CLIPConfig(32, clip.VisionConfig('vit', 64, 2, 1, 32, 8),
                      clip.TextConfig(64, 2, 1, 16, 100))
RTOL = 1e-4


@pytest.fixture(scope='module')
def torch_model(openai_model):
  torch.manual_seed(0)
  return reference.perturb(reference.build(openai_model, CFG))


@pytest.fixture(scope='module')
def state_dict(torch_model):
  return {k: v.numpy() for k, v in torch_model.state_dict().items()}


@pytest.fixture(scope='module')
def inputs():
  rng = np.random.default_rng(0)
  return (rng.standard_normal((2, 32, 32, 3)).astype(np.float32),
          reference.random_tokens(rng, 3, CFG))


def assert_same_params(params, flat):
  chex.assert_trees_all_equal(params, files.nest({k: v.astype(np.float32) for k, v in flat.items()}))


def test_config_inferred_from_shapes(tmp_path, state_dict):
  torch.save({k: torch.from_numpy(v) for k, v in state_dict.items()}, tmp_path / 'm.pt')
  params, cfg = clip.load(tmp_path / 'm.pt')
  assert cfg == CFG  # widths are multiples of 64: OpenAI's head rule applies
  assert_same_params(params, state_dict)


def test_fp16_loads_as_fp32_unless_asked(tmp_path, state_dict):
  torch.save({k: torch.from_numpy(v).half() if v.dtype == np.float32 else torch.from_numpy(v)
              for k, v in state_dict.items()}, tmp_path / 'half.pt')
  params, _ = clip.load(tmp_path / 'half.pt')
  assert {x.dtype for x in jax.tree.leaves(params)} == {np.dtype(np.float32)}
  np.testing.assert_array_equal(params['visual']['proj'],
                                state_dict['visual.proj'].astype(np.float16).astype(np.float32))
  params, _ = clip.load(tmp_path / 'half.pt', dtype=np.float16)
  assert params['visual']['proj'].dtype == np.float16


def test_missing_unexpected_and_misshapen_keys_are_listed(tmp_path, state_dict):
  broken = dict(state_dict)
  del broken['visual.ln_post.bias']
  broken['visual.extra'] = np.zeros(2, np.float32)
  broken['visual.proj'] = np.zeros((64, 31), np.float32)
  safetensors.numpy.save_file(broken, str(tmp_path / 'broken.safetensors'))
  with pytest.raises(clip.CheckpointError) as e:
    clip.load(tmp_path / 'broken.safetensors', config=CFG)
  message = str(e.value)
  assert 'visual.ln_post.bias' in message and 'visual.extra' in message
  assert 'visual.proj: expected (64, 32), got (64, 31)' in message


def test_custom_checkpoint_round_trips_through_torch(tmp_path):
  params = perturbed(clip.init(jax.random.PRNGKey(0), SCAN_CASE))
  torch.save(clip.to_torch_state_dict(clip.stack_layers(params)), tmp_path / 'custom.pt')
  loaded, cfg = clip.load(tmp_path / 'custom.pt', config=SCAN_CASE)
  chex.assert_trees_all_equal(loaded, jax.device_get(params))
  stacked, _ = clip.load(tmp_path / 'custom.pt', config=dataclasses.replace(SCAN_CASE, scan=True))
  chex.assert_trees_all_equal(clip.unstack_layers(stacked), jax.device_get(params))
  with pytest.raises(clip.CheckpointError, match='missing'):
    clip.load(tmp_path / 'custom.pt', config=dataclasses.replace(
        SCAN_CASE, vision=dataclasses.replace(SCAN_CASE.vision, norm_placement='normformer')))


def test_load_model_vars_from_cache(tmp_path, monkeypatch, state_dict):
  cfg = clip.MODELS['ViT-B/32']
  monkeypatch.setattr(openai, 'OFFICIAL_FILES', dict(openai.OFFICIAL_FILES))
  params = jax.eval_shape(clip.init, jax.random.PRNGKey(0), cfg)
  sd = {k: torch.zeros(v.shape, dtype=torch.int64 if 'num_batches' in k else torch.float16)
        for k, v in files.flatten(params).items()}
  path = tmp_path / 'ViT-B-32.pt'
  torch.save(sd, path)
  sha = hashlib.sha256(path.read_bytes()).hexdigest()
  openai.OFFICIAL_FILES['ViT-B/32'] = (sha, 'ViT-B-32.pt')
  monkeypatch.setenv(openai.CACHE_ENV, str(tmp_path))
  loaded, loaded_cfg = clip.load_model_vars('ViT-B/32', download=False)
  assert loaded_cfg == cfg and loaded['visual']['proj'].dtype == np.float32
  # clip.load takes OpenAI's names as OpenAI's clip.load does (from the same cache)
  by_name, by_name_cfg = clip.load('ViT-B/32')
  assert by_name_cfg == cfg
  chex.assert_trees_all_equal(by_name, loaded)
  with pytest.raises(ValueError, match='OpenAI model name'):
    clip.load('ViT-B/32', config=cfg)
  # a file whose hash differs from the one in OpenAI's URL is refused
  openai.OFFICIAL_FILES['ViT-B/32'] = ('0' * 64, 'ViT-B-32.pt')
  with pytest.raises(clip.CheckpointError, match='SHA256'):
    clip.load_model_vars('ViT-B/32', download=False)


def test_load_model_vars_says_where_to_put_the_file(tmp_path, monkeypatch):
  monkeypatch.setenv(openai.CACHE_ENV, str(tmp_path))
  with pytest.raises(FileNotFoundError) as e:
    clip.load_model_vars('RN50', download=False)
  assert str(tmp_path / 'RN50.pt') in str(e.value) and 'afeb0e10f9e5' in str(e.value)
  with pytest.raises(KeyError, match='official models'):
    clip.load_model_vars('ViT-G/14')
