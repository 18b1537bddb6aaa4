"""Evaluate a CLIP model: zero-shot classification, linear probe, image-text retrieval.

Results are written as JSON in the format of LAION's clip_benchmark (`dataset`, `model`,
`pretrained`, `task`, `metrics`, `language`), so numbers compare with theirs:

  python -m experiments.evaluate --model ViT-B/32 --dataset tfds/cifar10 --data-dir ~/tfds
  python -m experiments.evaluate --model results/train/small --config small \
      --dataset synthetic/colour_shape --split heldout --task zeroshot_classification
  python -m experiments.evaluate --model final.pt --config small --dataset synthetic \
      --task zeroshot_retrieval
  python -m experiments.evaluate --model ViT-B/32 --dataset tfds/cifar10 --task linear_probe

--model is an official name, a checkpoint file (any format `clip.load` reads) or a training
workdir of `experiments/train.py` (its newest checkpoint). --config names the file in
`experiments/configs/` whose model config to use, needed where the shapes do not determine the
head counts (OpenAI's 64-wide heads are assumed otherwise).

Datasets: `synthetic[/<task>]` is the built-in captioned shapes (`--split train | heldout | all`,
tasks colour_shape, shape, colour, size, count, position, texture); `tfds/<name>` any prepared
tensorflow-datasets classification set (`--data-dir`); for retrieval also `--captions` with
img2dataset tfrecords.
"""
import argparse
import glob
import importlib
import json
import os
import re

import numpy as np

TASKS = ('zeroshot_classification', 'linear_probe', 'zeroshot_retrieval')


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--model', required=True)
  parser.add_argument('--config', default=None, help='a file in experiments/configs/')
  parser.add_argument('--dataset', default='synthetic/colour_shape')
  parser.add_argument('--task', default='zeroshot_classification', choices=TASKS)
  parser.add_argument('--split', default=None, help='default: test (tfds); synthetic: heldout, '
                      'or all for the linear probe (held-out pairs have no training examples)')
  parser.add_argument('--train-split', default=None,
                      help='linear probe: what to fit on; default train (tfds), all (synthetic)')
  parser.add_argument('--examples', type=int, default=2048, help='synthetic examples per split')
  parser.add_argument('--data-dir', default=None, help='tensorflow-datasets data_dir')
  parser.add_argument('--captions', default=None, help='retrieval: img2dataset tfrecord glob')
  parser.add_argument('--templates', default='default',
                      help='tfds prompts: default | imagenet | a file of templates with {}')
  parser.add_argument('--batch-size', type=int, default=256)
  parser.add_argument('--seed', type=int, default=1)
  parser.add_argument('--output', default=None, help='JSON path (default under results/evaluate)')
  return parser.parse_args(argv)


# ---------------------------------------------------------------------------------- model

def _model_config(name):
  if name is None:
    return None
  return importlib.import_module(f'experiments.configs.{name}').get_config()['model']


def _workdir_params(workdir):
  """The newest checkpoint of a training workdir -> flat {torch key: array} of its params."""
  paths = sorted(glob.glob(os.path.join(workdir, 'checkpoints', 'step_*', 'state.npz')))
  if not paths:
    raise FileNotFoundError(f'{workdir} has no checkpoints/step_*/state.npz')
  with np.load(paths[-1], allow_pickle=False) as z:
    return {'.'.join(re.findall(r"\['([^']+)'\]", k)[1:]): z[k] for k in z.files
            if k.startswith("['params']") or k.startswith("['batch_stats']")}


def load_model(spec, config_name=None):
  """(params, cfg) from an official name, a checkpoint file or a training workdir."""
  import clip  # pylint: disable=g-import-not-at-top
  from clip import weights  # pylint: disable=g-import-not-at-top
  cfg = _model_config(config_name)
  if os.path.isdir(spec) and os.path.isdir(os.path.join(spec, 'checkpoints')):
    # Stacked (scan-layout) blocks are checked under their per-layer torch keys.
    flat = weights.flatten(clip.unstack_layers(weights.nest(_workdir_params(spec))))
    if cfg is not None and not cfg.logit_bias:
      flat.pop('logit_bias', None)  # sigmoid training's bias: zero-shot ranks do not use it
    return weights.from_state_dict(flat, cfg)
  if os.path.exists(spec):
    return clip.load(spec, config=cfg)
  if spec in clip.MODELS:
    return clip.load_model_vars(spec)
  raise ValueError(f'--model must be an official model ({", ".join(clip.MODELS)}), a checkpoint '
                   f'file or a training workdir, got {spec!r}')


