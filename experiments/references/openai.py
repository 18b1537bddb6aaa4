"""OpenAI's reference CLIP (clip-anytorch==2.6.0), imported by file path, for tests and benchmarks.

Its import name `clip` collides with ours, so it is pip-installed with --no-deps into a side folder
(`tests/.reference`, or $CLIP_REFERENCE_DIR) on first use and its files loaded by path.
"""
import importlib.util
import os
import sys

import numpy as np

from experiments.references import packages as reference_packages

PACKAGE = 'clip-anytorch==2.6.0'
ROOT = reference_packages.ROOT


def _install():
  reference_packages.install([PACKAGE], ROOT, 'clip')


def load_module(name):
  """`model` or `simple_tokenizer` from OpenAI's package, as a module named `openai_<name>`."""
  _install()
  module_name = f'openai_{name}'
  if module_name in sys.modules:
    return sys.modules[module_name]
  path = os.path.join(ROOT, 'clip', f'{name}.py')
  spec = importlib.util.spec_from_file_location(module_name, path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[module_name] = module
  spec.loader.exec_module(module)
  return module


def build(openai_model, cfg):
  """The torch reference CLIP for one of our configs (fp32, eval mode).

  OpenAI derives the vision heads from the width; custom configs choose their own, so the image
  tower is built by its own class with `cfg.vision.heads` and put in place of a tiny stand-in.
  """
  v, t = cfg.vision, cfg.text
  m = openai_model.CLIP(cfg.embed_dim, 32, 1, 64, 32, t.context_length, t.vocab_size, t.width,
                        t.heads, t.layers)
  if v.arch == 'vit':
    m.visual = openai_model.VisionTransformer(v.image_resolution, v.patch_size, v.width, v.layers,
                                              v.heads, cfg.embed_dim)
  else:
    m.visual = openai_model.ModifiedResNet(v.layers, cfg.embed_dim, v.heads, v.image_resolution,
                                           v.width)
  return m.eval()


def perturb(torch_model, seed=0, scale=0.1):
  """Adds noise to every parameter and BN buffer: OpenAI's init zeroes many biases, norms and
  `bn3.weight`, which would hide errors in the parts they multiply."""
  import torch  # pylint: disable=g-import-not-at-top
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in torch_model.state_dict().items():
      if not p.is_floating_point() or name == 'logit_scale' or name.endswith('attn_mask'):
        continue
      noise = scale * torch.randn(p.shape, generator=g)
      if name.endswith('running_var'):
        p.copy_(0.5 + torch.rand(p.shape, generator=g))
      else:
        p.add_(noise)
  return torch_model


def random_tokens(rng, n, cfg, min_len=2):
  """(n, context) int32 tokens: SOT, random words, EOT (the largest id) at a random position."""
  t = cfg.text
  tokens = np.zeros((n, t.context_length), np.int32)
  for i in range(n):
    length = rng.integers(min_len, t.context_length + 1)
    tokens[i, 0] = t.vocab_size - 2
    tokens[i, 1:length - 1] = rng.integers(1, t.vocab_size - 2, length - 2)
    tokens[i, length - 1] = t.vocab_size - 1
  return tokens
