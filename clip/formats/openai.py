"""OpenAI's CLIP: its state dict is our parameter layout (nested on `.`), its `build_model` shape
rules give a config from the keys (`infer_config`), every loaded state dict is checked key for key
and shape for shape (`check_state_dict`), and its released files are fetched, cached and verified
by SHA256 (`official_path`). torch is only imported to write a torch state dict.
"""
import dataclasses
import hashlib
import os
import re
import urllib.request

import jax
import numpy as np
from tqdm import tqdm

from clip import configs
from clip import model
from clip.formats import export
from clip.formats.files import CheckpointError
from clip.formats.files import atomic_write
from clip.formats.files import flatten
from clip.formats.files import nest

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


def to_torch_state_dict(params):
  """Nested params -> `{key: torch.Tensor}`, loadable by OpenAI's model with `strict=True`.
  Stacked (scan-layout) blocks are written per layer, under torch's keys."""
  import torch  # pylint: disable=g-import-not-at-top
  state = {}
  for key, value in export.flat_numpy(params).items():
    if key.endswith('num_batches_tracked'):
      value = value.astype(np.int64)
    state[key] = torch.from_numpy(value)
  return state


# ---------------------------------------------------------------- shapes -> config

def count_layers(flat, pattern):
  r"""How many blocks `flat` holds under `pattern`: the distinct indices its group 1 matches
  (`r'transformer\.resblocks\.(\d+)\.'`). The one place layers are counted from keys."""
  return len({m.group(1) for k in flat for m in [re.match(pattern, k)] if m})


