"""clip/model.py: parity of our towers with OpenAI's torch CLIP (random, perturbed weights), fp32;
SigLIP-like towers and biased logits against float64 numpy; the stacked (scan) layout against the
per-layer one; init's logit bias."""
import dataclasses
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import clip
from clip import configs
from experiments.references import openai as reference
from tests.numpy_reference import MUST_DIFFER
from tests.numpy_reference import RTOL
from tests.numpy_reference import TEXT
from tests.numpy_reference import VISION
from tests.numpy_reference import np_text
from tests.numpy_reference import np_vision
from tests.numpy_reference import perturbed
from tests.numpy_reference import rel_err
from tests.numpy_reference import text_tokens
from tests.numpy_reference import to_np

TINY_TEXT = clip.TextConfig(width=32, layers=2, heads=4, context_length=16, vocab_size=100)
CONFIGS = {
    'ViT-B/32': clip.MODELS['ViT-B/32'],
    'RN50': clip.MODELS['RN50'],
    'vit-tiny': clip.CLIPConfig(32, clip.VisionConfig('vit', 48, 2, 3, 32, 8), TINY_TEXT),
    'vit-odd': clip.CLIPConfig(
        16, clip.VisionConfig('vit', 40, 3, 5, 28, 7), clip.TextConfig(24, 1, 2, 9, 50)),
    'resnet-tiny': clip.CLIPConfig(24, clip.VisionConfig('resnet', 8, (1, 2, 1, 1), 4, 64), TINY_TEXT),
    'resnet-wide': clip.CLIPConfig(
        40, clip.VisionConfig('resnet', 16, (2, 1, 1, 2), 8, 96), clip.TextConfig(64, 2, 1, 20, 300)),
}
TORCH_RTOL = 1e-4


def torch_rel_err(actual, expected):
  return float(np.abs(np.asarray(actual) - expected).max() / np.abs(expected).max())


def torch_outputs(m, images, tokens):
  with torch.no_grad():
    image = torch.from_numpy(images).permute(0, 3, 1, 2)
    text = torch.from_numpy(tokens).long()
    logits_per_image, logits_per_text = m(image, text)
    return {'image': m.encode_image(image).numpy(), 'text': m.encode_text(text).numpy(),
            'logits_per_image': logits_per_image.numpy(), 'logits_per_text': logits_per_text.numpy()}


def jax_outputs(params, images, tokens, cfg):
  logits_per_image, logits_per_text = clip.apply(params, images, tokens, cfg)
  return {'image': clip.encode_image(params, images, cfg),
          'text': clip.encode_text(params, tokens, cfg),
          'logits_per_image': logits_per_image, 'logits_per_text': logits_per_text}


@pytest.fixture(scope='module', params=sorted(CONFIGS))
def case(request, openai_model, tmp_path_factory):
  """A perturbed reference model, its inputs and outputs, saved as state dict and TorchScript."""
  cfg = CONFIGS[request.param]
  torch.manual_seed(0)
  m = reference.perturb(reference.build(openai_model, cfg))
  rng = np.random.default_rng(1)
  r = cfg.image_resolution
  images = rng.standard_normal((3, r, r, 3)).astype(np.float32)
  tokens = reference.random_tokens(rng, 4, cfg)
  folder = tmp_path_factory.mktemp('ckpt')
  torch.save(m.state_dict(), folder / 'state_dict.pt')
  # OpenAI's released files are traced TorchScript archives carrying three metadata scalars.
  for name, value in (('input_resolution', r), ('context_length', cfg.context_length),
                      ('vocab_size', cfg.text.vocab_size)):
    if hasattr(m, name):
      delattr(m, name)
    m.register_buffer(name, torch.tensor(value))
  with torch.no_grad():
    traced = torch.jit.trace(m, (torch.from_numpy(images[:1]).permute(0, 3, 1, 2),
                                 torch.from_numpy(tokens[:1]).long()))
  traced.save(str(folder / 'torchscript.pt'))
  return request.param, m, images, tokens, torch_outputs(m, images, tokens), folder


