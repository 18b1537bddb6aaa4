"""What the main job's progress bar costs: the `small` config's training loop timed with three
bars, interleaved in one run so the machine's state is shared.

- `dispatched`: the bar advances when a step is dispatched (no wait; races ahead, then stalls).
- `completed`: `clip.train.loop.CompletedSteps` (the main job's bar), which waits on the loss
  of the step two dispatches back.
- `sync`: waits on every step's own loss (lag 0), the per-step host sync the main job avoids.

Each mode runs `--steps` steps from a copy of the same state (the step donates it), timed to the
last loss ready; the table shows the median of `--rounds`.

  python -m experiments.bench_progress                 # ~5 minutes on 2 CPU cores
"""
import argparse
import json
import os
import time

import jax
import numpy as np
import tqdm

from clip import sharding
from clip.train import loop
from clip.train import training
from experiments import train

MODES = ('dispatched', 'completed', 'sync')


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--config', default='small')
  parser.add_argument('--steps', type=int, default=100)
  parser.add_argument('--rounds', type=int, default=3)
  parser.add_argument('--out', default='results/bench_progress')
  return parser.parse_args(argv)


class _Dispatched:
  """A bar of dispatched steps (the main job's bar before CompletedSteps)."""

  def __init__(self, bar):
    self.bar, self.last = bar, None

  def dispatched(self, loss):
    self.last = loss
    self.bar.update(1)

  def finish(self):
    self.last.block_until_ready()


def time_loop(mode, train_step, state, batches, mesh):
  """Seconds for `len(batches)` steps with the bar of `mode`, to the last loss ready."""
  state = jax.block_until_ready(jax.tree.map(lambda x: x.copy(), state))  # the step donates it
  bar = tqdm.tqdm(total=len(batches), desc=mode, unit='step', leave=False)
  progress = {'dispatched': lambda: _Dispatched(bar),
              'completed': lambda: loop.CompletedSteps(bar),
              'sync': lambda: loop.CompletedSteps(bar, lag=0)}[mode]()
  start = time.perf_counter()
  for batch in batches:
    state, metrics = train_step(state, training.global_batch(mesh, batch))
    progress.dispatched(metrics['loss'])
  progress.finish()
  seconds = time.perf_counter() - start
  bar.close()
  return seconds


def main(argv=None):
  args = parse_args(argv)
  config = train.load_config(train.parse_args(['--config', args.config]))
  cfg, tcfg = config.model, config.train
  mesh = sharding.make_mesh(*tcfg.mesh)
  state, train_step, _, _, _ = training.setup(cfg, tcfg, mesh)
  it, _ = train.make_data(config, cfg, tcfg, {'step': 0})  # the main job's batches
  batches = [next(it) for _ in range(args.steps)]
  time_loop('sync', train_step, state, batches[:3], mesh)  # compile
  seconds = {mode: [] for mode in MODES}
  for _ in range(args.rounds):
    for mode in MODES:
      seconds[mode].append(time_loop(mode, train_step, state, batches, mesh))
  rows = [{'mode': mode, 'steps': args.steps, 'seconds': s,
           'median_s': float(np.median(s)),
           'images_per_s': args.steps * tcfg.batch_size / float(np.median(s))}
          for mode, s in seconds.items()]
  base = rows[0]['median_s']
  print(f'{args.config}, batch {tcfg.batch_size}, {args.steps} steps, median of {args.rounds}:')
  print('| bar | seconds | images/s | vs dispatched |\n| --- | ---: | ---: | ---: |')
  for r in rows:
    print(f'| {r["mode"]} | {r["median_s"]:.2f} | {r["images_per_s"]:.0f} | '
          f'{r["median_s"] / base:.3f}x |')
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, 'bench_progress.json'), 'w') as f:
    json.dump({'config': args.config, 'batch_size': tcfg.batch_size, 'rows': rows}, f, indent=2)


if __name__ == '__main__':
  main()
