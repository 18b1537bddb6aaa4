"""Forward+backward time and per-device memory of the four sharded losses, over device counts and
local batch sizes, on simulated CPU devices.

For each device count n and local batch b (global batch n*b, embedding dim 512, fp32), every loss
from `losses.make_loss` is jitted as `value_and_grad` w.r.t. both embeddings, the scale and the
bias. Memory is `memory_analysis().temp_size_in_bytes` of the compiled program (per device; from
compilation alone, so every size is measured). Time is the median wall time of a step over all
devices, measured where the global batch is at most --max-timed-batch (16384: at 32768 the
all-gather contrastive step needs 8 x 2.7 GiB of temporaries at once). The n simulated devices
share this machine's cores, so times add up over devices and are not those of n real
accelerators: compare the losses with each other at a given (n, b), not across n.

  python -m experiments.bench_losses                  # n in {1,2,4,8}, b in {256,1024,4096}
  python -m experiments.bench_losses --quick          # b in {256,1024}, fewer runs
  python -m experiments.bench_losses --max-timed-batch 32768   # time everything (~22 GB RAM)
"""
from experiments import simulated_devices

# Tests import this module in a session that already has its 8 devices; parse_args checks them.
simulated_devices.simulate_cpu_devices(8, who='bench_losses', jax_imported='keep')

# jax must see XLA_FLAGS before it is imported.
# pylint: disable=g-import-not-at-top,wrong-import-position
import argparse
import json
import os
import platform
import time

import jax
import matplotlib
import numpy as np
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

import losses

matplotlib.use('Agg')  # files only, no display; set before pyplot is imported
from matplotlib import pyplot as plt
# pylint: enable=g-import-not-at-top,wrong-import-position

NAMES = ('contrastive', 'ring_contrastive', 'sigmoid', 'ring_sigmoid')
RING_OF = {'contrastive': 'ring_contrastive', 'sigmoid': 'ring_sigmoid'}


def loss_args(name, mesh, n, b, dim, seed=0):
  """Unit-norm random embeddings, sharded over the mesh, and the trained-init scale (and bias)."""
  rng = np.random.default_rng(seed)
  sharded = NamedSharding(mesh, P('data'))
  pair = []
  for _ in range(2):
    x_NxD = rng.standard_normal((n * b, dim), np.float32)
    pair.append(jax.device_put(x_NxD / np.linalg.norm(x_NxD, axis=1, keepdims=True), sharded))
  scalars = (np.float32(np.log(10.0)), np.float32(-10.0))
  return (*pair, *scalars) if losses.takes_bias(name) else (*pair, scalars[0])


def bench_one(name, n, b, dim, timed, repeats, warmup):
  mesh = Mesh(np.asarray(jax.devices()[:n]), ('data',))
  args = loss_args(name, mesh, n, b, dim)
  step = jax.jit(jax.value_and_grad(losses.make_loss(name, mesh), argnums=tuple(range(len(args)))))
  start = time.perf_counter()
  compiled = step.lower(*args).compile()
  row = {'loss': name, 'devices': n, 'local_batch': b, 'global_batch': n * b, 'dim': dim,
         'compile_s': time.perf_counter() - start,
         'temp_bytes': compiled.memory_analysis().temp_size_in_bytes, 'step_s': None}
  if timed:
    for _ in range(warmup):
      jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(repeats):
      start = time.perf_counter()
      jax.block_until_ready(compiled(*args))
      times.append(time.perf_counter() - start)
    row['step_s'] = float(np.median(times))
  return row


def add_ratios(rows):
  """Ring time and memory over the all-gather version's at the same (n, b)."""
  by_key = {(r['loss'], r['devices'], r['local_batch']): r for r in rows}
  for r in rows:
    ring = by_key.get((RING_OF.get(r['loss']), r['devices'], r['local_batch']))
    if ring is not None:
      ring['mem_vs_allgather'] = ring['temp_bytes'] / r['temp_bytes']
      if ring['step_s'] and r['step_s']:
        ring['time_vs_allgather'] = ring['step_s'] / r['step_s']


