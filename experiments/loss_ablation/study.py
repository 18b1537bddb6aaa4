"""Loss ablation: sigmoid vs softmax (contrastive) across batch sizes at matched optimizer steps,
SigLIP's bias / temperature initialisation, and ring vs all-gather.

Every run trains one fixed small ViT CLIP (the `tiny` config's 2x64 towers, 64-d embeddings,
32px images) on the built-in captioned shapes for the same number of optimizer steps, and is
evaluated on images training never showed: zero-shot accuracy (48-way colour+shape) and
image->text recall@1 on the (shape, colour) pairs training never showed, zero-shot on the seen
pairs. Stages (each run is one JSON under --out/runs; a rerun reuses every run whose settings
are unchanged, so an interrupted study resumes):

  grid      loss x batch (32..1024) x seed on one device, learning rate by the square-root rule
            lr(B) = base_lr * sqrt(B / base_batch) (Adam's rule: Malladi et al. 2022, "On the
            SDEs and scaling rules for adaptive gradient algorithms")
  lr_sweep  the rule's learning rate times each --lr-factors, seed 0: is the rule what decides?
  horizon   the smallest batch trained --steps times each --horizon-factors, every seed: were
            --steps enough for it, and where does its curve flatten (the gain of each doubling)?
  long      the grid again at --steps x --long-factor for the --long-batches, every seed: the
            losses compared at a much longer budget, closer to the small batches' flat curves
  init      SigLIP's Table 4 (Zhai et al. 2023): sigmoid loss, bias init {0, -10} x logit scale
            init {ln 1, ln 10}, at --init-batch, every seed
  ring      ring vs all-gather of both losses on --devices simulated devices, seed 0: the logged
            losses must agree to fp32 noise, measured by the all-gather loss on 1 device vs
            --devices (see trajectory_differences)
  memory    per-device temporary memory of the whole compiled train step and its step time,
            ring vs all-gather, at per-device batches --memory-batches on --devices devices
  repeat    the first grid run trained again: it must reproduce exactly

  python -m experiments.loss_ablation          # the full study (wall time in README)
  python -m experiments.loss_ablation --quick  # every stage, reduced, in a few minutes

Writes summary.json, table.md, accuracy_vs_batch.png, curves.png, lr_sweep.png and horizon.png
into --out.
"""
import argparse
import dataclasses
import functools
import json
import math
import os
import time

from experiments import simulated_devices

LOSSES = ('contrastive', 'sigmoid')
IMPLEMENTATIONS = {'all-gather': '{}', 'ring': 'ring_{}'}  # -> training.TrainConfig.loss
INIT_GRID = ((0.0, 0.0), (0.0, math.log(10)), (-10.0, 0.0), (-10.0, math.log(10)))  # (b, t')
README_BEGIN, README_END = '<!-- loss_ablation:begin -->', '<!-- loss_ablation:end -->'
TIMING = ('step_s', 'compile_s', 'wall_s')  # run fields a repeated run may change


def _ints(text):
  return [int(v) for v in text.split(',')]


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--batch-sizes', type=_ints, default=[32, 64, 128, 256, 512, 1024],
                      help='the grid\'s global batches, comma-separated')
  parser.add_argument('--seeds', type=int, default=3, help='seeds 0 .. N-1 of every grid cell')
  parser.add_argument('--steps', type=int, default=500, help='optimizer steps of every run')
  parser.add_argument('--base-lr', type=float, default=2e-3,
                      help='the square-root rule\'s learning rate at --base-batch')
  parser.add_argument('--base-batch', type=int, default=256, help='the batch --base-lr is for')
  parser.add_argument('--lr-factors', default='0.5,2', help='the sweep, times the rule\'s lr')
  parser.add_argument('--lr-sweep-batches', type=_ints, default=[32, 256, 1024],
                      help='batches of the learning-rate sweep, comma-separated')
  parser.add_argument('--horizon-factors', type=_ints, default=[2, 4, 8, 16, 32],
                      help='the smallest batch also trains --steps times each of these')
  parser.add_argument('--long-factor', type=int, default=32,
                      help='the long grid trains --steps times this')
  parser.add_argument('--long-batches', type=_ints, default=[32, 64],
                      help='the long grid\'s global batches, comma-separated')
  parser.add_argument('--init-batch', type=int, default=256, help='batch of the init stage')
  parser.add_argument('--ring-batch', type=int, default=256,
                      help='global batch of the ring stage\'s training runs')
  parser.add_argument('--memory-batches', type=_ints, default=[128, 512, 1024],
                      help='per-device batches of the memory stage')
  parser.add_argument('--memory-steps', type=int, default=3, help='timed steps per measurement')
  parser.add_argument('--eval-examples', type=int, default=1024, help='images per split')
  parser.add_argument('--log-points', type=int, default=20, help='logged intervals per run')
  parser.add_argument('--devices', type=int, default=8, help='simulated CPU devices')
  parser.add_argument('--trajectory-rtol', type=float, default=1e-3,
                      help='ring vs all-gather: a relative loss difference that always passes')
  parser.add_argument('--noise-multiple', type=float, default=2.0,
                      help='ring vs all-gather: or at most this times the all-gather noise floor')
  parser.add_argument('--quick', action='store_true',
                      help='a smoke test of every stage in a few minutes: replaces the batches, '
                      'seeds, steps and stage sizes; its numbers mean nothing')
  parser.add_argument('--out', default='results/loss_ablation',
                      help='output folder (default results/loss_ablation): runs/*.json, tables, '
                      'plots')
  parser.add_argument('--update-readme', default=None,
                      help='replace the tables between the loss_ablation markers of this file')
  args = parser.parse_args(argv)
  if args.quick:
    args.batch_sizes, args.seeds, args.steps, args.eval_examples = [32, 64], 1, 40, 256
    args.init_batch = args.ring_batch = 32
    args.lr_sweep_batches, args.horizon_factors = args.batch_sizes, [2]
    args.long_factor, args.long_batches = 2, args.batch_sizes
    args.memory_batches, args.memory_steps, args.log_points = [8, 32], 2, 8
  try:
    args.lr_factors = [float(f) for f in args.lr_factors.split(',') if f]
  except ValueError:
    parser.error(f'--lr-factors must be comma-separated numbers, got {args.lr_factors!r}')
  global_batches = (args.batch_sizes + args.lr_sweep_batches + args.long_batches
                    + [args.init_batch, args.ring_batch]
                    + [b * args.devices for b in args.memory_batches])
  bad = [b for b in global_batches if b < 1 or b % args.devices]
  if bad:
    parser.error(f'batch sizes must be positive multiples of --devices {args.devices} (the ring '
                 f'and memory stages split them over the devices), got {bad}')
  bad = [f for f in args.horizon_factors + [args.long_factor] if f < 1]
  if bad or any(not f > 0 for f in args.lr_factors):
    parser.error(f'--horizon-factors and --long-factor must be >= 1, --lr-factors > 0, got '
                 f'{args.horizon_factors}, {args.long_factor}, {args.lr_factors}')
  if args.steps < 2 * args.log_points or args.steps % args.log_points or args.seeds < 1:
    parser.error(f'need --steps a multiple of --log-points, at least twice it, and --seeds >= 1 '
                 f'(else the last logged interval would not end at the last step), got '
                 f'--steps {args.steps}, --log-points {args.log_points}, --seeds {args.seeds}')
  return args


