"""Inference throughput of `clip.encode_image` / `clip.encode_text` against OpenAI's torch CLIP.

Both run on the same weights (the torch model's state dict, slightly perturbed so that the
zero-initialised biases and BN scales cannot hide a mismatch) and the same inputs, in paired
rounds (one block of torch calls, then one of jax calls); the table gives items per second (median
over the rounds), the ratio jax/torch (median of the per-round ratios, with their range) and the
max relative error of our features against torch's.

  python -m experiments.bench_models --models ViT-B/32,RN50 --batch-sizes 1,16
  python -m experiments.bench_models --quick
"""
import argparse
import json
import os
import platform
import time

import jax
import numpy as np
import torch

import clip
from clip.formats import files
from experiments.references import openai as openai_reference

def seconds(fn):
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def median_seconds(fn, repeats, warmup):
  """Median time of `fn` over `repeats` runs after `warmup` runs."""
  for _ in range(warmup):
    fn()
  return float(np.median([seconds(fn) for _ in range(repeats)]))


def max_rel_err(ours, ref):
  return float(np.abs(ours - ref).max() / np.abs(ref).max())


def bench_tower(tower, jax_fn, torch_fn, batch, rounds, repeats, warmup):
  """Times both frameworks in `rounds` paired rounds and reports the median of the per-round
  ratios with their range: this shared machine's speed drifts by tens of percent within a
  minute, and a pair of blocks run back to back sees the same drift.

  Within a round each framework runs in a block of its own, after one untimed call: torch's
  OpenMP workers spin for a while after each call, so alternating single calls would charge
  their spinning to whichever runs next.
  """
  sync_jax = lambda: jax_fn().block_until_ready()
  with torch.no_grad():
    ours, ref = np.asarray(jax_fn()), torch_fn().numpy()  # jax compiles here
    for _ in range(warmup):
      torch_fn()
      sync_jax()
    t_torch, t_jax = [], []
    for _ in range(rounds):
      t_torch.append(median_seconds(torch_fn, repeats, 1))
      t_jax.append(median_seconds(sync_jax, repeats, 1))
  ratios = np.array(t_torch) / np.array(t_jax)
  return {'tower': tower, 'batch': batch, 'jax_per_s': batch / float(np.median(t_jax)),
          'torch_per_s': batch / float(np.median(t_torch)), 'ratio': float(np.median(ratios)),
          'ratio_min': float(ratios.min()), 'ratio_max': float(ratios.max()),
          'max_rel_err': max_rel_err(ours, ref)}


def bench_model(openai_model, name, batch_sizes, rounds, repeats, warmup):
  cfg = clip.get_config(name)
  m = openai_reference.perturb(openai_reference.build(openai_model, cfg), scale=0.02)
  params = jax.device_put(files.nest({k: v.numpy() for k, v in m.state_dict().items()}))
  rng = np.random.default_rng(0)
  r = cfg.image_resolution
  rows = []
  for batch in batch_sizes:
    images_NxHxWx3 = rng.standard_normal((batch, r, r, 3)).astype(np.float32)
    images_jax = jax.device_put(images_NxHxWx3)
    images_torch = torch.from_numpy(images_NxHxWx3).permute(0, 3, 1, 2).contiguous()
    tokens_NxL = openai_reference.random_tokens(rng, batch, cfg)
    tokens_jax = jax.device_put(tokens_NxL)
    tokens_torch = torch.from_numpy(tokens_NxL).long()
    rows.append(bench_tower('image', lambda: clip.encode_image(params, images_jax, cfg),
                            lambda: m.encode_image(images_torch), batch, rounds, repeats, warmup))
    rows.append(bench_tower('text', lambda: clip.model.encode_text_jit(params, tokens_jax, cfg),
                            lambda: m.encode_text(tokens_torch), batch, rounds, repeats, warmup))
    for row in rows[-2:]:
      row['model'] = name
      print(f'  {name} {row["tower"]} batch {batch}: ratio {row["ratio"]:.2f} '
            f'({row["ratio_min"]:.2f}-{row["ratio_max"]:.2f})', flush=True)
  return rows


def format_table(rows):
  header = f'{"model":<10} {"tower":<6} {"batch":>5} {"jax/s":>9} {"torch/s":>9} ' \
           f'{"jax/torch":>9} {"range":>9} {"max rel err":>11}'
  lines = [header, '-' * len(header)]
  for r in rows:
    lines.append(f'{r["model"]:<10} {r["tower"]:<6} {r["batch"]:>5} {r["jax_per_s"]:>9.2f} '
                 f'{r["torch_per_s"]:>9.2f} {r["ratio"]:>9.2f} '
                 f'{r["ratio_min"]:>4.2f}-{r["ratio_max"]:<4.2f} {r["max_rel_err"]:>11.2e}')
  return '\n'.join(lines)


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--models', default='ViT-B/32,RN50')
  parser.add_argument('--batch-sizes', default='1,16')
  parser.add_argument('--rounds', type=int, default=7, help='paired torch/jax rounds')
  parser.add_argument('--repeats', type=int, default=3, help='timed runs per framework and round')
  parser.add_argument('--warmup', type=int, default=2, help='untimed runs after compilation')
  parser.add_argument('--quick', action='store_true', help='2 rounds of 2 runs, 1 warm-up run')
  parser.add_argument('--out', default='results/bench_models')
  args = parser.parse_args(argv)
  if args.quick:
    args.rounds, args.repeats, args.warmup = 2, 2, 1
  return args


def main(argv=None):
  args = parse_args(argv)
  openai_model = openai_reference.load_module('model')
  batch_sizes = [int(b) for b in args.batch_sizes.split(',')]
  rows = []
  for name in args.models.split(','):
    rows += bench_model(openai_model, name, batch_sizes, args.rounds, args.repeats, args.warmup)
  table = format_table(rows)
  print(table)
  os.makedirs(args.out, exist_ok=True)
  result = {'rows': rows, 'rounds': args.rounds, 'repeats': args.repeats,
            'warmup': args.warmup, 'jax': jax.__version__, 'torch': torch.__version__,
            'torch_threads': torch.get_num_threads(), 'cpu_count': os.cpu_count(),
            'jax_device': str(jax.devices()[0]), 'machine': platform.machine(),
            'xla_flags': os.environ.get('XLA_FLAGS', '')}
  with open(os.path.join(args.out, 'bench_models.json'), 'w') as f:
    json.dump(result, f, indent=2)
  print(f'wrote {os.path.join(args.out, "bench_models.json")}')


if __name__ == '__main__':
  main()
