"""NaFlex training throughput (`python -m experiments.bench_train --naflex`): per sequence length
and per batching mode, images/s, real patches/s, the padding fraction, compile seconds and the
compile count, beside the same model at fixed resolution.

The images are of many aspect ratios (log-uniform from 1:4 to 4:1, a fixed draw), each resized
by SigLIP 2's rule (`clip.naflex.target_size`) to the largest patch grid within the step's
sequence length S: their grids decide the padding. Rows:
- `fixed S`: `--naflex-batch` images per step at length S, one row per length;
- `budget S`: token-budget batching, `--naflex-batch x mean(S)` patches per step, so
  `budget // S` images at length S (`data.naflex_batching`);
- `fixed plan` / `budget plan`: `--naflex-steps` steps drawn from the plan as training draws
  them, timed end to end after every length has compiled once (the mix a run sees), with the
  train step's compile count (its jit cache) after them;
- `fixed res`: the model at `image_resolution` (every image squashed to a square), for
  reference.
Model FLOPs count the patches each step runs (padding included: what the device computes) via
`clip.flops.train_step_flops(..., num_patches=S)`.
"""
import dataclasses
import time

import numpy as np

from experiments import bench_train
from experiments.references import openai as openai_reference

RATIO_RANGE = (0.25, 4.0)  # width / height of the drawn images
PIXELS = 160 * 160         # their area before the NaFlex resize (any: S decides the grid)


