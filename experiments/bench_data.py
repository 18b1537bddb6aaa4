"""Input pipeline throughput beside the training throughput of small ViTs on the same machine.

Measures, in images per second:
- the built-in synthetic generator (`data.synthetic`, numpy, one thread) at several resolutions;
- the shards pipeline (`data.shards.Pipeline`) on img2dataset shards of 256px JPEGs, tfrecords
  and webdataset tars of the same images (written here from the synthetic set, plain and with
  photo-like noise) -> 224 crop, training (random resized crop) and eval (OpenAI's resize +
  centre crop), with the real BPE tokenizer; also the process CPU time per image, which is what
  a machine with more cores divides;
- `clip.encode_image` forward + backward (jitted, fp32) of small ViT image towers at 224px, i.e.
  how fast training could consume images here.

  python -m experiments.bench_data
  python -m experiments.bench_data --quick
"""
import argparse
import functools
import json
import os
import platform
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import tensorflow as tf

import clip
from data import shards
from data import synthetic

VITS = {  # name -> (width, layers, heads, patch)
    'ViT-Ti/32': (192, 12, 3, 32),
    'ViT-S/32': (384, 12, 6, 32),
    'ViT-B/32': (768, 12, 12, 32),
}


def bench_synthetic(resolutions, n):
  rows = []
  for r in resolutions:
    ds = synthetic.SyntheticCaptions(seed=0, resolution=r)
    ds.batch(64)  # warm-up (texture tables)
    start, cpu = time.perf_counter(), time.process_time()
    ds.batch(n, step=1)
    rows.append({'what': f'synthetic generator {r}px',
                 'images_per_s': n / (time.perf_counter() - start),
                 'cpu_ms_per_image': 1000 * (time.process_time() - cpu) / n})
    print(f'  synthetic {r}px: {rows[-1]["images_per_s"]:.0f} images/s', flush=True)
  return rows


class NoisySynthetic(synthetic.SyntheticCaptions):
  """The synthetic images with Gaussian noise (sigma 8): JPEGs as large and as slow to decode
  as photographs (flat drawings compress unrealistically well)."""

  def get(self, indices):
    out = super().get(indices)
    rng = np.random.default_rng(int(np.asarray(indices).reshape(-1)[0]))
    noisy = out['image'] + rng.normal(0, 8, out['image'].shape)
    out['image'] = np.clip(noisy, 0, 255).astype(np.uint8)
    return out


FORMATS = ('tfrecord', 'webdataset')
# The pipeline reads as a ViT-B at 224px of OpenAI's would: its BPE at 77 tokens, its resize,
# centre crop, mean and std.
TOKENIZE = functools.partial(clip.tokenize, context_length=77, truncate=True)
PREPROCESS = clip.PreprocessConfig()


def write_shards(out_dir, kind, fmt, n, num_shards):
  """The same n JPEGs in either format: the shard paths and their bytes per image."""
  ds = (NoisySynthetic if kind == 'noisy' else synthetic.SyntheticCaptions)(seed=0,
                                                                            resolution=256)
  write = ds.write_tfrecords if fmt == 'tfrecord' else ds.write_webdataset
  paths = write(out_dir, num_examples=n, num_shards=num_shards, image_format='jpg', quality=95)
  return paths, sum(os.path.getsize(p) for p in paths) / n


def bench_pipeline(files, train, batch, max_batches, shuffle_buffer):
  """Images/s and process CPU ms per image of one pass, after the first batch (graph build,
  shuffle buffer fill)."""
  p = shards.Pipeline(files, global_batch_size=batch, resolution=224, train=train,
                      tokenize=TOKENIZE, preprocess=PREPROCESS, shuffle_buffer=shuffle_buffer,
                      num_epochs=1, process_index=0, process_count=1)
  it = iter(p)
  next(it)
  n, start, cpu = 0, time.perf_counter(), time.process_time()
  for _, b in zip(range(max_batches), it):
    n += len(b['image'])
  wall, cpu = time.perf_counter() - start, time.process_time() - cpu
  return {'images_per_s': n / wall, 'cpu_ms_per_image': 1000 * cpu / n, 'images': n}


