"""Attention forward + backward time: the einsum reference against `jax.nn.dot_product_attention`.

Times a jitted forward pass and its vjp (the gradients for q, k and v) of
`clip.layers.attention_heads`, what every tower's attention calls, at the shapes of OpenAI's
ViT-B/32 image tower (50 tokens, 12 heads of 64) and text tower (77 tokens, 8 heads of 64, causal;
and with padded keys, as a bidirectional SigLIP-style tower masks them), batch 8, for each
implementation and dtype: the median of `--repeats` calls after one compiling call, the variants
taking turns each round (a busy machine slows them alike). Each row also gives the largest
difference from the fp32 einsum's output, relative to its largest value. 'cudnn' needs a CUDA GPU.

  python -m experiments.bench_attention
  python -m experiments.bench_attention --implementations einsum,xla,cudnn --batch 64
"""
import argparse
import json
import os
import time

import jax
import numpy as np

from clip import layers

# name: (tokens, heads, head dim, mask kind)
CASES = {'ViT-B/32 image': (50, 12, 64, None), 'text, causal': (77, 8, 64, 'causal'),
         'text, padded keys': (77, 8, 64, 'padding')}


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--implementations', default='einsum,xla')
  parser.add_argument('--dtypes', default='float32,bfloat16')
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--repeats', type=int, default=20)
  parser.add_argument('--out', default='results/bench_attention')
  return parser.parse_args(argv)


def inputs(case, batch):
  """(q, k, v, cotangent) fp32 (batch, tokens, heads, dim) and the case's `layers.Mask`."""
  length, heads, dim, kind = CASES[case]
  rng = np.random.default_rng(0)
  arrays = [rng.standard_normal((batch, length, heads, dim)).astype(np.float32) for _ in range(4)]
  lengths = rng.integers(length // 4, length + 1, batch)  # where each row's padding starts
  mask = {None: None, 'causal': layers.Mask(causal=True),
          'padding': layers.Mask(kv_lengths_N=lengths)}[kind]
  return arrays, mask


def forward_backward(implementation, dtype):
  """jitted (q, k, v, cotangent, mask) -> (attention output, its gradients for q, k and v)."""
  def run(q, k, v, cotangent, mask):
    qkv = [t.astype(dtype) for t in (q, k, v)]
    attend = lambda *t: layers.attention_heads(*t, mask, implementation)
    out, vjp = jax.vjp(attend, *qkv)
    return out, vjp(cotangent.astype(dtype))
  return jax.jit(run)


def rel_diff(out, reference):
  out, reference = np.asarray(out, np.float64), np.asarray(reference, np.float64)
  return float(np.abs(out - reference).max() / np.abs(reference).max())


def time_in_turns(fns, args, repeats):
  """`{name: (output, first call s with compilation, median s)}` of `fn(*args)` for every
  function in `fns`, each round calling them all in turn."""
  outs, first, times = {}, {}, {name: [] for name in fns}
  for name, fn in fns.items():
    start = time.perf_counter()
    outs[name] = jax.block_until_ready(fn(*args))[0]
    first[name] = time.perf_counter() - start
  for _ in range(repeats):
    for name, fn in fns.items():
      start = time.perf_counter()
      jax.block_until_ready(fn(*args))
      times[name].append(time.perf_counter() - start)
  return {name: (outs[name], first[name], float(np.median(times[name]))) for name in fns}


def bench_case(case, args):
  """One row per (dtype, implementation) of `case`; the fp32 einsum is the differences'
  reference."""
  arrays, mask = inputs(case, args.batch)
  reference = forward_backward('einsum', 'float32')(*arrays, mask)[0]
  fns = {(dtype, impl): forward_backward(impl, dtype) for dtype in args.dtypes.split(',')
         for impl in args.implementations.split(',')}
  rows = []
  for (dtype, impl), (out, first, median) in time_in_turns(fns, (*arrays, mask),
                                                            args.repeats).items():
    rows.append({'case': case, 'shape': list(arrays[0].shape), 'dtype': dtype,
                 'implementation': impl, 'ms': 1e3 * median, 'first_call_s': first,
                 'rel_diff_vs_fp32_einsum': rel_diff(out, reference)})
    print(f'  {case}, {dtype}, {impl}: {1e3 * median:.2f} ms', flush=True)
  return rows


def markdown(rows):
  """One line per (case, dtype, implementation), with its time relative to the einsum's."""
  lines = ['| case | (N, L, H, d) | dtype | implementation | fwd+bwd ms | vs einsum '
           '| max diff vs fp32 einsum |', '|---|---|---|---|---:|---:|---:|']
  einsum = {(r['case'], r['dtype']): r['ms'] for r in rows if r['implementation'] == 'einsum'}
  for r in rows:
    ratio = einsum.get((r['case'], r['dtype']))
    ratio = f'{r["ms"] / ratio:.2f}x' if ratio else '-'
    lines.append(f'| {r["case"]} | {tuple(r["shape"])} | {r["dtype"]} | {r["implementation"]} | '
                 f'{r["ms"]:.2f} | {ratio} | {r["rel_diff_vs_fp32_einsum"]:.1e} |')
  return '\n'.join(lines)


def main(argv=None):
  args = parse_args(argv)
  rows = [row for case in CASES for row in bench_case(case, args)]
  print(markdown(rows))
  os.makedirs(args.out, exist_ok=True)
  path = os.path.join(args.out, 'bench_attention.json')
  with open(path, 'w') as f:
    json.dump({'rows': rows, 'devices': [str(d) for d in jax.devices()],
               'cpu_count': os.cpu_count(), 'jax': jax.__version__, 'args': vars(args)}, f,
              indent=2)
  print(f'wrote {path}')


if __name__ == '__main__':
  main()
