"""Evaluators that run during training (big_vision's pattern): each is built once, before
training, from a spec, holding this process's share of its data; `run(params)` embeds it on every
device of the training mesh (`clip.eval.sharded_features`) and yields `(metric, value)` pairs
that every process computes alike from the gathered features with the library's own metric
functions (clip_benchmark's classification metrics, `retrieval.retrieval_metrics`).

  specs = [parse_evaluator(s) for s in ('zero_shot:tfds=cifar10,data_dir=/d', 'synthetic')]
  evaluators = make_evaluators(specs, cfg, mesh, batch_size=256)   # data read, errors now
  results = run_evaluators(evaluators, params)     # {'zero_shot_cifar10/acc1': ..., ...}
  tracker = BestAndLast(); tracker.update(step, results); tracker.write(path)

Specs, `kind[:key=value,...]` (see `FORMS`):
  zero_shot   a tfds classification set (`tfds=`, `split=` default test, `data_dir=`) or an image
              folder (`folder=`: one subfolder per class, sorted; names with '_' as spaces);
              `classnames=FILE` (one a line) replaces the names, `templates=` default (OpenAI's
              7) | imagenet (its 80) | FILE (one a line, `{}` or `{c}` for the class):
              acc1, acc5 (from 5 classes), mean_per_class_recall, as `experiments/evaluate.py`.
  retrieval   held-out img2dataset shards (`shards=` a tfrecord or tar glob), read in eval mode
              (the model's eval transform and tokenizer, truncated as training reads them; each
              record once, bad ones counted and logged): image_to_text_R@{1,5,10}, text_to_image_...
  synthetic   the built-in set (`examples=` per split, default 1024; `seed=`, default 1): the
              contrastive metrics of `data.synthetic_eval.evaluate` (`<split>/<task>_top1` and
              `<split>/<retrieval metric>` for the 'train' and 'heldout' splits).
Each takes `name=` (default zero_shot_<dataset or folder>, retrieval, synthetic), the prefix of
its metrics. All data is held in host memory as uint8 images at the model's resolution (R*R*3
bytes an image, over all processes), read and checked when the evaluator is built.
"""
import functools
import json
import logging
import os
import re
import typing

import jax
import numpy as np

from clip import model
from clip import preprocess
from clip import processing
from clip.eval import metrics as eval_metrics
from clip.eval import retrieval
from clip.eval import sharded_features
from clip.eval import zero_shot
from clip.formats import files

log = logging.getLogger(__name__)

KEYS = {'zero_shot': ('tfds', 'split', 'data_dir', 'folder', 'classnames', 'templates', 'name'),
        'retrieval': ('shards', 'name'),
        'synthetic': ('examples', 'seed', 'name')}
FORMS = ('zero_shot:tfds=NAME[,split=test][,data_dir=DIR][,classnames=FILE][,templates=default|'
         'imagenet|FILE]', 'zero_shot:folder=DIR[,classnames=FILE][,templates=...]',
         'retrieval:shards=GLOB', 'synthetic[:examples=1024][,seed=1]', '(each [,name=NAME])')
IMAGE_EXTENSIONS = ('.bmp', '.gif', '.jpeg', '.jpg', '.png', '.ppm', '.tif', '.tiff', '.webp')
_READ_BATCH = 256
_PATHS = ('data_dir', 'folder', 'classnames', 'templates', 'shards')  # '~' expanded


class Spec(typing.NamedTuple):
  """A parsed `--evaluator`: its kind and its options (str -> str)."""
  kind: str
  options: dict

  @property
  def name(self):
    opts = self.options
    if 'name' in opts:
      return opts['name']
    if self.kind != 'zero_shot':
      return self.kind
    source = opts.get('tfds') or os.path.basename(os.path.normpath(opts['folder']))
    return 'zero_shot_' + re.sub(r'[^A-Za-z0-9_.-]+', '_', source)


