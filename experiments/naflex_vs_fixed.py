"""Fixed resolution vs NaFlex at matched training compute, on the built-in layout captions.

For each seed, the main job trains `siglip2_naflex_small` at fixed resolution (every scene
squashed to 64 x 64: 64 patches of 8 px) for `--pretrain-steps` + `--steps` steps, keeping its
checkpoint after the pre-training steps. From that checkpoint a second run continues NaFlex
(each scene at its own aspect ratio, sequence lengths `--lengths` drawn per step) for as many
steps as fit in the model FLOPs of the fixed run's last `--steps` (`clip.flops.train_step_flops`,
padding included: what the device computes): the two arms share their start and spend the same
compute after it. (From scratch, NaFlex learned much slower than the squashed baseline on this
data: see docs/naflex.md; `--pretrain-steps 0` runs that protocol.) Each arm is evaluated on
held-out scenes (`data.synthetic_layout_eval`: the fixed model on squashed scenes, the NaFlex one
at each of `--eval-lengths`), per aspect-ratio bucket.

  python -m experiments.naflex_vs_fixed                        # 3 seeds, about 25 min on 2 cores
  python -m experiments.naflex_vs_fixed --seeds 0 --steps 50 --pretrain-steps 50   # a quick look

Writes <out>/{table.md, results.json, buckets.png}: the mean over seeds and a 95% t-interval, and
the runs' workdirs under runs/.
"""
import argparse
import json
import os
import shutil

import numpy as np
from scipy import stats

# Per bucket: the colours (which a model at this scale learns) and the stripes (what a squash
# averages away); overall: those and the layout, the order and retrieval.
BUCKET_TASKS = (('colours_top1', 'colours'), ('patterns_top1', 'patterns'))
TASKS = BUCKET_TASKS + (('layout_top1', 'layout'), ('order_top1', 'order'),
                        ('image_to_text_R@1', 'image→text R@1'))


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--seeds', default='0,1,2')
  parser.add_argument('--pretrain-steps', type=int, default=400,
                      help='fixed-resolution steps both arms share')
  parser.add_argument('--steps', type=int, default=300,
                      help='the fixed arm\'s steps after them (NaFlex: as many FLOPs)')
  parser.add_argument('--batch', type=int, default=64)
  parser.add_argument('--lengths', default='32/64/96', help='NaFlex training lengths')
  parser.add_argument('--eval-lengths', default='32,64,96')
  parser.add_argument('--eval-examples', type=int, default=1000)
  parser.add_argument('--out', default='results/naflex_vs_fixed')
  return parser.parse_args(argv)


def matched_steps(fixed_steps, batch, lengths, seed, start=0):
  """(NaFlex steps, fixed TFLOP, NaFlex TFLOP): the most NaFlex steps from step `start` of the
  plan (its lengths drawn by `seed`) whose model FLOPs do not exceed `fixed_steps`
  fixed-resolution steps'."""
  from clip import flops  # pylint: disable=g-import-not-at-top
  from data import naflex_batching  # pylint: disable=g-import-not-at-top
  from experiments.configs import siglip2_naflex_small  # pylint: disable=g-import-not-at-top
  cfg = siglip2_naflex_small.get_config().model
  budget = fixed_steps * flops.train_step_flops(cfg, batch)
  plan = naflex_batching.NaFlexBatching(cfg.vision.patch_size, lengths, batch_size=batch,
                                        seed=seed)
  per_length = {s: flops.train_step_flops(cfg, batch, num_patches=s) for s in plan.seq_lengths}
  total, steps = 0.0, 0
  while total + per_length[plan.seq_len(start + steps)] <= budget:
    total += per_length[plan.seq_len(start + steps)]
    steps += 1
  return steps, budget / 1e12, total / 1e12


def train(out, name, seed, steps, batch, naflex, lengths, eval_examples, extra=()):
  """Runs the main job (in this process) unless its eval.json exists; returns the eval."""
  from experiments import train as train_job  # pylint: disable=g-import-not-at-top
  workdir = run_dir(out, name, seed)
  path = os.path.join(workdir, 'eval.json')
  if not os.path.exists(path):
    arg = f'naflex={naflex},steps={steps},batch={batch},lengths={lengths}'
    train_job.main(['--config', f'siglip2_naflex_small:{arg}', '--workdir', workdir,
                    '--set', f'train.seed={seed}', '--eval-examples', str(eval_examples),
                    *extra])
  with open(path) as f:
    return json.load(f)


def run_dir(out, name, seed):
  return os.path.join(out, 'runs', f'{name}_seed{seed}')


def start_from(source, step, workdir):
  """`workdir` starts as `source` did at checkpoint `step`: that checkpoint and the model's
  files (a resumed main job continues from it)."""
  if os.path.exists(os.path.join(workdir, 'checkpoints')):
    return
  shutil.copytree(os.path.join(source, 'checkpoints', str(step)),
                  os.path.join(workdir, 'checkpoints', str(step)))
  for name in os.listdir(source):
    if name.endswith('.json') and name not in ('eval.json', 'eval_best.json'):
      shutil.copy(os.path.join(source, name), workdir)


