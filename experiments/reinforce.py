"""Reinforced shards (MobileCLIP's "reinforced data", DataCompDR): a teacher's embeddings of K
random-resized-crop views of every image, and of its caption, written into new shards beside the
originals, so that distillation reads them instead of running the teacher (`data.reinforced`:
the format; `data.shards.Pipeline(..., reinforced=ReinforcedSpec(embed_dim, K))` reads them).

  python -m experiments.reinforce --data 'shards/*.tar' --teacher results/train/small \
      --augmentations 5 --out shards-reinforced/
  python -m experiments.reinforce --data 'shards/{00000..00099}.tfrecord' --teacher ViT-B/32 \
      --augmentations 10 --out dr/ --seed 1 --batch-size 64 --teacher-dtype bfloat16

The teacher is anything `clip.load` takes (a checkpoint file or folder, a training workdir, an
official or Hub name) and is run with its own preprocessing (resolution, mean and std) and its own
tokenizer (truncating captions to its context); one whose tokenizer this package cannot build is
refused before any work. Every record is read, in order; unusable ones are counted, reported and
left out. Writes each shard under its own name into --out, its `.parquet` beside, and
`reinforced.json` (the teacher, `embed_dim`, `augmentations`, the teacher's `logit_scale`, the
crop scale and ratio, the seed, the sources and the record counts).
"""
import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

import clip
from clip import model
from clip.train import distillation
from data import reinforced_writer
from data import shard_files
from data import transforms


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--data', required=True, help='source shards: a glob, a folder or a brace '
                      'range of .tar or .tfrecord files')
  parser.add_argument('--teacher', required=True, help='what clip.load takes: a checkpoint file '
                      'or folder, a training workdir, an official or Hub name')
  parser.add_argument('--augmentations', type=int, required=True, help='K views per image')
  parser.add_argument('--out', required=True, help='folder of the reinforced shards (not the '
                      "sources')")
  parser.add_argument('--overwrite', action='store_true',
                      help='replace the reinforced shards --out holds (refused otherwise)')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--batch-size', type=int, default=64, help='records per teacher call')
  parser.add_argument('--teacher-dtype', default='float32', choices=('float32', 'bfloat16'),
                      help="the teacher's compute dtype (embeddings are stored as float32)")
  parser.add_argument('--scale', type=float, nargs=2, default=transforms.TRAIN_SCALE,
                      help='random-resized-crop area range')
  parser.add_argument('--ratio', type=float, nargs=2, default=transforms.TRAIN_RATIO,
                      help='random-resized-crop aspect-ratio range')
  return parser.parse_args(argv)


@functools.partial(jax.jit, static_argnames=('cfg',))
def _image_embeddings(params, images, cfg):
  return model.l2_normalize(model.encode_image(params, images, cfg))


@functools.partial(jax.jit, static_argnames=('cfg',))
def _text_embeddings(params, tokens, cfg):
  return model.l2_normalize(model.encode_text_jit(params, tokens, cfg))


def _padded(fn, size):
  """`fn` over arrays padded to `size` rows (one compiled shape), its rows for the real ones."""
  def run(x):
    n = len(x)
    pad = np.concatenate([x, np.repeat(x[:1], size - n, 0)]) if n < size else x
    return np.asarray(fn(pad))[:n]
  return run


def embedding_functions(params, cfg, batch_size, augmentations):
  """The teacher's `(embed_images, embed_texts)` for `data.reinforced_writer.write`, L2-normalised,
  each compiled once. Raises clip.TokenizerError, before anything runs, for a tokenizer this
  package cannot build, and ValueError for a model without a text tower."""
  if cfg.text is None:
    raise ValueError('the teacher has no text tower (a captioner): it has no text embedding')
  tokenizer = clip.get_tokenizer(cfg)
  embed_images = _padded(lambda x: _image_embeddings(params, x, cfg), batch_size * augmentations)
  embed_tokens = _padded(lambda t: _text_embeddings(params, t, cfg), batch_size)
  return embed_images, lambda texts: embed_tokens(tokenizer(texts, truncate=True))


def reinforce(params, cfg, data, out, *, augmentations, teacher, seed=0, batch_size=64,
              scale=transforms.TRAIN_SCALE, ratio=transforms.TRAIN_RATIO, progress=True,
              overwrite=False):
  """Writes the reinforced shards of `data` into `out` with the loaded teacher `(params, cfg)`
  (`teacher`: how it was named, for the sidecar). Returns the sidecar dict and the skip stats."""
  embed_images, embed_texts = embedding_functions(params, cfg, batch_size, augmentations)
  info = {'teacher': teacher, 'logit_scale': float(np.asarray(params['logit_scale'])),
          'teacher_dtype': cfg.dtype}
  if 'logit_bias' in params:
    info['logit_bias'] = float(np.asarray(params['logit_bias']))
  return reinforced_writer.write(
      data, out, embed_images, embed_texts, embed_dim=cfg.embed_dim,
      resolution=cfg.image_resolution, preprocess=cfg.preprocess, augmentations=augmentations,
      seed=seed, batch_size=batch_size, scale=scale, ratio=ratio, info=info, progress=progress,
      overwrite=overwrite)


def main(argv=None):
  args = parse_args(argv)
  try:
    reinforced_writer.targets(shard_files.expand_files(args.data), args.out,  # before loading
                              args.overwrite)
    teacher = distillation.Teacher.load(args.teacher, args.teacher_dtype)
    params, cfg = teacher.params, teacher.cfg
    start = time.perf_counter()
    sidecar, stats = reinforce(params, cfg, args.data, args.out,
                               augmentations=args.augmentations, teacher=args.teacher,
                               seed=args.seed, batch_size=args.batch_size, scale=args.scale,
                               ratio=args.ratio, overwrite=args.overwrite)
  except (ValueError, OSError) as e:
    raise SystemExit(f'reinforce: error: {e}') from e
  seconds = time.perf_counter() - start
  print(f'wrote {sidecar["records"]} reinforced records in {len(sidecar["shards"])} shards to '
        f'{args.out} ({sidecar["records"] / seconds:.1f} records/s, K={args.augmentations}, '
        f'E={sidecar["embed_dim"]})')
  if stats.skipped:
    print(f'left out: {stats.summary()}')
  return sidecar


if __name__ == '__main__':
  main()