def infer_config(flat):
  """The CLIPConfig an OpenAI-keyed state dict was built from by OpenAI's `build_model` rules:
  64-wide heads in the ViT and text towers, `32 * width / 64` heads in the ResNet attention pool,
  QuickGELU; the MLP width is read from `c_fc`. Shapes cannot tell the activation or the head
  count: `load` says what it assumed (see `resolve_config`)."""
  shape = lambda k: tuple(flat[k].shape)
  if any(k.startswith('text_decoder.') for k in flat):
    raise CheckpointError('a model with a captioning decoder (text_decoder.* keys): its config '
                          'cannot be inferred from the shapes; pass config= (the CLIPConfig it '
                          'was trained with; on the command line --config, e.g. cappa_small)')
  is_vit = any(k.startswith('visual.transformer.') for k in flat)
  needed = (('visual.conv1.weight', 'visual.positional_embedding',
             'visual.transformer.resblocks.0.mlp.c_fc.weight') if is_vit else
            ('visual.layer1.0.conv1.weight', 'visual.attnpool.positional_embedding'))
  needed += ('text_projection.weight' if 'text_projection.weight' in flat else 'text_projection',
             'positional_embedding', 'token_embedding.weight',
             'transformer.resblocks.0.mlp.c_fc.weight')
  absent = [k for k in needed if k not in flat]
  if absent:
    tower = 'ViT' if is_vit else 'ModifiedResNet'
    raise CheckpointError(f'not a complete CLIP state dict: its {tower} image tower and text '
                          f'tower need {absent}, which are missing; keys start with '
                          f'{sorted(flat)[:5]}')
  if is_vit:
    width, _, patch, _ = shape('visual.conv1.weight')
    grid = round((shape('visual.positional_embedding')[0] - 1) ** 0.5)
    vision = configs.VisionConfig(
        'vit', width, count_layers(flat, r'visual\.transformer\.resblocks\.(\d+)\.'),
        max(width // 64, 1), patch * grid, patch, ln_pre='visual.ln_pre.weight' in flat,
        mlp_dim=configs.mlp_dim_field(
            width, shape('visual.transformer.resblocks.0.mlp.c_fc.weight')[0]))
  else:
    width = shape('visual.layer1.0.conv1.weight')[0]
    resolution = round((shape('visual.attnpool.positional_embedding')[0] - 1) ** 0.5) * 32
    vision = configs.VisionConfig(
        'resnet', width,
        tuple(count_layers(flat, rf'visual\.layer{i}\.(\d+)\.') for i in range(1, 5)),
        width * 32 // 64, resolution)
  vocab_size, text_width = shape('token_embedding.weight')
  biased = 'text_projection.weight' in flat  # open_clip's proj_bias: an nn.Linear
  text = configs.TextConfig(
      text_width, count_layers(flat, r'transformer\.resblocks\.(\d+)\.'),
      max(text_width // 64, 1),
      shape('positional_embedding')[0], vocab_size, projection_bias=biased,
      mlp_dim=configs.mlp_dim_field(
          text_width, shape('transformer.resblocks.0.mlp.c_fc.weight')[0]))
  embed_dim = shape('text_projection.weight')[0] if biased else shape('text_projection')[1]
  try:
    return configs.CLIPConfig(embed_dim, vision, text, logit_bias='logit_bias' in flat)
  except ValueError as e:
    raise CheckpointError(f'the shapes in this state dict give an invalid config: {e}') from None


def expected_shapes(cfg):
  """`{torch key: (shape, dtype)}` of a config (per-layer keys), without allocating anything."""
  abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0), dataclasses.replace(cfg, scan=False))
  return {k: (tuple(v.shape), v.dtype) for k, v in flatten(abstract).items()}


def check_state_dict(flat, cfg):
  """Raises CheckpointError listing missing, unexpected and misshapen keys; else returns the
  expected `{key: (shape, dtype)}`."""
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
  return expected


def from_state_dict(flat, config=None, dtype=np.float32):
  """A flat torch-keyed state dict -> `(params, cfg)`: the config inferred from the shapes by
  OpenAI's rules unless given, every key and shape checked against it, floating leaves cast to
  `dtype` (the others to the config's dtypes), the blocks stacked for a `scan=True` config."""
  if config is None:
    config = infer_config(flat)
  elif not isinstance(config, configs.CLIPConfig):
    raise TypeError(f'config must be a CLIPConfig, got {type(config).__name__}')
  expected = check_state_dict(flat, config)
  def cast(key, value):
    stored_dtype = expected[key][1]
    return value.astype(dtype if np.issubdtype(stored_dtype, np.floating) else stored_dtype)
  params = nest({k: cast(k, v) for k, v in flat.items()})
  return (model.stack_layers(params) if config.scan else params), config


# ---------------------------------------------------------------- official files

def cache_dir():
  """Where OpenAI's files are kept: $CLIP_CACHE_DIR, else ~/.cache/clip."""
  return os.path.expanduser(os.environ.get(CACHE_ENV, DEFAULT_CACHE))


def sha256(path):
  """The SHA256 hex digest of the file at `path`."""
  h = hashlib.sha256()
  with open(path, 'rb') as f:
    for chunk in iter(lambda: f.read(1 << 20), b''):
      h.update(chunk)
  return h.hexdigest()


def is_official(path):
  """Whether the file at `path` is one of OpenAI's releases (by its SHA256)."""
  return sha256(path) in {sha for sha, _ in OFFICIAL_FILES.values()}


def _download(url, target, timeout=30):
  """Download to `target` (through `atomic_write`: never a half-written file)."""
  def write(tmp):
    with urllib.request.urlopen(url, timeout=timeout) as src, open(tmp, 'wb') as dst:
      total = int(src.headers.get('Content-Length', 0)) or None
      with tqdm(total=total, unit='B', unit_scale=True, desc=os.path.basename(target)) as bar:
        for chunk in iter(lambda: src.read(1 << 20), b''):
          dst.write(chunk)
          bar.update(len(chunk))
  atomic_write(target, write)


def official_path(name, cache=None, download=True):
  """The path of OpenAI's released file for `name` (a key of `OFFICIAL_FILES`), from `cache`
  (default $CLIP_CACHE_DIR or ~/.cache/clip, where OpenAI's package keeps them too), downloaded
  if absent and `download` and the network allow; its SHA256 checked against OpenAI's URL.
  KeyError for an unknown name, FileNotFoundError saying where to put the file, CheckpointError
  for a file with another hash."""
  if name not in OFFICIAL_FILES:
    raise KeyError(f'unknown model {name!r}; official models: {sorted(OFFICIAL_FILES)}')
  sha, filename = OFFICIAL_FILES[name]
  url = _OPENAI_URL.format(sha=sha, file=filename)
  path = os.path.join(os.path.expanduser(cache) if cache else cache_dir(), filename)
  if not os.path.exists(path):
    error = 'downloads disabled'
    if download:
      try:
        _download(url, path)
      except OSError as e:
        error = str(e)
    if not os.path.exists(path):
      raise FileNotFoundError(
          f'{name}: no file at {path} and it could not be downloaded ({error}). Download {url} '
          f'and put it at {path} (or set ${CACHE_ENV} to the folder that holds {filename}).')
  actual = sha256(path)
  if actual != sha:
    raise CheckpointError(f'{path} has SHA256 {actual}, expected {sha} for {name}: the file is '
                          'corrupt or another model; delete it and download again')
  return path