def interval(values):
  """(mean, half-width of the 95% t-interval; 0 for one value)."""
  values = np.asarray(values, np.float64)
  if len(values) < 2:
    return float(values.mean()), 0.0
  half = stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / np.sqrt(len(values))
  return float(values.mean()), float(half)


def summary(evals, buckets):
  """{(mode, task, bucket or 'all'): (mean, half-width)} over seeds, held-out split."""
  out = {}
  for mode, runs in evals.items():
    prefix = 'heldout' if mode == 'fixed' else f'heldout/len{mode[len("naflex@"):]}'
    for task, _ in TASKS:
      for bucket in ('all',) + buckets:
        key = f'{prefix}/{task}' if bucket == 'all' else f'{prefix}/{bucket}/{task}'
        out[(mode, task, bucket)] = interval([r[key] for r in runs])
  return out


def _modes(rows):
  return sorted({m for m, _, _ in rows}, key=lambda m: (m != 'fixed', m))


def _name(mode):
  return 'fixed 64 x 64 (squashed)' if mode == 'fixed' else f'NaFlex, evaluated at S={mode[7:]}'


def table(rows, buckets, compute):
  """Markdown: one table per bucket task (its accuracy per aspect-ratio bucket), one overall."""
  cell = lambda mode, task, b: '{:.1%} ± {:.1%}'.format(*rows[(mode, task, b)])
  lines = []
  for task, title in BUCKET_TASKS:
    lines += [f'Held-out `{task}` ({title}) per bucket (width x height):', '',
              f'| model | {" | ".join(buckets)} | all |', '|---|' + '---:|' * (len(buckets) + 1)]
    lines += [f'| {_name(m)} | ' + ' | '.join(cell(m, task, b) for b in buckets + ('all',))
              + ' |' for m in _modes(rows)]
    lines.append('')
  lines += ['Held-out, all buckets:', '', '| model | ' + ' | '.join(t for _, t in TASKS) + ' |',
            '|---|' + '---:|' * len(TASKS)]
  lines += [f'| {_name(m)} | ' + ' | '.join(cell(m, task, 'all') for task, _ in TASKS) + ' |'
            for m in _modes(rows)]
  return '\n'.join(lines + ['', compute])


def plot(rows, buckets, path):
  """Per-bucket accuracy of each bucket task, one panel each, the arms side by side."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  modes = _modes(rows)
  fig, axes = plt.subplots(1, len(BUCKET_TASKS), figsize=(11, 4))
  width = 0.8 / len(modes)
  for ax, (task, title) in zip(axes, BUCKET_TASKS):
    for i, mode in enumerate(modes):
      mean = [rows[(mode, task, b)][0] for b in buckets]
      err = [rows[(mode, task, b)][1] for b in buckets]
      ax.bar(np.arange(len(buckets)) + i * width, mean, width, yerr=err, capsize=3,
             label='fixed (squashed)' if mode == 'fixed' else f'NaFlex S={mode[7:]}')
    ax.set_xticks(np.arange(len(buckets)) + width * (len(modes) - 1) / 2, buckets)
    ax.set_xlabel('aspect-ratio bucket (width x height)')
    ax.set_ylabel(f'held-out {title} accuracy')
  axes[0].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main(argv=None):
  args = parse_args(argv)
  from data import synthetic_layout  # pylint: disable=g-import-not-at-top
  seeds = [int(s) for s in args.seeds.split(',')]
  lengths = tuple(int(s) for s in args.lengths.split('/'))
  evals, compute = {'fixed': []}, []
  pre = args.pretrain_steps
  for seed in seeds:
    steps, fixed_tflop, naflex_tflop = matched_steps(args.steps, args.batch, lengths, seed, pre)
    compute.append((seed, steps, fixed_tflop, naflex_tflop))
    keep = ['--checkpoint-every', str(pre)] if pre else []
    evals['fixed'].append(train(args.out, 'fixed', seed, pre + args.steps, args.batch, False,
                                args.lengths, args.eval_examples, keep))
    if pre:
      start_from(run_dir(args.out, 'fixed', seed), pre, run_dir(args.out, 'naflex', seed))
    run = train(args.out, 'naflex', seed, pre + steps, args.batch, True, args.lengths,
                args.eval_examples)
    for s in args.eval_lengths.split(','):
      evals.setdefault(f'naflex@{s}', []).append(run)
  buckets = synthetic_layout.BUCKET_NAMES
  rows = summary(evals, buckets)
  note = (f'Held-out scenes ({args.eval_examples} per split), mean and 95% t-interval over seeds '
          f'{args.seeds}; both arms from the same {pre} fixed-resolution steps. Compute after '
          'them per seed (model TFLOP, padding included): '
          + '; '.join(f'seed {s}: fixed {args.steps} steps {f:.2f}, NaFlex {n} steps {t:.2f}'
                      for s, n, f, t in compute))
  text = table(rows, buckets, note)
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, 'table.md'), 'w') as f:
    f.write(text + '\n')
  with open(os.path.join(args.out, 'results.json'), 'w') as f:
    json.dump({'args': vars(args), 'compute': compute,
               'rows': {'/'.join(k): v for k, v in rows.items()}}, f, indent=2)
  plot(rows, buckets, os.path.join(args.out, 'buckets.png'))
  print(text)


if __name__ == '__main__':
  main()