@pytest.mark.parametrize('filename', ['state_dict.pt', 'torchscript.pt'])
def test_matches_openai(case, filename):
  name, _, images, tokens, expected, folder = case
  cfg = CONFIGS[name]
  # Official models are inferred from the shapes; custom head counts must be given.
  params, loaded_cfg = clip.load(folder / filename, config=None if name in clip.MODELS else cfg)
  assert loaded_cfg == cfg
  actual = jax_outputs(params, images, tokens, cfg)
  for output in expected:
    chex.assert_shape(actual[output], expected[output].shape)
    assert torch_rel_err(actual[output], expected[output]) < TORCH_RTOL, output


def test_export_round_trips_exactly(case, openai_model):
  name, _, _, _, _, folder = case
  params, _ = clip.load(folder / 'state_dict.pt', config=CONFIGS[name])
  exported = clip.to_torch_state_dict(params)
  saved = torch.load(folder / 'state_dict.pt', weights_only=True)
  assert exported.keys() == saved.keys()
  for key, value in exported.items():
    assert value.dtype == saved[key].dtype, key
    assert torch.equal(value, saved[key]), key
  fresh = reference.build(openai_model, CONFIGS[name])
  fresh.load_state_dict(exported, strict=True)


# ---------------------------------------------------------------- SigLIP

SIGLIP_LIKE = configs.CLIPConfig(
    32, configs.VisionConfig(**VISION, pool='map', ln_pre=False, patch_bias=True, mlp='gelu_tanh',
                             norm_eps=1e-6, projection=False),
    configs.TextConfig(**TEXT, causal=False, mask_padding=False, pool='last', projection_bias=True,
                       mlp='gelu_tanh', norm_eps=1e-6), logit_bias=True)


def shrink_residual_stream(params, factor=1e-3):
  """Every writer into the residual streams (embeddings, attention and MLP outputs, in the blocks
  and the MAP head) scaled down: each norm then sees a variance of 1e-8 to 3e-6, where an epsilon
  of 1e-5 instead of 1e-6 changes the output."""
  writers = ('conv1', 'positional_embedding', 'token_embedding', 'out_proj', 'c_proj')
  return jax.tree_util.tree_map_with_path(
      lambda path, x: x * factor if any(w in jax.tree_util.keystr(path) for w in writers) else x,
      params)


def test_siglip_like_towers_and_biased_logits_match_numpy():
  params = shrink_residual_stream(perturbed(clip.init(jax.random.PRNGKey(0), SIGLIP_LIKE)))
  visual, vision, text_cfg = params['visual'], SIGLIP_LIKE.vision, SIGLIP_LIKE.text
  assert 'ln_pre' not in visual and 'proj' not in visual and 'bias' in visual['conv1']
  assert set(params['text_projection']) == {'weight', 'bias'}
  images = np.random.default_rng(2).standard_normal((3, 24, 24, 3)).astype(np.float32)
  tokens = text_tokens(np.random.default_rng(4), 4, 12, 64)
  np_params = to_np(params)
  img = np_vision(np_params['visual'], images.astype(np.float64), vision)
  txt = np_text(np_params, tokens, text_cfg)
  img_out = clip.encode_image(params, images, SIGLIP_LIKE)
  txt_out = clip.encode_text(params, tokens, SIGLIP_LIKE)
  assert rel_err(img_out, img) < RTOL
  assert rel_err(txt_out, txt) < RTOL
  for wrong in (dict(norm_eps=None), dict(mlp='gelu')):  # each option shows in each tower
    assert rel_err(img_out, np_vision(np_params['visual'], images.astype(np.float64),
                                      dataclasses.replace(vision, **wrong))) > MUST_DIFFER
    assert rel_err(txt_out, np_text(np_params, tokens,
                                    dataclasses.replace(text_cfg, **wrong))) > MUST_DIFFER

  logits_per_image, logits_per_text = clip.apply(params, images, tokens, SIGLIP_LIKE)
  unit = lambda f: f / np.linalg.norm(f, axis=-1, keepdims=True)
  expected = (np.exp(np_params['logit_scale']) * unit(img) @ unit(txt).T
              + np_params['logit_bias'])
  assert rel_err(logits_per_image, expected) < RTOL
  assert rel_err(logits_per_text, expected.T) < RTOL


