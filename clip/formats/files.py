"""Reading and writing files: every file the library writes (exports, a workdir's model config) goes
through `atomic_write`; every weights file is read here into a flat `{torch key: numpy array}`
dict (`read_checkpoint`), whatever its format: torch state dicts (`weights_only=True`), OpenAI's
TorchScript archives, `.safetensors` (also sharded), `.npz`, scenic's `.npy` (a safe unpickler).
torch is only imported for the formats that need it, never at `import clip`.
"""
import json
import os
import pickle
import tempfile
import zipfile

import numpy as np
from safetensors import numpy as st_numpy

# Scalars OpenAI's TorchScript archives carry in their state dict beside the weights.
_TORCHSCRIPT_EXTRAS = ('input_resolution', 'context_length', 'vocab_size')


def _umask():
  mask = os.umask(0)
  os.umask(mask)
  return mask


def atomic_write(path, write):
  """`write(tmp)` into a temporary file beside `path`, then renamed onto it: never half a file
  (its folder is made if missing), with the permissions `open` would give it (mkstemp's temporary
  is private, 0600). Every file the library writes goes through it."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix='.part')
  os.close(fd)
  try:
    write(tmp)
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


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


# ---------------------------------------------------------------- model folders

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


def read_json(path):
  """The JSON file at `path`; CheckpointError naming it when it is not JSON."""
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
    shards = sorted(set(read_json(path).get('weight_map', {}).values()))
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
      info[field] = read_json(os.path.join(folder, name))
  return flat, info


def _to_numpy(value):
  if isinstance(value, np.ndarray):
    return value
  if type(value).__module__.startswith('torch'):
    import torch  # pylint: disable=g-import-not-at-top
    value = value.detach().cpu()
    return (value.float() if value.dtype == torch.bfloat16 else value).numpy()
  return np.asarray(value)

