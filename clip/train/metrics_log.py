"""A run's metrics log: one JSON line per logged step (`metrics.jsonl`) and TensorBoard event
files of the same scalars (`tensorboard/` beside it, written through tensorboardX: neither
torch nor TensorFlow needed), read back and plotted."""
import json
import os
import re
import sys
import time
import warnings

import jax

TENSORBOARD = 'tensorboard'  # the event files' folder, beside metrics.jsonl
_TAG_BAD_CHARS = re.compile(r'[^-/\w.]')  # TensorBoard's tag alphabet (tensorboardX's rule)


class MetricsLog:
  """Appends one JSON line `{'step': s, name: float, ...}` per logged step and writes the same
  scalars to TensorBoard as `train/<name>` (evaluations: `eval/<evaluator>/<name>`, both).

  Only process 0 writes (`jax.process_index() == 0`); the others write nothing, no file or
  folder. Opened at a resumed run's `start_step`, it first drops what a killed run logged after
  that step (its last checkpoint) from the JSON lines, so the file never holds a step twice, and
  starts a new event file that tells TensorBoard to hide the older files' events after
  `start_step` (a `SessionLog.START` event at `start_step + 1`, as tensorboardX's `purge_step`;
  the old files stay, read in name order); at 0 the JSON lines start empty and TensorBoard hides
  any earlier run's events. Each write reaches the disk before it returns (an fsync); `close()`
  closes the event file, after which a write is a ValueError."""

  def __init__(self, path, start_step=0):
    self.path = path
    self.writer = None
    self.renamed = set()
    if jax.process_index():
      return
    kept = read_metrics(path, start_step)
    with open(path, 'w') as f:
      f.writelines(json.dumps(r) + '\n' for r in kept)
    self.writer = _event_file(os.path.join(os.path.dirname(path), TENSORBOARD), start_step)

  def write(self, step, metrics):
    """Logs the training `metrics` ({name: scalar}) of `step` (an int, steps done)."""
    self._write(step, metrics, 'train/')

  def write_eval(self, step, evaluator, metrics):
    """Logs an evaluation's `metrics` ({name: scalar}) at `step`: JSON keys and TensorBoard
    tags `eval/<evaluator>/<name>`. ValueError for an empty `evaluator` name."""
    if not isinstance(evaluator, str) or not evaluator:
      raise ValueError(f'an evaluation is logged under a non-empty evaluator name, got '
                       f'{evaluator!r}')
    self._write(step, {f'eval/{evaluator}/{k}': v for k, v in metrics.items()}, '')

  def close(self):
    """Flushes and closes the event file (nothing on other processes; idempotent)."""
    if self.writer:
      self.writer.close()
      self.writer = None

  def _write(self, step, metrics, tag_prefix):
    if jax.process_index():
      return
    if self.writer is None:
      raise ValueError(f'the metrics log {self.path} is closed: step {step} was not written')
    record = {'step': int(step), **_floats(metrics)}
    with open(self.path, 'a') as f:
      f.write(json.dumps(record) + '\n')
    from tensorboardX.proto import event_pb2, summary_pb2  # pylint: disable=g-import-not-at-top
    tags = {k: self._tag(tag_prefix + k) for k in record if k != 'step'}
    renamed = {k: t for k, t in tags.items() if t != tag_prefix + k and k not in self.renamed}
    if renamed:
      self.renamed.update(renamed)
      warnings.warn(f'TensorBoard tags hold letters, digits and _ - . /: metrics '
                    f'{sorted(renamed)} are tags {sorted(renamed.values())} there '
                    '(metrics.jsonl keeps the names)', stacklevel=3)
    values = [summary_pb2.Summary.Value(tag=t, simple_value=record[k]) for k, t in tags.items()]
    self.writer.write_event(event_pb2.Event(wall_time=time.time(), step=record['step'],
                                            summary=summary_pb2.Summary(value=values)))
    self.writer.flush()

  @staticmethod
  def _tag(name):
    return _TAG_BAD_CHARS.sub('_', name)