def rule_lr(batch, args):
  """The square-root scaling rule's learning rate for a global batch."""
  return args.base_lr * math.sqrt(batch / args.base_batch)


def model_config(loss='contrastive', init_logit_bias=None, init_logit_scale=None):
  """The fixed model of the study: the `tiny` config's towers (ViT 2x64 on 32px images, 8px
  patches; text 2x64) with 64-wide embeddings, SigLIP's bias where the loss takes one."""
  from experiments.configs import tiny  # pylint: disable=g-import-not-at-top
  return dataclasses.replace(tiny.get_config(f'loss={loss}').model, embed_dim=64,
                             init_logit_bias=init_logit_bias, init_logit_scale=init_logit_scale)


def spec(args, loss, batch, seed, impl='all-gather', devices=1, lr_factor=1.0,
         init_logit_bias=None, init_logit_scale=None, steps_factor=1):
  """Everything that decides a training run's result; runs with equal specs are one run."""
  longer = {'steps_factor': steps_factor} if steps_factor != 1 else {}  # the horizon stage's
  return {**longer, 'loss': loss, 'implementation': impl, 'batch': batch, 'seed': seed,
          'devices': devices,
          'learning_rate': rule_lr(batch, args) * lr_factor, 'lr_factor': lr_factor,
          'init_logit_bias': init_logit_bias, 'init_logit_scale': init_logit_scale,
          'steps': args.steps * steps_factor, 'eval_examples': args.eval_examples,
          'log_points': args.log_points}


def run_name(s):
  name = f'{s["loss"]}-{s["implementation"]}-b{s["batch"]}-s{s["seed"]}-d{s["devices"]}'
  if s['lr_factor'] != 1.0:
    name += f'-lrx{s["lr_factor"]:g}'
  if 'steps_factor' in s:
    name += f'-steps{s["steps"]}'
  if s['init_logit_bias'] is not None or s['init_logit_scale'] is not None:
    name += f'-bias{s["init_logit_bias"]:g}-t{s["init_logit_scale"]:.3g}'
  return name


def stage_specs(args):
  """{stage: [spec, ...]} of the training stages; a spec may serve several stages."""
  seeds = range(args.seeds)
  grid = [spec(args, loss, b, s) for s in seeds for b in args.batch_sizes for loss in LOSSES]
  sweep = [spec(args, loss, b, 0, lr_factor=f) for b in args.lr_sweep_batches
           for f in sorted(args.lr_factors + [1.0]) for loss in LOSSES]
  init = [spec(args, 'sigmoid', args.init_batch, s, init_logit_bias=b, init_logit_scale=t)
          if (b, t) != INIT_GRID[-1] else spec(args, 'sigmoid', args.init_batch, s)
          for s in seeds for b, t in INIT_GRID]
  ring = [spec(args, loss, args.ring_batch, 0, impl, args.devices) for loss in LOSSES
          for impl in IMPLEMENTATIONS]
  horizon = [spec(args, loss, min(args.batch_sizes), s, steps_factor=f)
             for f in args.horizon_factors for s in seeds for loss in LOSSES]
  long = [spec(args, loss, b, s, steps_factor=args.long_factor) for s in seeds
          for b in args.long_batches for loss in LOSSES]
  return {'grid': grid, 'lr_sweep': sweep, 'init': init, 'ring': ring, 'horizon': horizon,
          'long': long}


def _setup(s, devices_available):
  """Spec `s`'s model config, mesh, initial state, its built-in data (seeded by the run's
  seed), the first global batch and the train step compiled for it (with its compile time)."""
  import clip  # pylint: disable=g-import-not-at-top
  from clip import sharding  # pylint: disable=g-import-not-at-top
  from clip.train import training  # pylint: disable=g-import-not-at-top
  from data import synthetic  # pylint: disable=g-import-not-at-top
  cfg = model_config(s['loss'], s['init_logit_bias'], s['init_logit_scale'])
  steps = s['steps']
  tcfg = training.TrainConfig(batch_size=s['batch'], total_steps=steps,
                              warmup_steps=steps // 10,
                              loss=IMPLEMENTATIONS[s['implementation']].format(s['loss']),
                              learning_rate=s['learning_rate'], weight_decay=0.1,
                              mesh=(s['devices'], 1, 1), seed=s['seed'])
  if s['devices'] > len(devices_available):
    raise ValueError(f'run {run_name(s)} needs {s["devices"]} devices, jax has '
                     f'{len(devices_available)}')
  mesh = sharding.make_mesh(*tcfg.mesh, devices=devices_available[:s['devices']])
  state, step_fn, _, _, _ = training.setup(cfg, tcfg, mesh)
  data = synthetic.SyntheticCaptions(seed=s['seed'], resolution=cfg.image_resolution).batches(
      s['batch'], tokenize=functools.partial(clip.get_tokenizer(cfg), truncate=True),
      preprocess=cfg.preprocess)
  batch = training.global_batch(mesh, next(data))
  start = time.perf_counter()
  compiled = step_fn.lower(state, batch).compile()
  return cfg, mesh, state, data, batch, compiled, time.perf_counter() - start


