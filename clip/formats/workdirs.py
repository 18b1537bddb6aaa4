"""A training workdir as a model: its newest train-state checkpoint (`checkpoints/`) and
`model_config.json` (its architecture, tokenizer and preprocessing) with a SentencePiece
tokenizer's model file copied beside it; and the one bridge from whatever names a model (a
workdir, a checkpoint file, an official name) to `(params, cfg)` that the scripts share.

  params, cfg = workdirs.load_model('results/train/small')   # or 'final.pt', or 'ViT-B/32'
"""
import dataclasses
import json
import os
import shutil

import jax
import numpy as np

from clip import configs
from clip import model
from clip.formats import files
from clip.formats import hub
from clip.formats import load
from clip.formats import openai
from clip.train import state_store

MODEL_CONFIG = 'model_config.json'
TOKENIZER_FILE = 'tokenizer.model'  # a SentencePiece tokenizer's copy inside a workdir
CHECKPOINTS = 'checkpoints'  # the train-state checkpoints' folder inside a workdir
# How a model is run, how it starts training, and (set apart) how its inputs are made: not what
# its weights compute.
NOT_ARCHITECTURE = configs.NON_ARCHITECTURE_FIELDS + ('init_logit_scale', 'init_logit_bias')


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
      files.atomic_write(target, lambda tmp: shutil.copyfile(model_file, tmp))
    values['tokenizer']['model_file'] = TOKENIZER_FILE
  def write(tmp):
    with open(tmp, 'w') as f:
      json.dump(values, f, indent=2)
  files.atomic_write(os.path.join(workdir, MODEL_CONFIG), write)


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


def is_workdir(path):
  """Whether `path` is a training workdir: a folder holding a `checkpoints/` folder."""
  return os.path.isdir(path) and os.path.isdir(os.path.join(path, CHECKPOINTS))


def read_params(workdir):
  """The newest checkpoint of a training workdir -> flat `{torch key: array}` of its weights (the
  EMA of its parameters where the run kept one, as the run evaluated and exported, said; else its
  parameters) and BatchNorm buffers, stacked (scan-layout) blocks under their per-layer keys.
  FileNotFoundError when it holds no checkpoint."""
  directory = os.path.join(workdir, CHECKPOINTS)
  decay = state_store.meta(directory).get('train_config', {}).get('ema_decay')
  weights = 'params' if decay is None else 'ema'
  state, _ = state_store.read(directory, (weights, 'batch_stats'))
  if decay is not None:
    print(f'{workdir}: the EMA of its parameters (decay {decay}), as its run evaluated and '
          'exported them')
  flat = {**files.flatten(state[weights]), **files.flatten(state.get('batch_stats', {}))}
  return files.flatten(model.unstack_layers(files.nest(flat)))


def architecture_differences(given, saved):
  """'<field>: --config says .., the workdir's model_config.json says ..' for every field of the
  two configs that changes what the weights compute (every field of the towers and decoder; not
  the dtype, remat, scan, logit inits, tokenizer or preprocessing)."""
  return load.config_differences(given, saved, '--config', "the workdir's model_config.json",
                                 skip=NOT_ARCHITECTURE)


def workdir_config(workdir, config=None, has_bias=False, config_name=None):
  """The config of a training workdir: its saved `model_config.json` (architecture, tokenizer,
  preprocessing) when there is one, run with `config`'s dtype, remat and scan if given, which must
  have its architecture (ValueError naming each difference; `config_name`, the --config it came
  from, names it); else `config` (None: to be inferred from the shapes). `has_bias`: whether the
  checkpoint holds SigLIP's logit bias, which a given config follows."""
  if config is not None and has_bias != config.logit_bias:
    # `--loss sigmoid` on a config without the bias trains one (experiments/train.py)
    print(f'{workdir}: logit_bias={has_bias} as in its checkpoint, not the config\'s')
    config = dataclasses.replace(config, logit_bias=has_bias)
  if not os.path.isfile(os.path.join(workdir, MODEL_CONFIG)):
    return config
  saved = load_model_config(workdir)
  if config is None:
    return saved
  differences = architecture_differences(config, saved)
  if differences:
    raise ValueError(f'--config {config_name} is not the model {workdir} trained: '
                     + '; '.join(differences) + '. Leave --config out to use the workdir\'s '
                     f'{MODEL_CONFIG}')
  return dataclasses.replace(saved, dtype=config.dtype, remat=config.remat, scan=config.scan)


def load_model(spec, config=None, tokenizer=None, config_name=None, dtype=np.float32):
  """`(params, cfg)` from a training workdir (its newest checkpoint, `workdir_config`), a
  checkpoint file or folder (`clip.load`) or an official name (`clip.load_model_vars`); `cfg`
  carries the model's tokenizer and preprocessing (a workdir's from its `model_config.json`, a
  file's from what `clip.load` reads beside it, or `tokenizer`: a SentencePiece `.model` for a
  checkpoint file that ships none). `config` (a CLIPConfig; `config_name` names it in messages)
  is the architecture where the files do not state it; floating weights are cast to `dtype`.
  ValueError for a `tokenizer` given with a
  workdir or an official name, a `config` that contradicts a workdir's saved architecture, or a
  `spec` that names no model; FileNotFoundError for a workdir without checkpoints."""
  workdir = is_workdir(spec)
  if tokenizer is not None and (workdir or not os.path.exists(spec)):
    raise ValueError(f'--tokenizer gives the tokenizer of a checkpoint file or folder that ships '
                     f'none; {spec!r} is a training workdir or an official model, which name '
                     'their own')
  if workdir:
    flat = read_params(spec)
    return openai.from_state_dict(
        flat, workdir_config(spec, config, 'logit_bias' in flat, config_name), dtype)
  if os.path.exists(spec):
    return load.load(spec, config=config, tokenizer=tokenizer)
  if spec in configs.MODELS:
    return load.load_model_vars(spec)
  if hub.is_hub_name(spec):
    return load.load(spec, config=config)
  raise ValueError(f'--model must be an official model ({", ".join(configs.MODELS)}), a '
                   'Hub name (hf-hub:ORG/NAME, ORG/NAME), a checkpoint file or a training '
                   f'workdir, got {spec!r}')
