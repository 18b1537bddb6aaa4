"""Where a train step's time goes: a `jax.profiler` trace of the jitted step, its XLA operations
grouped by what they do and by the pass they belong to.

The step is `bench_train`'s (forward, contrastive loss, backward, AdamW; one device). Each XLA
operation the trace records is looked up in the compiled program (`compiled.as_text()`) and
sorted into
  matmul        YNNPACK / Eigen dot fusions and library calls (the work the MFU counts);
  layout copy   transposes and copies into the layout a matmul wants (XLA:CPU's dots take no
                transposed operand: the weight gradient of `x @ W.T` copies `dy` transposed);
  layer stack   what running the blocks as a `lax.scan` over stacked weights adds: stacking
                per-layer weights, zeroing the stacked gradient buffers, slicing them per layer
                and writing each layer's gradient into them;
  element-wise  every other fusion (layer norms, GELU, softmax, residual adds, AdamW);
and by pass from the operation's JAX name: backward (`transpose(jvp(...))`), forward (`jvp`),
and the rest (the optimizer update, the loss's reductions outside autodiff). The grouping reads
XLA's fusion names (`copy_bitcast_fusion`, `dynamic-slice_bitcast_fusion`, ...), which describe
what each fusion holds; a `while` is not counted itself (its body's operations are). Times are
summed over XLA's worker threads, so they add up to more than the step's wall time when the
threads overlap; the shares are what to read.

  python -m experiments.profile_step --model ViT-B/32 --batch-size 16 --remat block
  python -m experiments.profile_step --model small --batch-size 128

Prints the table and the slowest operations, and writes --out/<model>_<batch>.json and the
trace (TensorBoard's profile plugin or XProf read it) under --out/trace.
"""
import argparse
import collections
import glob
import gzip
import json
import os
import re
import warnings

from experiments import bench_train
from experiments import malloc_tuning

CATEGORIES = ('matmul', 'layout copy', 'layer stack', 'element-wise')
PASSES = ('forward', 'backward', 'optimizer & other')
_INSTRUCTION = re.compile(r'^\s*(?:ROOT )?%?([\w.\-]+) = .*? ([\w\-]+)\(')
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_STACK_PREFIXES = ('stack', 'wrapped_broadcast', 'dynamic-slice', 'dynamic-update-slice',
                   'bitcast_dynamic-update-slice', 'slice_bitcast', 'wrapped_slice', 'concatenate')
_NOT_COUNTED = ('while', 'call', 'conditional')  # their bodies' operations are counted


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--model', default='ViT-B/32',
                      help='a clip.MODELS name or an experiments/configs one (default: '
                           '%(default)s)')
  parser.add_argument('--batch-size', type=int, default=16, help='(default: %(default)s)')
  parser.add_argument('--remat', default='block', choices=('none', 'block', 'dots'),
                      help='the remat policy; any but none runs the blocks as a lax.scan over '
                           'weights stacked every step (default: %(default)s)')
  parser.add_argument('--scan', default='off', choices=('off', 'on'),
                      help='on: the weights are stored stacked and scanned (no stacking per '
                           'step); off: per-layer weights, unrolled unless --remat (default: '
                           '%(default)s)')
  parser.add_argument('--steps', type=int, default=2,
                      help='traced steps, after a warm-up and 2 timed ones (default: %(default)s)')
  parser.add_argument('--top', type=int, default=12,
                      help='slowest operations listed (default: %(default)s)')
  parser.add_argument('--out', default='results/profile_step',
                      help='the JSON and, under trace/, the trace (default: %(default)s)')
  args = parser.parse_args(argv)
  if args.steps < 1 or args.batch_size < 1:
    parser.error(f'--steps and --batch-size must be >= 1, got {args.steps}, {args.batch_size}')
  return args


def instructions(hlo_text):
  """{instruction name: (opcode, JAX op_name)} of every computation in an HLO module's text."""
  out = {}
  for line in hlo_text.splitlines():
    m = _INSTRUCTION.match(line)
    if m:
      op_name = _OP_NAME.search(line)
      out[m.group(1)] = (m.group(2), op_name.group(1) if op_name else '')
  return out


def category(name, opcode):
  """One of CATEGORIES for an XLA operation (its instruction name and opcode)."""
  if name.startswith('ynn_fusion') or opcode in ('dot', 'custom-call', 'convolution'):
    return 'matmul'
  if name.startswith(_STACK_PREFIXES):
    return 'layer stack'
  if name.startswith(('copy', 'transpose')) or opcode in ('copy', 'transpose'):
    return 'layout copy'
  return 'element-wise'