def train_one(s):
  """One run of spec `s`: its learning curve (mean training loss of each logged interval, the
  scale exp(t') and bias b at its end), evaluation, step time and per-device temp memory."""
  import jax  # pylint: disable=g-import-not-at-top
  from clip.train import training  # pylint: disable=g-import-not-at-top
  from data import synthetic_eval  # pylint: disable=g-import-not-at-top
  wall = time.perf_counter()
  cfg, mesh, state, data, batch, compiled, compile_s = _setup(s, jax.devices())
  temp_bytes = compiled.memory_analysis().temp_size_in_bytes
  steps, every = s['steps'], s['steps'] // s['log_points']
  curve, interval_loss, start = [], 0.0, None
  for step in range(steps):
    if step == 1:
      start = time.perf_counter()  # the first step includes one-off work
    state, metrics = compiled(state, batch)
    interval_loss = interval_loss + metrics['loss']  # stays on the device: no sync per step
    if (step + 1) % every == 0:
      m = jax.device_get({**metrics, 'interval_loss': interval_loss})
      curve.append({'step': step + 1, 'loss': float(m['interval_loss']) / every,
                    'logit_scale': float(m['logit_scale']),
                    'logit_bias': float(m['logit_bias']) if 'logit_bias' in m else None})
      interval_loss = 0.0
    if step + 1 < steps:
      batch = training.global_batch(mesh, next(data))
  jax.block_until_ready(state)
  step_s = (time.perf_counter() - start) / (steps - 1)
  params = jax.device_get(state['params'])
  results = synthetic_eval.evaluate(params, cfg, s['eval_examples'], seed=10_000 + s['seed'])
  return {'spec': s, 'name': run_name(s), 'curve': curve, 'final_loss': curve[-1]['loss'],
          'last_quarter_drop': last_quarter_drop(curve),
          'zero_shot_heldout': results['heldout/colour_shape_top1'],
          'zero_shot_seen': results['train/colour_shape_top1'],
          'zero_shot_chance': results['heldout/colour_shape_chance'],
          'recall_at_1_heldout': results['heldout/image_to_text_R@1'],
          'evaluation': {k: float(v) for k, v in results.items()},  # per attribute too
          'step_s': step_s, 'compile_s': compile_s, 'wall_s': time.perf_counter() - wall,
          'temp_mib_per_device': temp_bytes / 2**20}


def diverged(run):
  """Whether a run's logged training loss went non-finite: such a run is left out of every
  table and statistic and named under the tables."""
  return any(not math.isfinite(c['loss']) for c in run['curve'])


def last_quarter_drop(curve):
  """How much the logged training loss still fell over the last quarter of the run, relative to
  its value there: (L(3/4) - L(end)) / |L(3/4)|; ~0 once the curve has flattened."""
  quarter = curve[(3 * len(curve)) // 4 - 1]['loss']
  return (quarter - curve[-1]['loss']) / max(abs(quarter), 1e-12)


def measure_memory(loss, impl, per_device_batch, args):
  """Per-device temporary memory of the whole compiled train step (XLA's memory_analysis) and
  its median step time over --memory-steps steps after one warm-up, on --devices devices."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  s = dict(spec(args, loss, per_device_batch * args.devices, 0, impl, args.devices),
           steps=10, log_points=1)
  _, _, state, _, batch, compiled, _ = _setup(s, jax.devices())
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


def _max_rel_diff(run, reference):
  return max(abs(a['loss'] - b['loss']) / max(abs(b['loss']), 1e-12)
             for a, b in zip(run['curve'], reference['curve']))


def trajectory_differences(runs, rtol=1e-3, noise_multiple=2.0):
  """For each ring run with its all-gather twin (same loss, batch, seed, devices, settings): the
  largest relative difference of their logged losses, and the noise floor it is judged against.

  Both compute the same maths, so only fp32 rounding separates them, but training amplifies
  rounding differences (the sigmoid loss's runs drift apart by ~1e-3 over 500 steps). The floor
  is what the all-gather loss itself drifts on one device instead of several (the same maths
  summed in another order): the ring passes when its difference is at most `rtol` or at most
  `noise_multiple` times that floor."""
  def key(r, impl, devices):
    s = r['spec']
    return (s['loss'], impl, s['batch'], s['seed'], devices, s['learning_rate'],
            s['init_logit_bias'], s['init_logit_scale'], s['steps'])
  by_key = {key(r, r['spec']['implementation'], r['spec']['devices']): r for r in runs}
  out = []
  for k, ring in by_key.items():
    ag = by_key.get((k[0], 'all-gather') + k[2:])
    if k[1] != 'ring' or ag is None:
      continue
    one = by_key.get((k[0], 'all-gather') + k[2:4] + (1,) + k[5:])
    floor = _max_rel_diff(ag, one) if one is not None and k[4] != 1 else float('nan')
    diff = _max_rel_diff(ring, ag)
    out.append({'loss': k[0], 'batch': k[2], 'seed': k[3], 'devices': k[4],
                'max_rel_diff': diff, 'noise_floor': floor,
                'passes': bool(diff <= rtol or diff <= noise_multiple * floor),
                'zero_shot_heldout': {'all-gather': ag['zero_shot_heldout'],
                                      'ring': ring['zero_shot_heldout'],
                                      'all-gather, 1 device': (one or {}).get(
                                          'zero_shot_heldout')}})
  return out


def identical(a, b):
  """Whether two records of one run agree exactly outside their timings."""
  return ({k: v for k, v in a.items() if k not in TIMING}
          == {k: v for k, v in b.items() if k not in TIMING})


# ------------------------------------------------------------------ statistics and tables

METRICS = (('zero_shot_heldout', 'zero-shot held-out %', 100),
           ('recall_at_1_heldout', 'R@1 held-out %', 100),
           ('zero_shot_seen', 'zero-shot seen %', 100))


ATTRIBUTES = ('colour', 'shape', 'count', 'size')  # synthetic_eval's held-out zero-shot tasks


def mean_std(values):
  import numpy as np  # pylint: disable=g-import-not-at-top
  v = np.asarray(values, np.float64)
  if not len(v):
    return float('nan'), float('nan')
  return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else float('nan')


def paired_difference(a, b):
  """Mean of a - b over paired seeds with its 95% Student-t interval (nan for one seed). Seeds
  pair because two runs of one seed see the same data in the same order from the same init."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from scipy import stats  # pylint: disable=g-import-not-at-top
  d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
  if not len(d):
    return float('nan'), float('nan'), float('nan')
  if len(d) < 2:
    return float(d.mean()), float('nan'), float('nan')
  half = stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d))
  return float(d.mean()), float(d.mean() - half), float(d.mean() + half)


