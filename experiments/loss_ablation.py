"""Loss ablation: contrastive vs sigmoid, all-gather vs ring, across global batch sizes and seeds.

Every run trains the same small ViT CLIP on the built-in captioned shapes with 8 (simulated)
devices in pure data parallelism, sees the same number of examples (so a larger batch takes fewer
steps), and is evaluated on the (shape, colour) pairs training never showed: zero-shot accuracy
and image->text recall@1. Temperature and bias start as the papers say (contrastive: scale
ln(1/0.07); sigmoid: scale ln 10, bias -10), both learnable.

  python -m experiments.loss_ablation          # 2 losses x 2 implementations x 3 batches x 3 seeds
  python -m experiments.loss_ablation --quick  # a reduced grid in a few minutes

Writes into --out (default results/loss_ablation): runs/<run>.json (one per finished run; a rerun
skips them), summary.json, table.md (mean +- std over seeds), accuracy_vs_batch.png and
curves.png. The ring and all-gather implementations of one loss must follow the same trajectory
for the same seed; the largest relative difference is reported and checked (--trajectory-rtol).
"""
import argparse
import dataclasses
import json
import os
import time

from experiments import simulated_devices

LOSSES = ('contrastive', 'sigmoid')
IMPLEMENTATIONS = {'all-gather': '{}', 'ring': 'ring_{}'}  # -> training.TrainConfig.loss
README_BEGIN, README_END = '<!-- loss_ablation:begin -->', '<!-- loss_ablation:end -->'


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--batch-sizes', default='64,256,1024')
  parser.add_argument('--seeds', type=int, default=3)
  parser.add_argument('--examples', type=int, default=32768, help='seen by every run')
  parser.add_argument('--eval-examples', type=int, default=1024)
  parser.add_argument('--learning-rate', type=float, default=1e-3)
  parser.add_argument('--log-points', type=int, default=16, help='logged steps per run')
  parser.add_argument('--devices', type=int, default=8, help='simulated CPU devices')
  parser.add_argument('--trajectory-rtol', type=float, default=1e-3)
  parser.add_argument('--quick', action='store_true', help='batches 32,64, one seed, 4096 examples')
  parser.add_argument('--out', default='results/loss_ablation')
  parser.add_argument('--update-readme', default=None,
                      help='replace the table between the loss_ablation markers of this file')
  args = parser.parse_args(argv)
  if args.quick:
    args.batch_sizes, args.seeds, args.examples, args.eval_examples = '32,64', 1, 4096, 256
  args.batch_sizes = [int(b) for b in args.batch_sizes.split(',')]
  bad = [b for b in args.batch_sizes if b % args.devices or args.examples % b]
  if bad:
    parser.error(f'batch sizes must divide --examples {args.examples} and be multiples of '
                 f'--devices {args.devices}, got {bad}')
  return args


def model_config(loss='contrastive'):
  """The fixed model of the study: the `tiny` config's towers (ViT 2x64 on 32px images, 8px
  patches; text 2x64) with 64-wide embeddings, SigLIP's bias where the loss takes one."""
  from experiments.configs import tiny  # pylint: disable=g-import-not-at-top
  return dataclasses.replace(tiny.get_config(f'loss={loss}').model, embed_dim=64)


def run_name(loss, impl, batch, seed):
  return f'{loss}-{impl}-b{batch}-s{seed}'


