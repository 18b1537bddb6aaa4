"""Checkpoint cost: each process's peak host memory during a save, and step time with saves.

The train-state store (`clip/train/state_store.py`, orbax-checkpoint) against the store it replaced,
reproduced here as `pre_orbax_save` (every leaf all-gathered to every process, process 0 writing
one `.npz`):

1. Memory. Two localhost processes x --local-devices simulated CPU devices hold a train-state-like
   tree (params and AdamW's two moments, --state-mib in all, each leaf split along its first axis
   over an ('fsdp',) mesh of every device). Each method saves once in a fresh pair of processes
   (peak RSS only grows). Per process: its resident memory once the state is made (the baseline;
   on a CPU the devices' memory is host memory, so it holds this process's share) and its peak
   during the save, from the kernel's high-water mark (VmHWM, reset through /proc/self/clear_refs
   just before) and cross-checked by polling VmRSS every 5 ms. Both processes then read the
   checkpoint back and compare their shards with the live state.
2. Step time. One process x --devices simulated devices trains --config (the real train step,
   `clip.train.training.setup`, on an FSDP mesh) for --steps steps, --rounds times in turn: with
   no saves, with an orbax save every --save-every steps written in the background (the main
   job's way) and with the same saves synchronous. Per mode, the medians over rounds of: ms per
   step over the whole run (save calls and the final wait included), ms of the step itself (saves
   excluded: what a save in flight costs the steps beside it), how long each `save()` call holds
   the loop, and the wait at the end for the last save.

  python -m experiments.bench_checkpoint                 # 1.5 GiB state; the small config
  python -m experiments.bench_checkpoint --quick         # 256 MiB; the tiny config

Linux only (/proc); the memory part needs about 4 x --state-mib of free memory.
"""
import argparse
import dataclasses
import importlib
from importlib import metadata
import json
import os
import platform
import shutil
import sys
import tempfile
import threading
import time

import matplotlib
import numpy as np

from experiments import local_processes
from experiments import simulated_devices

matplotlib.use('Agg')  # files only, no display; set before pyplot is imported
from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position

