"""The study's figures: accuracy against the batch, learning curves, the learning-rate sweep and
the horizon stage, as PNGs."""
import os

import matplotlib
import numpy as np

from experiments.loss_ablation import settings
from experiments.loss_ablation import statistics

matplotlib.use('Agg')  # files only, no display; set before pyplot is imported
from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position


def plot(runs, results, args, out):
  """accuracy_vs_batch.png, curves.png, lr_sweep.png and horizon.png into `out`."""
  for draw, name in ((_plot_accuracy, 'accuracy_vs_batch'), (_plot_curves, 'curves'),
                     (_plot_sweep, 'lr_sweep'), (_plot_horizon, 'horizon')):
    fig = draw(runs, results, args)
    fig.tight_layout()
    fig.savefig(os.path.join(out, name + '.png'), dpi=100)
    plt.close(fig)


def _errorbars(ax, xs, rows, loss, key, scale, **style):
  ax.errorbar(xs, [scale * r[loss][key][0] for r in rows],
              yerr=[scale * np.nan_to_num(r[loss][key][1]) for r in rows], capsize=3, **style)


def _log_ticks(ax, values, fmt=str, **kw):
  ax.set_xticks(values)
  ax.set_xticklabels([fmt(v) for v in values], **kw)
  ax.minorticks_off()


def _plot_accuracy(runs, results, args):
  rows, long = results['grid'], results['long']
  metrics = statistics.METRICS
  fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.8))
  batches = sorted({r['batch'] for r in rows + long})
  for loss, marker, color in zip(settings.LOSSES, 'os', ('C0', 'C1')):
    for ax, (key, title, scale) in zip(axes, metrics):
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


def _plot_curves(runs, results, args):
  del results
  cols = min(len(args.batch_sizes), 3)
  nrows = -(-len(args.batch_sizes) // cols)
  fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 3 * nrows + 0.4), squeeze=False)
  for ax in axes.flat[len(args.batch_sizes):]:
    ax.axis('off')
  for ax, batch in zip(axes.flat, args.batch_sizes):
    for loss in settings.LOSSES:
      rs = statistics.rule_runs(runs, loss, batch, args.steps)
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


def _plot_sweep(runs, results, args):
  del runs, args
  sweep = results['lr_sweep']
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
  for ax, (key, title, scale) in zip(axes, statistics.METRICS[:2]):
    for r in sweep:
      ax.plot(r['learning_rates'], [scale * a for a in r[key]],
              '-o' if r['loss'] == 'contrastive' else '--s', label=f'{r["loss"]} b{r["batch"]}')
    ax.set(xscale='log', xlabel='learning rate (the rule\'s x0.5, x1, x2)', title=title)
    _log_ticks(ax, sorted({lr for r in sweep for lr in r['learning_rates']}),
               lambda lr: f'{lr:.2g}', rotation=45, fontsize=7)
  axes[0].legend(fontsize=7, ncol=2)
  fig.suptitle('learning-rate sweep, seed 0', fontsize=9)
  return fig


def _plot_horizon(runs, results, args):
  """The smallest batch's results against its run length: where they stop moving, its curve
  has flattened."""
  del runs
  rows = results['horizon']
  fig, axes = plt.subplots(1, 3, figsize=(12.6, 3.8))
  steps = [r['steps'] for r in rows]
  panels = statistics.METRICS[:2] + (('final_loss', 'final training loss (interval mean)', 1),)
  for loss, marker in zip(settings.LOSSES, 'os'):
    for ax, (key, title, scale) in zip(axes, panels):
      _errorbars(ax, steps, rows, loss, key, scale, fmt='-' + marker, label=loss)
      ax.set(xscale='log', xlabel='optimizer steps (each a whole run, warmup + cosine)',
             title=title)
      _log_ticks(ax, steps)
  axes[0].legend(fontsize=8)
  fig.suptitle(f'batch {min(args.batch_sizes)} trained longer: mean ± std over {args.seeds} '
               'seed(s)', fontsize=9)
  return fig