def _seed_paired_difference(a_runs, b_runs, key):
  """paired_difference of `key` over the seeds both run lists hold (a run left out, e.g. a
  diverged one, drops its seed from the pairs instead of shifting the pairing)."""
  a = {r['spec']['seed']: r[key] for r in a_runs}
  b = {r['spec']['seed']: r[key] for r in b_runs}
  seeds = sorted(a.keys() & b.keys())
  return paired_difference([a[s] for s in seeds], [b[s] for s in seeds])


def _by(runs, **fields):
  return sorted((r for r in runs if all(r['spec'][k] == v for k, v in fields.items())),
                key=lambda r: r['spec']['seed'])


def _rule_runs(runs, loss, batch, steps):
  """The runs of (loss, batch, steps) on one device at the rule's learning rate and the default
  inits (the grid's, horizon's and long grid's runs), by seed."""
  return _by(runs, loss=loss, batch=batch, steps=steps, devices=1, lr_factor=1.0,
             init_logit_bias=None)


def _compare_losses(per_loss):
  """{loss: mean, std over seeds of each metric}, and sigmoid - contrastive paired by seed."""
  row = {}
  for loss, rs in per_loss.items():
    row[loss] = {key: mean_std([r[key] for r in rs]) for key in
                 ('last_quarter_drop', 'final_loss', 'step_s') + tuple(k for k, _, _ in METRICS)}
    row[loss]['final_scale'] = mean_std([r['curve'][-1]['logit_scale'] for r in rs])
    row[loss]['attributes'] = (
        {**{a: mean_std([r['evaluation'][f'heldout/{a}_top1'] for r in rs]) for a in ATTRIBUTES},
         'chance': {a: rs[0]['evaluation'][f'heldout/{a}_chance'] for a in ATTRIBUTES}}
        if rs and all('evaluation' in r for r in rs) else None)
    row[loss]['seeds'] = len(rs)
  for key, _, _ in METRICS:
    row['sigmoid_minus_contrastive_' + key] = _seed_paired_difference(
        per_loss['sigmoid'], per_loss['contrastive'], key)
  return row


def grid_rows(runs, args, stage='grid'):
  """Per (batch, loss) of the grid (or the long grid): mean, std over seeds; per batch: sigmoid
  - contrastive, paired by seed."""
  batches, steps = _batches_and_steps(args, stage)
  return [dict(batch=batch, steps=steps, learning_rate=rule_lr(batch, args),
               **_compare_losses({loss: _rule_runs(runs, loss, batch, steps) for loss in LOSSES}))
          for batch in batches]


def _batches_and_steps(args, stage):
  if stage == 'grid':
    return args.batch_sizes, args.steps
  if stage == 'long':
    return args.long_batches, args.steps * args.long_factor
  raise ValueError(f'stage must be grid or long, got {stage!r}')


def learning_rate_sum(batch, steps, args):
  """The sum over the run's steps of its scheduled learning rate (warmup, then cosine). Adam
  moves a parameter by about the learning rate per step at most (Kingma & Ba 2015, section 2.1:
  when 1 - b1 <= sqrt(1 - b2), as with b1 0.9, b2 0.98), so a scalar such as the log temperature
  t' can move by about this much in the whole run and no more."""
  from clip.train import training  # pylint: disable=g-import-not-at-top
  tcfg = training.TrainConfig(batch_size=batch, total_steps=steps, warmup_steps=steps // 10,
                              learning_rate=rule_lr(batch, args))
  _, schedule = training.make_optimizer(tcfg)
  return float(sum(schedule(step) for step in range(steps)))


def reach_line(args):
  sums = {b: learning_rate_sum(b, args.steps, args) for b in args.batch_sizes}
  return ('Adam moves the log temperature t\' by about the learning rate per step at most '
          '(Kingma & Ba 2015, section 2.1): over '
          f'{args.steps} steps, by at most ' + ', '.join(
              f'{v:.2f} (batch {b})' for b, v in sums.items())
          + ', so exp(t\') can grow by a factor of at most ' + ', '.join(
              f'{math.exp(v):.2f}' for v in sums.values()) + '.')


def sign_tests(runs, args, stage='grid'):
  """Per metric, over every (batch, seed) pair of the grid: in how many pairs each loss is ahead,
  the ties, and the two-sided sign test's p-value (scipy's binomtest over the untied pairs)
  against "neither loss is ahead more often". Pooling the batches asks one question of all the
  grid's pairs: does one loss win more often than a coin flip would?"""
  from scipy import stats  # pylint: disable=g-import-not-at-top
  batches, _ = _batches_and_steps(args, stage)
  specs = stage_specs(args)[stage]
  grid = {(r['spec']['loss'], r['spec']['batch'], r['spec']['seed']): r
          for r in runs if r['spec'] in specs}
  pairs = [(grid[('sigmoid', b, sd)], grid[('contrastive', b, sd)]) for b in batches
           for sd in range(args.seeds) if ('sigmoid', b, sd) in grid
           and ('contrastive', b, sd) in grid]
  out = {}
  for key, _, _ in METRICS:
    ahead = sum(sig[key] > con[key] for sig, con in pairs)
    behind = sum(sig[key] < con[key] for sig, con in pairs)
    p = stats.binomtest(ahead, ahead + behind).pvalue if ahead + behind else float('nan')
    out[key] = {'sigmoid_ahead': ahead, 'contrastive_ahead': behind,
                'ties': len(pairs) - ahead - behind, 'p': float(p)}
  return out


