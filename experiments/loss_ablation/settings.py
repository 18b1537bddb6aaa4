"""The study's settings: its flags (and the --quick and --smoke presets), the spec of each
training run (everything that decides its result, and its name in the run cache) and the runs
of each stage. Plain Python: nothing here imports jax, which must start after the simulated
device count is set."""
import argparse
import math

import experiments.loss_ablation

LOSSES = ('contrastive', 'sigmoid')
IMPLEMENTATIONS = {'all-gather': '{}', 'ring': 'ring_{}'}  # -> training.TrainConfig.loss
INIT_GRID = ((0.0, 0.0), (0.0, math.log(10)), (-10.0, 0.0), (-10.0, math.log(10)))  # (b, t')
DOCS_PATH = 'docs/loss_ablation.md'  # where --update-docs writes the tables by default

# What each preset replaces. Their numbers mean nothing: they test the pipeline, every stage.
QUICK = dict(batch_sizes=[32, 64], seeds=1, steps=40, eval_examples=256, init_batch=32,
             ring_batch=32, lr_sweep_batches=[32, 64], horizon_factors=[2], long_factor=2,
             long_batches=[32, 64], memory_batches=[8, 32], memory_steps=2, log_points=8)
# The smallest study that takes every code path: the ring stage's batch is the grid's smallest
# (its 1-device noise floor is a grid run), the long grid's run is the horizon's, and the memory
# stage measures the ring stage's programs, so few programs are compiled, each of one block per
# tower (the CI test).
SMOKE = dict(batch_sizes=[8, 16], seeds=1, steps=10, eval_examples=64, init_batch=8,
             ring_batch=8, lr_sweep_batches=[8], lr_factors='2', horizon_factors=[2],
             long_factor=2, long_batches=[8], memory_batches=[1], memory_steps=1, log_points=5,
             layers=1)


def _ints(text):
  return [int(v) for v in text.split(',')]


