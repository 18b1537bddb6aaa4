"""Train-step throughput: images/s, TFLOP/s and MFU per model, batch and mesh, beside open_clip's.

Each row is one jitted train step (forward, loss, backward, AdamW) timed after a warm-up: its
step time, images/s, compile seconds, the model FLOPs per step counted from the config
(`clip.flops.train_step_flops`: 3x the forward, remat's recompute not counted, as PaLM's MFU),
XLA's own count (`cost_analysis`, summed over devices: it adds the elementwise work and the
optimizer, and counts the body of a `lax.scan` once, so it is low for `--scan on` or remat), the
achieved model TFLOP/s and the MFU against the peak. The peak: `--peak-tflops` per device if
given; on a CPU the best fp32 2048^2 matmul rate measured in this run, at its start and after
every row (JAX's, and torch's when the peer runs: the larger; the machine's, whatever the
simulated device count; `Peak`); on an accelerator the dense bf16 peak of its `device_kind`
(`clip.flops.PEAK_BF16_TFLOPS`) times the mesh's devices; otherwise (fp32 on an accelerator, an
unknown chip) no MFU, with a warning.

`--peer open_clip` times open_clip's real training step beside ours (open-clip-torch's model,
`ClipLoss` / `SigLipLoss`, torch AdamW, fp32, torch on every core;
`experiments/open_clip_step.py`) once for each model and batch, after its first row without
patch dropout or grad cache, with the same model FLOPs. (open_clip runs the text tower's last
block at every position, where ours runs it at the pooled one only: open_clip computes 18% more
than these model FLOPs at `small`, whose 3-block text tower is half its work, and 3% more at
ViT-B/32.) `auto` (the default) runs it on a CPU when open_clip imports, `none` never. On the
CPU the devices are simulated (1 by default), so a larger mesh measures the program and its
collectives on shared cores, not accelerator speed.
Run as a script it re-executes itself with the training entry points' malloc setting
(`experiments/malloc_tuning.py`), so ours and open_clip's steps run as `python -m
experiments.train` would. `--models` takes `name@batch` to give a model its own batch size
(default: small at 128, ViT-B/32 at 16); a name without one runs every `--batch-sizes`.

  python -m experiments.bench_train                    # small@128, ViT-B/32@16, open_clip beside
  python -m experiments.bench_train --quick
  python -m experiments.bench_train --models small,ViT-B/32 --batch-sizes 64,256 --devices 8 \
      --meshes=8,1,1:1,8,1:2,2,2 --peer none
  python -m experiments.bench_train --models ViT-B/16@256 --dtype bfloat16 \
      --meshes=1,1,1                 # on one H100: MFU against its 989 dense bf16 TFLOP/s
  python -m experiments.bench_train --models ViT-B/32@16 --scan on --remat block
  python -m experiments.bench_train --models small,ViT-B/32 --batch-sizes 16 --meshes=1,1,1 \
      --scan off,on --remat none,block
  python -m experiments.bench_train --models small,ViT-B/16 --batch-sizes 64 --meshes=1,1,1 \
      --patch-dropout 0,0.5,0.75          # FLIP: step time and memory
  python -m experiments.bench_train --models small --batch-sizes 512 --meshes=1,1,1 \
      --grad-cache 1,2,4,8                # two-pass accumulation at one global batch
  python -m experiments.bench_train --naflex  # NaFlex per length and batching mode
"""
import argparse
import dataclasses
import importlib
import json
import os
import time
from typing import Callable, NamedTuple
import warnings

import numpy as np

from experiments import malloc_tuning
from experiments import simulated_devices
from experiments.references import openai as openai_reference