def image_grids(n, patch_size, seq_len, seed=0):
  """(n, 2) int32 (h, w) patch grids of n images of drawn aspect ratios at length seq_len."""
  from clip import naflex  # pylint: disable=g-import-not-at-top  # jax after XLA_FLAGS
  rng = np.random.default_rng(seed)
  ratios = np.exp(rng.uniform(*np.log(RATIO_RANGE), n))
  grids = []
  for r in ratios:
    h, w = max(1, round((PIXELS / r) ** 0.5)), max(1, round((PIXELS * r) ** 0.5))
    th, tw = naflex.target_size(h, w, patch_size, seq_len)
    grids.append((th // patch_size, tw // patch_size))
  return np.asarray(grids, np.int32)


def naflex_batch(cfg, batch_size, seq_len, seed=0):
  """Random patches for `image_grids`, zero padding, random tokens."""
  rng = np.random.default_rng(seed)
  p = cfg.vision.patch_size
  grids = image_grids(batch_size, p, seq_len, seed)
  patches = rng.standard_normal((batch_size, seq_len, p * p * 3)).astype(np.float32)
  patches[np.arange(seq_len) >= grids.prod(1)[:, None]] = 0
  return {'patches': patches, 'spatial_shapes': grids,
          'tokens': openai_reference.random_tokens(rng, batch_size, cfg)}


def _setup(cfg, tcfg):
  import jax  # pylint: disable=g-import-not-at-top
  from clip import sharding  # pylint: disable=g-import-not-at-top
  from clip.train import training  # pylint: disable=g-import-not-at-top
  mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  setup = training.setup(cfg, tcfg, mesh)
  return mesh, setup, {'state': setup.state}


def _run(mesh, setup, holder, batch):
  import jax  # pylint: disable=g-import-not-at-top
  from clip.train import training  # pylint: disable=g-import-not-at-top
  holder['state'], metrics = setup.train_step(holder['state'], training.global_batch(mesh, batch))
  jax.block_until_ready(metrics)


def _row(kind, batch_size, seq_len, step_s, compile_s, padding, grids_real, model_flops):
  return {'mode': kind, 'seq_len': seq_len, 'batch': batch_size, 'step_s': step_s,
          'images_per_s': batch_size / step_s, 'real_patches_per_s': grids_real / step_s,
          'padding': padding, 'compile_s': compile_s,
          'model_tflop_per_step': model_flops / 1e12,
          'achieved_tflops': model_flops / step_s / 1e12}


def bench_mode(cfg, plan, repeats, steps, loss):
  """Rows for one batching mode: each length, then the plan's mix of `steps` steps."""
  from clip import flops  # pylint: disable=g-import-not-at-top
  from clip.train import training  # pylint: disable=g-import-not-at-top
  tcfg = training.TrainConfig(
      batch_size=plan.batch_size or 1, total_steps=1000, warmup_steps=10, loss=loss,
      naflex_seq_lengths=plan.seq_lengths, naflex_tokens_per_batch=plan.tokens_per_batch)
  mesh, setup, holder = _setup(cfg, tcfg)
  rows = []
  for b, s in plan.shapes():
    batch = naflex_batch(cfg, b, s)
    start = time.perf_counter()
    _run(mesh, setup, holder, batch)
    compile_s = time.perf_counter() - start
    run_once = lambda: _run(mesh, setup, holder, batch)  # pylint: disable=cell-var-from-loop
    step_s = bench_train.time_steps(run_once, repeats)
    real = int(batch['spatial_shapes'].prod(1).sum())
    rows.append(_row(f'{plan.batching} S', b, s, step_s, compile_s,
                     plan.padding_fraction(batch['spatial_shapes'], s), real,
                     flops.train_step_flops(cfg, b, num_patches=s)))
    print(f'  {plan.batching} S={s} batch {b}: {step_s:.3f} s/step, padding '
          f'{rows[-1]["padding"]:.1%}, compiled in {compile_s:.1f} s', flush=True)
  shapes = [plan.step_shape(g) for g in range(steps)]
  batches = [naflex_batch(cfg, b, s, seed=g) for g, (b, s) in enumerate(shapes)]
  start = time.perf_counter()
  for batch in batches:
    _run(mesh, setup, holder, batch)
  total_s = time.perf_counter() - start
  images = sum(b for b, _ in shapes)
  real = sum(int(x['spatial_shapes'].prod(1).sum()) for x in batches)
  slots = sum(b * s for b, s in shapes)
  model_flops = sum(flops.train_step_flops(cfg, b, num_patches=s) for b, s in shapes)
  rows.append({'mode': f'{plan.batching} plan', 'seq_len': None, 'batch': images / steps,
               'step_s': total_s / steps, 'images_per_s': images / total_s,
               'real_patches_per_s': real / total_s, 'padding': 1 - real / slots,
               'compile_s': None, 'model_tflop_per_step': model_flops / steps / 1e12,
               'achieved_tflops': model_flops / total_s / 1e12,
               'compiles': setup.train_step._cache_size()})  # pylint: disable=protected-access
  print(f'  {plan.batching} plan of {steps} steps: {images / total_s:.1f} img/s, '
        f'{rows[-1]["compiles"]} compiles for {len(plan.seq_lengths)} lengths', flush=True)
  return rows


def bench_fixed_resolution(cfg, batch_size, repeats, loss):
  """The same model at image_resolution (square images): the reference row."""
  from clip import flops  # pylint: disable=g-import-not-at-top
  from clip.train import training  # pylint: disable=g-import-not-at-top
  tcfg = training.TrainConfig(batch_size=batch_size, total_steps=1000, warmup_steps=10,
                              loss=loss)
  mesh, setup, holder = _setup(cfg, tcfg)
  batch = bench_train.random_batch(cfg, batch_size)
  start = time.perf_counter()
  _run(mesh, setup, holder, batch)
  compile_s = time.perf_counter() - start
  step_s = bench_train.time_steps(lambda: _run(mesh, setup, holder, batch), repeats)
  patches = cfg.vision.grid_size ** 2
  return _row('fixed res', batch_size, patches, step_s, compile_s, 0.0, batch_size * patches,
              flops.train_step_flops(cfg, batch_size))


def run(args, cfg, name):
  """All rows for model `name` (`cfg`), as `bench_train --naflex` asks."""
  import losses  # pylint: disable=g-import-not-at-top
  from data import naflex_batching  # pylint: disable=g-import-not-at-top
  cfg = dataclasses.replace(cfg, logit_bias=losses.takes_bias(args.loss))
  lengths = tuple(int(s) for s in args.naflex_lengths.split(','))
  p, b = cfg.vision.patch_size, args.naflex_batch
  budget = b * int(np.mean(lengths))
  plans = {'fixed': naflex_batching.NaFlexBatching(p, lengths, batch_size=b),
           'budget': naflex_batching.NaFlexBatching(p, lengths, tokens_per_batch=budget)}
  rows = []
  for mode in args.naflex_modes.split(','):
    if mode not in plans:
      raise ValueError(f'--naflex-modes takes fixed and/or budget, got {mode!r}')
    rows += bench_mode(cfg, plans[mode], args.repeats, args.naflex_steps, args.loss)
  rows.append(bench_fixed_resolution(cfg, b, args.repeats, args.loss))
  for row in rows:
    row['model'] = name
  return rows


def print_table(rows):
  header = (f'{"model":<20} {"mode":<12} {"S":>4} {"batch":>6} {"step s":>7} {"img/s":>7} '
            f'{"patches/s":>9} {"padding":>7} {"TFLOP/s":>8} {"MFU":>6} {"compile s":>9} '
            f'{"compiles":>8}')
  print(header)
  print('-' * len(header))
  for r in rows:
    cell = lambda v, fmt, w: f'{"-":>{w}}' if v is None else f'{v:>{w}{fmt}}'
    print(f'{r["model"]:<20} {r["mode"]:<12} {cell(r["seq_len"], "d", 4)} '
          f'{r["batch"]:>6.1f} {r["step_s"]:>7.3f} {r["images_per_s"]:>7.1f} '
          f'{r["real_patches_per_s"]:>9.0f} {r["padding"]:>7.1%} {r["achieved_tflops"]:>8.4f} '
          f'{cell(r.get("mfu"), ".1%", 6)} {cell(r["compile_s"], ".1f", 9)} '
          f'{cell(r.get("compiles"), "d", 8)}')
  print('(S: patches per image after padding; patches/s: real patches; padding: the share of '
        'the S x batch slots that are padding; compiles: the train step\'s jit cache after the '
        'plan\'s steps)')
