"""Checkpoints: torch state dict <-> nested params, file formats, config inference, official files.

Every foreign format is first read into a flat `{key: numpy array}` dict, recognised and
translated into our (OpenAI) naming by `families` and the key tables of `convert`, then checked
key for key and shape for shape against `jax.eval_shape(init)` of the stated, given or inferred
config. torch is only imported for the formats that need it, never at `import clip`.
"""
import dataclasses
import hashlib
import json
import os
import pickle
import re
import tempfile
import urllib.request
import warnings
import zipfile

import jax
import numpy as np

from clip import configs
from clip.formats import families
from clip import model
from clip.formats import open_clip_configs

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
        'vit', width, _count(flat, r'visual\.transformer\.resblocks\.(\d+)\.'),
        max(width // 64, 1), patch * grid, patch, ln_pre='visual.ln_pre.weight' in flat,
        mlp_dim=_mlp_dim(shape('visual.transformer.resblocks.0.mlp.c_fc.weight'), width))
  else:
    width = shape('visual.layer1.0.conv1.weight')[0]
    resolution = round((shape('visual.attnpool.positional_embedding')[0] - 1) ** 0.5) * 32
    vision = configs.VisionConfig(
        'resnet', width, tuple(_count(flat, rf'visual\.layer{i}\.(\d+)\.') for i in range(1, 5)),
        width * 32 // 64, resolution)
  vocab_size, text_width = shape('token_embedding.weight')
  biased = 'text_projection.weight' in flat  # open_clip's proj_bias: an nn.Linear
  text = configs.TextConfig(
      text_width, _count(flat, r'transformer\.resblocks\.(\d+)\.'), max(text_width // 64, 1),
      shape('positional_embedding')[0], vocab_size, projection_bias=biased,
      mlp_dim=_mlp_dim(shape('transformer.resblocks.0.mlp.c_fc.weight'), text_width))
  embed_dim = shape('text_projection.weight')[0] if biased else shape('text_projection')[1]
  try:
    return configs.CLIPConfig(embed_dim, vision, text, logit_bias='logit_bias' in flat)
  except ValueError as e:
    raise CheckpointError(f'the shapes in this state dict give an invalid config: {e}') from None


def _mlp_dim(c_fc_shape, width):
  return None if c_fc_shape[0] == 4 * width else c_fc_shape[0]


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


# Weight files a model folder may hold, in the order they are looked for: open_clip's (hub
# folders), then Hugging Face's (single or sharded), each read with the config file beside it.
FOLDER_FILES = ('open_clip_model.safetensors', 'open_clip_pytorch_model.bin',
                'model.safetensors', 'model.safetensors.index.json', 'pytorch_model.bin')
OPEN_CLIP_CONFIG = 'open_clip_config.json'
HF_CONFIG = 'config.json'
HF_PREPROCESSOR_CONFIG = 'preprocessor_config.json'
HF_TOKENIZER_CONFIG = 'tokenizer_config.json'
# Prefixes wrapping every key: DistributedDataParallel's `module.`, torch.compile's `_orig_mod.`.
WRAPPER_PREFIXES = ('module.', '_orig_mod.')


def _read_json(path):
  with open(path) as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise CheckpointError(f'{path} is not valid JSON: {e}') from None


def _weights_file(path):
  """A folder -> the weights file in it; a file -> itself."""
  if not os.path.isdir(path):
    if not os.path.exists(path):
      raise FileNotFoundError(f'no checkpoint at {path}')
    return path
  found = [os.path.join(path, n) for n in FOLDER_FILES if os.path.exists(os.path.join(path, n))]
  if not found:
    raise CheckpointError(f'{path} is a folder without any of {FOLDER_FILES}')
  return found[0]


def _read_file(path):
  """The raw contents of one weights file; a file its format cannot read is a CheckpointError
  naming the path (truncated downloads, a text file with a weights extension)."""
  try:
    return _read_by_extension(path)
  except (CheckpointError, FileNotFoundError):
    raise
  except Exception as e:  # pylint: disable=broad-except  (each reader has its own errors)
    raise CheckpointError(f'{path} is not a readable checkpoint: {type(e).__name__}: '
                          f'{str(e)[:300]}') from None


def _read_by_extension(path):
  ext = os.path.splitext(path)[1].lower()
  if path.endswith('.safetensors.index.json'):  # Hugging Face's sharded weights
    shards = sorted(set(_read_json(path).get('weight_map', {}).values()))
    if not shards:
      raise CheckpointError(f'{path} names no shards in its weight_map')
    raw = {}
    for shard in shards:
      raw.update(_read_safetensors(os.path.join(os.path.dirname(path), shard)))
    return raw
  if ext == '.safetensors':
    return _read_safetensors(path)
  if ext == '.npy':
    return _read_npy(path)
  if ext == '.npz':
    with np.load(path, allow_pickle=False) as z:
      return dict(z)
  return _read_torch(path)


def strip_wrappers(raw, path='checkpoint'):
  """open_clip's `{'state_dict': ...}` training checkpoints, and the `module.` / `_orig_mod.`
  key prefixes of DistributedDataParallel and torch.compile, in any combination and order."""
  while isinstance(raw, dict) and isinstance(raw.get('state_dict'), dict):
    raw = raw['state_dict']
  if not isinstance(raw, dict):
    raise CheckpointError(f'{path} holds a {type(raw).__name__}, not a state dict')
  flat = {}
  for key, value in raw.items():
    while key.startswith(WRAPPER_PREFIXES):
      key = key.split('.', 1)[1]
    if key in _TORCHSCRIPT_EXTRAS:
      continue  # metadata scalars of OpenAI's TorchScript archives, implied by the shapes
    flat[key] = _to_numpy(value)
  return flat


def read_checkpoint(path):
  """Any supported file (or model folder) -> `(flat, info)`: the state dict with its wrappers
  stripped, keys as the file has them (`params/` of big_vision dropped), and `info` with the
  weights file's `path`, its `folder` and the config files beside it (`open_clip_config`,
  `hf_config`, `preprocessor_config`, `tokenizer_config`)."""
  path = _weights_file(os.fspath(path))
  flat = strip_wrappers(_read_file(path), path)
  if any(k.startswith('params/') for k in flat):  # big_vision's .npz
    flat = {k[len('params/'):] if k.startswith('params/') else k: v for k, v in flat.items()}
  folder = os.path.dirname(path)
  info = {'path': path, 'folder': folder}
  for name, field in ((OPEN_CLIP_CONFIG, 'open_clip_config'), (HF_CONFIG, 'hf_config'),
                      (HF_PREPROCESSOR_CONFIG, 'preprocessor_config'),
                      (HF_TOKENIZER_CONFIG, 'tokenizer_config')):
    if os.path.exists(os.path.join(folder, name)):
      info[field] = _read_json(os.path.join(folder, name))
  return flat, info


def _to_numpy(value):
  if isinstance(value, np.ndarray):
    return value
  if type(value).__module__.startswith('torch'):
    import torch  # pylint: disable=g-import-not-at-top
    value = value.detach().cpu()
    return (value.float() if value.dtype == torch.bfloat16 else value).numpy()
  return np.asarray(value)


# ---------------------------------------------------------------- loading

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


def load(path, config=None, dtype=np.float32, image_resolution=None, tokenizer=None,
         preprocess=None):
  """A checkpoint file or model folder -> `(params, cfg)`, with outputs equal to the library
  that defines the family, or an error.

  Families: OpenAI's and open_clip's (OpenAI keys, `text.` of CustomTextCLIP, timm ViT trunks of
  the SigLIP models), Hugging Face `CLIPModel` and `SiglipModel`, big_vision's SigLIP `.npz`.
  Formats: torch state dicts (`weights_only=True`), OpenAI's TorchScript archives,
  `.safetensors` (also sharded), `.npz`, scenic's `.npy`; open_clip's `state_dict` wrapper and
  the `module.` / `_orig_mod.` prefixes are stripped. The config is, in order: `config=` (a
  CLIPConfig, an OpenAI name such as 'ViT-B/32', or an open_clip name such as 'ViT-H-14' or
  'ViT-B-32/laion2b_s34b_b79k'),
  checked against what the files state; the `open_clip_config.json` or Hugging Face
  `config.json` beside the weights; else inferred from the shapes, with a `CheckpointWarning`
  naming what was assumed (the activation, head counts) unless the file is one of OpenAI's
  releases. Floating weights are cast to `dtype` (fp16 files load as fp32 by default).
  `image_resolution` interpolates the position embedding to another input size.

  The returned config carries the model's tokenizer and image preprocessing (`cfg.tokenizer`,
  `cfg.preprocess`, for `clip.get_tokenizer` and `clip.preprocess_images`): what the files beside
  the weights state (open_clip's `open_clip_config.json` `preprocess_cfg` and
  `hf_tokenizer_name` / `tokenizer_kwargs`; transformers' `preprocessor_config.json`,
  `tokenizer_config.json` and its `spiece.model` / `tokenizer.model` / `vocab.json`), else the
  family's known settings with a `CheckpointWarning` naming them. `tokenizer=` (a
  `clip.TokenizerConfig`, or the path of a SentencePiece `.model` file, its kind read from the
  file) and `preprocess=` (a `clip.PreprocessConfig`) state them instead, e.g. for a big_vision
  `.npz`, which ships no tokenizer.

  Raises CheckpointError for an unsupported family (naming its keys), missing, unexpected or
  misshapen keys, a `config=` that contradicts the files, or processing files this package
  cannot run exactly.
  """
  raw, info = read_checkpoint(path)
  try:
    family = families.detect(raw)
    if family == families.BIG_VISION:
      info['big_vision_heads'] = families.big_vision_heads(raw)
    flat = families.to_ours(raw, family)
  except ValueError as e:
    raise CheckpointError(f'{info["path"]}: {e}') from None
  config = resolve_config(flat, family, info, config)
  params, config = from_state_dict(flat, config, dtype)
  if image_resolution is not None and image_resolution != config.image_resolution:
    params, config = interpolate_pos_embed(params, config, image_resolution)
  return params, with_processing(config, family, info, tokenizer, preprocess)


def with_processing(config, family, info, tokenizer=None, preprocess=None):
  """`config` with the tokenizer and preprocessing of its checkpoint (see `load`)."""
  try:
    stated_tok, stated_pp, assumed = families.processing(family, info, config)
  except (ValueError, OSError) as e:
    raise CheckpointError(f'{info["path"]}: {e}') from None
  if tokenizer is None:
    tokenizer = stated_tok
  elif isinstance(tokenizer, (str, os.PathLike)):
    try:
      tokenizer = families.given_tokenizer(tokenizer, family, info)
    except (ValueError, OSError) as e:
      raise CheckpointError(f'{info["path"]}: {e}') from None
  elif not isinstance(tokenizer, configs.TokenizerConfig):
    raise TypeError(f'tokenizer must be a clip.TokenizerConfig or the path of a SentencePiece '
                    f'.model file, got {type(tokenizer).__name__}')
  if preprocess is None:
    preprocess = stated_pp
  elif not isinstance(preprocess, configs.PreprocessConfig):
    raise TypeError(f'preprocess must be a clip.PreprocessConfig, got '
                    f'{type(preprocess).__name__}')
  given = {'tokenizer': tokenizer is not stated_tok, 'preprocess': preprocess is not stated_pp}
  assumed = [(what, text) for what, text in assumed if not given[what]]
  if assumed:
    how = ' or '.join(sorted({f'{what}=' for what, _ in assumed}))
    warnings.warn(f'{info["path"]}: assumed ' + '; '.join(text for _, text in assumed) +
                  f'. Pass {how} to clip.load to state it.', CheckpointWarning, stacklevel=3)
  return dataclasses.replace(config, tokenizer=tokenizer, preprocess=preprocess)


# ---------------------------------------------------------------- what a checkpoint states

class CheckpointWarning(UserWarning):
  """A checkpoint loaded under an assumption its files cannot confirm (the message says which,
  and how to state it with `config=`)."""


def _differences(given, stated, prefix=''):
  out = []
  for field in dataclasses.fields(given):
    a, b = getattr(given, field.name), getattr(stated, field.name)
    if field.name in configs.NON_ARCHITECTURE_FIELDS:
      continue
    if dataclasses.is_dataclass(a):
      out += _differences(a, b, f'{prefix}{field.name}.')
    elif a != b:
      out.append(f'{prefix}{field.name}: config= says {a!r}, the file says {b!r}')
  return out


def stated_config(family, info):
  """The config the files beside the weights state (open_clip_config.json for open_clip's
  families, config.json for Hugging Face's), or None."""
  try:
    if family in (families.OPENAI, families.OPEN_CLIP_TIMM) and 'open_clip_config' in info:
      model_cfg = info['open_clip_config'].get('model_cfg', info['open_clip_config'])
      return open_clip_configs.config_from_open_clip(model_cfg)
    if family in families.HUGGING_FACE and 'hf_config' in info:
      return families.config_from_hf(info['hf_config'])
  except (KeyError, ValueError) as e:
    raise CheckpointError(f'{info["path"]}: the config file beside it cannot be run exactly: '
                          f'{e!r}') from None
  return None


def _named_config(name):
  """An OpenAI name ('ViT-B/32') or an open_clip one ('ViT-B-32/laion2b_s34b_b79k') -> config;
  a name both libraries use for different models (open_clip's 'RN50' has exact GELU) is an
  error."""
  if name in configs.MODELS and name in open_clip_configs.MODEL_CFGS:
    raise ValueError(f'{name!r} names both OpenAI\'s {name} (QuickGELU) and open_clip\'s (exact '
                     f'GELU): pass config=clip.MODELS[{name!r}] or {name!r} with an open_clip tag '
                     f'("{name}/openai", "{name}-quickgelu", ...)')
  if name in configs.MODELS:
    return configs.MODELS[name]
  return open_clip_configs.open_clip_config(name)


def resolve_config(flat, family, info, config=None):
  """The config to load `flat` (our keys) with: `config=` if given (an error if the files state
  otherwise), else what the files state, else shapes plus the family's defaults with a warning
  naming the assumptions."""
  if isinstance(config, str):
    config = _named_config(config)
  stated = stated_config(family, info)
  if config is not None:
    if not isinstance(config, configs.CLIPConfig):
      raise TypeError(f'config must be a CLIPConfig or an open_clip model name, got '
                      f'{type(config).__name__}')
    contradictions = _differences(config, stated) if stated is not None else []
    if contradictions:
      raise CheckpointError(f'{info["path"]}: config= contradicts the config file beside it: '
                            + '; '.join(contradictions))
    return config
  if stated is not None:
    return stated
  config, assumed = _infer(flat, family, info)
  if assumed:
    warnings.warn(f'{info["path"]}: its files do not state the architecture; assumed '
                  + '; '.join(assumed) + '. Pass config= (a CLIPConfig or an open_clip name, '
                  'e.g. config="ViT-B-32/laion2b_s34b_b79k" for that release) to state it.',
                  CheckpointWarning, stacklevel=3)
  return config


def _infer(flat, family, info):
  """(config, assumptions) from the shapes and the family's defaults."""
  if family == families.BIG_VISION:
    cfg = families.siglip_from_shapes(flat, *info['big_vision_heads'], 'gelu_tanh', 'gelu_tanh')
    return cfg, ['text pooled at the last position (big_vision\'s pool_type="last", as every '
                 'SigLIP release)']
  if family in (families.HF_SIGLIP, families.HF_SIGLIP2, families.OPEN_CLIP_TIMM):
    return _infer_siglip(flat, family)
  cfg = infer_config(flat)
  matches = _open_clip_shape_matches(cfg)
  if matches:  # the head count is open_clip's for these shapes
    cfg = _with_heads(cfg, matches[0][1])
  elif cfg.vision.arch == 'vit' and cfg.vision.width % 64 or cfg.text.width % 64:
    raise CheckpointError(
        f'{info["path"]}: cannot infer head counts: text width {cfg.text.width} / vision width '
        f'{cfg.vision.width} are not multiples of 64 (OpenAI\'s head size) and match no open_clip '
        'architecture; pass config=')
  if family == families.OPENAI and _is_official(info['path']):
    return cfg, []
  names = sorted({name for name, _ in matches})
  kinds = sorted({c.vision.mlp for _, c in matches} | {'quick_gelu'})
  assumed = [f'OpenAI\'s QuickGELU activation (same keys and shapes: {names[:8]}, whose '
             f'activations are {kinds})' if names else 'OpenAI\'s QuickGELU activation',
             f'{cfg.vision.heads} vision and {cfg.text.heads} text heads',
             'OpenAI\'s causal text tower pooled at the end-of-text token']
  return cfg, assumed


def _infer_siglip(flat, family):
  heads = lambda w: max(w // 64, 1)
  text_width = flat['ln_final.weight'].shape[0]
  width = flat['visual.conv1.weight'].shape[0]
  vision_act = 'gelu' if family == families.OPEN_CLIP_TIMM else 'gelu_tanh'
  cfg = families.siglip_from_shapes(flat, heads(width), heads(text_width), vision_act,
                                    'gelu_tanh')
  matches = _open_clip_shape_matches(cfg)
  if matches:
    cfg = _with_heads(cfg, matches[0][1])
    if family == families.OPEN_CLIP_TIMM and len({c.text.mlp for _, c in matches}) == 1:
      cfg = dataclasses.replace(cfg, text=dataclasses.replace(
          cfg.text, mlp=matches[0][1].text.mlp))  # open_clip's own text activation
  elif width % 64 or text_width % 64:
    raise CheckpointError(f'cannot infer head counts: text width {text_width} / vision width '
                          f'{width} are not multiples of 64 and match no open_clip SigLIP '
                          'architecture; pass config=')
  names = sorted({name for name, _ in matches})
  kinds = sorted({c.text.mlp for _, c in matches} | {cfg.text.mlp})
  return cfg, [f'{cfg.vision.heads} vision and {cfg.text.heads} text heads',
               f'{vision_act} in the image tower and {cfg.text.mlp} in the text tower '
               f'(open_clip\'s models with these shapes: {names[:8]}, text activations {kinds})']


def _signature(cfg):
  """What the shapes of a ViT CLIP say: everything but head counts and activations."""
  v, t = cfg.vision, cfg.text
  return (cfg.embed_dim, v.arch, v.width, v.layers, v.patch_size, v.image_resolution,
          v.hidden_dim, v.pool, t.width, t.layers, t.context_length, t.vocab_size, t.hidden_dim)


def _open_clip_shape_matches(cfg):
  """`[(name, config)]` of open_clip's models (our table) whose shapes are those of `cfg`."""
  out = []
  for name, model_cfg in sorted(open_clip_configs.MODEL_CFGS.items()):
    try:
      candidate = open_clip_configs.config_from_open_clip(model_cfg)
    except ValueError:
      continue
    if _signature(candidate) == _signature(cfg):
      out.append((name, candidate))
  return out


def _with_heads(cfg, source):
  vision = dataclasses.replace(cfg.vision, heads=source.vision.heads)
  text = dataclasses.replace(cfg.text, heads=source.text.heads)
  return dataclasses.replace(cfg, vision=vision, text=text)


def _is_official(path):
  official = {sha for sha, _ in OFFICIAL_FILES.values()}
  return _sha256(path) in official


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