PEERS = ('auto', 'open_clip', 'none')


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  parser.add_argument('--models', default='small@128,ViT-B/32@16',
                      help='"tiny", "small" (experiments/configs) or an OpenAI model name, each '
                           'with an optional @batch')
  parser.add_argument('--batch-sizes', default='32,128', help='for models without @batch')
  parser.add_argument('--meshes', default='1,1,1',
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
  parser.add_argument('--devices', type=int, default=1, help='simulated CPU devices')
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--quick', action='store_true', help='tiny and small, batch 32, 2 runs')
  parser.add_argument('--peak-tflops', '--mfu-peak-tflops', dest='peak_tflops', type=float,
                      default=None, help='peak TFLOP/s of one device (default: measured on a '
                                         'CPU, looked up on an accelerator)')
  parser.add_argument('--probe-size', type=int, default=2048, help="the CPU matmul probe's side")
  parser.add_argument('--peer', default='auto', choices=PEERS,
                      help="open_clip's training step beside ours (auto: on a CPU, if it imports)")
  parser.add_argument('--naflex', action='store_true',
                      help='NaFlex rows instead (experiments/bench_naflex.py): per sequence '
                           'length and batching mode, beside fixed resolution; --models '
                           'defaults to siglip2_naflex_small')
  parser.add_argument('--naflex-lengths', default='32,64,96', help='sequence lengths (patches)')
  parser.add_argument('--naflex-batch', type=int, default=64,
                      help='images per step (fixed batching); x mean length: the token budget')
  parser.add_argument('--naflex-modes', default='fixed,budget', help='batching modes')
  parser.add_argument('--naflex-steps', type=int, default=12,
                      help='steps of each plan timed end to end')
  parser.add_argument('--out', default='results/bench_train')
  args = parser.parse_args(argv)
  if args.naflex and args.models == parser.get_default('models'):
    args.models = 'siglip2_naflex_small'
  if args.quick:
    args.models, args.batch_sizes, args.repeats = 'tiny,small', '32', 2
  return args


def model_batches(args):
  """[(name, batch size)] from `--models` (name@batch) and `--batch-sizes`."""
  out = []
  for spec in args.models.split(','):
    name, _, batch = spec.partition('@')
    batches = [batch] if batch else args.batch_sizes.split(',')
    out += [(name, int(b)) for b in batches]
  return out


def model_config(name, dtype, remat, scan):
  # Local: jax (and clip, losses, ... which import it) only after main sets XLA_FLAGS.
  import clip  # pylint: disable=g-import-not-at-top
  if name in clip.MODELS:
    cfg = clip.MODELS[name]
  else:
    cfg = importlib.import_module(f'experiments.configs.{name}').get_config().model
  return dataclasses.replace(cfg, dtype=dtype, remat=remat, scan=scan)


def random_batch(cfg, batch_size):
  rng = np.random.default_rng(0)
  r = cfg.image_resolution
  return {'image': rng.standard_normal((batch_size, r, r, 3)).astype(np.float32),
          'tokens': openai_reference.random_tokens(rng, batch_size, cfg)}


def time_steps(run, repeats):
  """The median seconds of `repeats` calls of `run()` (each blocks until done)."""
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    run()
    times.append(time.perf_counter() - start)
  return float(np.median(times))


class CompiledStep(NamedTuple):
  """A compiled train step on its own state and one fixed batch (`compiled_step`)."""
  compiled: object     # jax.stages.Compiled: (state, batch) -> (state, metrics)
  run: Callable[[], None]  # one step, blocking until done; the state is carried between calls
  compile_s: float     # seconds of lower + compile
  devices: int         # devices of the mesh it runs on
  params: int          # trained parameters (training.param_count)


def compiled_step(cfg, tcfg):
  """`training.setup`'s step for `cfg` and `tcfg` on `tcfg.mesh` (the first devices when the mesh
  has no -1), compiled for a random batch of `tcfg.batch_size` (`random_batch`); not yet run."""
  # Local: jax (and what imports it) only after main sets XLA_FLAGS.
  import jax  # pylint: disable=g-import-not-at-top
  from clip import sharding  # pylint: disable=g-import-not-at-top
  from clip.train import training  # pylint: disable=g-import-not-at-top
  devices = jax.devices()
  if -1 not in tcfg.mesh:  # e.g. 1,1,1: the single-device baseline in the same run
    devices = devices[:int(np.prod(tcfg.mesh))]
  mesh = sharding.make_mesh(*tcfg.mesh, devices=devices)
  state, step, _, _, _ = training.setup(cfg, tcfg, mesh)
  batch = training.global_batch(mesh, random_batch(cfg, tcfg.batch_size))
  start = time.perf_counter()
  compiled = step.lower(state, batch).compile()
  compile_s = time.perf_counter() - start
  params = training.param_count(state['params'])
  holder = {'state': state}

  def run():
    holder['state'], metrics = compiled(holder['state'], batch)
    jax.block_until_ready(metrics)
  return CompiledStep(compiled, run, compile_s, mesh.devices.size, params)


def bench_one(cfg, tcfg, repeats):
  step = compiled_step(cfg, tcfg)
  temp_mib = step.compiled.memory_analysis().temp_size_in_bytes / 2 ** 20
  cost = step.compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  xla_flops = float(cost.get('flops', float('nan'))) * step.devices  # all devices
  step.run()
  step_s = time_steps(step.run, repeats)
  return {'step_s': step_s, 'images_per_s': tcfg.batch_size / step_s,
          'compile_s': step.compile_s, 'xla_tflop_per_step': xla_flops / 1e12,
          'temp_mib': temp_mib, 'devices': step.devices, 'params_m': step.params / 1e6}


def peer_enabled(args, platform):
  """Whether open_clip's step runs: `--peer`, on a CPU only (torch here is its CPU build)."""
  if args.peer == 'none':
    return False
  if platform != 'cpu':
    if args.peer == 'open_clip':
      raise SystemExit(f'--peer open_clip runs torch on the CPU; this run is on {platform}')
    return False
  try:
    from experiments import open_clip_step  # pylint: disable=g-import-not-at-top
    open_clip_step.import_open_clip()
  except Exception as e:  # pylint: disable=broad-except
    if args.peer == 'open_clip':
      raise
    print(f'open_clip does not import ({type(e).__name__}: {e}): no peer rows (--peer auto)')
    return False
  return True


class Peak:
  """The peak TFLOP/s that MFU divides by. `--peak-tflops` (per device), else on a CPU the best
  fp32 matmul probe of this run (JAX's, and torch's with the peer), probed at the start and
  again after every row, so that load from other processes on a shared machine, which comes and
  goes, lowers it less; it is the whole machine's, however many devices are simulated. On an
  accelerator the device kind's dense bf16 peak (`clip.flops.peak_tflops`) per device, or None
  with a warning (MFU left empty)."""

  def __init__(self, args, device, peer):
    from clip import flops  # pylint: disable=g-import-not-at-top
    self.size, self.peer, self.best = args.probe_size, peer, {}
    self.machine_wide = args.peak_tflops is None and device.platform == 'cpu'
    self.fixed, self.note = args.peak_tflops, ''
    if args.peak_tflops:
      self.note = f'--peak-tflops {args.peak_tflops:g} per device'
    elif self.machine_wide:
      self.probe()
    else:
      with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        self.fixed = flops.peak_tflops(device.device_kind, args.dtype)
      for w in caught:
        print(f'warning: {w.message}: MFU left empty')
      if self.fixed:
        self.note = f'{device.device_kind}: {self.fixed:g} dense {args.dtype} TFLOP/s per device'

  def probe(self):
    """Probes the CPU again (nothing elsewhere); keeps each library's best."""
    if not self.machine_wide:
      return
    from clip import flops  # pylint: disable=g-import-not-at-top
    found = {'jax': flops.matmul_probe_tflops(self.size, dtype='float32')}
    if self.peer:
      from experiments import open_clip_step  # pylint: disable=g-import-not-at-top
      found['torch'] = open_clip_step.matmul_probe_tflops(self.size)
    for k, v in found.items():
      self.best[k] = max(v, self.best.get(k, 0.0))
    shown = ', '.join(f'{k} {v * 1e3:.1f}' for k, v in self.best.items())
    self.note = (f'CPU peak measured: fp32 {self.size}x{self.size} matmul, best of 5 at the start '
                 f'and after each row, {os.cpu_count()} cores: {shown} GFLOP/s; MFU against '
                 f'{self.tflops * 1e3:.1f}')

  @property
  def tflops(self):
    return max(self.best.values()) if self.machine_wide else self.fixed

  def total(self, devices):
    """The peak of a row run on `devices` devices (the machine's on a CPU), or None."""
    if self.tflops is None:
      return None
    return self.tflops * (1 if self.machine_wide else devices)


def add_rates(row, cfg, batch_size):
  """Model TFLOP per step and the achieved model TFLOP/s into `row`."""
  from clip import flops  # pylint: disable=g-import-not-at-top
  model_flops = flops.train_step_flops(cfg, batch_size)
  row['model_tflop_per_step'] = model_flops / 1e12
  row['achieved_tflops'] = model_flops / row['step_s'] / 1e12
  return row


def peer_row(name, cfg, tcfg, repeats):
  # Local: torch only when the peer runs.
  import jax  # pylint: disable=g-import-not-at-top
  import clip  # pylint: disable=g-import-not-at-top
  from clip.train import training  # pylint: disable=g-import-not-at-top
  from experiments import open_clip_step  # pylint: disable=g-import-not-at-top
  expected = training.param_count(
      jax.eval_shape(lambda: clip.init_params(jax.random.PRNGKey(0), cfg)))
  tokens = random_batch(cfg, tcfg.batch_size)['tokens']
  result = open_clip_step.bench(name, cfg, tcfg, tokens, repeats, expected)
  return {'impl': 'open_clip', 'devices': 1, 'mesh': '-', 'scan': '-', 'remat': '-',
          'xla_tflop_per_step': None, 'compile_s': result.pop('first_step_s'), 'temp_mib': None,
          **result}


def variants(args):
  out = [(scan, remat, float(drop), int(k)) for scan in args.scan.split(',')
         for remat in args.remat.split(',') for drop in args.patch_dropout.split(',')
         for k in args.grad_cache.split(',')]
  for scan, *_ in out:
    if scan not in ('off', 'on'):
      raise ValueError(f'--scan takes off and/or on, got {scan!r}')
  return out


def run_rows(args, peak, peer):
  import losses  # pylint: disable=g-import-not-at-top
  from clip.train import training  # pylint: disable=g-import-not-at-top
  rows, peers_done = [], set()
  for name, batch_size in model_batches(args):
    for scan, remat, drop, k in variants(args):
      cfg = model_config(name, args.dtype, remat, scan == 'on')
      cfg = dataclasses.replace(cfg, logit_bias=losses.takes_bias(args.loss), vision=(
          dataclasses.replace(cfg.vision, patch_dropout=drop) if drop else cfg.vision))
      base = {'model': name, 'batch': batch_size, 'dtype': args.dtype, 'patch_dropout': drop,
              'grad_cache': k}
      for mesh_arg in args.meshes.split(':'):
        mesh = tuple(int(s) for s in mesh_arg.split(','))
        tcfg = training.TrainConfig(batch_size=batch_size, total_steps=1000, warmup_steps=10,
                                    loss=args.loss, mesh=mesh, accumulation_steps=k,
                                    accumulation='grad_cache')
        row = {**base, 'impl': 'ours', 'mesh': mesh_arg, 'scan': scan, 'remat': remat,
               **bench_one(cfg, tcfg, args.repeats)}
        rows.append(add_rates(row, cfg, batch_size))
        peak.probe()
        print(f'  {name} scan {scan} remat {remat} drop {drop} k {k} batch {batch_size} mesh '
              f'{mesh_arg}: {row["step_s"]:.3f} s/step, compiled in {row["compile_s"]:.1f} s',
              flush=True)
        if peer and not drop and k == 1 and (name, batch_size) not in peers_done:
          peers_done.add((name, batch_size))
          row = {**base, **peer_row(name, cfg, tcfg, args.repeats)}
          rows.append(add_rates(row, cfg, batch_size))
          peak.probe()
          print(f'  {name} open_clip batch {batch_size}: {row["step_s"]:.3f} s/step', flush=True)
  return rows


def _cell(value, fmt, width):
  return f'{"-":>{width}}' if value is None else f'{value:>{width}{fmt}}'


def print_table(rows):
  header = (f'{"model":<10} {"impl":>9} {"scan":>4} {"remat":>5} {"drop":>4} {"k":>2} '
            f'{"batch":>5} {"mesh":>7} {"params M":>8} {"step s":>8} {"img/s":>8} '
            f'{"TFLOP/step":>10} {"XLA TFLOP":>9} {"TFLOP/s":>8} {"MFU":>6} {"compile s":>9} '
            f'{"temp MiB":>8}')
  print(header)
  print('-' * len(header))
  for r in rows:
    print(f'{r["model"]:<10} {r["impl"]:>9} {r["scan"]:>4} {r["remat"]:>5} '
          f'{r["patch_dropout"]:>4} {r["grad_cache"]:>2} {r["batch"]:>5} {r["mesh"]:>7} '
          f'{r["params_m"]:>8.1f} {r["step_s"]:>8.3f} {r["images_per_s"]:>8.1f} '
          f'{r["model_tflop_per_step"]:>10.4f} {_cell(r["xla_tflop_per_step"], ".4f", 9)} '
          f'{r["achieved_tflops"]:>8.4f} {_cell(r["mfu"], ".1%", 6)} '
          f'{r["compile_s"]:>9.1f} {_cell(r["temp_mib"], ".0f", 8)}')
  print('(TFLOP/step: model FLOPs, 3x the forward (clip.flops); XLA TFLOP: cost_analysis; '
        'open_clip\'s "compile s" is its first step)')


def main(argv=None):
  args = parse_args(argv)
  # Before jax is imported; a caller that already imported it (a test) keeps its devices.
  simulated_devices.simulate_cpu_devices(args.devices, who='bench_train', jax_imported='keep')
  import jax  # pylint: disable=g-import-not-at-top
  device = jax.devices()[0]
  peer = peer_enabled(args, device.platform)
  if args.naflex:
    peer = False  # open_clip's NaFlex step is not ours to time here
  peak = Peak(args, device, peer)
  if args.naflex:
    from experiments import bench_naflex  # pylint: disable=g-import-not-at-top
    rows = []
    for name in dict.fromkeys(name for name, _ in model_batches(args)):  # batch: --naflex-batch
      cfg = model_config(name, args.dtype, args.remat, args.scan == 'on')
      rows += bench_naflex.run(args, cfg, name)
  else:
    rows = run_rows(args, peak, peer)
  for row in rows:  # against the final peak: the best probe of the run
    total = peak.total(row.get('devices', 1))
    row['mfu'] = None if total is None else row['achieved_tflops'] / total
  if peak.note:
    print(peak.note)
  if args.naflex:
    from experiments import bench_naflex  # pylint: disable=g-import-not-at-top
    bench_naflex.print_table(rows)
  else:
    print_table(rows)
  os.makedirs(args.out, exist_ok=True)
  path = os.path.join(args.out, 'bench_train_naflex.json' if args.naflex else 'bench_train.json')
  with open(path, 'w') as f:
    json.dump({'rows': rows, 'devices': [str(d) for d in jax.devices()],
               'device_kind': device.device_kind, 'peak_tflops': peak.tflops,
               'peak_is_machine_wide': peak.machine_wide, 'peak_probes': peak.best,
               'peak_note': peak.note,
               'args': vars(args)}, f, indent=2)
  print(f'wrote {path}')
  return rows


if __name__ == '__main__':
  malloc_tuning.reexec_if_untuned()  # as the training entry points do; before main imports jax
  main()
