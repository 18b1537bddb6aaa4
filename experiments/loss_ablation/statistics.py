"""The study's statistics over its run records: means and spreads over seeds, sigmoid minus
contrastive paired by seed with Student-t intervals, the sign tests pooled over a grid, what
longer horizons add, the learning-rate sweep, SigLIP's init table, and the ring vs all-gather
trajectory differences judged against the all-gather noise floor."""
import math

import numpy as np
from scipy import stats

from clip.train import optim
from clip.train import training
from experiments.loss_ablation import settings

METRICS = (('zero_shot_heldout', 'zero-shot held-out %', 100),
           ('recall_at_1_heldout', 'R@1 held-out %', 100),
           ('zero_shot_seen', 'zero-shot seen %', 100))
ATTRIBUTES = ('colour', 'shape', 'count', 'size')  # synthetic_eval's held-out zero-shot tasks


def mean_std(values):
  """(mean, sample std) of `values`; nan where there are too few."""
  v = np.asarray(values, np.float64)
  if not len(v):
    return float('nan'), float('nan')
  return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else float('nan')


def paired_difference(a, b):
  """Mean of a - b over paired seeds with its 95% Student-t interval (nan for one seed). Seeds
  pair because two runs of one seed see the same data in the same order from the same init."""
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


def rule_runs(runs, loss, batch, steps):
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


def _rule_row(runs, args, batch, steps):
  return dict(batch=batch, steps=steps, learning_rate=settings.rule_lr(batch, args),
              **_compare_losses({loss: rule_runs(runs, loss, batch, steps)
                                 for loss in settings.LOSSES}))


def grid_rows(runs, args, stage='grid'):
  """Per (batch, loss) of the grid (or the long grid): mean, std over seeds; per batch: sigmoid
  - contrastive, paired by seed."""
  batches, steps = _batches_and_steps(args, stage)
  return [_rule_row(runs, args, batch, steps) for batch in batches]


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
  tcfg = training.TrainConfig(batch_size=batch, total_steps=steps, warmup_steps=steps // 10,
                              learning_rate=settings.rule_lr(batch, args))
  _, schedule = optim.make_optimizer(tcfg)
  return float(sum(schedule(step) for step in range(steps)))


def sign_tests(runs, args, stage='grid'):
  """Per metric, over every (batch, seed) pair of the grid: in how many pairs each loss is ahead,
  the ties, and the two-sided sign test's p-value (scipy's binomtest over the untied pairs)
  against "neither loss is ahead more often". Pooling the batches asks one question of all the
  grid's pairs: does one loss win more often than a coin flip would?"""
  batches, _ = _batches_and_steps(args, stage)
  specs = settings.stage_specs(args)[stage]
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


def _horizon_steps(args):
  return [args.steps] + [args.steps * f for f in args.horizon_factors]


def horizon_rows(runs, args):
  """The smallest batch trained --steps x each --horizon-factors: do its results still move?"""
  return [_rule_row(runs, args, min(args.batch_sizes), steps) for steps in _horizon_steps(args)]


def horizon_gains(runs, args):
  """Per loss and each doubling (or larger step) of the horizon stage's steps, the change of
  held-out R@1 and zero-shot and of the final training loss, paired by seed with 95% intervals:
  a curve has flattened where the gain's interval reaches 0 and its mean is small."""
  batch = min(args.batch_sizes)
  steps = _horizon_steps(args)
  rows = []
  for short, long in zip(steps, steps[1:]):
    for loss in settings.LOSSES:
      a, b = rule_runs(runs, loss, batch, long), rule_runs(runs, loss, batch, short)
      rows.append({'batch': batch, 'loss': loss, 'from_steps': short, 'to_steps': long,
                   'seeds': len({r['spec']['seed'] for r in a} & {r['spec']['seed'] for r in b}),
                   **{key: _seed_paired_difference(a, b, key) for key in
                      ('recall_at_1_heldout', 'zero_shot_heldout', 'final_loss')}})
  return rows


def sweep_rows(runs, args):
  """Per batch and loss of the learning-rate sweep (seed 0): its factors, learning rates and
  results, by factor."""
  rows = []
  for batch in args.lr_sweep_batches:
    for loss in settings.LOSSES:
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


def init_rows(runs, args):
  """SigLIP Table 4's cells, each vs the paper's choice (b=-10, t'=ln 10) paired by seed."""
  cells = {}
  for b, t in settings.INIT_GRID:
    if (b, t) == settings.INIT_GRID[-1]:
      rs = rule_runs(runs, 'sigmoid', args.init_batch, args.steps)  # the paper's = the grid's
    else:
      rs = _by(runs, loss='sigmoid', batch=args.init_batch, devices=1, lr_factor=1.0,
               init_logit_bias=b, init_logit_scale=t, steps=args.steps)
    cells[(b, t)] = rs
  best = cells[settings.INIT_GRID[-1]]
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
