"""Evaluate a CLIP model: zero-shot classification, linear probe, image-text retrieval.

Results are written as JSON in the format of LAION's clip_benchmark (`dataset`, `model`,
`pretrained`, `task`, `metrics`, `language`, plus `templates` where prompts were built from
templates, as its `--dump_templates`), with its metric names (`lp_` for the linear probe), so
numbers compare with theirs:

  python -m experiments.evaluate --model ViT-B/32 --dataset tfds/cifar10 --data-dir ~/tfds
  python -m experiments.evaluate --model results/train/small --config small \
      --dataset synthetic/colour_shape --split heldout --task zeroshot_classification
  python -m experiments.evaluate --model final.pt --config small --dataset synthetic \
      --task zeroshot_retrieval
  python -m experiments.evaluate --model ViT-B/32 --dataset tfds/cifar10 --task linear_probe
  python -m experiments.evaluate --model results/train/cappa_small --config cappa_small \
      --dataset synthetic/colour_shape --task generative_classification

`generative_classification` is CapPa's generative zero-shot for a model with a captioning
decoder (Tschannen et al. 2023): each class is scored by the log-likelihood of its prompt given
the image (the mean over its templates), the highest wins; its metrics are zero-shot's.

--model is an official name, a checkpoint file (any format `clip.load` reads) or a training
workdir of `experiments/train.py` (its newest checkpoint). A workdir holding the
`model_config.json` its run saved is that model, tokenizer and image preprocessing included, and
needs no --config (one given must have its architecture). Otherwise --config names the file in
`experiments/configs/` whose model config to use, needed where the shapes do not determine the
head counts (OpenAI's 64-wide heads are assumed otherwise).

Every task feeds the model its own processing: prompts and captions through its tokenizer
(`clip.get_tokenizer(cfg)`), images through its transform and normalisation (`cfg.preprocess`);
a model whose tokenizer is unknown (a SigLIP checkpoint without its SentencePiece file) is
refused with `clip.TokenizerError`, never run on OpenAI's.

Datasets: `synthetic[/<task>]` is the built-in captioned shapes (`--split train | heldout | all`,
tasks colour_shape, shape, colour, size, count, position, texture); `tfds/<name>` any prepared
tensorflow-datasets classification set (`--data-dir`); for retrieval also `--captions` with
img2dataset shards (webdataset tars or tfrecords).
"""
import argparse
import functools
import json
import os
import re

from experiments import malloc_tuning

if __name__ == '__main__':  # before jax is imported: the setting needs a fresh process
  malloc_tuning.reexec_if_untuned()

import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

import clip
from clip import batching
from clip import processing
from clip.eval import generation
from clip.eval import linear_probe
from clip.eval import metrics as eval_metrics
from clip.eval import retrieval
from clip.eval import zero_shot
from clip.formats import files
from clip.formats import workdirs
from data import synthetic
from experiments import configs

TASKS = ('zeroshot_classification', 'generative_classification', 'linear_probe',
         'zeroshot_retrieval')


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--model', required=True)
  parser.add_argument('--config', default=None, help='a file in experiments/configs/')
  parser.add_argument('--tokenizer', default=None,
                      help='the SentencePiece .model of a checkpoint that ships none (a lone '
                      'SigLIP weights file, a big_vision .npz)')
  parser.add_argument('--dataset', default='synthetic/colour_shape')
  parser.add_argument('--task', default='zeroshot_classification', choices=TASKS)
  parser.add_argument('--split', default=None, help='default: test (tfds); synthetic: heldout, '
                      'or all for the linear probe (held-out pairs have no training examples)')
  parser.add_argument('--train-split', default=None,
                      help='linear probe: what to fit on; default train (tfds), all (synthetic)')
  parser.add_argument('--examples', type=int, default=2048, help='synthetic examples per split')
  parser.add_argument('--data-dir', default=None, help='tensorflow-datasets data_dir')
  parser.add_argument('--captions', default=None,
                      help='retrieval: img2dataset shards (.tar or .tfrecord glob)')
  parser.add_argument('--templates', default='default',
                      help='tfds prompts: default (7 ImageNet-selected) | imagenet (80) | a file '
                      'of templates, one a line, with {} or {c} (clip_benchmark) for the class')
  parser.add_argument('--batch-size', type=int, default=256)
  parser.add_argument('--seed', type=int, default=1)
  parser.add_argument('--output', default=None, help='JSON path (default under results/evaluate)')
  return parser.parse_args(argv)


# ---------------------------------------------------------------------------------- model

def load_model(spec, config_name=None, tokenizer=None):
  """(params, cfg) of --model (`workdirs.load_model`), --config naming the file in
  `experiments/configs/` whose model config to use where the checkpoint does not state it."""
  return workdirs.load_model(spec, configs.model_config(config_name), tokenizer, config_name)


# ----------------------------------------------------------------------------------- data