def sign_table(tests):
  lines = ['| metric | sigmoid ahead | contrastive ahead | ties | sign test p |',
           '| --- | ---: | ---: | ---: | ---: |']
  for key, title, _ in METRICS:
    t = tests[key]
    lines.append(f'| {title.replace(" %", "")} | {t["sigmoid_ahead"]} | '
                 f'{t["contrastive_ahead"]} | {t["ties"]} | {t["p"]:.3f} |')
  return lines


def _horizon_steps(args):
  return [args.steps] + [args.steps * f for f in args.horizon_factors]


def horizon_rows(runs, args):
  """The smallest batch trained --steps x each --horizon-factors: do its results still move?"""
  batch = min(args.batch_sizes)
  return [dict(batch=batch, steps=steps, learning_rate=rule_lr(batch, args),
               **_compare_losses({loss: _rule_runs(runs, loss, batch, steps) for loss in LOSSES}))
          for steps in _horizon_steps(args)]


def horizon_gains(runs, args):
  """Per loss and each doubling (or larger step) of the horizon stage's steps, the change of
  held-out R@1 and zero-shot and of the final training loss, paired by seed with 95% intervals:
  a curve has flattened where the gain's interval reaches 0 and its mean is small."""
  batch = min(args.batch_sizes)
  steps = _horizon_steps(args)
  rows = []
  for short, long in zip(steps, steps[1:]):
    for loss in LOSSES:
      a, b = _rule_runs(runs, loss, batch, long), _rule_runs(runs, loss, batch, short)
      rows.append({'batch': batch, 'loss': loss, 'from_steps': short, 'to_steps': long,
                   'seeds': len({r['spec']['seed'] for r in a} & {r['spec']['seed'] for r in b}),
                   **{key: _seed_paired_difference(a, b, key) for key in
                      ('recall_at_1_heldout', 'zero_shot_heldout', 'final_loss')}})
  return rows


def attribute_table(rows, first='batch'):
  """Held-out zero-shot accuracy per attribute (what the 48-way colour+shape task is made of)
  for the rows whose runs stored their whole evaluation (runs recorded before it have none)."""
  stored = [(row, loss) for row in rows for loss in LOSSES if row[loss]['attributes']]
  if not stored:
    return ['(no run of these rows stored its per-attribute evaluation)']
  chance = stored[0][0][stored[0][1]]['attributes']['chance']
  lines = [f'| {first} | loss | ' + ' | '.join(
      f'{a} % (chance {100 * chance[a]:.1f})' for a in ATTRIBUTES) + ' |',
           '| ---: | --- |' + ' ---: |' * len(ATTRIBUTES)]
  for row, loss in stored:
    attrs = row[loss]['attributes']
    lines.append(f'| {row[first]} | {loss} | '
                 + ' | '.join(_pm(attrs[a], 100) for a in ATTRIBUTES) + ' |')
  return lines


def gains_table(rows):
  lines = ['| steps | loss | seeds | R@1 held-out gain (pp) | zero-shot held-out gain (pp) | '
           'final training loss change |', '| --- | --- | ---: | ---: | ---: | ---: |']
  for r in rows:
    lines.append(f'| {r["from_steps"]} → {r["to_steps"]} | {r["loss"]} | {r["seeds"]} | '
                 f'{_ci(r["recall_at_1_heldout"])} | {_ci(r["zero_shot_heldout"])} | '
                 f'{_ci(r["final_loss"], 1, 3)} |')
  return lines


def _pm(ms, scale, digits=1):
  return f'{ms[0] * scale:.{digits}f} ± {ms[1] * scale:.{digits}f}'


def _ci(d, scale=100, digits=1):
  mean, lo, hi = (v * scale for v in d)
  if math.isnan(lo):
    return f'{mean:+.{digits}f}'
  mark = ' **' if lo > 0 or hi < 0 else ''
  return f'{mean:+.{digits}f} [{lo:+.{digits}f}, {hi:+.{digits}f}]{mark}'


def loss_table(rows, seeds, first='batch'):
  """The per-loss table and the sigmoid - contrastive table of `rows`, keyed by `first`."""
  lines = [f'| {first} | lr | loss | zero-shot held-out % | R@1 held-out % | zero-shot seen % '
           '| final loss | last-quarter drop % | final exp(t\') | step ms |',
           '| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |']
  for row in rows:
    for loss in LOSSES:
      r = row[loss]
      lines.append(f'| {row[first]} | {row["learning_rate"]:.2g} | {loss} | '
                   f'{_pm(r["zero_shot_heldout"], 100)} | {_pm(r["recall_at_1_heldout"], 100)} '
                   f'| {_pm(r["zero_shot_seen"], 100)} | {_pm(r["final_loss"], 1, 3)} | '
                   f'{_pm(r["last_quarter_drop"], 100)} | {_pm(r["final_scale"], 1)} | '
                   f'{_pm(r["step_s"], 1000, 0)} |')
  lines += ['', f'Sigmoid minus contrastive, mean over {seeds} paired seed(s) with its 95% '
            'Student-t interval (** where the interval excludes 0):', '',
            f'| {first} | zero-shot held-out (pp) | R@1 held-out (pp) | zero-shot seen (pp) |',
            '| ---: | ---: | ---: | ---: |']
  for row in rows:
    lines.append(f'| {row[first]} | ' + ' | '.join(
        _ci(row['sigmoid_minus_contrastive_' + key]) for key, _, _ in METRICS) + ' |')
  return lines


def sweep_rows(runs, args):
  rows = []
  for batch in args.lr_sweep_batches:
    for loss in LOSSES:
      rs = sorted(_by(runs, loss=loss, batch=batch, seed=0, devices=1, init_logit_bias=None,
                      steps=args.steps),
                  key=lambda r: r['spec']['lr_factor'])
      rows.append({'batch': batch, 'loss': loss,
                   'factors': [r['spec']['lr_factor'] for r in rs],
                   'learning_rates': [r['spec']['learning_rate'] for r in rs],
                   'zero_shot_heldout': [r['zero_shot_heldout'] for r in rs],
                   'recall_at_1_heldout': [r['recall_at_1_heldout'] for r in rs],
                   'final_loss': [r['final_loss'] for r in rs]})
  return rows


