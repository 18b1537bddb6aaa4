"""Compare finished runs of the main job: a markdown table of their start and end loss and their
zero-shot / retrieval evaluation, and one plot of their loss curves.

  python -m experiments.compare_runs --runs small,siglip_small,registers_small

Reads `results/train/<run>/{metrics.jsonl,eval.json}` (what `experiments/train.py` writes) and
writes `results/compare_runs/{table.md,compare.json,loss.png}`.
"""
import argparse
import json
import os

import matplotlib

matplotlib.use('Agg')  # files only, no display; set before pyplot is imported
from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position

COLUMNS = (('heldout/colour_shape_top1', 'held-out colour+shape'),
           ('heldout/shape_top1', 'held-out shape'),
           ('train/colour_shape_top1', 'trained colour+shape'),
           ('heldout/image_to_text_R@1', 'held-out image→text R@1'),
           ('heldout/text_to_image_R@1', 'held-out text→image R@1'))


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--runs', required=True, help='comma-separated run names (workdirs)')
  parser.add_argument('--root', default='results/train')
  parser.add_argument('--out', default='results/compare_runs')
  parser.add_argument('--window', type=int, default=4, help='logged points averaged at each end')
  return parser.parse_args(argv)


def read_run(root, name):
  folder = os.path.join(root, name)
  paths = [os.path.join(folder, f) for f in ('metrics.jsonl', 'eval.json')]
  missing = [p for p in paths if not os.path.exists(p)]
  if missing:
    raise FileNotFoundError(f'run {name!r} is not finished: missing {missing}; train it with '
                            f'python -m experiments.train --config {name}')
  with open(paths[0]) as f:
    metrics = [json.loads(line) for line in f if line.strip()]
  with open(paths[1]) as f:
    evaluation = json.load(f)
  return {'name': name, 'curve': [(m['step'], m['loss']) for m in metrics if 'loss' in m],
          'eval': evaluation}


def summarise(run, window):
  losses = [loss for _, loss in run['curve']]
  row = {'run': run['name'], 'steps': run['curve'][-1][0],
         'first_loss': sum(losses[:window]) / len(losses[:window]),
         'last_loss': sum(losses[-window:]) / len(losses[-window:])}
  for key, _ in COLUMNS:
    row[key] = run['eval'][key]
  row['chance'] = run['eval']['heldout/colour_shape_chance']
  return row


def table(rows, window):
  header = (['run', 'steps', f'loss (first {window} logs)', f'loss (last {window} logs)']
            + [title for _, title in COLUMNS])
  lines = ['| ' + ' | '.join(header) + ' |', '| --- |' + ' ---: |' * (len(header) - 1)]
  for r in rows:
    cells = [f'`{r["run"]}`', str(r['steps']), f'{r["first_loss"]:.3f}', f'{r["last_loss"]:.3f}']
    cells += [f'{100 * r[key]:.1f}%' for key, _ in COLUMNS]
    lines.append('| ' + ' | '.join(cells) + ' |')
  chance = rows[0]['chance']
  lines.append(f'| chance | | | | {100 * chance:.1f}% | {100 / 6:.1f}% | {100 * chance:.1f}% '
               '| 0.1% | 0.1% |')
  return '\n'.join(lines)


def plot(runs, path):
  fig, ax = plt.subplots(figsize=(6, 3.5))
  for run in runs:
    steps, losses = zip(*run['curve'])
    ax.plot(steps, losses, label=run['name'])
  ax.set_xlabel('step')
  ax.set_ylabel('training loss (each run its own loss)')
  ax.set_yscale('log')
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv=None):
  args = parse_args(argv)
  runs = [read_run(args.root, name) for name in args.runs.split(',')]
  rows = [summarise(run, args.window) for run in runs]
  text = table(rows, args.window)
  print(text)
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, 'table.md'), 'w') as f:
    f.write(text + '\n')
  with open(os.path.join(args.out, 'compare.json'), 'w') as f:
    json.dump({'rows': rows}, f, indent=2)
  plot(runs, os.path.join(args.out, 'loss.png'))
  print(f'wrote {args.out}/table.md, compare.json, loss.png')


if __name__ == '__main__':
  main()