def format_table(rows):
  header = (f'{"loss":<17} {"n":>2} {"b":>5} {"global":>6} {"step ms":>9} {"temp MiB":>9} '
            f'{"time/allgather":>14} {"mem/allgather":>13}')
  lines = [header, '-' * len(header)]
  for r in rows:
    step = f'{1e3 * r["step_s"]:9.1f}' if r['step_s'] else f'{"-":>9}'
    ratio_t = f'{r["time_vs_allgather"]:14.2f}' if 'time_vs_allgather' in r else f'{"":>14}'
    ratio_m = f'{r["mem_vs_allgather"]:13.3f}' if 'mem_vs_allgather' in r else f'{"":>13}'
    mib = r['temp_bytes'] / 2**20
    lines.append(f'{r["loss"]:<17} {r["devices"]:>2} {r["local_batch"]:>5} '
                 f'{r["global_batch"]:>6} {step} {mib:9.1f} {ratio_t} {ratio_m}')
  return '\n'.join(lines)


def plot(rows, path):
  batches = sorted({r['local_batch'] for r in rows})
  fig, axes = plt.subplots(2, len(batches), figsize=(4.5 * len(batches), 7), squeeze=False)
  for col, b in enumerate(batches):
    for name in NAMES:
      sel = [r for r in rows if r['loss'] == name and r['local_batch'] == b]
      style = dict(marker='o', linestyle='-' if name.startswith('ring') else '--', label=name)
      timed = [r for r in sel if r['step_s']]
      axes[0, col].plot([r['devices'] for r in timed], [1e3 * r['step_s'] for r in timed], **style)
      axes[1, col].plot([r['devices'] for r in sel], [r['temp_bytes'] / 2**20 for r in sel],
                        **style)
    axes[0, col].set_title(f'local batch {b}')
    axes[0, col].set_ylabel('fwd+bwd step (ms, all devices)')
    axes[1, col].set_ylabel('temp memory per device (MiB)')
    for ax in axes[:, col]:
      ax.set_xscale('log', base=2)
      ax.set_yscale('log')
      ax.set_xlabel('devices n')
      ax.grid(True, which='both', alpha=0.3)
  axes[0, 0].legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--devices', default='1,2,4,8')
  parser.add_argument('--batch-sizes', default='256,1024,4096', help='local batch per device')
  parser.add_argument('--dim', type=int, default=512)
  parser.add_argument('--losses', default=','.join(NAMES))
  parser.add_argument('--max-timed-batch', type=int, default=16384,
                      help='time only where the global batch is at most this; memory is '
                           'measured everywhere')
  parser.add_argument('--repeats', type=int, default=3, help='timed runs per measurement')
  parser.add_argument('--warmup', type=int, default=1, help='untimed runs after compilation')
  parser.add_argument('--quick', action='store_true',
                      help='local batch 256,1024, 2 timed runs, 1 warm-up run')
  parser.add_argument('--out', default='results/bench_losses')
  args = parser.parse_args(argv)
  if args.quick:
    args.batch_sizes, args.repeats, args.warmup = '256,1024', 2, 1
  args.devices = [int(n) for n in args.devices.split(',')]
  args.batch_sizes = [int(b) for b in args.batch_sizes.split(',')]
  args.losses = args.losses.split(',')
  unknown = sorted(set(args.losses) - set(NAMES))
  if unknown:
    parser.error(f'--losses must be among {NAMES}, got {unknown}')
  if max(args.devices) > jax.device_count():
    parser.error(f'--devices up to {jax.device_count()} (simulated), got {max(args.devices)}')
  return args


def main(argv=None):
  args = parse_args(argv)
  configs = [(name, n, b) for b in args.batch_sizes for n in args.devices for name in args.losses]
  rows = []
  for name, n, b in tqdm(configs, desc='losses'):
    rows.append(bench_one(name, n, b, args.dim, n * b <= args.max_timed_batch, args.repeats,
                          args.warmup))
  add_ratios(rows)
  table = format_table(rows)
  print(table)
  os.makedirs(args.out, exist_ok=True)
  result = {'rows': rows, 'repeats': args.repeats, 'warmup': args.warmup, 'dim': args.dim,
            'max_timed_batch': args.max_timed_batch, 'jax': jax.__version__,
            'cpu_count': os.cpu_count(), 'jax_device': str(jax.devices()[0]),
            'machine': platform.machine(), 'xla_flags': os.environ.get('XLA_FLAGS', '')}
  with open(os.path.join(args.out, 'bench_losses.json'), 'w') as f:
    json.dump(result, f, indent=2)
  plot(rows, os.path.join(args.out, 'bench_losses.png'))
  print(f'wrote {os.path.join(args.out, "bench_losses.json")} and bench_losses.png')


if __name__ == '__main__':
  main()
