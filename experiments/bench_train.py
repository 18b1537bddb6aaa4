"""Train-step throughput: step time, images/s and XLA's FLOPs per step, per model, batch and mesh.

On the CPU the devices are simulated (8 by default), so the numbers measure the program and its
collectives on shared cores, not accelerator speed. `--scan off,on` compares the blocks unrolled
with the stacked layout run by `lax.scan` (compile time and step time), `--remat` the
rematerialisation policies. On a GPU, `--mfu-peak-tflops` turns the FLOPs
into model FLOPs utilisation (H100 SXM dense bf16: 989).

  python -m experiments.bench_train --quick
  python -m experiments.bench_train --models small,ViT-B/32 --batch-sizes 64,256 \
      --meshes=8,1,1:1,8,1:2,2,2
  python -m experiments.bench_train --models ViT-B/16 --dtype bfloat16 --devices 1 \
      --batch-sizes 256 --meshes=1,1,1 --mfu-peak-tflops 989        # on one H100
  python -m experiments.bench_train --models small,ViT-B/32 --batch-sizes 16 --meshes=1,1,1 \
      --scan off,on --remat none,block --devices 1
  python -m experiments.bench_train --models small,ViT-B/16 --batch-sizes 64 --meshes=1,1,1 \
      --patch-dropout 0,0.5,0.75 --devices 1         # FLIP: step time and memory
  python -m experiments.bench_train --models small --batch-sizes 512 --meshes=1,1,1 \
      --grad-cache 1,2,4,8 --devices 1                # two-pass accumulation at one global batch
"""
import argparse
import dataclasses
import importlib
import json
import os
import time

import numpy as np

from experiments import simulated_devices
from experiments.references import openai as openai_reference


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--models', default='small,ViT-B/32',
                      help='"tiny", "small" (experiments/configs) or an OpenAI model name')
  parser.add_argument('--batch-sizes', default='32,128')
  parser.add_argument('--meshes', default='1,1,1:8,1,1:1,8,1:2,2,2',
                      help='data,fsdp,tensor:... (a mesh of fewer devices uses the first ones)')
  parser.add_argument('--loss', default='contrastive')
  parser.add_argument('--dtype', default='float32')
  parser.add_argument('--remat', default='none', help='none,block,dots: the policies to compare')
  parser.add_argument('--scan', default='off', help='off,on: unrolled blocks and/or lax.scan')
  parser.add_argument('--grad-cache', default='1',
                      help='two-pass accumulation steps k to compare at the same global batch, '
                           'e.g. 1,2,4,8 (clip/train/grad_cache.py)')
  parser.add_argument('--patch-dropout', default='0',
                      help="FLIP's patch dropout fractions to compare, e.g. 0,0.5,0.75 (ViTs)")
  parser.add_argument('--devices', type=int, default=8, help='simulated CPU devices')
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--quick', action='store_true', help='tiny model, one batch size, 2 runs')
  parser.add_argument('--mfu-peak-tflops', type=float, default=None)
  parser.add_argument('--out', default='results/bench_train')
  args = parser.parse_args(argv)
  if args.quick:
    args.models, args.batch_sizes, args.repeats = 'tiny,small', '32', 2
  return args


def model_config(name, dtype, remat, scan):
  # Local: jax (and clip, losses, ... which import it) only after main sets XLA_FLAGS.
  import clip  # pylint: disable=g-import-not-at-top
  if name in clip.MODELS:
    cfg = clip.MODELS[name]
  else:
    cfg = importlib.import_module(f'experiments.configs.{name}').get_config().model
  return dataclasses.replace(cfg, dtype=dtype, remat=remat, scan=scan)


def bench_one(cfg, tcfg, repeats):
  # Local: jax (and what imports it) only after main sets XLA_FLAGS.
  import jax  # pylint: disable=g-import-not-at-top
  from clip import sharding  # pylint: disable=g-import-not-at-top
  from clip.train import training  # pylint: disable=g-import-not-at-top
  devices = jax.devices()
  if -1 not in tcfg.mesh:  # e.g. 1,1,1: the single-device baseline in the same run
    devices = devices[:int(np.prod(tcfg.mesh))]
  mesh = sharding.make_mesh(*tcfg.mesh, devices=devices)
  state, step, _, _, _ = training.setup(cfg, tcfg, mesh)
  rng = np.random.default_rng(0)
  r = cfg.image_resolution
  batch = training.global_batch(mesh, {
      'image': rng.standard_normal((tcfg.batch_size, r, r, 3)).astype(np.float32),
      'tokens': openai_reference.random_tokens(rng, tcfg.batch_size, cfg)})
  start = time.perf_counter()
  compiled = step.lower(state, batch).compile()
  compile_s = time.perf_counter() - start
  temp_mib = compiled.memory_analysis().temp_size_in_bytes / 2 ** 20
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  flops = float(cost.get('flops', float('nan'))) * len(mesh.devices.flat)  # per device -> total
  state, metrics = compiled(state, batch)
  jax.block_until_ready(metrics)
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  step_s = float(np.median(times))
  return {'step_s': step_s, 'images_per_s': tcfg.batch_size / step_s, 'compile_s': compile_s,
          'tflops_per_step': flops / 1e12, 'temp_mib': temp_mib,
          'achieved_tflops': flops / step_s / 1e12,
          'params_m': training.param_count(state['params']) / 1e6}