# ----------------------------------------------------------------------------------- data

def classification_data(args, cfg, split, fit=False):
  """(images float32 (N, R, R, 3), labels int32 (N,), class names, prompts per class or None:
  the built-in set has its own prompt per class, tfds classes get `--templates`). `fit`: the
  examples a linear probe is fitted on (other indices of the built-in set than evaluation's)."""
  import clip  # pylint: disable=g-import-not-at-top
  kind, _, name = args.dataset.partition('/')
  if kind == 'synthetic':
    from data import synthetic  # pylint: disable=g-import-not-at-top
    task = name or 'colour_shape'
    split = split or ('all' if args.task == 'linear_probe' else 'heldout')
    ds = synthetic.SyntheticCaptions(seed=args.seed, resolution=cfg.image_resolution,
                                     split=split)
    # Far from the indices a training run saw first, and from the evaluation examples.
    offset = 10**9 if split == 'train' or fit else 0
    sample = ds.get(np.arange(offset, offset + args.examples))
    images = clip.normalize_image(sample['image'].astype(np.float32) / 255)
    return images, ds.labels(sample, task), ds.classnames(task), [[p] for p in ds.prompts(task)]
  if kind == 'tfds':
    from data import tfds  # pylint: disable=g-import-not-at-top
    data = tfds.TFDSClassification(name, split or ('train' if fit else 'test'),
                                   data_dir=args.data_dir)
    images, labels = [], []
    for batch in data.batches(args.batch_size, cfg.image_resolution):
      images.append(batch['image'])
      labels.append(batch['label'])
    return np.concatenate(images), np.concatenate(labels), data.classnames, None
  raise ValueError(f'--dataset must be synthetic[/<task>] or tfds/<name>, got {args.dataset!r}')


def retrieval_data(args, cfg):
  """(images (N, R, R, 3), tokens (N, L)): one caption per image."""
  import clip  # pylint: disable=g-import-not-at-top
  if args.captions:
    from data import tfrecords  # pylint: disable=g-import-not-at-top
    pipeline = tfrecords.Pipeline(args.captions, global_batch_size=args.batch_size,
                                  resolution=cfg.image_resolution, train=False,
                                  context_length=cfg.context_length)
    batches = list(pipeline)
    if pipeline.stats.num_skipped:
      print(pipeline.stats.summary())
    return (np.concatenate([b['image'] for b in batches]),
            np.concatenate([b['tokens'] for b in batches]))
  if not args.dataset.startswith('synthetic'):
    raise ValueError('zeroshot_retrieval needs captions: --dataset synthetic or --captions GLOB')
  from data import synthetic  # pylint: disable=g-import-not-at-top
  ds = synthetic.SyntheticCaptions(seed=args.seed, resolution=cfg.image_resolution,
                                   split=args.split or 'heldout')
  sample = ds.get(np.arange(args.examples))
  return (clip.normalize_image(sample['image'].astype(np.float32) / 255),
          clip.tokenize(sample['caption'], cfg.context_length))


# -------------------------------------------------------------------------------- metrics

def classification_metrics(scores_NxC, labels_N, classnames=None):
  """clip_benchmark's top-1, top-5 (nan under 5 classes) and mean per-class recall, plus the
  top-1 accuracy of every class present (`per_class_acc1`, keyed by class name when given)."""
  scores, labels = np.asarray(scores_NxC), np.asarray(labels_N)
  order = np.argsort(-scores, axis=1)
  acc1 = float(np.mean(order[:, 0] == labels))
  acc5 = (float(np.mean((order[:, :5] == labels[:, None]).any(1))) if scores.shape[1] >= 5
          else float('nan'))
  per_class = {int(c): float(np.mean(order[labels == c, 0] == c)) for c in np.unique(labels)}
  names = classnames or [str(c) for c in range(scores.shape[1])]
  return {'acc1': acc1, 'acc5': acc5, 'mean_per_class_recall': float(np.mean(list(
      per_class.values()))), 'per_class_acc1': {names[c]: v for c, v in per_class.items()}}