def pass_of(op_name):
  """One of PASSES from a JAX op_name: autodiff's transpose is the backward pass."""
  if 'transpose(jvp(' in op_name:
    return 'backward'
  return 'forward' if 'jvp(' in op_name else 'optimizer & other'


def breakdown(trace_events, hlo, steps):
  """(table {(category, pass): ms per step}, {operation: ms per step}) of the complete events
  ('ph' == 'X') that name an XLA operation of `hlo` (`instructions`)."""
  table, ops = collections.Counter(), collections.Counter()
  for e in trace_events:
    if e.get('ph') != 'X' or e.get('name') not in hlo:
      continue
    opcode, op_name = hlo[e['name']]
    if opcode in _NOT_COUNTED:
      continue
    ms = e['dur'] / 1e3 / steps
    table[category(e['name'], opcode), pass_of(op_name)] += ms
    ops[e['name']] += ms
  return table, ops


def warn_if_no_matmul(table, source):
  """Warns when `breakdown`'s table holds no matmul time: a train step always has matmuls, so
  XLA must have renamed its dot fusions (`category` reads the names) and every share is wrong."""
  if not any(ms for (kind, _), ms in table.items() if kind == 'matmul'):
    warnings.warn(f'no operation of {source} was sorted as a matmul: XLA may have renamed its '
                  'dot fusions (profile_step.category reads the names); the shares are wrong',
                  stacklevel=2)


def print_table(table, ops, hlo, top):
  total = sum(table.values())
  cell = lambda ms: f'{ms:11.0f} ms {ms / total:6.1%}'
  print(f'{"":14}' + ''.join(f'{p:>21}' for p in PASSES) + f'{"all":>21}')
  for c in CATEGORIES:
    print(f'{c:14}' + ''.join(cell(table[c, p]) for p in PASSES)
          + cell(sum(table[c, p] for p in PASSES)))
  print(f'{"all":14}' + ''.join(cell(sum(table[c, p] for c in CATEGORIES)) for p in PASSES)
        + cell(total))
  print(f'\nslowest {top} operations (ms per step, summed over threads):')
  for name, ms in ops.most_common(top):
    opcode, op_name = hlo[name]
    print(f'  {ms:8.1f}  {category(name, opcode):12} {name:36} {op_name[-70:]}')


def main(argv=None):
  args = parse_args(argv)
  import jax  # pylint: disable=g-import-not-at-top  # after the re-exec
  from clip.train import training  # pylint: disable=g-import-not-at-top
  cfg = bench_train.model_config(args.model, 'float32', args.remat, args.scan == 'on')
  tcfg = training.TrainConfig(batch_size=args.batch_size, mesh=(1, 1, 1))
  step = bench_train.compiled_step(cfg, tcfg)
  compile_s, run = step.compile_s, step.run
  hlo = instructions(step.compiled.as_text())
  run()
  step_s = bench_train.time_steps(run, 2)
  trace_dir = os.path.join(args.out, 'trace')
  jax.profiler.start_trace(trace_dir)
  for _ in range(args.steps):
    run()
  jax.profiler.stop_trace()
  path = max(glob.glob(os.path.join(trace_dir, 'plugins', 'profile', '*', '*.trace.json.gz')),
             key=os.path.getmtime)
  with gzip.open(path) as f:
    events = json.load(f)['traceEvents']
  table, ops = breakdown(events, hlo, args.steps)
  if not table:
    raise RuntimeError(f'{path} names no operation of the compiled step: is the profiler '
                       'recording XLA:CPU operations?')
  warn_if_no_matmul(table, path)
  print(f'{args.model} batch {args.batch_size}, remat {args.remat}, scan {args.scan}: step '
        f'{step_s:.3f} s (median of 2 untraced), compile {compile_s:.1f} s; {args.steps} traced '
        f'steps, {jax.devices()[0].device_kind}')
  print_table(table, ops, hlo, args.top)
  name = f'{args.model.replace("/", "-")}_{args.batch_size}.json'
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, name), 'w') as f:
    json.dump({'model': args.model, 'batch_size': args.batch_size, 'remat': args.remat,
               'scan': args.scan, 'step_s': step_s, 'compile_s': compile_s, 'trace': path,
               'ms_per_step': {f'{c} / {p}': v for (c, p), v in table.items()},
               'top': dict(ops.most_common(args.top))}, f, indent=2)
  print(f'wrote {os.path.join(args.out, name)}')


if __name__ == '__main__':
  malloc_tuning.reexec_if_untuned()  # as the training entry points do; before jax is imported
  main()
