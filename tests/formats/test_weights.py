"""Checkpoint formats, Hugging Face parity, config inference, official-file cache, bad files; custom
architectures change resolution and round-trip through torch."""
import dataclasses
import hashlib
import os
import pickle

import chex
import jax
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers

import clip
from clip import configs
from clip.formats import weights
from experiments.references import openai as reference
from tests.numpy_reference import TEXT
from tests.numpy_reference import VISION
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
  chex.assert_trees_all_equal(params, weights.nest({k: v.astype(np.float32) for k, v in flat.items()}))


def test_nest_flatten_round_trip(state_dict):
  assert weights.flatten(weights.nest(state_dict)).keys() == state_dict.keys()


def test_config_inferred_from_shapes(tmp_path, state_dict):
  torch.save({k: torch.from_numpy(v) for k, v in state_dict.items()}, tmp_path / 'm.pt')
  params, cfg = clip.load(tmp_path / 'm.pt')
  assert cfg == CFG  # widths are multiples of 64: OpenAI's head rule applies
  assert_same_params(params, state_dict)


def test_open_clip_checkpoint(tmp_path, state_dict):
  wrapped = {'epoch': 3, 'name': 'run', 'state_dict': {
      f'module.{k}': torch.from_numpy(v) for k, v in state_dict.items()}}
  torch.save(wrapped, tmp_path / 'epoch_3.pt')
  params, _ = clip.load(tmp_path / 'epoch_3.pt')
  assert_same_params(params, state_dict)


def test_safetensors_npz_and_scenic_npy(tmp_path, state_dict):
  safetensors.numpy.save_file(state_dict, str(tmp_path / 'm.safetensors'))
  np.savez(tmp_path / 'm.npz', **state_dict)
  np.save(tmp_path / 'm.npy', state_dict, allow_pickle=True)  # scenic's conversion recipe
  for name in ('m.safetensors', 'm.npz', 'm.npy'):
    params, cfg = clip.load(tmp_path / name)
    assert cfg == CFG
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


def test_npy_with_code_is_refused(tmp_path):
  class Evil:
    def __reduce__(self):
      return (os.system, ('echo pwned',))
  np.save(tmp_path / 'evil.npy', np.array({'x': Evil()}, dtype=object), allow_pickle=True)
  with pytest.raises(clip.CheckpointError, match='refusing to unpickle'):
    clip.load(tmp_path / 'evil.npy')