def parse_evaluator(text):
  """`kind[:key=value,...]` -> `Spec`. ValueError naming the expected forms (`FORMS`) for an
  unknown kind or key, a key given twice, a missing or double data source, or a bad number."""
  kind, _, rest = str(text).partition(':')
  expected = 'expected one of: ' + '; '.join(FORMS)
  if kind not in KEYS:
    raise ValueError(f'unknown evaluator kind {kind!r} in {text!r}; {expected}')
  options = {}
  for item in filter(None, rest.split(',')):
    key, eq, value = item.partition('=')
    if not eq or not value or key not in KEYS[kind] or key in options:
      raise ValueError(f'bad option {item!r} in {text!r} (a {kind} evaluator takes '
                       f'{", ".join(KEYS[kind])}, each once, as key=value); {expected}')
    options[key] = os.path.expanduser(value) if key in _PATHS else value
  sources = [k for k in ('tfds', 'folder', 'shards') if k in options]
  if kind != 'synthetic' and len(sources) != 1:
    raise ValueError(f'{text!r} needs exactly one data source, got {sources or "none"}; '
                     f'{expected}')
  if kind == 'zero_shot' and 'folder' in options and {'split', 'data_dir'} & set(options):
    raise ValueError(f'split= and data_dir= are for tfds= sets, not folder=; {expected}')
  for key in ('examples', 'seed'):
    if key in options and not re.fullmatch(r'\d+', options[key]):
      raise ValueError(f'{key}= must be a non-negative integer, got {options[key]!r} in '
                       f'{text!r}; {expected}')
  if options.get('examples') == '0':
    raise ValueError(f'examples= must be >= 1, got 0 in {text!r}; {expected}')
  return Spec(kind, options)


def require_evaluators(eval_every, specs):
  """ValueError when evaluation is scheduled (`eval_every` > 0) without an evaluator to run."""
  if eval_every and not specs:
    raise ValueError(f'--eval-every {eval_every} needs at least one --evaluator; '
                     f'{"; ".join(FORMS)}')


def make_evaluators(specs, cfg, mesh, batch_size):
  """The evaluators of `specs` (`Spec`s or their text) for the model `cfg` on the training `mesh`,
  `batch_size` rows a step over all processes; every process calls it, in the same order. Their
  data is read now (this process's share), so a missing folder, an unprepared tfds set, a glob
  matching nothing, a bad template file or a prompt too long for the tokenizer raises here,
  before training. ValueError also for two evaluators of one name."""
  specs = [s if isinstance(s, Spec) else parse_evaluator(s) for s in specs]
  names = [s.name for s in specs]
  if len(set(names)) != len(names):
    raise ValueError(f'evaluator names must differ (give name=...), got {names}')
  encoder = sharded_features.ShardedEncoder(cfg, mesh, batch_size)
  builders = {'zero_shot': ZeroShot, 'retrieval': Retrieval, 'synthetic': Synthetic}
  return [builders[s.kind](s, encoder) for s in specs]


def run_evaluators(evaluators, params):
  """`{'<evaluator name>/<metric>': float}` of every evaluator on `params` (the model's, BatchNorm
  buffers included: `model.update_batch_stats`); every process calls it, with the same params."""
  return {f'{e.name}/{metric}': float(value) for e in evaluators for metric, value in e.run(params)}


# ------------------------------------------------------------------------- the evaluators