METHODS = ('pre_orbax', 'orbax')
MODES = ('none', 'async', 'sync')
MIB = 2 ** 20
_COLS = 1024  # float32 columns of every state leaf: 4 KiB rows
_COUNTS = ('state_mib', 'leaf_mib', 'local_devices', 'batch', 'devices', 'steps', 'save_every',
           'rounds')  # the flags that size a run, passed on to its workers


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--state-mib', type=int, default=1536, help='the whole state, MiB')
  parser.add_argument('--leaf-mib', type=int, default=32, help='the size of each state leaf, MiB')
  parser.add_argument('--local-devices', type=int, default=4, help='CPU devices per process')
  parser.add_argument('--config', default='small', help='experiments/configs module of part 2')
  parser.add_argument('--batch', type=int, default=32)
  parser.add_argument('--devices', type=int, default=8, help='simulated CPU devices of part 2')
  parser.add_argument('--steps', type=int, default=12, help='timed steps per mode and round')
  parser.add_argument('--save-every', type=int, default=4)
  parser.add_argument('--rounds', type=int, default=2)
  parser.add_argument('--parts', default='memory,steps', help='memory and/or steps')
  parser.add_argument('--quick', action='store_true',
                      help='256 MiB state of 8 MiB leaves; tiny config, 8 steps, 1 round')
  parser.add_argument('--timeout', type=int, default=600, help='seconds for each worker')
  parser.add_argument('--tmp', default=None, help='where checkpoints are written (then removed)')
  parser.add_argument('--out', default='results/bench_checkpoint')
  # Internal: how the parent starts each worker.
  parser.add_argument('--worker', choices=('memory', 'steps'), default=None,
                      help=argparse.SUPPRESS)
  parser.add_argument('--method', choices=METHODS, default=None, help=argparse.SUPPRESS)
  parser.add_argument('--process', type=int, default=None, help=argparse.SUPPRESS)
  parser.add_argument('--port', type=int, default=None, help=argparse.SUPPRESS)
  parser.add_argument('--ckpt-dir', default=None, help=argparse.SUPPRESS)
  parser.add_argument('--worker-out', default=None, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.quick:
    args.state_mib, args.leaf_mib, args.config, args.steps, args.save_every, args.rounds = (
        256, 8, 'tiny', 8, 4, 1)
  args.parts = args.parts.split(',')
  check_args(parser, args)
  return args


def check_args(parser, args):
  if not set(args.parts) <= {'memory', 'steps'} or not args.parts:
    parser.error(f'--parts takes memory and/or steps, got {",".join(args.parts)}')
  counts = {name: getattr(args, name) for name in _COUNTS}
  if min(counts.values()) < 1:
    parser.error(f'every count must be >= 1, got {counts}')
  if args.state_mib < 3 * args.leaf_mib:
    parser.error(f'--state-mib must hold at least 3 leaves (params and two moments) of '
                 f'--leaf-mib {args.leaf_mib}, got {args.state_mib}')
  if (args.leaf_mib * MIB // (4 * _COLS)) % (2 * args.local_devices):
    parser.error(f'a leaf of {args.leaf_mib} MiB has {args.leaf_mib * MIB // (4 * _COLS)} rows, '
                 f'not divisible by the {2 * args.local_devices} devices it is split over')
  if args.save_every > args.steps:
    parser.error(f'--save-every {args.save_every} saves nothing in --steps {args.steps}')


# Resident memory, from the kernel.

def _status_bytes(field):
  """A memory field of /proc/self/status (VmRSS, VmHWM) in bytes."""
  with open('/proc/self/status') as f:
    for line in f:
      if line.startswith(field + ':'):
        return int(line.split()[1]) * 1024  # the kernel gives kB
  raise RuntimeError(f'/proc/self/status has no {field}')


class PeakRss:
  """Inside `with PeakRss() as peak:`, this process's resident bytes are watched: on exit,
  `peak.hwm` is the kernel's high-water mark since entry (VmHWM, reset on entry by writing 5 to
  /proc/self/clear_refs; None where the kernel refuses) and `peak.polled` the largest VmRSS
  polled every `interval_s` seconds from a thread (a lower bound of the true peak)."""

  def __init__(self, interval_s=0.005):
    self.interval_s = interval_s
    self.hwm = self.polled = None
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._poll, daemon=True)
    self._reset = False

  def __enter__(self):
    try:
      with open('/proc/self/clear_refs', 'w') as f:
        f.write('5')  # resets the peak resident set size (Linux >= 4.0)
      self._reset = True
    except OSError:
      self._reset = False
    self.polled = _status_bytes('VmRSS')
    self._thread.start()
    return self

  def _poll(self):
    while not self._stop.wait(self.interval_s):
      self.polled = max(self.polled, _status_bytes('VmRSS'))

  def __exit__(self, *exc):
    self._stop.set()
    self._thread.join()
    self.polled = max(self.polled, _status_bytes('VmRSS'))
    self.hwm = _status_bytes('VmHWM') if self._reset else None


# Part 1: memory, two processes.

def make_state(mesh, state_bytes, leaf_bytes):
  """A train-state-like tree made already sharded: `{'params', 'opt': {'mu', 'nu'}}` of float32
  (rows, 1024) leaves of `leaf_bytes`, `state_bytes` in all, each split along its rows over the
  mesh's 'fsdp' axis, and a replicated int32 'step'. Values are random (incompressible)."""
  import jax  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top
  rows, count = leaf_bytes // (4 * _COLS), state_bytes // (3 * leaf_bytes)

  def group(key):
    return {f'w{i:03d}': jax.random.uniform(jax.random.fold_in(key, i), (rows, _COLS))
            for i in range(count)}

  def init(key):
    keys = jax.random.split(key, 3)
    return {'params': group(keys[0]), 'opt': {'mu': group(keys[1]), 'nu': group(keys[2])},
            'step': jax.numpy.zeros((), jax.numpy.int32)}
  abstract = jax.eval_shape(init, jax.random.PRNGKey(0))
  shardings = jax.tree.map(
      lambda leaf: NamedSharding(mesh, P('fsdp') if leaf.ndim else P()), abstract)
  state = jax.jit(init, out_shardings=shardings)(jax.random.PRNGKey(0))
  return jax.block_until_ready(state), abstract, shardings


def pre_orbax_save(directory, step, state):
  """The store before orbax (`clip/train/state_store.save` at git 7772829), for reference: every
  leaf all-gathered to every process (`process_allgather(tiled=True)`), then process 0 writes
  them as one `.npz` into a temporary folder renamed into place; all processes wait for it.
  Returns the .npz's path."""
  import jax  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  flat, _ = jax.tree_util.tree_flatten_with_path(state)
  leaves = {jax.tree_util.keystr(path): np.asarray(multihost_utils.process_allgather(
      leaf, tiled=True)) for path, leaf in flat}
  final = os.path.join(directory, f'step_{step:08d}')
  if jax.process_index() == 0:
    tmp = tempfile.mkdtemp(dir=directory, prefix='.tmp-')
    with open(os.path.join(tmp, 'state.npz'), 'wb') as f:
      np.savez(f, **leaves)
    os.rename(tmp, final)
  multihost_utils.sync_global_devices(f'checkpoint {step}')
  return os.path.join(final, 'state.npz')


def shards_equal(stored, live):
  """Whether every shard this process holds of `live` (a jax.Array) equals that slice of
  `stored` (a numpy array of the global shape, or a jax.Array of the same sharding)."""
  if isinstance(stored, np.ndarray):
    return all(np.array_equal(stored[s.index], np.asarray(s.data)) for s in live.addressable_shards)
  return all(np.array_equal(np.asarray(a.data), np.asarray(b.data))
             for a, b in zip(stored.addressable_shards, live.addressable_shards))


def save_and_check(method, directory, state, abstract, shardings):
  """Saves `state` by `method` inside a `PeakRss`; returns (peak, times in s, whether what was
  written reads back equal to this process's shards)."""
  import jax  # pylint: disable=g-import-not-at-top
  from clip.train import state_store  # pylint: disable=g-import-not-at-top
  store = state_store.Store(directory, keep=1) if method == 'orbax' else None
  start = time.perf_counter()
  with PeakRss() as peak:
    if method == 'orbax':
      store.save(1, state, {'data_position': 1})
      blocked = time.perf_counter() - start
      store.wait()
    else:
      path = pre_orbax_save(directory, 1, state)
      blocked = time.perf_counter() - start
  times = {'save_blocks_s': blocked, 'save_total_s': time.perf_counter() - start}
  if method == 'orbax':
    restored, _ = store.restore(abstract, shardings)
    store.close()
    equal = all(jax.tree.leaves(jax.tree.map(shards_equal, restored, state)))
  else:
    flat, _ = jax.tree_util.tree_flatten_with_path(state)
    with np.load(path, allow_pickle=False) as stored:  # one leaf read at a time
      equal = all(shards_equal(stored[jax.tree_util.keystr(p)], leaf) for p, leaf in flat)
  return peak, times, equal


def run_memory_worker(args):
  """One process of a pair: makes the state, saves it once by `args.method`, writes its row."""
  simulated_devices.simulate_cpu_devices(args.local_devices, who='bench_checkpoint worker')
  import jax  # pylint: disable=g-import-not-at-top
  jax.distributed.initialize(coordinator_address=f'127.0.0.1:{args.port}', num_processes=2,
                             process_id=args.process)
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ('fsdp',))
  state, abstract, shardings = make_state(mesh, args.state_mib * MIB, args.leaf_mib * MIB)
  time.sleep(0.5)  # let the allocator settle before the baseline
  baseline = _status_bytes('VmRSS')
  peak, times, equal = save_and_check(args.method, args.ckpt_dir, state, abstract, shardings)
  row = {'method': args.method, 'process': args.process, 'baseline_bytes': baseline,
         'peak_hwm_bytes': peak.hwm, 'peak_polled_bytes': peak.polled,
         'share_bytes': sum(s.data.nbytes for leaf in jax.tree.leaves(state)
                            for s in leaf.addressable_shards),
         'state_bytes': sum(leaf.nbytes for leaf in jax.tree.leaves(state)),
         'leaf_bytes': args.leaf_mib * MIB, 'checkpoint_equal': equal, **times,
         'jax': jax.__version__, 'devices': jax.device_count()}
  with open(args.worker_out, 'w') as f:
    json.dump(row, f)


