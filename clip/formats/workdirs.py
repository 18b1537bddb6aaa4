"""A training workdir as a model: `model_config.json` (its architecture, tokenizer and
preprocessing) with a SentencePiece tokenizer's model file copied beside it."""
import json
import os
import shutil

import jax

from clip import configs
from clip.formats.files import atomic_write

MODEL_CONFIG = 'model_config.json'
TOKENIZER_FILE = 'tokenizer.model'  # a SentencePiece tokenizer's copy inside a workdir


def save_model_config(workdir, cfg):
  """Writes `cfg` (its architecture, tokenizer and preprocessing) as `workdir/model_config.json`,
  atomically, with a SentencePiece tokenizer's model file copied beside it (`tokenizer.model`,
  referred to by that relative name), so the workdir is a model on its own. Process 0 writes."""
  if jax.process_index():
    return
  os.makedirs(workdir, exist_ok=True)
  values = configs.to_dict(cfg)
  model_file = cfg.tokenizer.model_file
  if model_file is not None:
    target = os.path.join(workdir, TOKENIZER_FILE)
    if os.path.abspath(model_file) != os.path.abspath(target):
      atomic_write(target, lambda tmp: shutil.copyfile(model_file, tmp))
    values['tokenizer']['model_file'] = TOKENIZER_FILE
  def write(tmp):
    with open(tmp, 'w') as f:
      json.dump(values, f, indent=2)
  atomic_write(os.path.join(workdir, MODEL_CONFIG), write)


def load_model_config(workdir):
  """The CLIPConfig `save_model_config` wrote into `workdir` (a relative tokenizer model file is
  resolved inside the workdir); FileNotFoundError when there is none."""
  path = os.path.join(workdir, MODEL_CONFIG)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{workdir} holds no {MODEL_CONFIG} (workdirs written before it was '
                            'saved need their config named, e.g. --config small)')
  with open(path) as f:
    values = json.load(f)
  tokenizer = values.get('tokenizer') or {}
  if tokenizer.get('model_file') and not os.path.isabs(tokenizer['model_file']):
    tokenizer['model_file'] = os.path.join(os.path.abspath(workdir), tokenizer['model_file'])
  try:
    return configs.from_dict(values)
  except (TypeError, ValueError) as e:
    raise ValueError(f'{path}: {e}') from None
