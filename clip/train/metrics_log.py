"""A run's metrics log: one JSON line per logged step (`metrics.jsonl`, and TensorBoard's event
files beside it where torch's `SummaryWriter` is installed), read back and plotted."""
import json
import os

import jax


class MetricsLog:
  """Appends one JSON line `{'step': s, name: float, ...}` per logged step (process 0 only).

  Opened at a resumed run's `start_step`, it first drops what a killed run logged after that
  step (its last checkpoint), so the file never holds a step twice; at 0 it starts empty."""

  def __init__(self, path, start_step=0):
    self.path = path
    self.writer = None
    if jax.process_index():
      return
    kept = read_metrics(path, start_step)
    with open(path, 'w') as f:
      f.writelines(json.dumps(r) + '\n' for r in kept)
    try:
      from torch.utils import tensorboard  # pylint: disable=g-import-not-at-top
      self.writer = tensorboard.SummaryWriter(os.path.dirname(path))
    except ImportError:  # optional: torch is the [torch] extra
      pass

  def write(self, step, metrics):
    if jax.process_index():
      return
    record = {'step': int(step), **{k: float(v) for k, v in metrics.items()}}
    with open(self.path, 'a') as f:
      f.write(json.dumps(record) + '\n')
    if self.writer:
      for k, v in record.items():
        if k != 'step':
          self.writer.add_scalar(k, v, step)


def read_metrics(path, upto):
  """Logged records with step <= `upto` ([] without a file)."""
  if not os.path.exists(path):
    return []
  with open(path) as f:
    records = [json.loads(line) for line in f if line.strip()]
  return [r for r in records if r['step'] <= upto]


def plot_losses(records, path, title):
  """The training losses (total, contrastive, captioning: those logged) and accuracies of
  `records` against the step, written as a PNG to `path`."""
  import matplotlib  # pylint: disable=g-import-not-at-top  # heavy, and its backend set first
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.5))
  steps = [r['step'] for r in records]
  losses_shown = [k for k in ('loss', 'contrastive_loss', 'caption_loss') if k in records[0]]
  for key in losses_shown:
    ax_loss.plot(steps, [r[key] for r in records], label=key)
  ax_loss.set(xlabel='step', ylabel='training loss', title=title)
  for key, label in (('accuracy', 'in-batch image-text matching'),
                     ('token_accuracy', 'caption next-token (scored positions)')):
    if key in records[0]:
      ax_acc.plot(steps, [r[key] for r in records], label=label)
  ax_acc.set(xlabel='step', ylabel='training accuracy', ylim=(0, 1))
  for ax in (ax_loss, ax_acc):
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
