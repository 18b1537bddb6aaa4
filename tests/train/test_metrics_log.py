"""A run's metrics log (`clip/train/metrics_log.py`): one JSON line per logged step, read back up
to a step; reopened at a resumed run's step it drops what a killed run logged after it; the same
values in TensorBoard event files, read back by TensorFlow's reader, from process 0 only; the
plot is a PNG."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

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
  # A run resumed without distillation: its first lines log the KD term, its last do not.
  records = [{**r, 'distill_loss': 0.5, 'contrastive_loss': 1.0} if r['step'] < 5 else r
             for r in records]
  metrics_log.plot_losses(records, str(tmp_path / 'loss.png'), 'tiny')
  assert (tmp_path / 'loss.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def tensorboard_events(folder):
  """The event files in `folder`, in name order (TensorBoard's reading order), each as a list of
  (step, {tag: value} | 'purge'), read by TensorFlow's own reader; the file-version header
  skipped."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top  # the [test] extra's reader
  files = []
  for name in sorted(os.listdir(folder)):
    events = []
    for event in tf.compat.v1.train.summary_iterator(os.path.join(folder, name)):
      if event.HasField('summary'):
        events.append((event.step, {v.tag: v.simple_value for v in event.summary.value}))
      elif event.HasField('session_log'):
        assert event.session_log.status == event.session_log.START
        events.append((event.step, 'purge'))
    files.append(events)
  return files


def f32(x):
  return float(np.float32(x))  # an event's simple_value is a float32


def test_tensorboard_holds_the_logged_values_and_a_resume_purges_after_its_step(tmp_path):
  """Training scalars as train/<name>, evaluations as eval/<evaluator>/<name> (also in the
  JSON lines); a resumed run's new file first tells TensorBoard to drop steps after the resumed
  one (tensorboardX's purge marker; TensorBoard 2.21's EventAccumulator then shows the first
  run up to step 10 and the resumed run after it, checked by hand: docs/training.md)."""
  path = str(tmp_path / 'metrics.jsonl')
  log = metrics_log.MetricsLog(path)
  log.write(5, {'loss': np.float32(0.3), 'accuracy': 0.5})
  log.write(10, {'loss': 0.2, 'accuracy': 0.625})
  log.write_eval(10, 'zeroshot', {'top1': 0.25, 'heldout/top5': 0.75})
  log.write(15, {'loss': 0.1, 'accuracy': 0.875})  # killed after this; resumed from step 10
  log = metrics_log.MetricsLog(path, start_step=10)
  log.write(15, {'loss': 0.15, 'accuracy': 0.75})
  log.close()
  log.close()
  first, resumed = tensorboard_events(str(tmp_path / metrics_log.TENSORBOARD))
  assert first == [(1, 'purge'),
                   (5, {'train/loss': f32(0.3), 'train/accuracy': 0.5}),
                   (10, {'train/loss': f32(0.2), 'train/accuracy': 0.625}),
                   (10, {'eval/zeroshot/top1': 0.25, 'eval/zeroshot/heldout/top5': 0.75}),
                   (15, {'train/loss': f32(0.1), 'train/accuracy': 0.875})]
  assert resumed == [(11, 'purge'), (15, {'train/loss': f32(0.15), 'train/accuracy': 0.75})]
  assert metrics_log.read_metrics(path, 100) == [
      {'step': 5, 'loss': f32(0.3), 'accuracy': 0.5}, {'step': 10, 'loss': 0.2, 'accuracy': 0.625},
      {'step': 10, 'eval/zeroshot/top1': 0.25, 'eval/zeroshot/heldout/top5': 0.75},
      {'step': 15, 'loss': 0.15, 'accuracy': 0.75}]
  with pytest.raises(ValueError, match='is closed: step 20 was not written'):
    log.write(20, {'loss': 0.1})


def test_only_process_0_writes(tmp_path, monkeypatch):
  monkeypatch.setattr(jax, 'process_index', lambda: 1)
  log = metrics_log.MetricsLog(str(tmp_path / 'metrics.jsonl'))
  log.write(5, {'loss': 0.5})
  log.write_eval(5, 'zeroshot', {'top1': 0.5})
  log.close()
  assert not os.listdir(tmp_path)


def test_bad_metrics_and_tags_are_named(tmp_path):
  log = metrics_log.MetricsLog(str(tmp_path / 'metrics.jsonl'))
  with pytest.raises(TypeError, match=r"metric 'loss' must be a scalar number, got list \[1, 2\]"):
    log.write(5, {'loss': [1, 2]})
  with pytest.raises(ValueError, match="non-empty evaluator name, got ''"):
    log.write_eval(5, '', {'top1': 0.5})
  with pytest.warns(UserWarning, match=r"metrics \['eval/retrieval/R@1'\] are tags "
                     r"\['eval/retrieval/R_1'\] there"):
    log.write_eval(5, 'retrieval', {'R@1': 0.5})
  log.close()
  [[purge, event]] = tensorboard_events(str(tmp_path / metrics_log.TENSORBOARD))
  assert purge == (1, 'purge') and event == (5, {'eval/retrieval/R_1': 0.5})
  assert metrics_log.read_metrics(str(tmp_path / 'metrics.jsonl'), 5) == [
      {'step': 5, 'eval/retrieval/R@1': 0.5}]


def test_the_event_file_is_written_without_loading_torch(tmp_path):
  """tensorboardX loads torch where installed; the log hides it (a job's start-up saves 1-4 s)
  and leaves it importable. A fresh process: this one may hold torch already."""
  code = ('import sys\n'
          'from clip.train import metrics_log\n'
          f'log = metrics_log.MetricsLog({str(tmp_path / "metrics.jsonl")!r})\n'
          'log.write(1, {"loss": 0.5})\n'
          'log.close()\n'
          # Not loaded, nor left marked unimportable (a None entry is in sys.modules).
          'assert "tensorboardX" in sys.modules and "torch" not in sys.modules, "torch loaded"\n'
          'print("ok")\n')
  done = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=False)
  assert done.returncode == 0, done.stderr[-2000:]
  assert done.stdout.split() == ['ok']
  assert len(os.listdir(tmp_path / metrics_log.TENSORBOARD)) == 1