def classification_data(args, cfg, split, fit=False):
  """(images float32 (N, R, R, 3) by the model's own preprocessing, labels int32 (N,), class
  names, prompts per class or None: the built-in set has its own prompt per class, tfds classes
  get `--templates`). `fit`: the examples a linear probe is fitted on (other indices of the
  built-in set than evaluation's). The built-in set is drawn at the model's resolution, so its
  images need only the model's normalisation (`clip.processing.normalize`)."""
  kind, _, name = args.dataset.partition('/')
  if kind == 'synthetic':
    task = name or 'colour_shape'
    split = split or ('all' if args.task == 'linear_probe' else 'heldout')
    ds = synthetic.SyntheticCaptions(seed=args.seed, resolution=cfg.image_resolution,
                                     split=split)
    # Far from the indices a training run saw first, and from the evaluation examples.
    offset = synthetic.UNSEEN_START if split == 'train' or fit else 0
    sample = ds.get(np.arange(offset, offset + args.examples))
    images = processing.normalize(sample['image'].astype(np.float32) / 255, cfg)
    return images, ds.labels(sample, task), ds.classnames(task), [[p] for p in ds.prompts(task)]
  if kind == 'tfds':
    from data import tfds  # pylint: disable=g-import-not-at-top
    data = tfds.TFDSClassification(name, split or ('train' if fit else 'test'),
                                   data_dir=args.data_dir)
    return (*data.arrays(args.batch_size, cfg.image_resolution, preprocess=cfg.preprocess),
            data.classnames, None)
  raise ValueError(f'--dataset must be synthetic[/<task>] or tfds/<name>, got {args.dataset!r}')


def retrieval_data(args, cfg):
  """(images (N, R, R, 3), tokens int32 (N, L)): one caption per image, the images by the model's
  preprocessing, the captions by its tokenizer (`--captions` truncated to its context, as
  training reads them; the built-in captions fit it)."""
  tokenizer = processing.get_tokenizer(cfg)
  if args.captions:
    from data import shards  # pylint: disable=g-import-not-at-top
    pipeline = shards.Pipeline(args.captions, global_batch_size=args.batch_size,
                               resolution=cfg.image_resolution, train=False,
                               tokenize=functools.partial(tokenizer, truncate=True),
                               preprocess=cfg.preprocess)  # no batch: EmptyEpochError
    batches = list(pipeline)
    print(f'--captions: {pipeline.stats.summary()}')  # how many pairs are scored, what was skipped
    return (np.concatenate([b['image'] for b in batches]),
            np.concatenate([b['tokens'] for b in batches]))
  if not args.dataset.startswith('synthetic'):
    raise ValueError('zeroshot_retrieval needs captions: --dataset synthetic or --captions GLOB')
  ds = synthetic.SyntheticCaptions(seed=args.seed, resolution=cfg.image_resolution,
                                   split=args.split or 'heldout')
  sample = ds.get(np.arange(args.examples))
  return (processing.normalize(sample['image'].astype(np.float32) / 255, cfg),
          tokenizer(sample['caption']))


# -------------------------------------------------------------------------------- metrics

def zero_shot_scores(params, images, class_prompts, cfg, batch_size):
  """Cosine similarities (N, C) of the images with the prompt-ensembled class embeddings;
  `class_prompts` holds the same number of prompts for every class, tokenised by the model's own
  tokenizer (`clip.get_tokenizer(cfg)`)."""
  c, t = len(class_prompts), len(class_prompts[0])
  tokens = processing.get_tokenizer(cfg)([p for ps in class_prompts for p in ps])
  weights = zero_shot.classifier_weights_from_tokens(params, tokens.reshape(c, t, -1), cfg)
  feats = linear_probe.image_features(params, images, cfg, batch_size)
  return (feats / np.linalg.norm(feats, axis=-1, keepdims=True)) @ weights


def generative_scores(params, images, class_prompts, cfg, batch_size):
  """Log-likelihoods (N, C) of each class's prompts given each image under the captioning
  decoder, averaged over the class's prompts (CapPa's generative zero-shot). The prompts are rows
  of the model's own tokenizer, which must start them with its start token
  (`generation.start_token_id`: a tokenizer without one raises `clip.TokenizerError`)."""
  if cfg.decoder is None:
    raise ValueError('--task generative_classification needs a model with a captioning decoder '
                     '(e.g. --config cappa_small); this config has none')
  generation.start_token_id(cfg)
  c, t = len(class_prompts), len(class_prompts[0])
  tokens = processing.get_tokenizer(cfg)([p for ps in class_prompts for p in ps])

  def scores(images_BxRxRx3):
    image_tokens = clip.model.image_features_and_tokens(params, images_BxRxRx3, cfg)[1]
    return generation.generative_zero_shot_scores(params['text_decoder'], image_tokens, tokens,
                                                  cfg.decoder)

  out = batching.map_batches(scores, images, batch_size, 'generative scores', 'images')
  return out.reshape(-1, c, t).mean(axis=-1)