def _import_tensorboardx_without_torch():
  """Imports tensorboardX with torch hidden where nothing loaded torch yet: its package import
  loads torch where installed (tensorboardX 2.6's `writer` imports it, guarded, for type hints;
  1-4 s of a job's start-up on a 2-core CPU), though the event writer and protos used here need
  none. Hidden, tensorboardX's `import torch` raises ImportError and it takes its no-torch path;
  torch imports as usual afterwards. A tensorboardX that fails without torch is imported again
  with it visible. Called from the main thread (another thread importing torch meanwhile would
  get the ImportError)."""
  if 'tensorboardX' in sys.modules or 'torch' in sys.modules:
    return
  sys.modules['torch'] = None  # Python's marker of a module that cannot be imported
  try:
    import tensorboardX  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:  # a later tensorboardX whose import needs torch: pay for it
    for name in [n for n in sys.modules if n == 'tensorboardX' or n.startswith('tensorboardX.')]:
      del sys.modules[name]
  finally:
    sys.modules.pop('torch', None)


def _event_file(folder, start_step):
  """A new event file in `folder` whose first event tells TensorBoard to hide the events of
  earlier files at steps after `start_step`. It writes synchronously (tensorboardX's
  `SummaryWriter` queues events to a thread that reaches the disk every 120 s: a killed run would
  lose what it logged before its last checkpoint)."""
  _import_tensorboardx_without_torch()  # process 0's only
  from tensorboardX import event_file_writer  # pylint: disable=g-import-not-at-top
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  os.makedirs(folder, exist_ok=True)
  # tensorboardX names files by the second; the suffix (nanoseconds) keeps a file unique and
  # after the run it continues, in TensorBoard's reading order, when both open in one second.
  writer = event_file_writer.EventsWriter(os.path.join(folder, 'events'),
                                          f'.{time.time_ns() % 10**9:09d}')
  writer.write_event(event_pb2.Event(wall_time=time.time(), step=start_step + 1,
                                     session_log=event_pb2.SessionLog(
                                         status=event_pb2.SessionLog.START)))
  writer.flush()
  return writer


def _floats(metrics):
  """{name: float(value)}; TypeError naming the metric whose value is not a scalar number."""
  floats = {}
  for k, v in metrics.items():
    try:
      floats[str(k)] = float(v)
    except (TypeError, ValueError):
      raise TypeError(f'metric {k!r} must be a scalar number, got {type(v).__name__} '
                      f'{v!r:.80}') from None
  return floats


def read_metrics(path, upto):
  """Logged records with step <= `upto` ([] without a file): training lines and evaluation lines
  (keys `eval/...`) in the order written."""
  if not os.path.exists(path):
    return []
  with open(path) as f:
    records = [json.loads(line) for line in f if line.strip()]
  return [r for r in records if r['step'] <= upto]


def plot_losses(records, path, title):
  """The training losses (total, contrastive, captioning, distillation: those logged) and
  accuracies of `records` (their training lines; evaluation lines are skipped) against the step,
  written as a PNG to `path`. A metric is drawn where it was logged (a resumed run may have
  started or stopped logging one)."""
  import matplotlib  # pylint: disable=g-import-not-at-top  # heavy, and its backend set first
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  records = [r for r in records if 'loss' in r]
  fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.5))
  def curve(ax, key, label):
    logged = [r for r in records if key in r]
    if logged:
      ax.plot([r['step'] for r in logged], [r[key] for r in logged], label=label)
  for key in ('loss', 'contrastive_loss', 'caption_loss', 'distill_loss'):
    curve(ax_loss, key, key)
  ax_loss.set(xlabel='step', ylabel='training loss', title=title)
  for key, label in (('accuracy', 'in-batch image-text matching'),
                     ('token_accuracy', 'caption next-token (scored positions)')):
    curve(ax_acc, key, label)
  ax_acc.set(xlabel='step', ylabel='training accuracy', ylim=(0, 1))
  for ax in (ax_loss, ax_acc):
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