def _parser():
  parser = argparse.ArgumentParser(prog='python -m experiments.loss_ablation',
                                   description=experiments.loss_ablation.__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  add = parser.add_argument
  add('--batch-sizes', type=_ints, default=[32, 64, 128, 256, 512, 1024],
      help='the grid\'s global batches, comma-separated')
  add('--seeds', type=int, default=3, help='seeds 0 .. N-1 of every grid cell')
  add('--steps', type=int, default=500, help='optimizer steps of every run')
  add('--base-lr', type=float, default=2e-3,
      help='the square-root rule\'s learning rate at --base-batch')
  add('--base-batch', type=int, default=256, help='the batch --base-lr is for')
  add('--lr-factors', default='0.5,2', help='the sweep, times the rule\'s lr')
  add('--lr-sweep-batches', type=_ints, default=[32, 256, 1024],
      help='batches of the learning-rate sweep, comma-separated')
  add('--horizon-factors', type=_ints, default=[2, 4, 8, 16, 32],
      help='the smallest batch also trains --steps times each of these')
  add('--long-factor', type=int, default=32, help='the long grid trains --steps times this')
  add('--long-batches', type=_ints, default=[32, 64],
      help='the long grid\'s global batches, comma-separated')
  add('--init-batch', type=int, default=256, help='batch of the init stage')
  add('--ring-batch', type=int, default=256,
      help='global batch of the ring stage\'s training runs')
  add('--memory-batches', type=_ints, default=[128, 512, 1024],
      help='per-device batches of the memory stage')
  add('--memory-steps', type=int, default=3, help='timed steps per measurement')
  add('--eval-examples', type=int, default=1024, help='images per split')
  add('--log-points', type=int, default=20, help='logged intervals per run')
  add('--devices', type=int, default=8, help='simulated CPU devices')
  add('--layers', type=int, default=2, help='transformer blocks of each tower')
  add('--trajectory-rtol', type=float, default=1e-3,
      help='ring vs all-gather: a relative loss difference that always passes')
  add('--noise-multiple', type=float, default=2.0,
      help='ring vs all-gather: or at most this times the all-gather noise floor')
  preset = parser.add_mutually_exclusive_group()
  preset.add_argument('--quick', action='store_true',
                      help='a smoke test of every stage in a few minutes: replaces the batches, '
                      'seeds, steps and stage sizes; its numbers mean nothing')
  preset.add_argument('--smoke', action='store_true',
                      help='every stage at its smallest (batches 8 and 16, 10 steps, few '
                      'compiled programs), about a minute on 2 cores: the CI test\'s study')
  add('--out', default='results/loss_ablation',
      help='output folder (default results/loss_ablation): runs/*.json, tables, plots')
  add('--update-docs', '--update-readme', dest='update_docs', nargs='?', const=DOCS_PATH,
      default=None, metavar='PATH',
      help=f'replace the tables between the loss_ablation markers of PATH (default {DOCS_PATH}; '
      '--update-readme is the old name of this flag)')
  return parser


def parse_args(argv):
  """The study's settings from its command line; bad settings exit with the parser's error."""
  parser = _parser()
  args = parser.parse_args(argv)
  for name, value in (QUICK if args.quick else SMOKE if args.smoke else {}).items():
    setattr(args, name, value)
  try:
    args.lr_factors = [float(f) for f in args.lr_factors.split(',') if f]
  except ValueError:
    parser.error(f'--lr-factors must be comma-separated numbers, got {args.lr_factors!r}')
  _check(parser, args)
  return args


def _check(parser, args):
  global_batches = (args.batch_sizes + args.lr_sweep_batches + args.long_batches
                    + [args.init_batch, args.ring_batch]
                    + [b * args.devices for b in args.memory_batches])
  bad = [b for b in global_batches if b < 1 or b % args.devices]
  if bad:
    parser.error(f'batch sizes must be positive multiples of --devices {args.devices} (the ring '
                 f'and memory stages split them over the devices), got {bad}')
  bad = [f for f in args.horizon_factors + [args.long_factor] if f < 1]
  if bad or any(not f > 0 for f in args.lr_factors):
    parser.error(f'--horizon-factors and --long-factor must be >= 1, --lr-factors > 0, got '
                 f'{args.horizon_factors}, {args.long_factor}, {args.lr_factors}')
  if args.layers < 1:
    parser.error(f'--layers must be >= 1, got {args.layers}')
  if args.steps < 2 * args.log_points or args.steps % args.log_points or args.seeds < 1:
    parser.error(f'need --steps a multiple of --log-points, at least twice it, and --seeds >= 1 '
                 f'(else the last logged interval would not end at the last step), got '
                 f'--steps {args.steps}, --log-points {args.log_points}, --seeds {args.seeds}')


def rule_lr(batch, args):
  """The square-root scaling rule's learning rate for a global batch."""
  return args.base_lr * math.sqrt(batch / args.base_batch)


def spec(args, loss, batch, seed, impl='all-gather', devices=1, lr_factor=1.0,
         init_logit_bias=None, init_logit_scale=None, steps_factor=1):
  """Everything that decides a training run's result; runs with equal specs are one run."""
  longer = {'steps_factor': steps_factor} if steps_factor != 1 else {}  # the horizon stage's
  smaller = {'layers': args.layers} if args.layers != 2 else {}  # the --smoke study's
  return {**longer, **smaller, 'loss': loss, 'implementation': impl, 'batch': batch, 'seed': seed,
          'devices': devices,
          'learning_rate': rule_lr(batch, args) * lr_factor, 'lr_factor': lr_factor,
          'init_logit_bias': init_logit_bias, 'init_logit_scale': init_logit_scale,
          'steps': args.steps * steps_factor, 'eval_examples': args.eval_examples,
          'log_points': args.log_points}


def run_name(s):
  """Spec `s`'s name: its file in the run cache is `<name>.json`."""
  name = f'{s["loss"]}-{s["implementation"]}-b{s["batch"]}-s{s["seed"]}-d{s["devices"]}'
  if s['lr_factor'] != 1.0:
    name += f'-lrx{s["lr_factor"]:g}'
  if 'steps_factor' in s:
    name += f'-steps{s["steps"]}'
  if 'layers' in s:
    name += f'-layers{s["layers"]}'
  if s['init_logit_bias'] is not None or s['init_logit_scale'] is not None:
    name += f'-bias{s["init_logit_bias"]:g}-t{s["init_logit_scale"]:.3g}'
  return name


def stage_specs(args):
  """{stage: [spec, ...]} of the training stages; a spec may serve several stages."""
  seeds = range(args.seeds)
  grid = [spec(args, loss, b, s) for s in seeds for b in args.batch_sizes for loss in LOSSES]
  sweep = [spec(args, loss, b, 0, lr_factor=f) for b in args.lr_sweep_batches
           for f in sorted(args.lr_factors + [1.0]) for loss in LOSSES]
  init = [spec(args, 'sigmoid', args.init_batch, s, init_logit_bias=b, init_logit_scale=t)
          if (b, t) != INIT_GRID[-1] else spec(args, 'sigmoid', args.init_batch, s)
          for s in seeds for b, t in INIT_GRID]
  ring = [spec(args, loss, args.ring_batch, 0, impl, args.devices) for loss in LOSSES
          for impl in IMPLEMENTATIONS]
  horizon = [spec(args, loss, min(args.batch_sizes), s, steps_factor=f)
             for f in args.horizon_factors for s in seeds for loss in LOSSES]
  long = [spec(args, loss, b, s, steps_factor=args.long_factor) for s in seeds
          for b in args.long_batches for loss in LOSSES]
  return {'grid': grid, 'lr_sweep': sweep, 'init': init, 'ring': ring, 'horizon': horizon,
          'long': long}