def test_truncated_and_foreign_files(tmp_path, state_dict):
  torch.save({k: torch.from_numpy(v) for k, v in state_dict.items()}, tmp_path / 'm.pt')
  data = (tmp_path / 'm.pt').read_bytes()
  (tmp_path / 'truncated.pt').write_bytes(data[:len(data) // 2])
  with pytest.raises(clip.CheckpointError, match='not a readable torch checkpoint'):
    clip.load(tmp_path / 'truncated.pt')
  torch.save({'fc.weight': torch.zeros(3, 3)}, tmp_path / 'resnet18.pt')
  with pytest.raises(clip.CheckpointError, match='not a CLIP checkpoint of a known family'):
    clip.load(tmp_path / 'resnet18.pt')
  torch.save(torch.zeros(3), tmp_path / 'tensor.pt')
  with pytest.raises(clip.CheckpointError, match='not a state dict'):
    clip.load(tmp_path / 'tensor.pt')
  with pytest.raises(FileNotFoundError):
    clip.load(tmp_path / 'absent.pt')


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


def test_config_that_does_not_fit(tmp_path, state_dict):
  safetensors.numpy.save_file(state_dict, str(tmp_path / 'm.safetensors'))
  with pytest.raises(clip.CheckpointError, match='missing'):
    clip.load(tmp_path / 'm.safetensors', config=clip.MODELS['ViT-B/32'])
  with pytest.raises(clip.CheckpointError, match='missing'):  # OpenAI's names work too
    clip.load(tmp_path / 'm.safetensors', config='ViT-B/32')
  with pytest.raises(KeyError, match='ViT-B-32, not ViT-B/32'):
    clip.load(tmp_path / 'm.safetensors', config='ViT-B/31')
  with pytest.raises(TypeError, match='CLIPConfig'):
    clip.load(tmp_path / 'm.safetensors', config=512)
  with pytest.raises(ValueError, match="names both OpenAI's RN50"):
    clip.load(tmp_path / 'm.safetensors', config='RN50')


def test_interpolated_position_embedding(tmp_path, state_dict, inputs):
  safetensors.numpy.save_file(state_dict, str(tmp_path / 'm.safetensors'))
  params, cfg = clip.load(tmp_path / 'm.safetensors', image_resolution=48)
  assert cfg.image_resolution == 48
  chex.assert_shape(params['visual']['positional_embedding'], (6 * 6 + 1, 64))
  np.testing.assert_array_equal(params['visual']['positional_embedding'][0],
                                state_dict['visual.positional_embedding'][0])
  images = np.random.default_rng(0).standard_normal((2, 48, 48, 3)).astype(np.float32)
  chex.assert_tree_all_finite(clip.encode_image(params, images, cfg))
  # resizing to the same grid is the identity (bicubic at integer positions)
  same, _ = weights.interpolate_pos_embed(weights.nest(dict(state_dict)), CFG, 32)
  np.testing.assert_allclose(same['visual']['positional_embedding'],
                             state_dict['visual.positional_embedding'], atol=1e-6)


def hf_model(seed=0):
  """A random Hugging Face CLIPModel with OpenAI's architecture (QuickGELU), biases perturbed."""
  config = transformers.CLIPConfig(
      text_config=dict(hidden_size=48, intermediate_size=192, num_hidden_layers=2,
                       num_attention_heads=4, vocab_size=100, max_position_embeddings=16,
                       hidden_act='quick_gelu', eos_token_id=99, bos_token_id=98),
      vision_config=dict(hidden_size=40, intermediate_size=160, num_hidden_layers=2,
                         num_attention_heads=5, image_size=32, patch_size=8,
                         hidden_act='quick_gelu'),
      projection_dim=24)
  torch.manual_seed(seed)
  return reference.perturb(transformers.CLIPModel(config).eval())


def test_sincos_and_gap_models_change_resolution():
  for options in (dict(pool='gap'), dict(pool='map', pos_embedding='sincos2d')):
    cfg = configs.CLIPConfig(32, configs.VisionConfig(**VISION, **options), configs.TextConfig(**TEXT))
    params = clip.init(jax.random.PRNGKey(0), cfg)
    new_params, new_cfg = weights.interpolate_pos_embed(params, cfg, 32)
    if 'positional_embedding' in params['visual']:
      assert new_params['visual']['positional_embedding'].shape == (16, 32)
    out = clip.encode_image(new_params, np.zeros((1, 32, 32, 3), np.float32), new_cfg)
    chex.assert_tree_all_finite(out)


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


def test_hugging_face_parity(tmp_path, inputs):
  hf = hf_model()
  hf.save_pretrained(tmp_path)
  params, cfg = clip.load(tmp_path)
  assert (cfg.vision.heads, cfg.text.heads, cfg.vision.width, cfg.text.width) == (5, 4, 40, 48)
  images, _ = inputs
  tokens = reference.random_tokens(np.random.default_rng(1), 3, cfg)
  with torch.no_grad():
    out = hf(input_ids=torch.from_numpy(tokens).long(),
             pixel_values=torch.from_numpy(images).permute(0, 3, 1, 2))
  ours = clip.apply(params, images, tokens, cfg)
  for name, expected in (('image', out.image_embeds), ('text', out.text_embeds)):
    features = (clip.encode_image(params, images, cfg) if name == 'image'
                else clip.encode_text(params, tokens, cfg))
    features = features / np.linalg.norm(features, axis=-1, keepdims=True)
    np.testing.assert_allclose(features, expected.numpy(), rtol=RTOL, atol=1e-5)
  np.testing.assert_allclose(ours[0], out.logits_per_image.numpy(), rtol=RTOL, atol=1e-4)
  np.testing.assert_allclose(ours[1], out.logits_per_text.numpy(), rtol=RTOL, atol=1e-4)


def test_hugging_face_unsupported_activation_is_refused(tmp_path):
  hf = hf_model()
  hf.config.text_config.hidden_act = 'relu'
  hf.save_pretrained(tmp_path)
  with pytest.raises(clip.CheckpointError, match="'relu' is not one we run exactly"):
    clip.load(tmp_path)


def test_hugging_face_unknown_key(tmp_path, state_dict):
  hf = {f'text_model.{k}': torch.from_numpy(v) for k, v in state_dict.items()}
  hf['text_model.encoder.layers.0.self_attn.rotary.weight'] = torch.zeros(2)
  torch.save(hf, tmp_path / 'hf.bin')
  with pytest.raises(clip.CheckpointError, match='no place in this layout'):
    clip.load(tmp_path / 'hf.bin')


def test_load_model_vars_from_cache(tmp_path, monkeypatch, state_dict):
  cfg = clip.MODELS['ViT-B/32']
  monkeypatch.setattr(weights, 'OFFICIAL_FILES', dict(weights.OFFICIAL_FILES))
  params = jax.eval_shape(clip.init, jax.random.PRNGKey(0), cfg)
  sd = {k: torch.zeros(v.shape, dtype=torch.int64 if 'num_batches' in k else torch.float16)
        for k, v in weights.flatten(params).items()}
  path = tmp_path / 'ViT-B-32.pt'
  torch.save(sd, path)
  sha = hashlib.sha256(path.read_bytes()).hexdigest()
  weights.OFFICIAL_FILES['ViT-B/32'] = (sha, 'ViT-B-32.pt')
  monkeypatch.setenv(weights.CACHE_ENV, str(tmp_path))
  loaded, loaded_cfg = clip.load_model_vars('ViT-B/32', download=False)
  assert loaded_cfg == cfg and loaded['visual']['proj'].dtype == np.float32
  # a file whose hash differs from the one in OpenAI's URL is refused
  weights.OFFICIAL_FILES['ViT-B/32'] = ('0' * 64, 'ViT-B-32.pt')
  with pytest.raises(clip.CheckpointError, match='SHA256'):
    clip.load_model_vars('ViT-B/32', download=False)


def test_load_model_vars_says_where_to_put_the_file(tmp_path, monkeypatch):
  monkeypatch.setenv(weights.CACHE_ENV, str(tmp_path))
  with pytest.raises(FileNotFoundError) as e:
    clip.load_model_vars('RN50', download=False)
  assert str(tmp_path / 'RN50.pt') in str(e.value) and 'afeb0e10f9e5' in str(e.value)
  with pytest.raises(KeyError, match='official models'):
    clip.load_model_vars('ViT-G/14')