class ZeroShot:
  """Zero-shot classification by prompt-ensembled class embeddings (`zero_shot`'s), scored as
  `experiments/evaluate.py` scores it: cosine of each image with each class."""

  def __init__(self, spec, encoder):
    self.name, self.encoder, cfg = spec.name, encoder, encoder.cfg
    opts = spec.options
    if 'tfds' in opts:
      images, tags, names = _tfds_share(opts, cfg)
    else:
      images, tags, names = _folder_share(opts['folder'], cfg)
    self.classnames = _read_lines(opts['classnames'], 'classnames') if 'classnames' in opts \
        else names
    if len(self.classnames) != len(names):
      raise ValueError(f'{spec.name}: {len(names)} classes, {len(self.classnames)} names in '
                       f'{opts["classnames"]}')
    templates = opts.get('templates', 'default')
    self.templates = list(zero_shot.TEMPLATES.get(templates) or _read_lines(templates,
                                                                           'templates'))
    self.images = encoder.share(images, tags)
    self.prompts = _prompt_share(encoder, zero_shot.prompts(self.classnames, self.templates),
                                 len(self.templates))

  def run(self, params):
    weights_CxD = _class_weights(self.encoder.texts(params, self.prompts), len(self.classnames))
    features, tags = self.encoder.images(params, self.images)
    scores_NxC = _unit(features) @ weights_CxD.T
    result = eval_metrics.classification_metrics(scores_NxC, tags[:, 2])
    yield 'acc1', result['acc1']
    if len(self.classnames) >= 5:
      yield 'acc5', result['acc5']
    yield 'mean_per_class_recall', result['mean_per_class_recall']


class Retrieval:
  """Image<->text recall@{1,5,10} on held-out img2dataset shards, one caption per image, in the
  order of the shards and of their records (`retrieval`'s tie rule then holds for any process
  count)."""

  def __init__(self, spec, encoder):
    self.name, self.encoder = spec.name, encoder
    images, tokens, tags = _shards_share(spec.options['shards'], encoder.cfg)
    self.images, self.texts = encoder.share(images, tags), encoder.share(tokens, tags)

  def run(self, params):
    image_features, _ = self.encoder.images(params, self.images)
    text_features, _ = self.encoder.texts(params, self.texts)
    yield from retrieval.retrieval_metrics(image_features, text_features).items()


class Synthetic:
  """`data.synthetic_eval.evaluate`'s contrastive metrics, its images, captions and prompts
  embedded sharded: zero-shot top-1 of every task and retrieval, on the 'train' and 'heldout'
  splits (the chance levels, constants, and a decoder's captioning metrics are left to it)."""

  def __init__(self, spec, encoder):
    from data import synthetic  # pylint: disable=g-import-not-at-top
    from data import synthetic_eval  # pylint: disable=g-import-not-at-top
    self.name, self.encoder, cfg = spec.name, encoder, encoder.cfg
    n, seed = int(spec.options.get('examples', 1024)), int(spec.options.get('seed', 1))
    self.tasks = synthetic_eval.TASKS
    tokenize = processing.get_tokenizer(cfg)
    index, count = jax.process_index(), jax.process_count()
    self.splits = {}
    for split, start in synthetic_eval.SPLIT_STARTS:
      ds = synthetic.SyntheticCaptions(seed=seed, resolution=cfg.image_resolution, split=split)
      sample = ds.get(np.arange(start, start + n)[index::count])
      labels = [ds.labels(sample, task) for task in self.tasks]
      tags = np.stack([np.zeros_like(sample['index']), sample['index'], *labels], 1)
      self.splits[split] = (encoder.share(sample['image'], tags),
                            encoder.share(tokenize(sample['caption']), tags))
    prompts = [ds.prompts(task) for task in self.tasks]
    self.num_classes = [len(p) for p in prompts]
    rows = [(t, c) for t, p in enumerate(prompts) for c in range(len(p))]
    self.prompts = encoder.share(tokenize([p for ps in prompts for p in ps])[index::count],
                                 np.asarray(rows[index::count], np.int32).reshape(-1, 2))

  def run(self, params):
    text_features, tags = self.encoder.texts(params, self.prompts)
    weights = [_unit(text_features[tags[:, 0] == t]) for t in range(len(self.tasks))]
    for split, (images, captions) in self.splits.items():
      image_features, tags = self.encoder.images(params, images)
      for t, task in enumerate(self.tasks):
        scores_NxC = _unit(image_features) @ weights[t].T
        yield (f'{split}/{task}_top1',
               eval_metrics.classification_metrics(scores_NxC, tags[:, 2 + t])['acc1'])
      caption_features, _ = self.encoder.texts(params, captions)
      for metric, value in retrieval.retrieval_metrics(image_features, caption_features).items():
        yield f'{split}/{metric}', value