def sweep_table(rows):
  factors = sorted({f for r in rows for f in r['factors']})
  head = ' | '.join(f'lr x{f:g}' for f in factors)
  lines = [f'| batch | loss | {head} | best by zero-shot | best by R@1 |',
           '| ---: | --- |' + ' ---: |' * (len(factors) + 2)]
  for r in rows:
    zs = dict(zip(r['factors'], r['zero_shot_heldout']))
    r1 = dict(zip(r['factors'], r['recall_at_1_heldout']))
    cells = ' | '.join(f'{100 * zs[f]:.1f} / {100 * r1[f]:.1f}' if f in zs else '–'
                       for f in factors)
    lines.append(f'| {r["batch"]} | {r["loss"]} | {cells} | x{max(zs, key=zs.get):g} | '
                 f'x{max(r1, key=r1.get):g} |')
  return lines


def init_rows(runs, args):
  """SigLIP Table 4's cells, each vs the paper's choice (b=-10, t'=ln 10) paired by seed."""
  cells = {}
  for b, t in INIT_GRID:
    if (b, t) == INIT_GRID[-1]:
      rs = _rule_runs(runs, 'sigmoid', args.init_batch, args.steps)  # the paper's = the grid's
    else:
      rs = _by(runs, loss='sigmoid', batch=args.init_batch, devices=1, lr_factor=1.0,
               init_logit_bias=b, init_logit_scale=t, steps=args.steps)
    cells[(b, t)] = rs
  best = cells[INIT_GRID[-1]]
  rows = []
  for (b, t), rs in cells.items():
    row = {'init_logit_bias': b, 'init_logit_scale': t, 'seeds': len(rs),
           'final_scale': mean_std([r['curve'][-1]['logit_scale'] for r in rs]),
           'final_logit_bias': mean_std([r['curve'][-1]['logit_bias'] for r in rs]),
           'final_loss': mean_std([r['final_loss'] for r in rs])}
    for key, _, _ in METRICS:
      row[key] = mean_std([r[key] for r in rs])
      row['minus_paper_choice_' + key] = _seed_paired_difference(rs, best, key)
    rows.append(row)
  return rows


def init_table(rows):
  lines = ['| bias init b | scale init t\' | zero-shot held-out % | R@1 held-out % | '
           'zero-shot seen % | vs the paper\'s choice: zero-shot held-out (pp) | '
           'R@1 held-out (pp) | final exp(t\') | final b |',
           '| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |']
  for r in rows:
    paper = (r['init_logit_bias'], r['init_logit_scale']) == INIT_GRID[-1]
    diffs = ('the paper\'s choice', '') if paper else (
        _ci(r['minus_paper_choice_zero_shot_heldout']),
        _ci(r['minus_paper_choice_recall_at_1_heldout']))
    lines.append(f'| {r["init_logit_bias"]:g} | ln {math.exp(r["init_logit_scale"]):.3g} | '
                 f'{_pm(r["zero_shot_heldout"], 100)} | {_pm(r["recall_at_1_heldout"], 100)} | '
                 f'{_pm(r["zero_shot_seen"], 100)} | {diffs[0]} | {diffs[1]} | '
                 f'{r["final_scale"][0]:.1f} | {r["final_logit_bias"][0]:.2f} |')
  return lines


def memory_table(measurements, checks):
  lines = ['| loss | per-device batch | global batch | all-gather temp MiB | ring temp MiB | '
           'all-gather step ms | ring step ms |',
           '| --- | ---: | ---: | ---: | ---: | ---: | ---: |']
  keyed = {(m['loss'], m['implementation'], m['per_device_batch']): m for m in measurements}
  for loss in LOSSES:
    for b in sorted({m['per_device_batch'] for m in measurements}):
      ag, ring = keyed.get((loss, 'all-gather', b)), keyed.get((loss, 'ring', b))
      if ag and ring:
        lines.append(f'| {loss} | {b} | {ag["batch"]} | {ag["temp_mib_per_device"]:.1f} | '
                     f'{ring["temp_mib_per_device"]:.1f} | {1000 * ag["step_s"]:.0f} | '
                     f'{1000 * ring["step_s"]:.0f} |')
  for c in checks:
    zs = ', '.join(f'{k} {100 * v:.1f}%' for k, v in c['zero_shot_heldout'].items()
                   if v is not None)
    lines.append(f'\nRing vs all-gather training ({c["loss"]}, batch {c["batch"]}, '
                 f'{c["devices"]} devices, seed {c["seed"]}): largest relative difference of '
                 f'the logged losses {c["max_rel_diff"]:.1e}, against {c["noise_floor"]:.1e} '
                 f'between all-gather on {c["devices"]} devices and on 1 '
                 f'({"passes" if c["passes"] else "FAILS"}); held-out zero-shot {zs}.')
  return lines


# ------------------------------------------------------------------ plots

