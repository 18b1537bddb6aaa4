"""Inference throughput of `clip.encode_image` / `clip.encode_text` against OpenAI's torch CLIP.

Both run on the same weights (the torch model's state dict, slightly perturbed so that the
zero-initialised biases and BN scales cannot hide a mismatch) and the same inputs; the table gives
items per second (median of timed runs after warm-up), the ratio jax/torch and the max relative
error of our features against torch's.

  python -m experiments.bench_models --models ViT-B/32,RN50 --batch-sizes 1,16
  python -m experiments.bench_models --quick
"""
import argparse
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np

import clip
from clip import weights

REFERENCE_PACKAGE = 'clip-anytorch==2.6.0'
DEFAULT_REFERENCE_DIR = os.environ.get(
    'CLIP_REFERENCE_DIR',
    os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'tests', '.reference'))


def load_openai_model(reference_dir):
  """OpenAI's `clip/model.py` loaded by path (its import name `clip` collides with ours)."""
  if not os.path.isdir(os.path.join(reference_dir, 'clip')):
    parent = os.path.dirname(os.path.abspath(reference_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix='.reference-')
    subprocess.run([sys.executable, '-m', 'pip', 'install', '-q', '--no-deps', '--target', tmp,
                    REFERENCE_PACKAGE], check=True)
    try:
      os.rename(tmp, reference_dir)
    except OSError:  # installed meanwhile by someone else
      shutil.rmtree(tmp, ignore_errors=True)
  path = os.path.join(reference_dir, 'clip', 'model.py')
  spec = importlib.util.spec_from_file_location('openai_clip_model', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def build_torch_model(openai_model, cfg, seed=0, noise=0.02):
  """OpenAI's CLIP for one of our configs, fp32 eval mode, every float weight perturbed."""
  import torch  # pylint: disable=g-import-not-at-top
  v, t = cfg.vision, cfg.text
  m = openai_model.CLIP(cfg.embed_dim, v.image_resolution, v.layers, v.width, v.patch_size,
                        t.context_length, t.vocab_size, t.width, t.heads, t.layers)
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in m.state_dict().items():
      if p.is_floating_point() and name != 'logit_scale':
        if name.endswith('running_var'):
          p.copy_(0.5 + torch.rand(p.shape, generator=g))
        else:
          p.add_(noise * torch.randn(p.shape, generator=g))
  return m.float().eval()


def random_tokens(rng, n, t):
  """(n, context) int32: SOT, random words, EOT (the largest id) at a random position."""
  tokens = np.zeros((n, t.context_length), np.int32)
  for i in range(n):
    length = rng.integers(2, t.context_length + 1)
    tokens[i, 0] = t.vocab_size - 2
    tokens[i, 1:length - 1] = rng.integers(1, t.vocab_size - 2, length - 2)
    tokens[i, length - 1] = t.vocab_size - 1
  return tokens


def median_seconds(fn, repeats, warmup):
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def max_rel_err(ours, ref):
  return float(np.abs(ours - ref).max() / np.abs(ref).max())


def bench_tower(tower, jax_fn, torch_fn, batch, repeats, warmup):
  import torch  # pylint: disable=g-import-not-at-top
  ours = np.asarray(jax_fn())  # compiles
  with torch.no_grad():
    ref = torch_fn().numpy()
    t_torch = median_seconds(torch_fn, repeats, warmup)
  t_jax = median_seconds(lambda: jax_fn().block_until_ready(), repeats, warmup)
  return {'tower': tower, 'batch': batch, 'jax_per_s': batch / t_jax,
          'torch_per_s': batch / t_torch, 'ratio': t_torch / t_jax,
          'max_rel_err': max_rel_err(ours, ref)}


def bench_model(openai_model, name, batch_sizes, repeats, warmup):
  import torch  # pylint: disable=g-import-not-at-top
  cfg = clip.get_config(name)
  m = build_torch_model(openai_model, cfg)
  params = jax.device_put(weights.nest({k: v.numpy() for k, v in m.state_dict().items()}))
  rng = np.random.default_rng(0)
  r = cfg.image_resolution
  rows = []
  for batch in batch_sizes:
    images_NxHxWx3 = rng.standard_normal((batch, r, r, 3)).astype(np.float32)
    images_jax = jax.device_put(images_NxHxWx3)
    images_torch = torch.from_numpy(images_NxHxWx3).permute(0, 3, 1, 2).contiguous()
    tokens_NxL = random_tokens(rng, batch, cfg.text)
    tokens_jax = jax.device_put(tokens_NxL)
    tokens_torch = torch.from_numpy(tokens_NxL).long()
    rows.append(bench_tower('image', lambda: clip.encode_image(params, images_jax, cfg),
                            lambda: m.encode_image(images_torch), batch, repeats, warmup))
    rows.append(bench_tower('text', lambda: clip.encode_text(params, tokens_jax, cfg),
                            lambda: m.encode_text(tokens_torch), batch, repeats, warmup))
    for row in rows[-2:]:
      row['model'] = name
      print(f'  {name} {row["tower"]} batch {batch}: ratio {row["ratio"]:.2f}', flush=True)
  return rows


def format_table(rows):
  header = f'{"model":<10} {"tower":<6} {"batch":>5} {"jax/s":>9} {"torch/s":>9} ' \
           f'{"jax/torch":>9} {"max rel err":>11}'
  lines = [header, '-' * len(header)]
  for r in rows:
    lines.append(f'{r["model"]:<10} {r["tower"]:<6} {r["batch"]:>5} {r["jax_per_s"]:>9.2f} '
                 f'{r["torch_per_s"]:>9.2f} {r["ratio"]:>9.2f} {r["max_rel_err"]:>11.2e}')
  return '\n'.join(lines)


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--models', default='ViT-B/32,RN50')
  parser.add_argument('--batch-sizes', default='1,16')
  parser.add_argument('--repeats', type=int, default=10, help='timed runs per measurement')
  parser.add_argument('--warmup', type=int, default=2, help='untimed runs after compilation')
  parser.add_argument('--quick', action='store_true', help='3 timed runs, 1 warm-up run')
  parser.add_argument('--reference-dir', default=DEFAULT_REFERENCE_DIR,
                      help=f'where {REFERENCE_PACKAGE} is (installed there if missing)')
  parser.add_argument('--out', default='results/bench_models')
  args = parser.parse_args(argv)
  if args.quick:
    args.repeats, args.warmup = 3, 1
  return args


def main(argv=None):
  import torch  # pylint: disable=g-import-not-at-top
  args = parse_args(argv)
  openai_model = load_openai_model(args.reference_dir)
  batch_sizes = [int(b) for b in args.batch_sizes.split(',')]
  rows = []
  for name in args.models.split(','):
    rows += bench_model(openai_model, name, batch_sizes, args.repeats, args.warmup)
  table = format_table(rows)
  print(table)
  os.makedirs(args.out, exist_ok=True)
  result = {'rows': rows, 'repeats': args.repeats, 'warmup': args.warmup,
            'jax': jax.__version__, 'torch': torch.__version__,
            'torch_threads': torch.get_num_threads(), 'cpu_count': os.cpu_count(),
            'jax_device': str(jax.devices()[0]), 'machine': platform.machine()}
  with open(os.path.join(args.out, 'bench_models.json'), 'w') as f:
    json.dump(result, f, indent=2)
  print(f'wrote {os.path.join(args.out, "bench_models.json")}')


if __name__ == '__main__':
  main()
