"""The loss ablation study: ring and all-gather runs follow one trajectory, runs reproduce, and the
`--quick` grid runs end to end, resumes without recomputing, and writes its table and plots."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from experiments import loss_ablation

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def args(**changes):
  a = loss_ablation.parse_args(['--examples', '256', '--batch-sizes', '32', '--eval-examples',
                                '64', '--log-points', '8'])
  for k, v in changes.items():
    setattr(a, k, v)
  return a


@pytest.mark.parametrize('loss', loss_ablation.LOSSES)
def test_ring_and_allgather_follow_one_trajectory(loss):
  ag = loss_ablation.train_one(loss, 'all-gather', 32, 0, args())
  ring = loss_ablation.train_one(loss, 'ring', 32, 0, args())
  assert len(ag['curve']) == 8
  np.testing.assert_allclose([c['loss'] for c in ring['curve']],
                             [c['loss'] for c in ag['curve']], rtol=1e-4)
  np.testing.assert_allclose(ring['zero_shot_heldout'], ag['zero_shot_heldout'], atol=1 / 64)
  diffs = loss_ablation.trajectory_differences([ag, ring])
  assert len(diffs) == 1 and diffs[0]['max_rel_diff'] < 1e-4
  assert ag['curve'][-1]['loss'] < ag['curve'][0]['loss']


def test_a_run_reproduces():
  first = loss_ablation.train_one('sigmoid', 'ring', 32, 1, args())
  second = loss_ablation.train_one('sigmoid', 'ring', 32, 1, args())
  timing = ('step_s', 'compile_s')
  assert ({k: v for k, v in first.items() if k not in timing}
          == {k: v for k, v in second.items() if k not in timing})


def test_trajectory_check_catches_a_difference():
  run = {'loss': 'contrastive', 'batch': 32, 'seed': 0,
         'curve': [{'step': 1, 'loss': 2.0}, {'step': 2, 'loss': 1.0}]}
  other = dict(run, curve=[{'step': 1, 'loss': 2.0}, {'step': 2, 'loss': 1.1}])
  diffs = loss_ablation.trajectory_differences([dict(run, implementation='all-gather'),
                                                dict(other, implementation='ring')])
  np.testing.assert_allclose(diffs[0]['max_rel_diff'], 0.1)


def test_bad_batch_sizes_are_refused(capsys):
  with pytest.raises(SystemExit):
    loss_ablation.parse_args(['--batch-sizes', '32,100', '--examples', '512'])
  assert 'batch sizes must divide --examples 512 and be multiples of --devices 8, got [100]' in \
      capsys.readouterr().err


@pytest.mark.slow
def test_quick_grid_end_to_end_and_resume(tmp_path):
  out = tmp_path / 'ablation'
  readme = tmp_path / 'README.md'
  readme.write_text(f'before\n{loss_ablation.README_BEGIN}\nold\n{loss_ablation.README_END}\n'
                    'after\n')
  # The --quick grid's shape (2 losses x 2 implementations x batches 32, 64, one seed), fewer
  # examples.
  cmd = [sys.executable, '-m', 'experiments.loss_ablation', '--batch-sizes', '32,64', '--seeds',
         '1', '--examples', '512', '--eval-examples', '64', '--log-points', '4', '--out', str(out),
         '--update-readme', str(readme)]
  env = dict(os.environ, PYTHONPATH=ROOT, XLA_FLAGS='')
  subprocess.run(cmd, cwd=ROOT, env=env, check=True, timeout=900, capture_output=True)
  summary = json.loads((out / 'summary.json').read_text())
  assert len(summary['runs']) == 8 and len(summary['rows']) == 8
  assert summary['max_trajectory_rel_diff'] < 1e-3
  for name in ('table.md', 'accuracy_vs_batch.png', 'curves.png'):
    assert (out / name).stat().st_size > 0, name
  text = readme.read_text()
  assert 'old' not in text and '| contrastive | ring | 64 |' in text
  assert text.startswith('before\n') and text.endswith('after\n')
  # A rerun finds every run finished and recomputes none of them.
  mtimes = {p.name: p.stat().st_mtime_ns for p in (out / 'runs').iterdir()}
  subprocess.run(cmd, cwd=ROOT, env=env, check=True, timeout=300, capture_output=True)
  assert mtimes == {p.name: p.stat().st_mtime_ns for p in (out / 'runs').iterdir()}