# ---------------------------------------------------------------- stacked layout

SCAN_CASE = configs.CLIPConfig(
    32, configs.VisionConfig(**VISION, pool='map', registers=2, norm='rmsnorm', mlp='geglu'),
    configs.TextConfig(**TEXT, pos_embedding='rope', qk_norm=True), logit_bias=True)


@pytest.mark.parametrize('remat', ['none', 'block', 'dots'])
def test_stacked_layout_gives_identical_outputs_and_gradients(remat):
  per_layer = perturbed(clip.init(jax.random.PRNGKey(0), SCAN_CASE))
  stacked = clip.stack_layers(per_layer)
  scan_cfg = dataclasses.replace(SCAN_CASE, scan=True, remat=remat)
  assert stacked['transformer']['resblocks']['attn']['in_proj_weight'].shape == (2, 96, 32)
  images = np.random.default_rng(7).standard_normal((2, 24, 24, 3)).astype(np.float32)
  tokens = text_tokens(np.random.default_rng(8), 2, 12, 64)

  def loss(params, cfg):
    logits, _ = clip.apply(params, images, tokens, cfg)
    return jnp.sum(jnp.sin(logits))

  value, grads = jax.value_and_grad(loss)(per_layer, SCAN_CASE)
  value_s, grads_s = jax.value_and_grad(loss)(stacked, scan_cfg)
  np.testing.assert_allclose(value_s, value, rtol=1e-5)
  chex.assert_trees_all_close(clip.unstack_layers(grads_s), grads, rtol=1e-4, atol=2e-5)


def test_stack_unstack_round_trip_and_torch_export():
  per_layer = clip.init(jax.random.PRNGKey(0), SCAN_CASE)
  stacked = clip.init(jax.random.PRNGKey(0), dataclasses.replace(SCAN_CASE, scan=True))
  chex.assert_trees_all_equal(clip.stack_layers(per_layer), stacked)
  chex.assert_trees_all_equal(clip.unstack_layers(stacked), per_layer)
  chex.assert_trees_all_equal(clip.stack_layers(stacked), stacked)  # idempotent
  exported = clip.to_torch_state_dict(stacked)
  assert 'visual.transformer.resblocks.1.mlp.c_gate.weight' in exported
  assert exported.keys() == clip.to_torch_state_dict(per_layer).keys()


def test_stacking_a_gap_in_the_layers_is_a_clear_error():
  per_layer = clip.init(jax.random.PRNGKey(0), SCAN_CASE)
  blocks = per_layer['transformer']['resblocks']
  blocks['2'] = blocks.pop('1')
  with pytest.raises(ValueError, match=r"numbered 0\.\.1 to be stacked; got \['0', '2'\]"):
    clip.stack_layers(per_layer)


# ---------------------------------------------------------------- init

def test_logit_bias_starts_as_siglip():
  params = clip.init(jax.random.PRNGKey(0), SCAN_CASE)
  assert float(params['logit_bias']) == -10.0
  assert float(params['logit_scale']) == pytest.approx(math.log(10.0))


@pytest.mark.parametrize('bias', [False, True])
def test_logit_scale_and_bias_inits_are_configurable(bias):
  cfg = dataclasses.replace(SCAN_CASE, logit_bias=bias, init_logit_scale=0.0,
                            init_logit_bias=0.0 if bias else None)
  params = clip.init(jax.random.PRNGKey(0), cfg)
  assert float(params['logit_scale']) == 0.0
  assert ('logit_bias' in params) == bias and (not bias or float(params['logit_bias']) == 0.0)


def test_bad_logit_inits_are_refused():
  with pytest.raises(ValueError, match='init_logit_bias=-5.0 needs logit_bias=True'):
    dataclasses.replace(SCAN_CASE, logit_bias=False, init_logit_bias=-5.0)
  with pytest.raises(ValueError, match="init_logit_scale must be None or a finite number, got nan"):
    dataclasses.replace(SCAN_CASE, init_logit_scale=float('nan'))
