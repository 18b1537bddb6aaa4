"""CPU collectives between two processes (gloo): all-reduce time before and after a small
reduce-scatter, and whether each result is right.

Why: the two-process CPU training run (tests/experiments/test_train_job.py) takes ~14 s a step where one
process with the same eight devices takes ~0.1 s. The cause is below our code, in jaxlib's gloo
collectives: after a process has run a small reduce-scatter (like the backward of an all-gather
loss on the embeddings), its large all-reduces (like the gradient of a replicated token
embedding) run ~100x slower, in time linear in their size, until a large reduce-scatter runs. This
script measures that in isolation, so it can be rechecked on each jaxlib upgrade.

It starts two worker processes on localhost, each with --local-devices simulated CPU devices, on
one mesh over all of them: all-reduces of each size (floats per device), then one reduce-scatter
of --scatter-size floats per device, then the same all-reduces again (the same compiled programs);
the median of --repeats timed calls after one warm-up call. Every device contributes its global
index + 1, so every reduced element must equal the known total: each result is checked on both
processes.

  python -m experiments.bench_gloo                  # 2^16, 2^18, 2^20 floats per device
  python -m experiments.bench_gloo --quick          # 2^14, 2^16, 2^18; 2 timed runs
"""
import argparse
import json
import os
import platform
import sys
import time

import matplotlib
import numpy as np

from experiments import local_processes
from experiments import simulated_devices

matplotlib.use('Agg')  # files only, no display; set before pyplot is imported
from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position