def zero_shot_scores(params, cfg, images, class_prompts, batch_size):
  """Cosine similarities (N, C) of the images with the prompt-ensembled class embeddings;
  `class_prompts` holds the same number of prompts for every class."""
  from clip import linear_probe  # pylint: disable=g-import-not-at-top
  from clip import tokenizer  # pylint: disable=g-import-not-at-top
  from clip import zero_shot  # pylint: disable=g-import-not-at-top
  c, t = len(class_prompts), len(class_prompts[0])
  tokens = tokenizer.tokenize([p for ps in class_prompts for p in ps], cfg.context_length)
  weights = zero_shot.classifier_weights_from_tokens(params, cfg, tokens.reshape(c, t, -1))
  feats = linear_probe.image_features(params, cfg, images, batch_size)
  return (feats / np.linalg.norm(feats, axis=-1, keepdims=True)) @ weights


def _templates(path_or_name):
  from clip import zero_shot  # pylint: disable=g-import-not-at-top
  if path_or_name in zero_shot.TEMPLATES:
    return zero_shot.TEMPLATES[path_or_name]
  with open(path_or_name) as f:
    return [line.strip() for line in f if line.strip()]


def evaluate(args):
  params, cfg = load_model(args.model, args.config)
  if args.task == 'zeroshot_retrieval':
    from clip import model  # pylint: disable=g-import-not-at-top
    from clip import zero_shot  # pylint: disable=g-import-not-at-top
    from clip import linear_probe  # pylint: disable=g-import-not-at-top
    images, tokens = retrieval_data(args, cfg)
    image_features = linear_probe.image_features(params, cfg, images, args.batch_size)
    text_features = np.concatenate([np.asarray(model.encode_text(params, tokens[i:i + 256], cfg))
                                    for i in range(0, len(tokens), 256)])
    recall = zero_shot.retrieval_metrics(image_features, text_features)
    metrics = {}
    for k in (1, 5, 10):
      metrics[f'image_retrieval_recall@{k}'] = float(recall[f'text_to_image_R@{k}'])
      metrics[f'text_retrieval_recall@{k}'] = float(recall[f'image_to_text_R@{k}'])
    return metrics
  images, labels, classnames, class_prompts = classification_data(args, cfg, args.split)
  if args.task == 'zeroshot_classification':
    if class_prompts is None:
      templates = _templates(args.templates)
      class_prompts = [[t.format(c) for t in templates] for c in classnames]
    scores = zero_shot_scores(params, cfg, images, class_prompts, args.batch_size)
    return classification_metrics(scores, labels, classnames)
  from clip import linear_probe  # pylint: disable=g-import-not-at-top
  train_images, train_labels, _, _ = classification_data(args, cfg, args.train_split, fit=True)
  feats = linear_probe.image_features(params, cfg, train_images, args.batch_size)
  n_val = max(len(feats) // 5, 1)  # the last fifth of the training split validates the sweep
  probe = linear_probe.sweep(feats[:-n_val], train_labels[:-n_val], feats[-n_val:],
                             train_labels[-n_val:], len(classnames))
  test_feats = linear_probe.image_features(params, cfg, images, args.batch_size)
  metrics = classification_metrics(linear_probe.predict(probe, test_feats), labels, classnames)
  metrics.update({'l2': probe['l2'], 'sweep': {str(k): v for k, v in probe['sweep'].items()}})
  return metrics


def main(argv=None):
  args = parse_args(argv)
  metrics = evaluate(args)
  dataset = args.dataset.split('/', 1)[-1] if args.dataset.startswith('tfds/') else args.dataset
  result = {'dataset': dataset, 'model': os.path.basename(os.path.normpath(args.model)),
            'pretrained': args.model, 'task': args.task, 'metrics': metrics, 'language': 'en'}
  print(json.dumps(result, indent=2))
  output = args.output or os.path.join(
      'results', 'evaluate', f'{re.sub(r"[^A-Za-z0-9_.-]+", "_", dataset)}_{args.task}.json')
  os.makedirs(os.path.dirname(output) or '.', exist_ok=True)
  tmp = output + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(result, f, indent=2)
  os.replace(tmp, output)
  print(f'wrote {output}')
  return result


if __name__ == '__main__':
  main()
