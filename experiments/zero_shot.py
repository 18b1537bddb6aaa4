"""Zero-shot classification of a folder of images with a CLIP model and a list of class names.

Prints the top-k classes of every image with their probabilities and writes them to
`results/zero_shot/predictions.json` (and to a CSV on request). The class prompts go through the
model's own tokenizer and the images through its own preprocessing (`cfg.tokenizer`,
`cfg.preprocess`: what `clip.load` read beside the weights, or a training workdir's
`model_config.json`); a model whose tokenizer is unknown is refused, never run on OpenAI's.

  python -m experiments.zero_shot --model ViT-B/32 --images photos/ --classes cat,dog,car
  python -m experiments.zero_shot --model ckpt.pt --images photos/ --classes classes.txt \
      --templates imagenet --top-k 3 --csv predictions.csv
  python -m experiments.zero_shot --model results/train/siglip_small --images photos/ \
      --classes cat,dog
"""
import argparse
import csv
import json
import os

import numpy as np
from tqdm import tqdm

import clip
from clip.eval import zero_shot
from clip.formats import workdirs

IMAGE_EXTENSIONS = ('.bmp', '.gif', '.jpeg', '.jpg', '.png', '.ppm', '.tif', '.tiff', '.webp')


def list_images(folder):
  """Image files directly in `folder`, sorted -> (paths, names of the other entries skipped)."""
  if not os.path.isdir(folder):
    raise ValueError(f'--images {folder!r} is not a folder')
  entries = sorted(os.listdir(folder))
  paths = [os.path.join(folder, e) for e in entries
           if e.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(folder, e))]
  used = set(paths)
  skipped = [e for e in entries if os.path.join(folder, e) not in used]
  if not paths:
    raise ValueError(f'no images in {folder!r} (looked for {", ".join(IMAGE_EXTENSIONS)}; '
                     f'{len(entries)} other entries)')
  return paths, skipped


def read_classes(arg):
  """A comma-separated list, or a file with one class name per line (blank lines ignored)."""
  if os.path.isfile(arg):
    with open(arg, encoding='utf-8') as f:
      names = [line.strip() for line in f]
  else:
    names = [name.strip() for name in arg.split(',')]
  names = [name for name in names if name]
  if not names:
    raise ValueError(f'--classes {arg!r} holds no class names')
  duplicates = sorted({n for n in names if names.count(n) > 1})
  if duplicates:
    raise ValueError(f'--classes names some classes twice: {duplicates}')
  return names


def predict(params, paths, weights_DxC, cfg, k, batch_size):
  """Top-k class indices and probabilities of every image, preprocessed a batch at a time by the
  model's own transform (`clip.preprocess_images(paths, cfg)`). The last batch is padded to full
  size: one compiled shape for the whole folder."""
  size = min(batch_size, len(paths))
  indices, probs = [], []
  for start in tqdm(range(0, len(paths), size), desc='images', unit='batch',
                    disable=len(paths) <= size):
    images = clip.preprocess_images(paths[start:start + size], cfg)
    n = len(images)
    images = np.concatenate([images, np.repeat(images[:1], size - n, axis=0)])
    idx, p = zero_shot.classify(params, images, weights_DxC, cfg, k=k, batch_size=size)
    indices.append(idx[:n])
    probs.append(p[:n])
  return np.concatenate(indices), np.concatenate(probs)


def rows(paths, classnames, indices, probs):
  return [{'image': os.path.basename(path),
           'top': [{'class': classnames[i], 'probability': float(p)} for i, p in zip(idx, prob)]}
          for path, idx, prob in zip(paths, indices, probs)]


def format_table(predictions):
  k = len(predictions[0]['top'])
  cells = [[r['image']] + [f'{t["class"]} {t["probability"]:.3f}' for t in r['top']]
           for r in predictions]
  header = ['image'] + [f'top-{i + 1}' for i in range(k)]
  widths = [max(len(row[c]) for row in cells + [header]) for c in range(k + 1)]
  line = lambda row: '  '.join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip()
  return '\n'.join([line(header), '-' * sum(widths + [2 * k])] + [line(row) for row in cells])


def write_csv(path, predictions):
  k = len(predictions[0]['top'])
  with open(path, 'w', newline='', encoding='utf-8') as f:
    writer = csv.writer(f)
    writer.writerow(['image'] + [f'{x}_{i + 1}' for i in range(k) for x in ('class', 'prob')])
    for r in predictions:
      writer.writerow([r['image']] + [v for t in r['top'] for v in (t['class'],
                                                                    f'{t["probability"]:.6f}')])


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--model', required=True,
                      help='checkpoint file, training workdir, or an official name: '
                      f'{", ".join(clip.MODELS)}')
  parser.add_argument('--tokenizer', default=None,
                      help='the SentencePiece .model of a checkpoint that ships none (a lone '
                      'SigLIP weights file, a big_vision .npz)')
  parser.add_argument('--images', required=True, help='folder of images')
  parser.add_argument('--classes', required=True,
                      help='comma-separated class names, or a file with one per line')
  parser.add_argument('--templates', choices=sorted(zero_shot.TEMPLATES), default='default',
                      help='prompt templates: OpenAI\'s 7 selected ones, or all 80 ImageNet ones')
  parser.add_argument('--top-k', type=int, default=5)
  parser.add_argument('--batch-size', type=int, default=32)
  parser.add_argument('--csv', help='also write the predictions to this CSV file')
  parser.add_argument('--out', default='results/zero_shot')
  args = parser.parse_args(argv)
  if args.top_k < 1 or args.batch_size < 1:
    parser.error(f'--top-k and --batch-size must be >= 1, got {args.top_k} and {args.batch_size}')
  return args


def main(argv=None):
  args = parse_args(argv)
  try:
    classnames = read_classes(args.classes)
    paths, skipped = list_images(args.images)
    params, cfg = workdirs.load_model(args.model, tokenizer=args.tokenizer)
    clip.get_tokenizer(cfg)  # the model's own, or clip.TokenizerError saying how to give it
  except (ValueError, OSError, KeyError) as e:
    raise SystemExit(f'zero_shot: error: {e}') from e
  if skipped:
    print(f'skipped {len(skipped)} entries of {args.images} that are not image files: '
          f'{", ".join(skipped[:10])}{" ..." if len(skipped) > 10 else ""}')
  k = min(args.top_k, len(classnames))
  if k < args.top_k:
    print(f'--top-k {args.top_k} > {len(classnames)} classes: showing {k}')
  templates = zero_shot.TEMPLATES[args.templates]
  weights = zero_shot.classifier_weights(params, classnames, cfg, templates, args.batch_size)
  try:
    indices, probs = predict(params, paths, weights, cfg, k, args.batch_size)
  except (ValueError, OSError) as e:
    raise SystemExit(f'zero_shot: error: {e}') from e
  predictions = rows(paths, classnames, indices, probs)
  print(format_table(predictions))
  os.makedirs(args.out, exist_ok=True)
  out = os.path.join(args.out, 'predictions.json')
  with open(out, 'w', encoding='utf-8') as f:
    json.dump({'model': args.model, 'images': args.images, 'classes': classnames,
               'templates': list(templates), 'predictions': predictions}, f, indent=2)
  print(f'wrote {out}')
  if args.csv:
    write_csv(args.csv, predictions)
    print(f'wrote {args.csv}')
  return predictions


if __name__ == '__main__':
  main()
