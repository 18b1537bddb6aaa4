"""The loss ablation study: ring and all-gather runs follow one trajectory, runs reproduce, the
stages share the runs they have in common, its statistics match scipy's, and `--smoke` runs every
stage end to end, resumes without recomputing, and writes its tables, plots and docs."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from scipy import stats

from experiments.loss_ablation import memory
from experiments.loss_ablation import report
from experiments.loss_ablation import runs as runs_lib
from experiments.loss_ablation import settings
from experiments.loss_ablation import statistics

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def small_args(*extra):
  return settings.parse_args(['--steps', '16', '--log-points', '8', '--eval-examples', '64',
                              '--layers', '1', *extra])


@pytest.mark.parametrize('loss', settings.LOSSES)
def test_ring_and_allgather_follow_one_trajectory(loss):
  args = small_args()
  ag = runs_lib.train_one(settings.spec(args, loss, 32, 0, 'all-gather', devices=8))
  ring = runs_lib.train_one(settings.spec(args, loss, 32, 0, 'ring', devices=8))
  assert len(ag['curve']) == 8
  np.testing.assert_allclose([c['loss'] for c in ring['curve']],
                             [c['loss'] for c in ag['curve']], rtol=1e-4)
  diffs = statistics.trajectory_differences([ag, ring])
  assert len(diffs) == 1 and diffs[0]['max_rel_diff'] < 1e-4
  assert ag['curve'][-1]['loss'] < ag['curve'][0]['loss']


def test_a_run_reproduces():
  s = settings.spec(small_args(), 'sigmoid', 32, 1, init_logit_bias=0.0, init_logit_scale=0.0)
  first, second = runs_lib.train_one(s), runs_lib.train_one(s)
  assert runs_lib.identical(first, second)
  assert not runs_lib.identical(first, dict(second, final_loss=second['final_loss'] + 1e-7))
  # The init stage's cell starts where it says: the first logged bias is near 0, not -10.
  assert abs(first['curve'][0]['logit_bias']) < 1


def test_trajectory_check_judges_the_ring_against_the_all_gather_noise_floor():
  s = settings.spec(small_args(), 'contrastive', 32, 0, devices=8)
  def run(spec, losses):
    return {'spec': spec, 'curve': [{'loss': v} for v in losses], 'zero_shot_heldout': 0.5}
  ag = run(s, [2.0, 1.0])
  ring = run(dict(s, implementation='ring'), [2.0, 1.1])
  check, = statistics.trajectory_differences([ag, ring])
  np.testing.assert_allclose(check['max_rel_diff'], 0.1)
  assert math.isnan(check['noise_floor']) and not check['passes']
  # All-gather on one device drifts 0.15 / 1.15 from all-gather on eight: 0.1 is within 2x that.
  one = run(dict(s, devices=1), [2.0, 1.15])
  check, = statistics.trajectory_differences([ag, ring, one])
  np.testing.assert_allclose(check['noise_floor'], 0.15 / 1.15)
  assert check['passes'] and check['zero_shot_heldout']['all-gather, 1 device'] == 0.5
  check, = statistics.trajectory_differences([ag, ring, one], noise_multiple=0.5)
  assert not check['passes']


def test_stages_share_their_common_runs():
  args = settings.parse_args([])
  stages = settings.stage_specs(args)
  grid = {settings.run_name(s) for s in stages['grid']}
  assert len(grid) == 2 * 6 * 3
  # The paper's cell of the init study and the sweep's x1 are grid runs, not new ones.
  init = {settings.run_name(s) for s in stages['init']}
  assert len(init) == 4 * 3 and len(init - grid) == 3 * 3
  sweep = {settings.run_name(s) for s in stages['lr_sweep']}
  assert len(sweep) == 3 * 2 * 3 and len(sweep - grid) == 2 * 2 * 3
  horizon = {settings.run_name(s) for s in stages['horizon']}
  assert len(horizon) == 2 * 3 * 5 and not horizon & grid
  assert {s['steps'] for s in stages['horizon']} == {1000, 2000, 4000, 8000, 16000}
  # The long grid's batch 32 is the horizon's longest run; its other batches are new runs.
  long = {settings.run_name(s) for s in stages['long']}
  assert len(long) == 2 * 2 * 3 and long & horizon == {
      settings.run_name(s) for s in stages['long'] if s['batch'] == 32}
  assert {s['steps'] for s in stages['long']} == {16000}
  ring = stages['ring']
  assert {(s['implementation'], s['devices']) for s in ring} == {('all-gather', 8), ('ring', 8)}
  assert [settings.rule_lr(b, args) for b in (64, 256, 1024)] == [1e-3, 2e-3, 4e-3]


def test_paired_difference_is_scipys_paired_t_interval():
  a, b = [0.30, 0.25, 0.41, 0.33], [0.20, 0.27, 0.30, 0.31]
  mean, lo, hi = statistics.paired_difference(a, b)
  interval = stats.ttest_rel(a, b).confidence_interval(0.95)
  np.testing.assert_allclose([mean, lo, hi], [np.mean(np.subtract(a, b)), interval.low,
                                              interval.high], rtol=1e-12)
  assert all(math.isnan(v) for v in statistics.paired_difference([0.3], [0.2])[1:])


def test_a_left_out_seed_drops_its_pair_instead_of_shifting_the_pairing():
  def run(loss, seed, r1, final_loss=1.0):
    return {'spec': {'loss': loss, 'seed': seed}, 'recall_at_1_heldout': r1,
            'curve': [{'loss': 2.0}, {'loss': final_loss}]}
  sigmoid = [run('sigmoid', 0, 0.5), run('sigmoid', 1, 0.9), run('sigmoid', 2, 0.1)]
  contrastive = [run('contrastive', 0, 0.4), run('contrastive', 2, 0.3)]  # seed 1 left out
  got = statistics._seed_paired_difference(sigmoid, contrastive, 'recall_at_1_heldout')
  np.testing.assert_allclose(got, statistics.paired_difference([0.5, 0.1], [0.4, 0.3]))
  assert all(math.isnan(v)
             for v in statistics._seed_paired_difference(sigmoid, [], 'recall_at_1_heldout'))
  assert runs_lib.diverged(run('sigmoid', 0, 0.5, float('nan')))
  assert runs_lib.diverged(run('sigmoid', 0, 0.5, float('inf')))
  assert not runs_lib.diverged(sigmoid[0])


def test_sign_tests_count_the_grids_pairs():
  args = settings.parse_args(['--batch-sizes', '32,64', '--seeds', '2'])
  runs = []
  # Sigmoid ahead on held-out zero-shot except one tie.
  for s in settings.stage_specs(args)['grid']:
    value = 0.2 if s['loss'] == 'contrastive' else (0.2 if s['batch'] == 64 and s['seed'] else 0.3)
    runs.append({'spec': s, 'zero_shot_heldout': value, 'recall_at_1_heldout': 0.1,
                 'zero_shot_seen': 0.1 + 0.1 * (s['loss'] == 'contrastive')})
  tests = statistics.sign_tests(runs, args)
  assert tests['zero_shot_heldout'] == {'sigmoid_ahead': 3, 'contrastive_ahead': 0, 'ties': 1,
                                        'p': stats.binomtest(3, 3).pvalue}
  assert tests['zero_shot_seen']['contrastive_ahead'] == 4
  assert tests['recall_at_1_heldout']['ties'] == 4 and math.isnan(tests['recall_at_1_heldout']['p'])


def test_last_quarter_drop():
  curve = [{'loss': v} for v in (4.0, 3.0, 2.0, 1.0, 1.0, 1.0, 0.9, 0.8)]
  np.testing.assert_allclose(runs_lib.last_quarter_drop(curve), (1.0 - 0.8) / 1.0)


def test_an_unknown_stage_is_refused():
  with pytest.raises(ValueError, match="stage must be grid or long, got 'horizon'"):
    statistics.grid_rows([], settings.parse_args([]), 'horizon')
  with pytest.raises(ValueError, match="stage must be grid or long, got 'bogus'"):
    statistics.sign_tests([], settings.parse_args([]), 'bogus')


def test_bad_settings_are_refused(capsys):
  with pytest.raises(SystemExit):
    settings.parse_args(['--batch-sizes', '32,100'])
  assert 'batch sizes must be positive multiples of --devices 8' in capsys.readouterr().err
  with pytest.raises(SystemExit):
    settings.parse_args(['--memory-batches', '0'])
  assert 'got [0]' in capsys.readouterr().err
  for bad in (['--horizon-factors', '2,0'], ['--long-factor', '0'], ['--lr-factors', '0.5,-1']):
    with pytest.raises(SystemExit):  # a zero-step run, or a non-positive learning rate
      settings.parse_args(bad)
    assert '--horizon-factors and --long-factor must be >= 1' in capsys.readouterr().err
  with pytest.raises(SystemExit):
    settings.parse_args(['--lr-factors', '0.5,x'])
  assert "--lr-factors must be comma-separated numbers, got '0.5,x'" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    settings.parse_args(['--steps', '10', '--log-points', '8'])
  assert 'got --steps 10, --log-points 8' in capsys.readouterr().err
  with pytest.raises(SystemExit):  # the last logged interval would end before the last step
    settings.parse_args(['--steps', '50', '--log-points', '20'])
  assert 'need --steps a multiple of --log-points' in capsys.readouterr().err
  settings.parse_args(['--steps', '60', '--log-points', '20'])
  with pytest.raises(SystemExit):
    settings.parse_args(['--layers', '0'])
  assert '--layers must be >= 1, got 0' in capsys.readouterr().err


# 4 grid + 3 init + 4 ring (its 1-device noise floor is the grid's batch 8) + 2 sweep (x2 at
# batch 8; x1 is the grid's) + 2 horizon + 0 long (its batch 8 is the horizon's): every stage,
# the shared runs once.
SMOKE_RUNS = 4 + 3 + 4 + 2 + 2 + 0


def test_the_quick_and_smoke_studies_take_every_stage_with_shared_runs_once():
  args = settings.parse_args(['--quick'])
  stages = settings.stage_specs(args)
  assert args.batch_sizes == [32, 64] and args.seeds == 1 and args.steps == 40
  # 4 grid + 3 init + 4 ring + 2x2x2 sweep + 2 horizon + 2 long (its batch 32 is the horizon's):
  # every stage, the shared runs once.
  assert len({settings.run_name(s) for stage in stages.values() for s in stage}) == (
      4 + 3 + 4 + 8 + 2 + 2)
  assert sorted({(s['batch'], s['steps']) for s in stages['long']}) == [(32, 80), (64, 80)]
  assert {s['steps'] for s in stages['horizon']} == {80}
  assert len(args.memory_batches) * 2 * 2 == 2 * 2 * 2
  args = settings.parse_args(['--smoke'])
  stages = settings.stage_specs(args)
  assert len({settings.run_name(s) for stage in stages.values() for s in stage}) == SMOKE_RUNS
  # Its towers have one block each, in every spec and run name; the study's default two are in
  # neither (their runs keep their names).
  assert all(s['layers'] == 1 and '-layers1' in settings.run_name(s)
             for stage in stages.values() for s in stage)
  assert not any('layers' in s for stage in settings.stage_specs(settings.parse_args([])).values()
                 for s in stage)
  with pytest.raises(SystemExit):
    settings.parse_args(['--quick', '--smoke'])


def test_the_docs_flag_and_its_old_name():
  assert settings.parse_args([]).update_docs is None
  assert settings.parse_args(['--update-docs']).update_docs == 'docs/loss_ablation.md'
  assert settings.parse_args(['--update-docs', 'x.md']).update_docs == 'x.md'
  assert settings.parse_args(['--update-readme', 'README.md']).update_docs == 'README.md'


@pytest.mark.slow
def test_smoke_study_end_to_end_and_resume(tmp_path, monkeypatch):
  """Every stage, statistic, table and plot and the docs writer, on the smallest study (`--smoke`,
  about a minute on 2 cores; `--quick` runs the same code at larger sizes in several)."""
  out = tmp_path / 'ablation'
  docs = tmp_path / 'loss_ablation.md'
  docs.write_text(f'before\n{report.DOCS_BEGIN}\nold\n{report.DOCS_END}\nafter\n')
  cmd = [sys.executable, '-m', 'experiments.loss_ablation', '--smoke', '--out', str(out),
         '--update-docs', str(docs)]
  env = dict(os.environ, PYTHONPATH=ROOT, XLA_FLAGS='')
  subprocess.run(cmd, cwd=ROOT, env=env, check=True, timeout=900, capture_output=True)
  summary = json.loads((out / 'summary.json').read_text())
  checks = summary['trajectory_checks']
  assert summary['repeat_identical'] and len(checks) == 2  # one per loss
  assert all(c['passes'] and c['max_rel_diff'] < 1e-3 for c in checks)
  assert [r['batch'] for r in summary['grid']] == [8, 16]
  assert len(summary['init']) == 4 and len(summary['memory']) == 2 * 1 * 2
  assert len(summary['runs']) == SMOKE_RUNS
  assert [(r['batch'], r['steps']) for r in summary['long']] == [(8, 20)]
  gain, = [g for g in summary['horizon_gains'] if g['loss'] == 'sigmoid']
  assert (gain['from_steps'], gain['to_steps'], gain['seeds']) == (10, 20, 1)
  assert sum(summary['sign_tests']['zero_shot_heldout'][k]
             for k in ('sigmoid_ahead', 'contrastive_ahead', 'ties')) == 2
  assert [r['steps'] for r in summary['horizon']] == [10, 20]
  for name in ('table.md', 'accuracy_vs_batch.png', 'curves.png', 'lr_sweep.png', 'horizon.png'):
    assert (out / name).stat().st_size > 0, name
  text = docs.read_text()
  assert 'old' not in text and '| 16 | 0.0005 | sigmoid |' in text
  assert 'SigLIP Table 4' in text and '| contrastive | 1 | 8 |' in text
  assert text.startswith('before\n') and text.endswith('after\n')
  # A rerun finds every run and measurement finished and recomputes none of them: run in this
  # process (no second interpreter and jax start-up: CI time) with training and measuring
  # replaced by a failure; it still writes the summary, tables, plots and docs.
  mtimes = {p.name: p.stat().st_mtime_ns for p in (out / 'runs').iterdir()}
  from experiments.loss_ablation import study  # pylint: disable=g-import-not-at-top
  def recomputed(*args, **kwargs):
    raise AssertionError(f'the rerun recomputed {args} {kwargs}')
  monkeypatch.setattr(runs_lib, 'train_one', recomputed)
  monkeypatch.setattr(memory, 'measure_memory', recomputed)
  (out / 'summary.json').unlink()
  study.run(settings.parse_args(cmd[cmd.index('--smoke'):]))
  assert mtimes == {p.name: p.stat().st_mtime_ns for p in (out / 'runs').iterdir()}
  assert json.loads((out / 'summary.json').read_text())['runs'] == summary['runs']
