"""Distillation on the built-in data: a student half the size of `small`, taught by the main job's
`small`, online and from reinforced shards, against the same student trained alone.

The teacher is the main job's result (`results/train/small`, trained here first if missing). The
built-in captions are written once as tfrecord shards (`data.synthetic_shards`), and reinforced
once (`experiments.reinforce`: the teacher's embeddings of `--augmentations` random crops of each
image and of its caption). Each seed then trains the student three ways, for the same steps on the
same shards (the shard pipeline's random resized crops):

  alone    the contrastive loss only;
  online   + `--weight` x KD, the teacher run inside each step on the student's crop;
  offline  + `--weight` x KD, from the stored embeddings (the crop replays a stored one).

and each is evaluated on held-out attribute combinations (`data.synthetic_eval`: zero-shot top-1
and retrieval recall). The student is `small` at half its width (64; embed_dim 64): about half of
its parameters (the token embedding dominates both).

  python -m experiments.distill_study                      # 3 seeds, about 30 min on 2 cores
  python -m experiments.distill_study --seeds 0 --steps 50  # a quick look

Writes <out>/{table.md, results.json, distill.png}: per arm the mean over seeds and a 95%
t-interval of each metric, the training step time, and the runs' workdirs under runs/.
"""
import argparse
import json
import os

import numpy as np

from experiments.naflex_vs_fixed import interval

ARMS = ('alone', 'online', 'offline')
TASKS = (('heldout/colour_shape_top1', 'colour+shape'), ('heldout/shape_top1', 'shape'),
         ('heldout/colour_top1', 'colour'), ('heldout/count_top1', 'count'),
         ('heldout/size_top1', 'size'), ('heldout/image_to_text_R@1', 'image→text R@1'),
         ('heldout/text_to_image_R@1', 'text→image R@1'))
# `small` at half its width (its blocks' heads 64 wide become 32 wide).
STUDENT = ('model.embed_dim=64', 'model.vision.width=64', 'model.text.width=64')


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--teacher', default=os.path.join('results', 'train', 'small'),
                      help='the teacher workdir (trained with the main job\'s `small` if missing)')
  parser.add_argument('--out', default=os.path.join('results', 'distill_study'))
  parser.add_argument('--seeds', default='0,1,2')
  parser.add_argument('--steps', type=int, default=500)
  parser.add_argument('--batch', type=int, default=128)
  parser.add_argument('--examples', type=int, default=16384, help='shard examples written')
  parser.add_argument('--augmentations', type=int, default=4, help='crops stored per image')
  parser.add_argument('--weight', type=float, default=1.0, help='distill_weight')
  parser.add_argument('--eval-examples', type=int, default=1024)
  parser.add_argument('--set', action='append', default=[], metavar='FIELD=VALUE',
                      help='more main-job settings for every run (tests make them tiny)')
  return parser.parse_args(argv)


def ensure_teacher(path, extra=()):
  """The teacher workdir: the main job's `small` trained into `path` unless it holds a run."""
  from experiments import train as train_job  # pylint: disable=g-import-not-at-top
  if not os.path.exists(os.path.join(path, 'model_config.json')):
    train_job.main(['--config', 'small', '--workdir', path, *extra])
  return path


def write_shards(out, examples, seed=1234):
  """The built-in captions as tfrecord shards (once), another seed than any evaluation's."""
  from data import synthetic  # pylint: disable=g-import-not-at-top
  from data import synthetic_shards  # pylint: disable=g-import-not-at-top
  folder = os.path.join(out, 'shards')
  if not os.path.exists(os.path.join(folder, 'done')):
    synthetic_shards.write_tfrecords(synthetic.SyntheticCaptions(seed=seed, resolution=64),
                                     folder, examples, num_shards=8)
    open(os.path.join(folder, 'done'), 'w').close()
  return os.path.join(folder, '*.tfrecord')


def reinforce(out, shards, teacher, augmentations):
  """The shards reinforced with the teacher's embeddings (once); the glob of the new shards."""
  from experiments import reinforce as reinforce_job  # pylint: disable=g-import-not-at-top
  folder = os.path.join(out, 'reinforced')
  if not os.path.exists(os.path.join(folder, 'reinforced.json')):
    reinforce_job.main(['--data', shards, '--teacher', teacher, '--augmentations',
                        str(augmentations), '--out', folder])
  return os.path.join(folder, '*.tfrecord')


