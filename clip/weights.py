"""Checkpoints: torch state dict <-> nested params, file formats, config inference, official files.

Every foreign format is first read into a flat `{torch key: numpy array}` dict in OpenAI's naming
(Hugging Face keys are translated by the table in `hf_to_openai`), then checked key for key and
shape for shape against `jax.eval_shape(init)` of the inferred (or given) config. torch is only
imported for the formats that need it, never at `import clip`.
"""
import dataclasses
import hashlib
import json
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
  """Nested params -> `{key: torch.Tensor}`, loadable by OpenAI's model with `strict=True`.
  Stacked (scan-layout) blocks are written per layer, under torch's keys."""
  import torch  # pylint: disable=g-import-not-at-top
  state = {}
  for key, value in flatten(model.unstack_layers(params)).items():
    value = np.asarray(jax.device_get(value))
    if key.endswith('num_batches_tracked'):
      value = value.astype(np.int64)
    state[key] = torch.from_numpy(np.array(value))
  return state


# ---------------------------------------------------------------- config inference

def _count(flat, pattern):
  return len({m.group(1) for k in flat for m in [re.match(pattern, k)] if m})


def infer_config(flat, heads=None):
  """The CLIPConfig a flat OpenAI-keyed state dict was built from (OpenAI's `build_model` rules:
  64-wide heads in the ViT and text towers, `32 * width / 64` heads in the ResNet attention pool),
  unless `heads=(text_heads, vision_heads)` says otherwise.
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
  if heads is None and (text_width % 64 or (vision_patch is not None and width % 64)):
    raise CheckpointError(
        f'cannot infer head counts: text width {text_width} / vision width {width} are not '
        'multiples of 64 (OpenAI\'s head size); pass config= explicitly')
  text_heads, vision_heads = heads or (text_width // 64, None)
  try:
    cfg = configs.openai_config(embed_dim, resolution, vision_layers, width, vision_patch,
                                context_length, vocab_size, text_width, text_heads, text_layers,
                                vision_heads)
    return dataclasses.replace(cfg, logit_bias='logit_bias' in flat)
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


# ---------------------------------------------------------------- Hugging Face CLIPModel keys

_HF_BLOCK = {
    'layer_norm1': 'ln_1', 'layer_norm2': 'ln_2', 'self_attn.out_proj': 'attn.out_proj',
    'mlp.fc1': 'mlp.c_fc', 'mlp.fc2': 'mlp.c_proj',
}
_HF_KEYS = [  # (regex on the HF key, OpenAI key template, transpose)
    (r'text_model\.embeddings\.token_embedding\.weight', 'token_embedding.weight', False),
    (r'text_model\.embeddings\.position_embedding\.weight', 'positional_embedding', False),
    (r'text_model\.final_layer_norm\.(weight|bias)', 'ln_final.{0}', False),
    (r'text_projection\.weight', 'text_projection', True),
    (r'vision_model\.embeddings\.class_embedding', 'visual.class_embedding', False),
    (r'vision_model\.embeddings\.patch_embedding\.weight', 'visual.conv1.weight', False),
    (r'vision_model\.embeddings\.position_embedding\.weight', 'visual.positional_embedding', False),
    (r'vision_model\.pre_layrnorm\.(weight|bias)', 'visual.ln_pre.{0}', False),
    (r'vision_model\.post_layernorm\.(weight|bias)', 'visual.ln_post.{0}', False),
    (r'visual_projection\.weight', 'visual.proj', True),
    (r'logit_scale', 'logit_scale', False),
] + [
    (rf'(text|vision)_model\.encoder\.layers\.(\d+)\.{re.escape(hf)}\.(weight|bias)',
     '{0}transformer.resblocks.{1}.' + ours + '.{2}', False)
    for hf, ours in _HF_BLOCK.items()
]
_HF_QKV = re.compile(
    r'(text|vision)_model\.encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)')
_HF_IGNORED = re.compile(r'(text|vision)_model\.embeddings\.position_ids')  # a constant buffer


def _tower_prefix(groups):
  return tuple(('visual.' if g == 'vision' else '') if g in ('text', 'vision') else g
               for g in groups)


def hf_to_openai(hf):
  """Hugging Face `CLIPModel` state dict -> OpenAI keys; q/k/v are packed into `in_proj_*`."""
  flat, qkv, unknown = {}, {}, []
  for key, value in hf.items():
    if _HF_IGNORED.fullmatch(key):
      continue
    if m := _HF_QKV.fullmatch(key):
      tower, layer, which, kind = m.groups()
      qkv.setdefault((_tower_prefix([tower])[0], layer, kind), {})[which] = value
      continue
    for pattern, template, transpose in _HF_KEYS:
      if m := re.fullmatch(pattern, key):
        flat[template.format(*_tower_prefix(m.groups()))] = value.T if transpose else value
        break
    else:
      unknown.append(key)
  if unknown:
    raise CheckpointError(f'Hugging Face keys with no CLIP counterpart: {unknown[:20]}')
  for (prefix, layer, kind), parts in qkv.items():
    if set(parts) != {'q', 'k', 'v'}:
      raise CheckpointError(f'{prefix}layer {layer} has only {sorted(parts)} of q/k/v {kind}')
    packed = np.concatenate([np.asarray(parts[c]) for c in 'qkv'], axis=0)
    flat[f'{prefix}transformer.resblocks.{layer}.attn.in_proj_{kind}'] = packed
  return flat


def is_hf(flat):
  return any(k.startswith(('text_model.', 'vision_model.')) for k in flat)


# ---------------------------------------------------------------- file formats

class _ArrayUnpickler(pickle.Unpickler):
  """Unpickles numpy arrays inside dicts and nothing else: no code from the file is run."""
  _ALLOWED = {
      ('numpy.core.multiarray', '_reconstruct'), ('numpy._core.multiarray', '_reconstruct'),
      ('numpy', 'ndarray'), ('numpy', 'dtype'), ('collections', 'OrderedDict'),
      ('numpy.core.multiarray', 'scalar'), ('numpy._core.multiarray', 'scalar'),
  }

  def find_class(self, module, name):
    if (module, name) not in self._ALLOWED:
      raise CheckpointError(f'refusing to unpickle {module}.{name}: a .npy checkpoint may only '
                            'hold a dict of arrays')
    return super().find_class(module, name)


def _read_npy(path):
  """scenic's `.npy`: `np.save` of a dict {torch key: array}, read without running pickled code."""
  with open(path, 'rb') as f:
    version = np.lib.format.read_magic(f)
    read_header = (np.lib.format.read_array_header_1_0 if version[0] == 1
                   else np.lib.format.read_array_header_2_0)
    _, _, dtype = read_header(f)
    if dtype.hasobject:
      obj = _ArrayUnpickler(f).load()
      obj = obj.item() if isinstance(obj, np.ndarray) and obj.shape == () else obj
    else:
      raise CheckpointError(f'{path} holds one plain array, not a dict of named weights')
  if not isinstance(obj, dict):
    raise CheckpointError(f'{path} should hold a dict of arrays, got {type(obj).__name__}')
  return obj


