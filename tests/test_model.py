"""Parity of our towers with OpenAI's torch CLIP (random, perturbed weights), fp32."""
import chex
import jax
import numpy as np
import pytest
import torch

import clip
from clip import weights
from experiments import openai_reference as reference

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
RTOL = 1e-4


def rel_err(actual, expected):
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
    assert rel_err(actual[output], expected[output]) < RTOL, output


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
