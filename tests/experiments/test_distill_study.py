"""The distillation study's report (`experiments/distill_study.py`): per arm the mean over seeds
with its 95% t-interval, the step time from metrics.jsonl's throughput (the compiling interval
left out), the table and the plot. (Its runs are the main job's, tested in test_distill_job.py.)"""
import json

import numpy as np
from scipy import stats

from experiments import distill_study


def test_summary_table_and_plot(tmp_path):
  rng = np.random.default_rng(0)
  evals = {arm: [{key: float(rng.random()) for key, _ in distill_study.TASKS} for _ in range(3)]
           for arm in distill_study.ARMS}
  times = {arm: [0.2, 0.25, 0.3] for arm in distill_study.ARMS}
  rows = distill_study.summarise(evals, times)
  key = distill_study.TASKS[0][0]
  values = [r[key] for r in evals['online']]
  half = stats.t.ppf(0.975, 2) * np.std(values, ddof=1) / np.sqrt(3)
  np.testing.assert_allclose(rows['online'][key], (np.mean(values), half))
  np.testing.assert_allclose(rows['alone']['step_s'], (0.25, stats.t.ppf(0.975, 2) * 0.05 /
                                                       np.sqrt(3)))
  args = distill_study.parse_args(['--steps', '7', '--batch', '16'])
  text = distill_study.table(rows, args, [0, 1, 2])
  assert 'after 7 steps of batch 16' in text and text.count('\n| ') == 4  # header + 3 arms
  assert f'{np.mean(values):.1%} ± {half:.1%}' in text
  distill_study.plot(rows, str(tmp_path / 'distill.png'))
  assert (tmp_path / 'distill.png').stat().st_size > 0


def test_step_time_leaves_out_the_compiling_interval(tmp_path):
  path = tmp_path / 'metrics.jsonl'
  lines = [{'step': 25, 'loss': 1.0, 'images_per_s': 10.0}, {'step': 50, 'images_per_s': 200.0},
           {'step': 75, 'images_per_s': 100.0}, {'step': 100, 'images_per_s': 400.0}]
  path.write_text(''.join(json.dumps(line) + '\n' for line in lines))
  assert distill_study.step_seconds(str(path), 100) == 100 / 200.0