def _read_safetensors(path):
  from safetensors import numpy as st_numpy  # pylint: disable=g-import-not-at-top
  try:
    return st_numpy.load_file(path)
  except TypeError:  # bfloat16 has no numpy dtype in safetensors' numpy backend
    from safetensors import torch as st_torch  # pylint: disable=g-import-not-at-top
    return st_torch.load_file(path)


def _is_torchscript(path):
  if not zipfile.is_zipfile(path):
    return False
  with zipfile.ZipFile(path) as z:
    return any(n.split('/', 1)[-1] == 'constants.pkl' or '/code/' in n for n in z.namelist())


def _read_torch(path):
  """`torch.load(weights_only=True)`; TorchScript archives (OpenAI's released `.pt` files) go
  through `torch.jit.load`, whose restricted TorchScript unpickler runs no Python code."""
  import torch  # pylint: disable=g-import-not-at-top
  if _is_torchscript(path):
    return torch.jit.load(path, map_location='cpu').state_dict()
  try:
    return torch.load(path, map_location='cpu', weights_only=True)
  except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile) as e:
    raise CheckpointError(f'{path} is not a readable torch checkpoint: {e}') from None


def _hf_heads(directory):
  """Head counts and activation from a Hugging Face model folder's config.json, if there."""
  path = os.path.join(directory, 'config.json')
  if not os.path.exists(path):
    return None
  with open(path) as f:
    hf = json.load(f)
  for tower in ('text_config', 'vision_config'):
    act = hf.get(tower, {}).get('hidden_act', 'quick_gelu')
    if act != 'quick_gelu':
      raise CheckpointError(f'{tower}.hidden_act is {act!r}; OpenAI CLIP uses quick_gelu')
  return hf['text_config']['num_attention_heads'], hf['vision_config']['num_attention_heads']