def _templates(path_or_name):
  if path_or_name in zero_shot.TEMPLATES:
    return list(zero_shot.TEMPLATES[path_or_name])
  with open(path_or_name) as f:
    return [line.strip() for line in f if line.strip()]


def evaluate(args):
  """(clip_benchmark's metrics, the templates the class prompts were built from or None)."""
  params, cfg = load_model(args.model, args.config, args.tokenizer)
  if cfg.text is None and args.task in ('zeroshot_classification', 'zeroshot_retrieval'):
    raise ValueError(f'--task {args.task} compares images with a text tower, and this model has '
                     'none (a captioner): use --task generative_classification or linear_probe')
  if args.task == 'zeroshot_retrieval':
    return _retrieval(params, cfg, args), None
  if args.task in ('zeroshot_classification', 'generative_classification'):
    return _classification(params, cfg, args)
  return _linear_probe(params, cfg, args), None


def _retrieval(params, cfg, args):
  images, tokens = retrieval_data(args, cfg)
  image_features = linear_probe.image_features(params, images, cfg, args.batch_size)
  text_features = np.concatenate([np.asarray(clip.encode_text(params, tokens[i:i + 256], cfg))
                                  for i in range(0, len(tokens), 256)])
  recall = retrieval.retrieval_metrics(image_features, text_features)
  metrics = {}
  for k in (1, 5, 10):
    metrics[f'image_retrieval_recall@{k}'] = float(recall[f'text_to_image_R@{k}'])
    metrics[f'text_retrieval_recall@{k}'] = float(recall[f'image_to_text_R@{k}'])
  return metrics


def _classification(params, cfg, args):
  images, labels, classnames, class_prompts = classification_data(args, cfg, args.split)
  templates = None
  if class_prompts is None:
    templates = _templates(args.templates)
    flat = zero_shot.prompts(classnames, templates)
    class_prompts = [flat[i:i + len(templates)] for i in range(0, len(flat), len(templates))]
  score = zero_shot_scores if args.task == 'zeroshot_classification' else generative_scores
  scores = score(params, images, class_prompts, cfg, args.batch_size)
  return eval_metrics.classification_metrics(scores, labels, classnames), templates


def _linear_probe(params, cfg, args):
  images, labels, classnames, _ = classification_data(args, cfg, args.split)
  train_images, train_labels, _, _ = classification_data(args, cfg, args.train_split, fit=True)
  feats = linear_probe.image_features(params, train_images, cfg, args.batch_size)
  n_val = max(len(feats) // 5, 1)  # the last fifth of the training split validates the sweep
  probe = linear_probe.sweep(feats[:-n_val], train_labels[:-n_val], feats[-n_val:],
                             train_labels[-n_val:], len(classnames))
  test_feats = linear_probe.image_features(params, images, cfg, args.batch_size)
  metrics = eval_metrics.linear_probe_metrics(linear_probe.predict(probe, test_feats), labels,
                                              classnames)
  metrics.update({'lp_l2': probe['l2'],
                  'lp_l2_sweep': {str(k): v for k, v in probe['sweep'].items()}})
  return metrics


def model_name(spec, config_name=None):
  """clip_benchmark's (`model`, `pretrained`): an official name as open_clip spells it
  (`ViT-B-32`, `openai`); a file or workdir as its `--config` (else its basename) and its path."""
  if spec in clip.MODELS and not os.path.exists(spec):
    return spec.replace('/', '-'), 'openai'
  return config_name or os.path.basename(os.path.normpath(spec)), spec


def dataset_name(args):
  """The dataset actually evaluated: retrieval reads `--captions` where given, and the built-in
  set's captions (not one of its label tasks) otherwise; `tfds/<name>` is `<name>`."""
  if args.task == 'zeroshot_retrieval':
    return args.captions or args.dataset.split('/', 1)[0]
  return args.dataset.split('/', 1)[-1] if args.dataset.startswith('tfds/') else args.dataset


def main(argv=None):
  args = parse_args(argv)
  if args.captions and args.task != 'zeroshot_retrieval':
    raise ValueError(f'--captions is read by --task zeroshot_retrieval only, got --task '
                     f'{args.task}')
  metrics, templates = evaluate(args)
  dataset = dataset_name(args)
  model, pretrained = model_name(args.model, args.config)
  result = {'dataset': dataset, 'model': model, 'pretrained': pretrained, 'task': args.task,
            'metrics': metrics, 'language': 'en'}
  if templates is not None:
    result['templates'] = templates
  print(json.dumps(result, indent=2))
  output = args.output or os.path.join(
      'results', 'evaluate', f'{re.sub(r"[^A-Za-z0-9_.-]+", "_", dataset)}_{args.task}.json')
  def write(tmp):
    with open(tmp, 'w') as f:
      json.dump(result, f, indent=2)
  files.atomic_write(output, write)
  print(f'wrote {output}')
  return result


if __name__ == '__main__':
  main()