# Part 2: step time, one process.

def timed_run(train_step, state, batch, store, args):
  """Runs `args.steps` steps, saving to `store` (None: never) after step 1 and every
  `args.save_every` steps after it (so that steps follow each save in the timed window, as in a
  run), then waits for the last save; returns (state, figures in ms)."""
  import jax  # pylint: disable=g-import-not-at-top
  step_ms, save_ms = [], []
  start = time.perf_counter()
  for i in range(1, args.steps + 1):
    tick = time.perf_counter()
    state, metrics = train_step(state, batch)
    jax.block_until_ready(metrics)
    step_ms.append(1e3 * (time.perf_counter() - tick))
    if store is not None and (i - 1) % args.save_every == 0:
      tick = time.perf_counter()
      store.save(int(state['step']), state, {'data_position': i})
      save_ms.append(1e3 * (time.perf_counter() - tick))
  tick = time.perf_counter()
  if store is not None:
    store.wait()
  wait_ms = 1e3 * (time.perf_counter() - tick)
  return state, {'ms_per_step': 1e3 * (time.perf_counter() - start) / args.steps,
                 'step_ms': float(np.mean(step_ms)),
                 'save_blocks_ms': float(np.median(save_ms)) if save_ms else 0.0,
                 'final_wait_ms': wait_ms, 'saves': len(save_ms)}


