"""A run's metrics log (`clip/train/metrics_log.py`): one JSON line per logged step, read back up
to a step; reopened at a resumed run's step it drops what a killed run logged after it; the
plot is a PNG."""
import json

import numpy as np

from clip.train import metrics_log


def test_lines_are_written_read_back_and_cut_at_the_resumed_step(tmp_path):
  path = str(tmp_path / 'metrics.jsonl')
  log = metrics_log.MetricsLog(path)
  for step in (5, 10, 15):
    log.write(step, {'loss': np.float32(1 / step), 'accuracy': 0.5})
  with open(path) as f:
    first = json.loads(f.readline())
  assert first == {'step': 5, 'loss': float(np.float32(1 / 5)), 'accuracy': 0.5}
  assert [r['step'] for r in metrics_log.read_metrics(path, 10)] == [5, 10]
  log = metrics_log.MetricsLog(path, start_step=10)  # resumed from the step-10 checkpoint
  log.write(15, {'loss': 0.25, 'accuracy': 0.75})
  records = metrics_log.read_metrics(path, 100)
  assert [(r['step'], r['loss']) for r in records] == [
      (5, float(np.float32(0.2))), (10, float(np.float32(0.1))), (15, 0.25)]
  metrics_log.MetricsLog(path)  # a fresh run in the same workdir starts empty
  assert not metrics_log.read_metrics(path, 100)
  assert not metrics_log.read_metrics(str(tmp_path / 'missing.jsonl'), 100)


def test_the_plot_is_a_png(tmp_path):
  records = [{'step': s, 'loss': 1 / s, 'accuracy': s / 10} for s in range(1, 10)]
  metrics_log.plot_losses(records, str(tmp_path / 'loss.png'), 'tiny')
  assert (tmp_path / 'loss.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
