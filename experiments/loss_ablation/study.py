"""The whole study from its settings: every stage's runs (trained, or reused from the run cache),
the memory stage, the statistics, then summary.json, table.md and the plots in --out and, with
--update-docs, the tables in the docs. Exits with an error when a ring vs all-gather check fails
or the repeated run does not reproduce."""
import os
import time

import tqdm

from experiments.loss_ablation import memory
from experiments.loss_ablation import plots
from experiments.loss_ablation import report
from experiments.loss_ablation import runs as runs_lib
from experiments.loss_ablation import settings
from experiments.loss_ablation import statistics

TRAINING_STAGES = ('grid', 'init', 'ring', 'lr_sweep', 'horizon', 'long')  # in training order


def run(args):
  """The study of `args` (settings.parse_args), on the devices jax has (set before importing
  jax: see __main__)."""
  study_start = time.perf_counter()
  runs_dir = os.path.join(args.out, 'runs')
  os.makedirs(runs_dir, exist_ok=True)
  stages = settings.stage_specs(args)
  by_name = runs_lib.run_all([s for name in TRAINING_STAGES for s in stages[name]], runs_dir,
                             tqdm.tqdm)
  left_out = sorted(name for name, r in by_name.items() if runs_lib.diverged(r))
  kept = [r for name, r in by_name.items() if name not in left_out]
  results = _results(args, by_name, kept, left_out, stages['grid'][0], runs_dir)
  table = report.study_table(args, list(by_name.values()), results)
  print(table)
  runs_lib.write_json(os.path.join(args.out, 'summary.json'), {
      'args': vars(args), **results,
      'study_seconds_this_invocation': time.perf_counter() - study_start,
      'runs': sorted(by_name)})
  with open(os.path.join(args.out, 'table.md'), 'w') as f:
    f.write(table + '\n')
  plots.plot(kept, results, args, args.out)
  if args.update_docs:
    report.update_docs(args.update_docs, table)
  print(f'wrote {args.out}')
  _check(results, stages['grid'][0])


def _results(args, by_name, runs, left_out, first, runs_dir):
  """Every stage's statistics over `runs` (all but the diverged runs, named in `left_out`), the
  memory stage's measurements, the trajectory checks of every run and whether the `first` run
  reproduces: what summary.json holds."""
  return {'grid': statistics.grid_rows(runs, args),
          'sign_tests': statistics.sign_tests(runs, args),
          'horizon': statistics.horizon_rows(runs, args),
          'horizon_gains': statistics.horizon_gains(runs, args),
          'long': statistics.grid_rows(runs, args, 'long'),
          'long_sign_tests': statistics.sign_tests(runs, args, 'long'),
          'lr_sweep': statistics.sweep_rows(runs, args),
          'init': statistics.init_rows(runs, args),
          'memory': memory.memory_stage(args, runs_dir),
          'trajectory_checks': statistics.trajectory_differences(
              list(by_name.values()), args.trajectory_rtol, args.noise_multiple),
          'repeat_identical': runs_lib.repeat_stage(first, by_name, runs_dir),
          'diverged': left_out,
          'training_hours': sum(r['wall_s'] for r in by_name.values()) / 3600}


def _check(results, first):
  checks = results['trajectory_checks']
  failed = [c for c in checks if not c['passes']]
  if failed or not checks:
    raise SystemExit(f'ring vs all-gather trajectory checks: {len(checks)} run, failed: {failed}')
  if not results['repeat_identical']:
    raise SystemExit(f'the repeated run {settings.run_name(first)} did not reproduce exactly')