PHASES = ('all_reduce_fresh', 'reduce_scatter', 'all_reduce_after')


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--sizes', default='65536,262144,1048576', help='floats per device')
  parser.add_argument('--scatter-size', type=int, default=1024,
                      help='floats per device of the reduce-scatter between the two rounds')
  parser.add_argument('--local-devices', type=int, default=2, help='CPU devices per process')
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--timeout', type=int, default=600, help='seconds for the workers')
  parser.add_argument('--quick', action='store_true', help='sizes 2^14, 2^16, 2^18; 2 timed runs')
  parser.add_argument('--out', default='results/bench_gloo')
  # Internal: how the parent starts each worker.
  parser.add_argument('--worker', type=int, default=None, help=argparse.SUPPRESS)
  parser.add_argument('--port', type=int, default=None, help=argparse.SUPPRESS)
  parser.add_argument('--worker-out', default=None, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.quick:
    args.sizes, args.repeats = '16384,65536,262144', 2
  args.sizes = [int(s) for s in args.sizes.split(',')]
  if min(args.local_devices, args.scatter_size, *args.sizes) < 1:
    parser.error('--local-devices, --scatter-size and --sizes must be >= 1, got '
                 f'{args.local_devices}, {args.scatter_size} and {args.sizes}')
  devices = 2 * args.local_devices
  if args.scatter_size % devices:
    parser.error(f'--scatter-size must be divisible by the {devices} devices it is scattered '
                 f'over, got {args.scatter_size}')
  return args


def run_worker(args):
  """One of the two processes: times and checks the collectives, writes its rows as JSON."""
  simulated_devices.simulate_cpu_devices(args.local_devices, who='bench_gloo worker')
  # jax only now: XLA reads the device count at import.
  # pylint: disable=g-import-not-at-top
  import jax
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  jax.distributed.initialize(coordinator_address=f'127.0.0.1:{args.port}', num_processes=2,
                             process_id=args.worker)
  mesh = Mesh(np.array(jax.devices()), ('d',))
  devices = mesh.size
  total = devices * (devices + 1) / 2  # each device contributes its index + 1
  all_reduce = jax.jit(jax.shard_map(lambda x: jax.lax.psum(x, 'd'), mesh=mesh,
                                     in_specs=P('d'), out_specs=P()))
  reduce_scatter = jax.jit(jax.shard_map(lambda x: jax.lax.psum_scatter(x, 'd', tiled=True),
                                         mesh=mesh, in_specs=P('d'), out_specs=P('d')))
  first = args.worker * args.local_devices

  def inputs(size):
    local = np.repeat(np.arange(first + 1, first + args.local_devices + 1, dtype=np.float32),
                      size)
    return jax.make_array_from_process_local_data(NamedSharding(mesh, P('d')), local)

  def measure(program, size):
    x = inputs(size)
    out = jax.block_until_ready(program(x))
    times = []
    for _ in range(args.repeats):
      tick = time.perf_counter()
      out = jax.block_until_ready(program(x))
      times.append(time.perf_counter() - tick)
    correct = all(bool(np.all(np.asarray(s.data) == total)) for s in out.addressable_shards)
    return float(np.median(times)), correct

  rows = []
  runs = {'all_reduce_fresh': (all_reduce, args.sizes),
          'reduce_scatter': (reduce_scatter, [args.scatter_size]),
          'all_reduce_after': (all_reduce, args.sizes)}
  for phase in PHASES:
    program, sizes = runs[phase]
    for size in sizes:
      seconds, correct = measure(program, size)
      rows.append({'phase': phase, 'floats_per_device': size, 'seconds': seconds,
                   'correct': correct})
  with open(args.worker_out, 'w') as f:
    json.dump(rows, f)


def run_workers(args):
  """Both workers' rows: the timings of process 0, `correct` only where both processes agree."""
  port = local_processes.free_port()
  os.makedirs(args.out, exist_ok=True)
  outs = [os.path.join(args.out, f'worker{i}.json') for i in range(2)]
  cmd = [sys.executable, '-m', 'experiments.bench_gloo', '--port', str(port),
         '--local-devices', str(args.local_devices), '--repeats', str(args.repeats),
         '--sizes', ','.join(map(str, args.sizes)), '--scatter-size', str(args.scatter_size)]
  rows = local_processes.run_workers(
      [cmd + ['--worker', str(i), '--worker-out', outs[i]] for i in range(2)], outs, args.timeout)
  for row, other in zip(*rows):
    row['correct'] = row['correct'] and other['correct']
  return rows[0]


def format_table(rows, sizes):
  by = {(r['phase'], r['floats_per_device']): r for r in rows}
  scatter, = (r for r in rows if r['phase'] == 'reduce_scatter')
  lines = [f'all-reduce of fp32 floats per device, before and after one reduce-scatter of '
           f'{scatter["floats_per_device"]} ({scatter["seconds"]:.4f} s, '
           f'{"right" if scatter["correct"] else "WRONG"})',
           '| floats/device | before | after | after/before | results right |',
           '|---:|---:|---:|---:|:---:|']
  for size in sizes:
    before, after = by[('all_reduce_fresh', size)], by[('all_reduce_after', size)]
    right = before['correct'] and after['correct']
    lines.append(f'| {size} | {before["seconds"]:.4f} s | {after["seconds"]:.4f} s '
                 f'| {after["seconds"] / before["seconds"]:.1f}x | {"yes" if right else "NO"} |')
  return '\n'.join(lines)


def plot(rows, path):
  fig, ax = plt.subplots(figsize=(5.5, 4))
  for phase, label in (('all_reduce_fresh', 'all-reduce before'),
                       ('all_reduce_after', 'all-reduce after a small reduce-scatter')):
    sel = sorted((r for r in rows if r['phase'] == phase), key=lambda r: r['floats_per_device'])
    ax.plot([r['floats_per_device'] for r in sel], [r['seconds'] for r in sel], marker='o',
            label=label)
  ax.set_xscale('log', base=2)
  ax.set_yscale('log')
  ax.set_xlabel('fp32 elements per device')
  ax.set_ylabel('seconds per call (median)')
  ax.set_title('CPU collectives (gloo), 2 processes')
  ax.grid(True, which='both', alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv=None):
  args = parse_args(argv)
  if args.worker is not None:
    run_worker(args)
    return
  rows = run_workers(args)
  print(format_table(rows, args.sizes))
  # Local: jax must not be imported before a worker's run_worker sets its device count.
  import jax  # pylint: disable=g-import-not-at-top
  result = {'rows': rows, 'local_devices': args.local_devices, 'processes': 2,
            'repeats': args.repeats, 'jax': jax.__version__, 'cpu_count': os.cpu_count(),
            'machine': platform.machine()}
  with open(os.path.join(args.out, 'bench_gloo.json'), 'w') as f:
    json.dump(result, f, indent=2)
  plot(rows, os.path.join(args.out, 'bench_gloo.png'))
  print(f'wrote {os.path.join(args.out, "bench_gloo.json")} and bench_gloo.png')


if __name__ == '__main__':
  main()