def read_state_dict(path):
  """Any supported file (or a Hugging Face model folder) -> flat `{OpenAI key: numpy array}`.

  Returns `(flat, heads)`; `heads` is `(text, vision)` when the file says so (HF config.json).
  """
  heads = None
  if os.path.isdir(path):
    heads = _hf_heads(path)
    names = ('model.safetensors', 'pytorch_model.bin', 'open_clip_pytorch_model.bin')
    found = [os.path.join(path, n) for n in names if os.path.exists(os.path.join(path, n))]
    if not found:
      raise CheckpointError(f'{path} is a folder without any of {names}')
    path = found[0]
  if not os.path.exists(path):
    raise FileNotFoundError(f'no checkpoint at {path}')
  ext = os.path.splitext(path)[1].lower()
  if ext == '.safetensors':
    raw = _read_safetensors(path)
  elif ext == '.npy':
    raw = _read_npy(path)
  elif ext == '.npz':
    with np.load(path, allow_pickle=False) as z:
      raw = dict(z)
  else:
    raw = _read_torch(path)
  if isinstance(raw, dict) and isinstance(raw.get('state_dict'), dict):
    raw = raw['state_dict']  # open_clip's training checkpoints
  if not isinstance(raw, dict):
    raise CheckpointError(f'{path} holds a {type(raw).__name__}, not a state dict')
  flat = {}
  for key, value in raw.items():
    key = key[len('module.'):] if key.startswith('module.') else key
    if key in _TORCHSCRIPT_EXTRAS:
      continue  # metadata scalars of OpenAI's TorchScript archives, implied by the shapes
    flat[key] = _to_numpy(value)
  return (hf_to_openai(flat) if is_hf(flat) else flat), heads


def _to_numpy(value):
  if isinstance(value, np.ndarray):
    return value
  if type(value).__module__.startswith('torch'):
    import torch  # pylint: disable=g-import-not-at-top
    value = value.detach().cpu()
    return (value.float() if value.dtype == torch.bfloat16 else value).numpy()
  return np.asarray(value)


# ---------------------------------------------------------------- loading

def from_state_dict(flat, config=None, dtype=np.float32, heads=None):
  """A flat torch-keyed state dict -> `(params, cfg)`: the config inferred from the shapes unless
  given, every key and shape checked against it, floating leaves cast to `dtype` (the others to
  the config's dtypes), the blocks stacked for a `scan=True` config."""
  if config is None:
    config = infer_config(flat, heads)
  elif not isinstance(config, configs.CLIPConfig):
    raise TypeError(f'config must be a CLIPConfig, got {type(config).__name__}')
  expected = check_state_dict(flat, config)
  def cast(key, value):
    stored_dtype = expected[key][1]
    return value.astype(dtype if np.issubdtype(stored_dtype, np.floating) else stored_dtype)
  params = nest({k: cast(k, v) for k, v in flat.items()})
  return (model.stack_layers(params) if config.scan else params), config