def main(argv=None):
  args = parse_args(argv)
  simulated_devices.simulate_cpu_devices(args.devices, who='bench_train')
  # jax, and everything that imports it, only now: XLA reads the device count at import.
  import jax  # pylint: disable=g-import-not-at-top
  import losses  # pylint: disable=g-import-not-at-top
  from clip.train import training  # pylint: disable=g-import-not-at-top
  rows = []
  variants = [(scan, remat, float(drop), int(k)) for scan in args.scan.split(',')
              for remat in args.remat.split(',') for drop in args.patch_dropout.split(',')
              for k in args.grad_cache.split(',')]
  for name in args.models.split(','):
    for scan, remat, drop, k in variants:
      if scan not in ('off', 'on'):
        raise ValueError(f'--scan takes off and/or on, got {scan!r}')
      cfg = model_config(name, args.dtype, remat, scan == 'on')
      cfg = dataclasses.replace(cfg, logit_bias=losses.takes_bias(args.loss), vision=(
          dataclasses.replace(cfg.vision, patch_dropout=drop) if drop else cfg.vision))
      for batch_size in [int(b) for b in args.batch_sizes.split(',')]:
        for mesh_arg in args.meshes.split(':'):
          mesh = tuple(int(s) for s in mesh_arg.split(','))
          tcfg = training.TrainConfig(batch_size=batch_size, total_steps=1000, warmup_steps=10,
                                      loss=args.loss, mesh=mesh, accumulation_steps=k,
                                      accumulation='grad_cache')
          row = {'model': name, 'batch': batch_size, 'mesh': mesh_arg, 'dtype': args.dtype,
                 'scan': scan, 'remat': remat, 'patch_dropout': drop, 'grad_cache': k,
                 **bench_one(cfg, tcfg, args.repeats)}
          if args.mfu_peak_tflops:
            row['mfu'] = row['achieved_tflops'] / (args.mfu_peak_tflops * jax.device_count())
          rows.append(row)
          print(f'  {name} scan {scan} remat {remat} drop {drop} k {k} batch {batch_size} mesh '
                f'{mesh_arg}: '
                f'{row["step_s"]:.3f} s/step, compiled in {row["compile_s"]:.1f} s', flush=True)
  header = (f'{"model":<10} {"scan":>4} {"remat":>5} {"drop":>4} {"k":>2} {"batch":>5} {"mesh":>7} '
            f'{"params M":>8} '
            f'{"step s":>8} {"img/s":>8} {"TFLOP/step":>10} {"TFLOP/s":>8} {"compile s":>9} '
            f'{"temp MiB":>8}' + (f' {"MFU":>6}' if args.mfu_peak_tflops else ''))
  print(header)
  print('-' * len(header))
  for r in rows:
    print(f'{r["model"]:<10} {r["scan"]:>4} {r["remat"]:>5} {r["patch_dropout"]:>4} '
          f'{r["grad_cache"]:>2} '
          f'{r["batch"]:>5} {r["mesh"]:>7} '
          f'{r["params_m"]:>8.1f} {r["step_s"]:>8.3f} {r["images_per_s"]:>8.1f} '
          f'{r["tflops_per_step"]:>10.3f} {r["achieved_tflops"]:>8.3f} {r["compile_s"]:>9.1f} '
          f'{r["temp_mib"]:>8.0f}' + (f' {r["mfu"]:>6.1%}' if args.mfu_peak_tflops else ''))
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, 'bench_train.json'), 'w') as f:
    json.dump({'rows': rows, 'devices': [str(d) for d in jax.devices()],
               'args': vars(args)}, f, indent=2)
  print(f'wrote {os.path.join(args.out, "bench_train.json")}')


if __name__ == '__main__':
  main()