def train_one(loss, impl, batch, seed, args):
  """One run: its logged losses, final metrics, step time and per-device temp memory."""
  import jax  # pylint: disable=g-import-not-at-top
  from clip import sharding  # pylint: disable=g-import-not-at-top
  from clip import training  # pylint: disable=g-import-not-at-top
  from data import synthetic  # pylint: disable=g-import-not-at-top
  from data import synthetic_eval  # pylint: disable=g-import-not-at-top
  cfg = model_config(loss)
  steps = args.examples // batch
  tcfg = training.TrainConfig(batch_size=batch, total_steps=steps, warmup_steps=steps // 10,
                              loss=IMPLEMENTATIONS[impl].format(loss),
                              learning_rate=args.learning_rate, weight_decay=0.1,
                              mesh=(args.devices, 1, 1), seed=seed)
  mesh = sharding.make_mesh(*tcfg.mesh, devices=jax.devices()[:args.devices])
  state, step_fn, _, _, _ = training.setup(cfg, tcfg, mesh)
  data = synthetic.SyntheticCaptions(seed=seed, resolution=cfg.image_resolution).batches(
      batch, context_length=cfg.context_length)
  first = training.global_batch(mesh, next(data))
  start = time.perf_counter()
  compiled = step_fn.lower(state, first).compile()
  compile_s = time.perf_counter() - start
  temp_bytes = compiled.memory_analysis().temp_size_in_bytes
  log_every = max(steps // args.log_points, 1)
  curve, batch_arrays, start = [], first, None
  for step in range(steps):
    if step == 1:
      start = time.perf_counter()  # the first step includes one-off work
    state, metrics = compiled(state, batch_arrays)
    if (step + 1) % log_every == 0 or step + 1 == steps:
      m = jax.device_get(metrics)
      curve.append({'step': step + 1, 'loss': float(m['loss']),
                    'logit_scale': float(m['logit_scale'])})
    if step + 1 < steps:
      batch_arrays = training.global_batch(mesh, next(data))
  jax.block_until_ready(state)
  step_s = (time.perf_counter() - start) / max(steps - 1, 1) if start else float('nan')
  params = jax.device_get(state['params'])
  results = synthetic_eval.evaluate(params, cfg, args.eval_examples, seed=10_000 + seed)
  return {'loss': loss, 'implementation': impl, 'batch': batch, 'seed': seed, 'steps': steps,
          'examples': args.examples, 'curve': curve, 'final_loss': curve[-1]['loss'],
          'zero_shot_heldout': results['heldout/colour_shape_top1'],
          'zero_shot_chance': results['heldout/colour_shape_chance'],
          'recall_at_1_heldout': results['heldout/image_to_text_R@1'],
          'step_s': step_s, 'compile_s': compile_s,
          'temp_mib_per_device': temp_bytes / 2**20, 'devices': args.devices,
          'final_logit_scale': curve[-1]['logit_scale']}


def trajectory_differences(runs):
  """Largest relative difference of the logged losses between the ring and all-gather runs of
  each (loss, batch, seed): both compute the same maths, so only fp32 noise may separate them."""
  by_key = {(r['loss'], r['implementation'], r['batch'], r['seed']): r for r in runs}
  out = []
  for (loss, impl, batch, seed), ring in by_key.items():
    if impl != 'ring' or (loss, 'all-gather', batch, seed) not in by_key:
      continue
    ag = by_key[(loss, 'all-gather', batch, seed)]
    diff = max(abs(a['loss'] - b['loss']) / max(abs(b['loss']), 1e-12)
               for a, b in zip(ring['curve'], ag['curve']))
    out.append({'loss': loss, 'batch': batch, 'seed': seed, 'max_rel_diff': diff})
  return out


def aggregate(runs):
  """Mean and std over seeds of each (loss, implementation, batch)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  groups = {}
  for r in runs:
    groups.setdefault((r['loss'], r['implementation'], r['batch']), []).append(r)
  rows = []
  for (loss, impl, batch), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][2],
                                                                        kv[0][1])):
    row = {'loss': loss, 'implementation': impl, 'batch': batch, 'seeds': len(rs)}
    for key in ('zero_shot_heldout', 'recall_at_1_heldout', 'final_loss', 'step_s',
                'temp_mib_per_device'):
      values = np.array([r[key] for r in rs], np.float64)
      row[key] = float(values.mean())
      row[key + '_std'] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
    rows.append(row)
  return rows


def markdown_table(rows, chance):
  def pm(row, key, scale=1.0, digits=1):
    return f'{row[key] * scale:.{digits}f} ± {row[key + "_std"] * scale:.{digits}f}'
  lines = ['| loss | implementation | batch | zero-shot held-out % | R@1 held-out % | final loss '
           '| step ms | temp MiB/device |',
           '| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |']
  for r in rows:
    lines.append(f'| {r["loss"]} | {r["implementation"]} | {r["batch"]} | '
                 f'{pm(r, "zero_shot_heldout", 100)} | {pm(r, "recall_at_1_heldout", 100)} | '
                 f'{pm(r, "final_loss", 1, 3)} | {pm(r, "step_s", 1000, 0)} | '
                 f'{r["temp_mib_per_device"]:.2f} |')
  seeds = max(r['seeds'] for r in rows)
  lines.append('')
  lines.append(f'Mean ± std over {seeds} seed(s); zero-shot is 48-way colour+shape on the pairs '
               f'training never showed (chance {100 * chance:.1f}%).')
  return '\n'.join(lines)


def plot(runs, rows, out):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
  for loss in LOSSES:
    for impl, style in (('all-gather', '-o'), ('ring', '--x')):
      rs = [r for r in rows if r['loss'] == loss and r['implementation'] == impl]
      if not rs:
        continue
      b = [r['batch'] for r in rs]
      for ax, key in zip(axes, ('zero_shot_heldout', 'recall_at_1_heldout')):
        ax.errorbar(b, [100 * r[key] for r in rs], yerr=[100 * r[key + '_std'] for r in rs],
                    fmt=style, capsize=3, label=f'{loss} ({impl})')
  for ax, title in zip(axes, ('zero-shot accuracy, held-out pairs', 'image→text R@1, held-out')):
    ax.set(xscale='log', xlabel='global batch size', ylabel='%', title=title)
    ax.set_xticks(sorted({r['batch'] for r in rows}))
    ax.set_xticklabels([str(b) for b in sorted({r['batch'] for r in rows})])
  axes[0].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(os.path.join(out, 'accuracy_vs_batch.png'), dpi=100)
  plt.close(fig)

  batches = sorted({r['batch'] for r in runs})
  fig, axes = plt.subplots(1, len(batches), figsize=(4 * len(batches), 3.5), squeeze=False)
  for ax, batch in zip(axes[0], batches):
    for r in runs:
      if r['batch'] == batch and r['seed'] == 0:
        ax.plot([c['step'] * batch for c in r['curve']], [c['loss'] for c in r['curve']],
                '-' if r['implementation'] == 'all-gather' else '--',
                label=f'{r["loss"]} ({r["implementation"]})')
    ax.set(xlabel='examples seen', ylabel='training loss', title=f'batch {batch}, seed 0')
  axes[0][0].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(os.path.join(out, 'curves.png'), dpi=100)
  plt.close(fig)


def update_readme(path, table):
  with open(path) as f:
    text = f.read()
  if README_BEGIN not in text or README_END not in text:
    raise ValueError(f'{path} has no {README_BEGIN} ... {README_END} markers')
  head, rest = text.split(README_BEGIN, 1)
  _, tail = rest.split(README_END, 1)
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    f.write(f'{head}{README_BEGIN}\n{table}\n{README_END}{tail}')
  os.replace(tmp, path)


def main(argv=None):
  args = parse_args(argv)
  simulated_devices.simulate_cpu_devices(args.devices, who='loss_ablation')
  import tqdm  # pylint: disable=g-import-not-at-top
  runs_dir = os.path.join(args.out, 'runs')
  os.makedirs(runs_dir, exist_ok=True)
  grid = [(loss, impl, batch, seed) for seed in range(args.seeds) for batch in args.batch_sizes
          for loss in LOSSES for impl in IMPLEMENTATIONS]
  runs = []
  for loss, impl, batch, seed in tqdm.tqdm(grid, desc='loss ablation'):
    path = os.path.join(runs_dir, run_name(loss, impl, batch, seed) + '.json')
    if os.path.exists(path):
      with open(path) as f:
        run = json.load(f)
      if run['examples'] == args.examples:
        runs.append(run)
        continue
    run = train_one(loss, impl, batch, seed, args)
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
      json.dump(run, f)
    os.replace(tmp, path)
    tqdm.tqdm.write(f'{run_name(loss, impl, batch, seed)}: zero-shot '
                    f'{100 * run["zero_shot_heldout"]:.1f}%, R@1 '
                    f'{100 * run["recall_at_1_heldout"]:.1f}%, loss {run["final_loss"]:.3f}, '
                    f'{1000 * run["step_s"]:.0f} ms/step')
    runs.append(run)

  rows = aggregate(runs)
  checks = trajectory_differences(runs)
  worst = max((c['max_rel_diff'] for c in checks), default=0.0)
  table = markdown_table(rows, runs[0]['zero_shot_chance'])
  print(table)
  print(f'ring vs all-gather, largest relative loss difference: {worst:.2e}')
  summary = {'args': vars(args), 'rows': rows, 'trajectory_checks': checks,
             'max_trajectory_rel_diff': worst, 'runs': [run_name(r['loss'], r['implementation'],
                                                                 r['batch'], r['seed'])
                                                        for r in runs]}
  with open(os.path.join(args.out, 'summary.json'), 'w') as f:
    json.dump(summary, f, indent=2)
  with open(os.path.join(args.out, 'table.md'), 'w') as f:
    f.write(table + '\n')
  plot(runs, rows, args.out)
  if args.update_readme:
    update_readme(args.update_readme, table)
  print(f'wrote {args.out}')
  if worst > args.trajectory_rtol:
    raise SystemExit(f'ring and all-gather trajectories differ by {worst:.2e} > '
                     f'{args.trajectory_rtol}')


if __name__ == '__main__':
  main()