def plot(runs, results, args, out):
  """accuracy_vs_batch.png, curves.png, lr_sweep.png and horizon.png into `out`."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  for draw, name in ((_plot_accuracy, 'accuracy_vs_batch'), (_plot_curves, 'curves'),
                     (_plot_sweep, 'lr_sweep'), (_plot_horizon, 'horizon')):
    fig = draw(plt, runs, results, args)
    fig.tight_layout()
    fig.savefig(os.path.join(out, name + '.png'), dpi=100)
    plt.close(fig)


def _errorbars(ax, xs, rows, loss, key, scale, **style):
  import numpy as np  # pylint: disable=g-import-not-at-top
  ax.errorbar(xs, [scale * r[loss][key][0] for r in rows],
              yerr=[scale * np.nan_to_num(r[loss][key][1]) for r in rows], capsize=3, **style)


def _log_ticks(ax, values, fmt=str, **kw):
  ax.set_xticks(values)
  ax.set_xticklabels([fmt(v) for v in values], **kw)
  ax.minorticks_off()


def _plot_accuracy(plt, runs, results, args):
  rows, long = results['grid'], results['long']
  fig, axes = plt.subplots(1, len(METRICS), figsize=(4.2 * len(METRICS), 3.8))
  batches = sorted({r['batch'] for r in rows + long})
  for loss, marker, color in zip(LOSSES, 'os', ('C0', 'C1')):
    for ax, (key, title, scale) in zip(axes, METRICS):
      _errorbars(ax, [r['batch'] for r in rows], rows, loss, key, scale, fmt='-' + marker,
                 color=color, label=f'{loss}, {args.steps} steps')
      _errorbars(ax, [r['batch'] for r in long], long, loss, key, scale, fmt='--' + marker,
                 color=color, mfc='none', label=f'{loss}, {args.steps * args.long_factor} steps')
      if key.startswith('zero_shot'):
        ax.axhline(100 * runs[0]['zero_shot_chance'], color='grey', lw=0.8, ls=':')
      ax.set(xscale='log', xlabel='global batch size', title=title)
      _log_ticks(ax, batches)
  axes[0].legend(fontsize=7)
  fig.suptitle(f'matched optimizer steps, mean ± std over {args.seeds} seed(s); dotted: chance',
               fontsize=9)
  return fig


def _plot_curves(plt, runs, results, args):
  import numpy as np  # pylint: disable=g-import-not-at-top
  del results
  cols = min(len(args.batch_sizes), 3)
  nrows = -(-len(args.batch_sizes) // cols)
  fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 3 * nrows + 0.4), squeeze=False)
  for ax in axes.flat[len(args.batch_sizes):]:
    ax.axis('off')
  for ax, batch in zip(axes.flat, args.batch_sizes):
    for loss in LOSSES:
      rs = _rule_runs(runs, loss, batch, args.steps)
      if not rs:
        continue
      steps = [c['step'] for c in rs[0]['curve']]
      curves = np.array([[c['loss'] for c in r['curve']] for r in rs])
      line, = ax.plot(steps, curves.mean(0), label=loss)
      ax.fill_between(steps, curves.min(0), curves.max(0), color=line.get_color(), alpha=0.25)
    ax.set(xlabel='optimizer step', title=f'batch {batch}')
  axes[0][0].set_ylabel('training loss (interval mean)')
  axes[0][0].legend(fontsize=8)
  fig.suptitle('learning curves: mean over seeds, band = min..max\n(the losses have their own '
               'scales; the sigmoid loss sums over a row\'s negatives, so it grows with the batch)',
               fontsize=9)
  return fig


def _plot_sweep(plt, runs, results, args):
  del runs, args
  sweep = results['lr_sweep']
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
  for ax, (key, title, scale) in zip(axes, METRICS[:2]):
    for r in sweep:
      ax.plot(r['learning_rates'], [scale * a for a in r[key]],
              '-o' if r['loss'] == 'contrastive' else '--s', label=f'{r["loss"]} b{r["batch"]}')
    ax.set(xscale='log', xlabel='learning rate (the rule\'s x0.5, x1, x2)', title=title)
    _log_ticks(ax, sorted({lr for r in sweep for lr in r['learning_rates']}),
               lambda lr: f'{lr:.2g}', rotation=45, fontsize=7)
  axes[0].legend(fontsize=7, ncol=2)
  fig.suptitle('learning-rate sweep, seed 0', fontsize=9)
  return fig


def _plot_horizon(plt, runs, results, args):
  """The smallest batch's results against its run length: where they stop moving, its curve
  has flattened."""
  del runs
  rows = results['horizon']
  fig, axes = plt.subplots(1, 3, figsize=(12.6, 3.8))
  steps = [r['steps'] for r in rows]
  panels = METRICS[:2] + (('final_loss', 'final training loss (interval mean)', 1),)
  for loss, marker in zip(LOSSES, 'os'):
    for ax, (key, title, scale) in zip(axes, panels):
      _errorbars(ax, steps, rows, loss, key, scale, fmt='-' + marker, label=loss)
      ax.set(xscale='log', xlabel='optimizer steps (each a whole run, warmup + cosine)',
             title=title)
      _log_ticks(ax, steps)
  axes[0].legend(fontsize=8)
  fig.suptitle(f'batch {min(args.batch_sizes)} trained longer: mean ± std over {args.seeds} '
               'seed(s)', fontsize=9)
  return fig


def update_readme(path, table):
  with open(path) as f:
    text = f.read()
  if README_BEGIN not in text or README_END not in text:
    raise ValueError(f'{path} has no {README_BEGIN} ... {README_END} markers')
  head, rest = text.split(README_BEGIN, 1)
  _, tail = rest.split(README_END, 1)
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    f.write(f'{head}{README_BEGIN}\n{table}\n{README_END}{tail}')
  os.replace(tmp, path)


# ------------------------------------------------------------------ the study

def _write_json(path, value):
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(value, f, indent=1)
  os.replace(tmp, path)


def _load(path, key, value):
  """The stored record at `path` if its `key` equals `value` (a rerun with other settings
  recomputes it), else None."""
  if not os.path.exists(path):
    return None
  with open(path) as f:
    record = json.load(f)
  return record if record.get(key) == value else None


def run_all(specs, runs_dir, progress):
  """{name: run record} of every spec: stored records reused, the others trained."""
  unique = list({run_name(s): s for s in specs}.values())  # stages share runs
  runs = {}
  for s in progress(unique, desc='training runs'):
    name = run_name(s)
    path = os.path.join(runs_dir, name + '.json')
    run = _load(path, 'spec', s)
    if run is None:
      run = train_one(s)
      _write_json(path, run)
      progress.write(('DIVERGED (left out of the tables) ' if diverged(run) else '')
                     + f'{name}: zero-shot held-out {100 * run["zero_shot_heldout"]:.1f}%, '
                     f'R@1 {100 * run["recall_at_1_heldout"]:.1f}%, loss '
                     f'{run["final_loss"]:.3f}, {1000 * run["step_s"]:.0f} ms/step, '
                     f'{run["wall_s"]:.0f} s')
    runs[name] = run
  return runs


def memory_stage(args, runs_dir):
  memory = []
  for loss in LOSSES:
    for b in args.memory_batches:
      for impl in IMPLEMENTATIONS:
        settings = {'loss': loss, 'implementation': impl, 'per_device_batch': b,
                    'devices': args.devices, 'timed_steps': args.memory_steps}
        path = os.path.join(runs_dir, f'memory-{loss}-{impl}-pd{b}-d{args.devices}.json')
        m = _load(path, 'settings', settings)
        if m is None:
          m = dict(measure_memory(loss, impl, b, args), settings=settings)
          _write_json(path, m)
        memory.append(m)
  return memory


def repeat_stage(first, by_name, runs_dir):
  """Whether the run of spec `first`, trained again, reproduces its record exactly."""
  path = os.path.join(runs_dir, 'repeat-' + run_name(first) + '.json')
  repeat = _load(path, 'spec', first)
  if repeat is None:
    repeat = train_one(first)
    _write_json(path, repeat)
  return identical(repeat, by_name[run_name(first)])


def study_table(args, runs, results):
  r = results
  caveat = (['One seed: no spread and no intervals (nan). `--quick` is a smoke test of the '
             'pipeline; its numbers mean nothing.', ''] if args.seeds == 1 else [])
  return '\n'.join(
      caveat + loss_table(r['grid'], args.seeds)
      + ['', reach_line(args)]
      + ['', 'Every (batch, seed) pair of the grid at once: which loss is ahead, and the '
         'two-sided sign test:', '']
      + sign_table(r['sign_tests'])
      + ['', f'The smallest batch trained longer (batch {min(args.batch_sizes)}, mean ± std '
         f'over {args.seeds} seed(s)):', '']
      + loss_table(r['horizon'], args.seeds, 'steps')
      + ['', 'What each longer horizon adds (batch '
         f'{min(args.batch_sizes)}; longer minus shorter, paired by seed, 95% interval):', '']
      + gains_table(r['horizon_gains'])
      + ['', f'The long grid: every batch of {args.long_batches} trained '
         f'{args.steps * args.long_factor} steps (mean ± std over {args.seeds} seed(s)):', '']
      + loss_table(r['long'], args.seeds)
      + ['', 'Every (batch, seed) pair of the long grid at once:', '']
      + sign_table(r['long_sign_tests'])
      + ['', 'What the held-out zero-shot task is made of: per-attribute accuracy (mean ± std '
         'over seeds) of the horizon runs and the long grid, the runs that stored it:', '']
      + attribute_table(r['horizon'], 'steps') + ['']
      + attribute_table(r['long'])
      + ['', 'Learning-rate sweep (held-out zero-shot % / R@1 %, seed 0; x1 is the rule\'s):',
         '']
      + sweep_table(r['lr_sweep'])
      + ['', f'SigLIP Table 4 on our data (sigmoid loss, batch {args.init_batch}, mean ± std '
         f'over {args.seeds} seed(s); the difference is paired by seed, 95% interval):', '']
      + init_table(r['init'])
      + ['', f'Ring vs all-gather, {args.devices} simulated devices (per-device temporary '
         'memory of the whole train step; median step time):', '']
      + memory_table(r['memory'], r['trajectory_checks'])
      + ['', f'{len(runs)} training runs ({args.steps} steps each, the horizon stage\'s and '
         f'the long grid\'s longer), their training and evaluation {r["training_hours"]:.2f} h '
         f'of wall time in all on this machine; zero-shot is 48-way colour+shape (chance '
         f'{100 * runs[0]["zero_shot_chance"]:.1f}%). The first grid run, trained again: '
         f'{"identical" if r["repeat_identical"] else "DIFFERENT"}. Diverged runs (a '
         'non-finite training loss), left out of every table and statistic: '
         + (', '.join(r['diverged']) if r['diverged'] else 'none') + '.'])


def main(argv=None):
  args = parse_args(argv)
  simulated_devices.simulate_cpu_devices(args.devices, who='loss_ablation')
  import tqdm  # pylint: disable=g-import-not-at-top
  study_start = time.perf_counter()
  runs_dir = os.path.join(args.out, 'runs')
  os.makedirs(runs_dir, exist_ok=True)
  stages = stage_specs(args)
  by_name = run_all([s for name in ('grid', 'init', 'ring', 'lr_sweep', 'horizon', 'long')
                     for s in stages[name]], runs_dir, tqdm.tqdm)
  left_out = sorted(name for name, run in by_name.items() if diverged(run))
  runs = [run for name, run in by_name.items() if name not in left_out]
  results = {'grid': grid_rows(runs, args), 'sign_tests': sign_tests(runs, args),
             'horizon': horizon_rows(runs, args), 'horizon_gains': horizon_gains(runs, args),
             'long': grid_rows(runs, args, 'long'),
             'long_sign_tests': sign_tests(runs, args, 'long'),
             'lr_sweep': sweep_rows(runs, args),
             'init': init_rows(runs, args), 'memory': memory_stage(args, runs_dir),
             'trajectory_checks': trajectory_differences(list(by_name.values()),
                                                         args.trajectory_rtol,
                                                         args.noise_multiple),
             'repeat_identical': repeat_stage(stages['grid'][0], by_name, runs_dir),
             'diverged': left_out,
             'training_hours': sum(r['wall_s'] for r in by_name.values()) / 3600}
  table = study_table(args, list(by_name.values()), results)
  print(table)
  _write_json(os.path.join(args.out, 'summary.json'), {
      'args': vars(args), **results,
      'study_seconds_this_invocation': time.perf_counter() - study_start,
      'runs': sorted(by_name)})
  with open(os.path.join(args.out, 'table.md'), 'w') as f:
    f.write(table + '\n')
  plot(runs, results, args, args.out)
  if args.update_readme:
    update_readme(args.update_readme, table)
  print(f'wrote {args.out}')
  checks = results['trajectory_checks']
  failed = [c for c in checks if not c['passes']]
  if failed or not checks:
    raise SystemExit(f'ring vs all-gather trajectory checks: {len(checks)} run, failed: {failed}')
  if not results['repeat_identical']:
    raise SystemExit(f'the repeated run {run_name(stages["grid"][0])} did not reproduce exactly')


if __name__ == '__main__':
  main()
