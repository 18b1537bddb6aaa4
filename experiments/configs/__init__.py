"""Experiment configs: one file per family, each `get_config(arg) -> Experiment`.

`arg` is the text after the name's colon (`--config small:loss=sigmoid,batch=256`), read by
`parse_arg` against the defaults the config declares, as big_vision's configs do
(`configs/proj/image_text/*.py`: `get_config(arg)` with `bvcc.parse_arg(arg, ...)`). Any field can
then be set with `override` (`--set train.learning_rate=3e-4 --set model.vision.layers=6`).
"""
import ast
import dataclasses
import importlib
import types

from clip import configs
from clip.train import training


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """What the main job does besides the model and the optimisation."""
  data: str | None = 'synthetic'  # 'synthetic', a glob of img2dataset shards, or 'a:0.7,b:0.3'
  data_resampled: bool = False    # shards drawn with replacement per process (any shard count)
  log_every: int = 25             # steps between metrics.jsonl lines
  checkpoint_every: int = 500     # steps between checkpoints (and at the end)
  keep_checkpoints: int = 2
  checkpoint_dir: str | None = None  # any path orbax takes (gs://...); None: <workdir>/checkpoints
  eval_examples: int = 0          # built-in zero-shot evaluation at the end (0: none)
  eval_every: int = 0             # steps between runs of the evaluators (0: none), and at the end
  evaluators: tuple[str, ...] = ()  # clip.eval.evaluators specs, e.g. 'zero_shot:tfds=cifar10'
  keep: object = None             # a data.filters.MetadataFilter for the shards

  def __post_init__(self):
    for name in ('log_every', 'checkpoint_every', 'keep_checkpoints'):
      if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
        raise ValueError(f'run.{name} must be an int >= 1, got {getattr(self, name)!r}')
    for name in ('eval_examples', 'eval_every'):
      if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
        raise ValueError(f'run.{name} must be an int >= 0, got {getattr(self, name)!r}')
    if isinstance(self.evaluators, str):
      raise ValueError(f'run.evaluators is a tuple of specs, got the string {self.evaluators!r}')


@dataclasses.dataclass(frozen=True)
class Experiment:
  """A config file's result: the model, the training and the run settings."""
  model: configs.CLIPConfig
  train: training.TrainConfig
  run: RunConfig


def _parse_value(text):
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text  # a bare word: a string


def _checked(name, value, default):
  """`value` in the type of `default` (an int where a float is expected is fine)."""
  if default is None or value is None:
    return value
  if isinstance(default, bool) or isinstance(value, bool):
    if not isinstance(value, bool) or not isinstance(default, bool):
      raise ValueError(f'{name} takes {type(default).__name__}, got {value!r}')
    return value
  if isinstance(default, float) and isinstance(value, int):
    return float(value)
  if isinstance(default, str) and isinstance(value, (int, float)):
    return str(value)  # 'lengths=64' where the field is text such as '32/64/96'
  if isinstance(default, tuple) and isinstance(value, (list, tuple)):
    return tuple(value)
  if not isinstance(value, type(default)):
    raise ValueError(f'{name} takes {type(default).__name__} (like {default!r}), got {value!r}')
  return value


def parse_arg(arg, **defaults):
  """'loss=sigmoid,batch=256' -> a namespace of `defaults` with those replaced, each in its
  default's type. Raises ValueError on an unknown key or a value of another type."""
  values = dict(defaults)
  for item in filter(None, (arg or '').split(',')):
    key, sep, text = item.partition('=')
    key = key.strip()
    if not sep or key not in defaults:
      raise ValueError(f'config argument {item!r}: expected key=value with key one of '
                       f'{sorted(defaults)}')
    values[key] = _checked(key, _parse_value(text.strip()), defaults[key])
  return types.SimpleNamespace(**values)


def parse_assignment(text):
  """'train.learning_rate=3e-4' -> ('train.learning_rate', 3e-4); the value as a Python literal,
  else the bare text. Raises ValueError without a section.field path."""
  path, sep, value = text.partition('=')
  if not sep or len(path.strip().split('.')) < 2:
    raise ValueError(f'--set takes section.field=value (sections: model, train, run), got '
                     f'{text!r}')
  return path.strip(), _parse_value(value.strip())


def set_fields(experiment, values):
  """`experiment` with the field at each dotted path of `values` (nested dataclasses included)
  replaced, each value in its field's type. The fields of one dataclass are replaced together and
  validated once (so `train.total_steps` and `train.warmup_steps` can move together). Raises
  ValueError naming the fields there on an unknown one."""
  return _replace(experiment, [(path.split('.'), value, path) for path, value in values.items()])


def set_field(experiment, path, value):
  return set_fields(experiment, {path: value})


def override(experiment, assignment):
  """`set_field` from 'section.field=value' text (`--set train.learning_rate=3e-4`)."""
  return set_field(experiment, *parse_assignment(assignment))


def _replace(obj, items):
  fields = [f.name for f in dataclasses.fields(obj)]
  changes, nested = {}, {}
  for names, value, path in items:
    if names[0] not in fields:
      raise ValueError(f'{path}: {type(obj).__name__} has no field {names[0]!r}; its fields: '
                       f'{fields}')
    current = getattr(obj, names[0])
    if len(names) == 1:
      changes[names[0]] = _checked(path, value, current)
    elif dataclasses.is_dataclass(current):
      nested.setdefault(names[0], []).append((names[1:], value, path))
    else:
      raise ValueError(f'{path}: {names[0]} is a {type(current).__name__}, not a config')
  for name, items_below in nested.items():
    changes[name] = _replace(getattr(obj, name), items_below)
  return dataclasses.replace(obj, **changes)


def model_config(name):
  """The model config of the experiment file `experiments/configs/<name>.py` (None for None): what
  the scripts' --config names where a checkpoint does not state its architecture."""
  if name is None:
    return None
  return importlib.import_module(f'experiments.configs.{name}').get_config().model