def train(out, arm, seed, args, data, teacher):
  """One run of the main job (in this process) unless its eval.json exists: (eval, seconds per
  step, the median over logged intervals after the first)."""
  from experiments import train as train_job  # pylint: disable=g-import-not-at-top
  workdir = os.path.join(out, 'runs', f'{arm}_seed{seed}')
  path = os.path.join(workdir, 'eval.json')
  if not os.path.exists(path):
    extra = [] if arm == 'alone' else ['--distill-weight', str(args.weight)]
    extra += ['--teacher', teacher] if arm == 'online' else []
    sets = [x for s in STUDENT + tuple(args.set) for x in ('--set', s)]
    train_job.main(['--config', f'small:batch={args.batch},steps={args.steps}', '--workdir',
                    workdir, '--data', data, '--eval-examples', str(args.eval_examples),
                    '--set', f'train.seed={seed}', *sets, *extra])
  with open(path) as f:
    results = json.load(f)
  return results, step_seconds(os.path.join(workdir, 'metrics.jsonl'), args.batch)


def step_seconds(path, batch):
  """Median seconds per step from metrics.jsonl's throughput (the first interval compiles)."""
  with open(path) as f:
    rates = [json.loads(line)['images_per_s'] for line in f if '"images_per_s"' in line]
  rates = rates[1:] or rates
  return float(batch / np.median(rates))


def summarise(evals, times):
  """{arm: {metric: (mean, half-width), 'step_s': (mean, half-width)}}."""
  return {arm: {**{key: interval([r[key] for r in evals[arm]]) for key, _ in TASKS},
                'step_s': interval(times[arm])} for arm in evals}


def table(rows, args, seeds):
  cell = lambda v: f'{v[0]:.1%} ± {v[1]:.1%}'
  lines = [f'Student (`small` at width 64) after {args.steps} steps of batch {args.batch}, '
           f'seeds {seeds}, held-out combinations, mean ± 95% t-interval; KD weight '
           f'{args.weight}, {args.augmentations} stored crops per image:', '',
           '| arm | ' + ' | '.join(t for _, t in TASKS) + ' | s/step |',
           '|---|' + '---:|' * (len(TASKS) + 1)]
  for arm in rows:
    s = rows[arm]['step_s']
    lines.append(f'| {arm} | ' + ' | '.join(cell(rows[arm][k]) for k, _ in TASKS)
                 + f' | {s[0]:.3f} ± {s[1]:.3f} |')
  return '\n'.join(lines)


def plot(rows, path):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(10, 4))
  width = 0.8 / len(rows)
  for i, arm in enumerate(rows):
    ax.bar(np.arange(len(TASKS)) + i * width, [rows[arm][k][0] for k, _ in TASKS], width,
           yerr=[rows[arm][k][1] for k, _ in TASKS], capsize=3, label=arm)
  ax.set_xticks(np.arange(len(TASKS)) + width * (len(rows) - 1) / 2, [t for _, t in TASKS])
  ax.set_ylabel('held-out accuracy / recall')
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main(argv=None):
  args = parse_args(argv)
  seeds = [int(s) for s in args.seeds.split(',')]
  os.makedirs(args.out, exist_ok=True)
  teacher = ensure_teacher(args.teacher)
  shards = write_shards(args.out, args.examples)
  reinforced = reinforce(args.out, shards, teacher, args.augmentations)
  evals, times = {arm: [] for arm in ARMS}, {arm: [] for arm in ARMS}
  for seed in seeds:
    for arm in ARMS:
      result, seconds = train(args.out, arm, seed, args, reinforced if arm == 'offline' else
                              shards, teacher)
      evals[arm].append(result)
      times[arm].append(seconds)
  rows = summarise(evals, times)
  text = table(rows, args, seeds)
  print(text)
  with open(os.path.join(args.out, 'table.md'), 'w') as f:
    f.write(text + '\n')
  with open(os.path.join(args.out, 'results.json'), 'w') as f:
    json.dump({arm: {k: list(v) for k, v in r.items()} for arm, r in rows.items()}, f, indent=2)
  plot(rows, os.path.join(args.out, 'distill.png'))


if __name__ == '__main__':
  main()