# ----------------------------------------------------------------------------- helpers

def _unit(x_NxD):
  return np.asarray(model.l2_normalize(np.asarray(x_NxD, np.float32)))


def _class_weights(text, num_classes):
  """Sorted prompt features (C * T, D) and their (class, template) tags -> (C, D) class
  embeddings: per class the mean of its normalised prompt features, normalised again
  (`zero_shot.classifier_weights_from_tokens`)."""
  features, _ = text
  return _unit(_unit(features).reshape(num_classes, -1, features.shape[1]).mean(axis=1))


def _prompt_share(encoder, prompts, num_templates):
  """Every process's share of the class-major prompts, tagged (class, template); the tokenizer
  refuses a prompt too long for the model (as `zero_shot.classifier_weights` does)."""
  index, count = jax.process_index(), jax.process_count()
  tokens = processing.get_tokenizer(encoder.cfg)(prompts)
  rows = np.arange(len(prompts))[index::count]
  return encoder.share(tokens[rows], np.stack([rows // num_templates, rows % num_templates], 1))


def _read_lines(path, what):
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{what}={path!r}: no such file (a file with one entry a line'
                            + (', or default | imagenet)' if what == 'templates' else ')'))
  with open(path, encoding='utf-8') as f:
    lines = [line.strip() for line in f if line.strip()]
  if not lines:
    raise ValueError(f'{what} file {path!r} is empty')
  return lines


def _folder_share(folder, cfg):
  """(uint8 images (n, R, R, 3) by the model's eval transform, tags (n, 3): (0, index, label),
  class names) of this process's share (every process-count-th file from its index) of an image
  folder with one subfolder per class."""
  if not os.path.isdir(folder):
    raise FileNotFoundError(f'zero_shot folder={folder!r} is not a folder')
  classes = sorted(e for e in os.listdir(folder) if os.path.isdir(os.path.join(folder, e)))
  paths, labels = [], []
  for label, name in enumerate(classes):
    entries = sorted(os.listdir(os.path.join(folder, name)))
    images = [e for e in entries if e.lower().endswith(IMAGE_EXTENSIONS)]
    if not images:
      raise ValueError(f'class folder {os.path.join(folder, name)!r} holds no image '
                       f'({", ".join(IMAGE_EXTENSIONS)})')
    if len(images) < len(entries):
      log.warning('%s: left out %d entries that are not images (%s)', os.path.join(folder, name),
                  len(entries) - len(images), ', '.join(IMAGE_EXTENSIONS))
    paths += [os.path.join(folder, name, e) for e in images]
    labels += [label] * len(images)
  if len(classes) < 2:
    raise ValueError(f'zero_shot folder={folder!r} needs a subfolder per class (2 or more), '
                     f'found {classes}')
  rows = np.arange(len(paths))[jax.process_index()::jax.process_count()]
  r, config = cfg.image_resolution, cfg.preprocess
  images = np.zeros((len(rows), r, r, 3), np.uint8)
  for i, row in enumerate(rows):
    images[i] = np.asarray(preprocess.transform(preprocess.to_pil(paths[row]), r, config))
  tags = np.stack([np.zeros_like(rows), rows, np.asarray(labels, np.int64)[rows]], 1)
  return images, tags, [c.replace('_', ' ') for c in classes]


def _tfds_share(opts, cfg):
  """(uint8 images, tags (n, 3): (process, position, label), class names) of this process's even
  share of a prepared tfds split (`data.tfds.TFDSClassification`)."""
  from data import tfds  # pylint: disable=g-import-not-at-top  # TensorFlow: tfds sets only
  data = tfds.TFDSClassification(opts['tfds'], opts.get('split', 'test'),
                                 data_dir=opts.get('data_dir'))
  r = cfg.image_resolution
  batches = list(data.batches(_READ_BATCH, r, preprocess=cfg.preprocess, image_dtype='uint8')
                 ) if data.num_examples else [{'image': np.zeros((0, r, r, 3), np.uint8),
                                               'label': np.zeros(0, np.int32)}]
  labels = np.concatenate([b['label'] for b in batches])
  tags = np.stack([np.full_like(labels, jax.process_index()), np.arange(len(labels)), labels], 1)
  return np.concatenate([b['image'] for b in batches]), tags, data.classnames


def _shards_share(pattern, cfg):
  """(uint8 images, int32 tokens, tags (n, 2): (file, record)) of this process's files (every
  process-count-th of the sorted matches from its index), each read whole in its own order by
  `data.shards.Pipeline` in eval mode; skipped records are logged with their reasons."""
  from data import shard_files  # pylint: disable=g-import-not-at-top  # TensorFlow
  from data import shards  # pylint: disable=g-import-not-at-top
  all_files = shard_files.expand_files(pattern)
  tokenize = functools.partial(processing.get_tokenizer(cfg), truncate=True)
  images, tokens, tags = [], [], []
  for f in range(jax.process_index(), len(all_files), jax.process_count()):
    pipeline = shards.Pipeline([all_files[f]], global_batch_size=_READ_BATCH,
                               resolution=cfg.image_resolution, train=False, tokenize=tokenize,
                               preprocess=cfg.preprocess, image_dtype='uint8', process_index=0,
                               process_count=1)
    batches = list(pipeline)
    images += [b['image'] for b in batches]
    tokens += [b['tokens'] for b in batches]
    n = sum(len(b['tokens']) for b in batches)
    tags.append(np.stack([np.full(n, f), np.arange(n)], 1))
    if pipeline.stats.skipped:
      log.warning('retrieval shard %s: %s', all_files[f], pipeline.stats.summary())
  r, length = cfg.image_resolution, cfg.text.context_length
  return (np.concatenate(images or [np.zeros((0, r, r, 3), np.uint8)]),
          np.concatenate(tokens or [np.zeros((0, length), np.int32)]),
          np.concatenate(tags or [np.zeros((0, 2), np.int64)]))


# ------------------------------------------------------------------- best and last results

class BestAndLast:
  """The last results of the evaluators and, per metric, the best value and its step (higher is
  better, except the names in `lower_is_better`); NaN never counts as best. `write(path)` writes
  `{'last': {'step', 'metrics'}, 'best': {metric: {'value', 'step'}}}` atomically; `load(path)`
  continues a resumed run's."""

  def __init__(self, lower_is_better=()):
    self.lower_is_better = frozenset(lower_is_better)
    self.last, self.best = None, {}

  def update(self, step, results):
    """Records `results` ({metric: float}) of step `step`; returns the metrics it improved."""
    self.last = {'step': int(step), 'metrics': dict(results)}
    improved = []
    for name, value in results.items():
      sign = -1 if name in self.lower_is_better else 1
      old = self.best.get(name)
      if not np.isnan(value) and (old is None or sign * value > sign * old['value']):
        self.best[name] = {'value': float(value), 'step': int(step)}
        improved.append(name)
    return improved

  def write(self, path):
    payload = {'last': self.last, 'best': self.best}

    def write(tmp):
      with open(tmp, 'w', encoding='utf-8') as f:
        json.dump(payload, f, indent=2)
    files.atomic_write(path, write)

  @classmethod
  def load(cls, path, lower_is_better=()):
    """The tracker `write` left at `path`, or a fresh one where there is no file."""
    tracker = cls(lower_is_better)
    if os.path.exists(path):
      with open(path, encoding='utf-8') as f:
        payload = json.load(f)
      tracker.last, tracker.best = payload['last'], payload['best']
    return tracker