def bench_format(files, kind, fmt, bytes_per_image, args):
  """The pipeline's training and evaluation rows on one format's shards."""
  rows = []
  for train in (True, False):
    # A buffer smaller than the shards, as in real training: one that holds them all (the
    # default 10_000) reads everything before the untimed first batch, so the training rows
    # would time no reading at all.
    row = bench_pipeline(files, train, args.batch, args.images // args.batch,
                         shuffle_buffer=args.images // 4)
    mode = 'train: random resized crop' if train else 'eval: resize + centre crop'
    row['what'] = (f'{fmt} pipeline, 256px JPEG ({kind}, {bytes_per_image / 1024:.0f} KB/image) '
                   f'-> 224, {mode}')
    row['format'] = fmt
    rows.append(row)
    print(f'  {row["what"]}: {row["images_per_s"]:.0f} images/s', flush=True)
  return rows


def bench_vit(name, batch, repeats):
  width, layers, heads, patch = VITS[name]
  cfg = clip.CLIPConfig(512, clip.VisionConfig('vit', width, layers, heads, 224, patch),
                        clip.TextConfig(256, 1, 4, 16))
  params = clip.init(jax.random.PRNGKey(0), cfg)
  images = jnp.asarray(np.random.default_rng(0).standard_normal((batch, 224, 224, 3)),
                       jnp.float32)
  loss = lambda p, x: jnp.mean(jnp.square(clip.encode_image(p, x, cfg)))
  step = jax.jit(jax.value_and_grad(loss))
  jax.block_until_ready(step(params, images))  # compile
  times, cpu = [], time.process_time()
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(step(params, images))
    times.append(time.perf_counter() - start)
  cpu = time.process_time() - cpu
  return {'what': f'{name} encode_image fwd+bwd, batch {batch}',
          'images_per_s': batch / float(np.median(times)),
          'cpu_ms_per_image': 1000 * cpu / (batch * repeats)}


def format_table(rows):
  """Images/s of the run, and CPU ms per image (all threads), which contention on a shared
  machine changes much less than wall-clock rates."""
  w = max(len(r['what']) for r in rows)
  header = f'{"what":<{w}} {"images/s":>9} {"CPU ms/image":>12}'
  lines = [header, '-' * len(header)]
  for r in rows:
    cpu = f'{r["cpu_ms_per_image"]:.2f}' if 'cpu_ms_per_image' in r else ''
    lines.append(f'{r["what"]:<{w}} {r["images_per_s"]:>9.1f} {cpu:>12}')
  return '\n'.join(lines)


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--images', type=int, default=4096, help='images in the shards')
  parser.add_argument('--formats', default=','.join(FORMATS), help='shard formats to read')
  parser.add_argument('--shards', type=int, default=8)
  parser.add_argument('--batch', type=int, default=256, help='pipeline batch size')
  parser.add_argument('--vits', default='ViT-Ti/32,ViT-S/32,ViT-B/32')
  parser.add_argument('--vit-batch', type=int, default=32)
  parser.add_argument('--repeats', type=int, default=3, help='timed ViT steps')
  parser.add_argument('--quick', action='store_true', help='1024 images, ViT-Ti/32 only')
  parser.add_argument('--out', default='results/bench_data')
  args = parser.parse_args(argv)
  unknown = set(args.formats.split(',')) - set(FORMATS)
  if unknown:
    parser.error(f'--formats must be among {FORMATS}, got {sorted(unknown)}')
  if args.quick:
    args.images, args.vits, args.repeats = 1024, 'ViT-Ti/32', 2
  return args


def main(argv=None):
  args = parse_args(argv)
  load = os.getloadavg()
  rows = bench_synthetic((64, 128, 224), n=1024)
  shard_bytes = {}
  with tempfile.TemporaryDirectory() as tmp:
    for kind in ('shapes', 'noisy'):
      shard_bytes[kind] = {}
      for fmt in args.formats.split(','):
        files, shard_bytes[kind][fmt] = write_shards(os.path.join(tmp, kind, fmt), kind, fmt,
                                                     args.images, args.shards)
        rows += bench_format(files, kind, fmt, shard_bytes[kind][fmt], args)
  for name in args.vits.split(','):
    rows.append(bench_vit(name, args.vit_batch, args.repeats))
    print(f'  {rows[-1]["what"]}: {rows[-1]["images_per_s"]:.1f} images/s', flush=True)
  table = format_table(rows)
  print(table)
  os.makedirs(args.out, exist_ok=True)
  result = {'rows': rows, 'args': vars(args), 'cpu_count': os.cpu_count(),
            'load_average_at_start': load, 'machine': platform.machine(),
            'jax': jax.__version__, 'tensorflow': tf.__version__,
            'jax_device': str(jax.devices()[0]), 'shard_bytes_per_image': shard_bytes}
  path = os.path.join(args.out, 'bench_data.json')
  with open(path, 'w') as f:
    json.dump(result, f, indent=2)
  print(f'wrote {path}')


if __name__ == '__main__':
  main()
