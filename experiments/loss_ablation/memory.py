"""The memory stage: per-device temporary memory of the whole compiled train step and its step
time, ring vs all-gather, at each per-device batch of --memory-batches on --devices devices."""
import os
import time

import jax
import numpy as np

from experiments.loss_ablation import runs as runs_lib
from experiments.loss_ablation import settings


def measure_memory(loss, impl, per_device_batch, args):
  """Per-device temporary memory of the whole compiled train step (XLA's memory_analysis) and
  its median step time over --memory-steps steps after one warm-up, on --devices devices."""
  s = dict(settings.spec(args, loss, per_device_batch * args.devices, 0, impl, args.devices),
           steps=10, log_points=1)
  _, _, state, _, batch, compiled, _ = runs_lib.setup_run(s, jax.devices())
  memory = compiled.memory_analysis()
  times = []
  for _ in range(args.memory_steps + 1):
    start = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - start)
  return {'loss': loss, 'implementation': impl, 'per_device_batch': per_device_batch,
          'batch': s['batch'], 'devices': args.devices,
          'temp_mib_per_device': memory.temp_size_in_bytes / 2**20,
          'step_s': float(np.median(times[1:])), 'timed_steps': args.memory_steps}


def memory_stage(args, runs_dir):
  """Every measurement of the stage: stored ones (under `runs_dir`) reused, the others taken."""
  memory = []
  for loss in settings.LOSSES:
    for b in args.memory_batches:
      for impl in settings.IMPLEMENTATIONS:
        stored = {'loss': loss, 'implementation': impl, 'per_device_batch': b,
                  'devices': args.devices, 'timed_steps': args.memory_steps,
                  **({'layers': args.layers} if args.layers != 2 else {})}
        path = os.path.join(runs_dir, f'memory-{loss}-{impl}-pd{b}-d{args.devices}.json')
        m = runs_lib.load_record(path, 'settings', stored)
        if m is None:
          m = dict(measure_memory(loss, impl, b, args), settings=stored)
          runs_lib.write_json(path, m)
        memory.append(m)
  return memory
