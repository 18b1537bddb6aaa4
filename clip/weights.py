"""Checkpoints: torch state dict <-> nested params, file formats, config inference, official files.

Every foreign format is first read into a flat `{torch key: numpy array}` dict in OpenAI's naming
(Hugging Face keys are translated by the table in `hf_to_openai`), then checked key for key and
shape for shape against `jax.eval_shape(init)` of the inferred (or given) config. torch is only
imported for the formats that need it, never at `import clip`.
"""
import hashlib
import io
import os
import pickle
import re
import tempfile
import urllib.request
import zipfile

import jax
import numpy as np

from clip import configs
from clip import model

# OpenAI's official checkpoints: the SHA256 of each file is the directory in its URL.
_OPENAI_URL = 'https://openaipublic.azureedge.net/clip/models/{sha}/{file}'
OFFICIAL_FILES = {
    'RN50': ('afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762', 'RN50.pt'),
    'RN101': ('8fa8567bab74a42d41c5915025a8e4538c3bdbe8804a470a72f30b0d94fab599', 'RN101.pt'),
    'RN50x4': ('7e526bd135e493cef0776de27d5f42653e6b4c8bf9e0f653bb11773263205fdd', 'RN50x4.pt'),
    'RN50x16': ('52378b407f34354e150460fe41077663dd5b39c54cd0bfd2b27167a4a06ec9aa', 'RN50x16.pt'),
    'RN50x64': ('be1cfb55d75a9666199fb2206c106743da0f6468c9d327f3e0d0a543a9919d9c', 'RN50x64.pt'),
    'ViT-B/32': ('40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af', 'ViT-B-32.pt'),
    'ViT-B/16': ('5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f', 'ViT-B-16.pt'),
    'ViT-L/14': ('b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836', 'ViT-L-14.pt'),
    'ViT-L/14@336px': ('3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02',
                       'ViT-L-14-336px.pt'),
}
CACHE_ENV = 'CLIP_CACHE_DIR'
DEFAULT_CACHE = os.path.join('~', '.cache', 'clip')  # where OpenAI's `clip.load` keeps them too

# Scalars OpenAI's TorchScript archives carry in their state dict beside the weights.
_TORCHSCRIPT_EXTRAS = ('input_resolution', 'context_length', 'vocab_size')


class CheckpointError(ValueError):
  """A checkpoint that is not a CLIP model in a known format, or does not fit the config."""


# ---------------------------------------------------------------- nested <-> flat

def flatten(params):
  """Nested params -> `{'visual.conv1.weight': array, ...}` (the torch key set)."""
  flat = {}

  def visit(prefix, node):
    if isinstance(node, dict):
      for k, v in node.items():
        visit(f'{prefix}{k}.', v)
    else:
      flat[prefix[:-1]] = node

  visit('', params)
  return flat


def nest(flat):
  """`{'a.b.c': x}` -> `{'a': {'b': {'c': x}}}`."""
  params = {}
  for key, value in flat.items():
    *path, leaf = key.split('.')
    node = params
    for k in path:
      node = node.setdefault(k, {})
    node[leaf] = value
  return params


def to_torch_state_dict(params):
  """Nested params -> `{key: torch.Tensor}`, loadable by OpenAI's model with `strict=True`."""
  import torch  # pylint: disable=g-import-not-at-top
  state = {}
  for key, value in flatten(params).items():
    value = np.asarray(jax.device_get(value))
    if key.endswith('num_batches_tracked'):
      value = value.astype(np.int64)
    state[key] = torch.from_numpy(np.array(value))
  return state


# ---------------------------------------------------------------- config inference

def _count(flat, pattern):
  return len({m.group(1) for k in flat for m in [re.match(pattern, k)] if m})


def infer_config(flat):
  """The CLIPConfig a flat OpenAI-keyed state dict was built from (OpenAI's `build_model` rules:
  64-wide heads in the ViT and text towers, `32 * width / 64` heads in the ResNet attention pool).
  """
  shape = lambda k: tuple(flat[k].shape)
  try:
    if 'visual.proj' in flat:
      width, _, patch, _ = shape('visual.conv1.weight')
      grid = round((shape('visual.positional_embedding')[0] - 1) ** 0.5)
      vision_layers = _count(flat, r'visual\.transformer\.resblocks\.(\d+)\.')
      vision_patch = patch
      resolution = patch * grid
    else:
      vision_layers = tuple(_count(flat, rf'visual\.layer{i}\.(\d+)\.') for i in range(1, 5))
      width = shape('visual.layer1.0.conv1.weight')[0]
      resolution = round((shape('visual.attnpool.positional_embedding')[0] - 1) ** 0.5) * 32
      vision_patch = None
    embed_dim = shape('text_projection')[1]
    context_length = shape('positional_embedding')[0]
    vocab_size = shape('token_embedding.weight')[0]
    text_width = shape('ln_final.weight')[0]
    text_layers = _count(flat, r'transformer\.resblocks\.(\d+)\.')
  except KeyError as e:
    raise CheckpointError(f'not a CLIP state dict: key {e} is missing; keys start with '
                          f'{sorted(flat)[:5]}') from None
  if text_width % 64 or (vision_patch is not None and width % 64):
    raise CheckpointError(
        f'cannot infer head counts: text width {text_width} / vision width {width} are not '
        'multiples of 64 (OpenAI\'s head size); pass config= explicitly')
  try:
    return configs.openai_config(embed_dim, resolution, vision_layers, width, vision_patch,
                                 context_length, vocab_size, text_width, text_width // 64,
                                 text_layers)
  except ValueError as e:
    raise CheckpointError(f'the shapes in this state dict give an invalid config: {e}') from None


def expected_shapes(cfg):
  """`{torch key: (shape, dtype)}` of a config, without allocating anything."""
  abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0), cfg)
  return {k: (tuple(v.shape), v.dtype) for k, v in flatten(abstract).items()}


def check_state_dict(flat, cfg):
  """Raises CheckpointError listing missing, unexpected and misshapen keys."""
  expected = expected_shapes(cfg)
  missing = sorted(set(expected) - set(flat))
  unexpected = sorted(set(flat) - set(expected))
  misshapen = sorted(f'{k}: expected {expected[k][0]}, got {tuple(flat[k].shape)}'
                     for k in set(expected) & set(flat) if tuple(flat[k].shape) != expected[k][0])
  if missing or unexpected or misshapen:
    parts = [f'{name} ({len(keys)}): {keys[:20]}' + (' ...' if len(keys) > 20 else '')
             for name, keys in (('missing', missing), ('unexpected', unexpected),
                                ('misshapen', misshapen)) if keys]
    raise CheckpointError('state dict does not match the config: ' + '; '.join(parts))