def load(path, config=None, dtype=np.float32, image_resolution=None):
  """A checkpoint file (or HF folder) -> `(params, cfg)`.

  Formats: torch state dict (`.pt`/`.pth`/`.bin`, `weights_only=True`), OpenAI's TorchScript
  archives, open_clip checkpoints (`state_dict` wrapper, `module.` prefix), `.safetensors`,
  scenic's `.npy` dict, `.npz`, and Hugging Face `CLIPModel` weights. The config is inferred from
  the shapes unless given. Floating weights are cast to `dtype` (fp16 files load as fp32 by
  default). `image_resolution` interpolates the position embedding to another input size.
  """
  flat, heads = read_state_dict(os.fspath(path))
  params, config = from_state_dict(flat, config, dtype, heads)
  if image_resolution is not None and image_resolution != config.image_resolution:
    params, config = interpolate_pos_embed(params, config, image_resolution)
  return params, config


def interpolate_pos_embed(params, cfg, image_resolution):
  """Bicubic resize of the image tower's position grid (class / pooled token kept) to a new
  input resolution -> `(params, cfg)`. Only done on request: a changed model is a new model.
  A fixed sin-cos table has nothing to resize: it is computed for the new grid."""
  vision = dataclasses.replace(cfg.vision, image_resolution=image_resolution)
  new_cfg = dataclasses.replace(cfg, vision=vision)
  if cfg.vision.arch == 'vit' and cfg.vision.pos_embedding == 'sincos2d':
    return params, new_cfg
  table = 'attnpool' if cfg.vision.arch == 'resnet' else None
  holder = params['visual'][table] if table else params['visual']
  pos = np.asarray(holder['positional_embedding'])
  old, new, d = cfg.vision.grid_size, vision.grid_size, pos.shape[-1]
  keep = pos.shape[0] - old * old  # the class / pooled token's row, if any
  grid = pos[keep:].reshape(old, old, d)
  resized = jax.image.resize(grid, (new, new, d), 'bicubic').reshape(new * new, d)
  holder = dict(holder, positional_embedding=np.concatenate([pos[:keep], np.asarray(resized)], 0))
  visual = dict(params['visual'], **({table: holder} if table else holder))
  return dict(params, visual=visual), new_cfg


def cache_dir():
  return os.path.expanduser(os.environ.get(CACHE_ENV, DEFAULT_CACHE))


def _sha256(path):
  h = hashlib.sha256()
  with open(path, 'rb') as f:
    for chunk in iter(lambda: f.read(1 << 20), b''):
      h.update(chunk)
  return h.hexdigest()


def _download(url, target, timeout=30):
  """Download to a temporary file beside `target`, then rename (never a half-written file)."""
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  os.makedirs(os.path.dirname(target), exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(target), suffix='.part')
  try:
    with urllib.request.urlopen(url, timeout=timeout) as src, os.fdopen(fd, 'wb') as dst:
      total = int(src.headers.get('Content-Length', 0)) or None
      with tqdm(total=total, unit='B', unit_scale=True, desc=os.path.basename(target)) as bar:
        for chunk in iter(lambda: src.read(1 << 20), b''):
          dst.write(chunk)
          bar.update(len(chunk))
    os.replace(tmp, target)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def load_model_vars(name, cache=None, download=True, **load_kwargs):
  """An official OpenAI model by name -> `(params, cfg)`, from `cache` (default $CLIP_CACHE_DIR
  or ~/.cache/clip, where OpenAI's package keeps them too), downloaded if absent and the network
  allows; the file's SHA256 must be the one in OpenAI's URL."""
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
  actual = _sha256(path)
  if actual != sha:
    raise CheckpointError(f'{path} has SHA256 {actual}, expected {sha} for {name}: the file is '
                          'corrupt or another model; delete it and download again')
  return load(path, config=configs.MODELS[name], **load_kwargs)