def train_setup(args):
  """(state, train_step, batch, params in millions) of `args.config` on an FSDP mesh."""
  # pylint: disable=g-import-not-at-top
  from clip import sharding
  from clip.train import training
  from experiments.references import openai as openai_reference
  experiment = importlib.import_module(f'experiments.configs.{args.config}').get_config(
      f'batch={args.batch}')
  cfg, tcfg = experiment.model, dataclasses.replace(experiment.train, mesh=(1, args.devices, 1))
  mesh = sharding.make_mesh(*tcfg.mesh)
  state, train_step, _, _, _ = training.setup(cfg, tcfg, mesh)
  rng = np.random.default_rng(0)
  r = cfg.image_resolution
  batch = training.global_batch(mesh, {
      'image': rng.standard_normal((args.batch, r, r, 3)).astype(np.float32),
      'tokens': openai_reference.random_tokens(rng, args.batch, cfg)})
  return state, train_step, batch, training.param_count(state['params']) / 1e6


def run_steps_worker(args):
  """Times the modes in turn, `args.rounds` times, after a warm-up; writes the rows."""
  simulated_devices.simulate_cpu_devices(args.devices, who='bench_checkpoint worker')
  import jax  # pylint: disable=g-import-not-at-top
  from clip.train import state_store  # pylint: disable=g-import-not-at-top
  state, train_step, batch, params_m = train_setup(args)
  for _ in range(2):  # compiles, then one step more
    state, metrics = train_step(state, batch)
    jax.block_until_ready(metrics)
  state_bytes = sum(leaf.nbytes for leaf in jax.tree.leaves(state))
  rows = []
  for r in range(args.rounds):
    for mode in MODES:
      store = None if mode == 'none' else state_store.Store(
          os.path.join(args.ckpt_dir, f'{mode}{r}'), keep=2, async_save=mode == 'async')
      if store is not None:  # the manager's first save (folders, threads) is not timed
        store.save(int(state['step']), state)
        store.wait()
      state, figures = timed_run(train_step, state, batch, store, args)
      if store is not None:
        store.close()
      rows.append({'mode': mode, 'round': r, **figures})
  with open(args.worker_out, 'w') as f:
    json.dump({'rows': rows, 'params_m': params_m, 'state_bytes': state_bytes,
               'jax': jax.__version__, 'devices': jax.device_count()}, f)


# The parent: starts the workers, prints and writes the results.

def worker_cmd(args, *extra):
  sizes = [f'--{name.replace("_", "-")}={getattr(args, name)}' for name in _COUNTS + ('config',)]
  return [sys.executable, '-m', 'experiments.bench_checkpoint', *sizes, *extra]


def measure_memory(args, tmp):
  """Each method in a fresh pair of processes: both processes' rows."""
  rows = []
  for method in METHODS:
    directory = os.path.join(tmp, method)
    os.makedirs(directory)
    port = local_processes.free_port()
    outs = [os.path.join(tmp, f'{method}{i}.json') for i in range(2)]
    cmds = [worker_cmd(args, '--worker', 'memory', '--method', method, '--process', str(i),
                       '--port', str(port), '--ckpt-dir', directory, '--worker-out', outs[i])
            for i in range(2)]
    rows += local_processes.run_workers(cmds, outs, args.timeout)
    shutil.rmtree(directory)
  return rows


def measure_steps(args, tmp):
  out = os.path.join(tmp, 'steps.json')
  result, = local_processes.run_workers(
      [worker_cmd(args, '--worker', 'steps', '--ckpt-dir', tmp, '--worker-out', out)], [out],
      args.timeout)
  return result


def cpu_model():
  with open('/proc/cpuinfo') as f:
    return next((line.split(':', 1)[1].strip() for line in f if line.startswith('model name')),
                platform.processor())


def mib(n):
  return 'n/a' if n is None else f'{n / MIB:,.0f}'


def memory_table(rows):
  peak = lambda r: r['peak_hwm_bytes'] or r['peak_polled_bytes']  # pylint: disable=g-long-lambda
  lines = ['| method | process | state MiB | share MiB | baseline MiB | peak MiB (polled) '
           '| peak - baseline MiB | (peak - baseline) / share | save s (blocks) | read back equal |',
           '|---|---:|---:|---:|---:|---:|---:|---:|---:|:---:|']
  for r in rows:
    added = peak(r) - r['baseline_bytes']
    lines.append(
        f'| {r["method"]} | {r["process"]} | {mib(r["state_bytes"])} | {mib(r["share_bytes"])} '
        f'| {mib(r["baseline_bytes"])} | {mib(r["peak_hwm_bytes"])} '
        f'({mib(r["peak_polled_bytes"])}) | {mib(added)} | {added / r["share_bytes"]:.2f} '
        f'| {r["save_total_s"]:.1f} ({r["save_blocks_s"]:.1f}) '
        f'| {"yes" if r["checkpoint_equal"] else "NO"} |')
  return '\n'.join(lines)


def step_summary(result):
  """Per mode, the medians over rounds of each figure."""
  keys = ('ms_per_step', 'step_ms', 'save_blocks_ms', 'final_wait_ms', 'saves')
  return {mode: {k: float(np.median([r[k] for r in result['rows'] if r['mode'] == mode]))
                 for k in keys} for mode in MODES}


def steps_table(summary):
  names = {'none': 'no saves', 'async': 'orbax, async (the default)', 'sync': 'orbax, sync'}
  base = summary['none']['ms_per_step']
  lines = ['| saves | ms/step (all in) | vs no saves | step ms (saves excluded) '
           '| save() blocks ms | final wait ms | saves |', '|---|---:|---:|---:|---:|---:|---:|']
  for mode, s in summary.items():
    lines.append(f'| {names[mode]} | {s["ms_per_step"]:.0f} | {s["ms_per_step"] / base:.2f}x '
                 f'| {s["step_ms"]:.0f} | {s["save_blocks_ms"]:.0f} | {s["final_wait_ms"]:.0f} '
                 f'| {s["saves"]:.0f} |')
  return '\n'.join(lines)


def plot(memory_rows, summary, path):
  panels = [p for p in (memory_rows, summary) if p]
  fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
  axes = list(axes[0])
  if memory_rows:
    ax = axes.pop(0)
    labels = [f'{r["method"]}\np{r["process"]}' for r in memory_rows]
    x = np.arange(len(memory_rows))
    ax.bar(x, [((r['peak_hwm_bytes'] or r['peak_polled_bytes']) - r['baseline_bytes']) / MIB
               for r in memory_rows], color='tab:orange')
    ax.axhline(memory_rows[0]['state_bytes'] / MIB, color='k', ls='--', label='whole state')
    ax.axhline(memory_rows[0]['share_bytes'] / MIB, color='k', ls=':', label="a process's share")
    ax.set_xticks(x, labels)
    ax.set_ylabel('peak - baseline, MiB per process')
    ax.set_title('host memory a save adds')
    ax.legend(loc='center right')
  if summary:
    ax = axes.pop(0)
    ax.bar(list(summary), [s['ms_per_step'] for s in summary.values()], label='all in')
    ax.bar(list(summary), [s['step_ms'] for s in summary.values()], width=0.4,
           label='step alone')
    ax.set_ylabel('ms per step')
    ax.set_title('step time with saves')
    ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv=None):
  args = parse_args(argv)
  if args.worker == 'memory':
    run_memory_worker(args)
    return
  if args.worker == 'steps':
    run_steps_worker(args)
    return
  os.makedirs(args.out, exist_ok=True)
  tmp = tempfile.mkdtemp(dir=args.tmp, prefix='bench_checkpoint-')
  try:
    memory_rows = measure_memory(args, tmp) if 'memory' in args.parts else []
    steps = measure_steps(args, tmp) if 'steps' in args.parts else None
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  summary = step_summary(steps) if steps else {}
  if memory_rows:
    print(f'peak host memory of each process during one save (2 processes x '
          f'{args.local_devices} CPU devices, FSDP):')
    print(memory_table(memory_rows))
  if summary:
    print(f'step time, {args.config} config, batch {args.batch}, {args.devices} CPU devices '
          f'(FSDP), {steps["params_m"]:.1f} M params, state {mib(steps["state_bytes"])} MiB, '
          f'a save every {args.save_every} of {args.steps} steps, medians of {args.rounds} '
          f'rounds:')
    print(steps_table(summary))
  result = {'memory': memory_rows, 'steps': steps, 'steps_summary': summary, 'args': vars(args),
            'orbax_checkpoint': metadata.version('orbax-checkpoint'),
            'cpu_count': os.cpu_count(), 'machine': platform.machine(), 'cpu': cpu_model()}
  with open(os.path.join(args.out, 'bench_checkpoint.json'), 'w') as f:
    json.dump(result, f, indent=2)
  plot(memory_rows, summary, os.path.join(args.out, 'bench_checkpoint.png'))
  print(f'wrote {os.path.join(args.out, "bench_checkpoint.json")} and bench_checkpoint.png')


if __name__ == '__main__':
  main()
