"""Caption decoding throughput (generated tokens/s), with the KV cache and without it.

Greedy and beam search with the decoder's KV cache and without it (every step re-runs `decoder.apply` over the whole token buffer), on a
random-weight decoder of `small`'s text-tower shape (width 128, 3 blocks, 2 heads, context 32)
reading 16 image tokens of width 128 (`small`'s ViT at 64 px, patch 16).

A row decodes until every caption of the batch ends or `max_length` is reached; random weights
rarely emit the end-of-text token, so the loop usually runs all `max_length - 1` positions.
Tokens/s counts the positions decoded times the batch (the output captions' tokens; beam search
scores `beam` candidates per output token). The time is the median of `--repeats` calls after
one compiling call. `--shortlists 0,55` adds a decoder scoring 55 ids (`output_ids`, like
`cappa_small`) beside the full 49408-id vocabulary, whose projection dominates this small model.
`--coca` adds open_clip's CoCa (`clip.coca_decoding`) of the same shape: its greedy captions
(`clip.coca.caption`, which always runs `max_length - 1` positions) and beam search, each with
the cache and with `use_cache=False` (both towers re-run over the whole buffer every step).

  python -m experiments.bench_decode --quick
  python -m experiments.bench_decode --batch-sizes 1,32 --repeats 5 --shortlists 0,55
  python -m experiments.bench_decode --quick --coca
"""
import argparse
import dataclasses
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from clip import coca
from clip import coca_decoding
from clip import configs
from clip import decoder
from clip.eval import generation
from experiments.configs import cappa_small

IMAGE_TOKENS, IMAGE_WIDTH = 16, 128


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--batch-sizes', default='1,32')
  parser.add_argument('--beam-size', type=int, default=4)
  parser.add_argument('--max-length', type=int, default=32,
                      help='the caption buffer, start token included (<= context 32)')
  parser.add_argument('--shortlists', default='0',
                      help='0 (the whole vocabulary) and/or sizes of an output_ids shortlist; '
                      'empty: none (with --coca: CoCa only)')
  parser.add_argument('--dtype', default='float32')
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--quick', action='store_true', help='batch 1 and 8, 2 repeats')
  parser.add_argument('--coca', action='store_true', help='also CoCa\'s greedy and beam search')
  parser.add_argument('--out', default='results/bench_decode')
  args = parser.parse_args(argv)
  if args.quick:
    args.batch_sizes, args.repeats = '1,8', 2
  return args


def decoder_config(shortlist):
  """`small`'s text-tower shape as a captioning decoder; `shortlist` > 0 scores that many ids
  (the end-of-text id among them)."""
  vocab = 49408
  ids = None if not shortlist else tuple(range(shortlist - 1)) + (vocab - 1,)
  return configs.DecoderConfig(width=128, layers=3, heads=2, context_length=32, vocab_size=vocab,
                               image_projection=False, output_ids=ids)


def start_id(cfg):
  """The start token of `cappa_small`'s model with decoder `cfg`: its own tokenizer's (OpenAI's
  BPE, whose 49408 ids the decoder reads), as `generation.start_token_id` gives it."""
  model = dataclasses.replace(cappa_small.get_config().model, decoder=cfg)
  return generation.start_token_id(model)


def bench_one(decode, repeats):
  """`decode() -> (..., last position)`: (compile + first call s, median s, positions)."""
  start = time.perf_counter()
  out = jax.block_until_ready(decode())
  compile_s = time.perf_counter() - start
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    out = jax.block_until_ready(decode())
    times.append(time.perf_counter() - start)
  return compile_s, float(np.median(times)), int(out[-1])


def decode_fn(method, params, image, cfg, args, cache):
  """`() -> (tokens, ..., last position decoded)`: generation's jitted loops, which also return
  how far they ran (the public functions return the captions only)."""
  # pylint: disable=protected-access
  execution, start = configs.Execution(args.dtype), start_id(cfg)
  if method == 'greedy':
    return lambda: generation._greedy(params, image, cfg, start, args.max_length, execution,
                                      cache)
  return lambda: generation._beam_search(params, image, cfg, start, args.max_length,
                                         args.beam_size, 0.0, execution, cache)


def bench_decoder(cfg, batch_sizes, args):
  """Rows for greedy and beam search, each with and without the cache, at every batch size."""
  params = jax.jit(decoder.init, static_argnums=(1, 2))(jax.random.PRNGKey(0), cfg, IMAGE_WIDTH)
  rows = []
  for batch in batch_sizes:
    image = jax.random.normal(jax.random.PRNGKey(1), (batch, IMAGE_TOKENS, IMAGE_WIDTH))
    for method in ('greedy', 'beam'):
      name = 'greedy' if method == 'greedy' else f'beam {args.beam_size}'
      for cache in (True, False):
        decode = decode_fn(method, params, image, cfg, args, cache)
        compile_s, call_s, positions = bench_one(decode, args.repeats)
        rows.append({'outputs': cfg.num_outputs, 'method': name, 'kv_cache': cache,
                     'batch': batch, 'positions': positions, 'call_s': call_s,
                     'tokens_per_s': batch * positions / call_s, 'compile_s': compile_s})
        print(f'  {cfg.num_outputs} outputs, {name}, cache {cache}, batch {batch}: '
              f'{call_s:.3f} s per call, compiled in {compile_s:.1f} s', flush=True)
  return rows


def coca_model():
  """A random-weight CoCa (every parameter random) of the decoder's shape: text tower and
  multimodal decoder of width 128, 3 blocks, 2 heads, context 32, OpenAI's 49408 ids; the 16
  image tokens of an attentional pooler over `small`'s ViT at 64 px, patch 16."""
  text = {'context_length': 32, 'vocab_size': 49408, 'width': 128, 'heads': 2, 'layers': 3}
  cfg = coca.config_from_open_clip({
      'embed_dim': 128, 'text_cfg': dict(text, embed_cls=True), 'multimodal_cfg': text,
      'vision_cfg': {'image_size': 64, 'layers': 2, 'width': 128, 'head_width': 64,
                     'patch_size': 16, 'attentional_pool': True, 'attn_pooler_heads': 2,
                     'attn_pooler_queries': IMAGE_TOKENS + 1}})
  rng = np.random.default_rng(0)
  flat = {}
  for key, shape in coca.expected_shapes(cfg).items():
    gain = key.endswith('.weight') and len(shape) == 1
    flat[key] = (float(gain) + 0.05 * rng.standard_normal(shape)).astype(np.float32)
  return coca.from_state_dict(flat, cfg), cfg


def bench_coca(batch_sizes, args):
  """Rows for CoCa's greedy captions and beam search, with and without the cache."""
  # pylint: disable=protected-access
  params, cfg = coca_model()
  params = jax.device_put(params)
  sot, eos, rows = 49406, 49407, []
  for batch in batch_sizes:
    images = jax.random.normal(jax.random.PRNGKey(1), (batch, 64, 64, 3))
    for method in ('greedy', 'beam'):
      name = 'CoCa greedy' if method == 'greedy' else f'CoCa beam {args.beam_size}'
      for cache in (True, False):
        if method == 'greedy':
          decode = lambda c=cache: (coca_decoding._caption(params, images, cfg, sot, eos,
                                                           args.max_length, 5, c),
                                    jnp.int32(args.max_length - 1))
        else:
          decode = lambda c=cache: coca_decoding._beam_caption(
              params, images, cfg, sot, eos, args.max_length, args.beam_size, 0.0, c)
        compile_s, call_s, positions = bench_one(decode, args.repeats)
        rows.append({'outputs': cfg.text.vocab_size, 'method': name, 'kv_cache': cache,
                     'batch': batch, 'positions': positions, 'call_s': call_s,
                     'tokens_per_s': batch * positions / call_s, 'compile_s': compile_s})
        print(f'  {name}, cache {cache}, batch {batch}: {call_s:.3f} s per call, compiled in '
              f'{compile_s:.1f} s', flush=True)
  return rows


def markdown(rows):
  """The table: one line per (outputs, method, batch), cached and uncached side by side."""
  lines = ['| scored ids | method | batch | positions | tokens/s, KV cache | tokens/s, no cache '
           '| speed-up | ms/call, cache | ms/call, no cache |',
           '|---:|---|---:|---:|---:|---:|---:|---:|---:|']
  keyed = {(r['outputs'], r['method'], r['batch'], r['kv_cache']): r for r in rows}
  for (outputs, method, batch, cache), r in keyed.items():
    if not cache:
      continue
    u = keyed[(outputs, method, batch, False)]
    lines.append(f'| {outputs} | {method} | {batch} | {r["positions"]} | '
                 f'{r["tokens_per_s"]:,.0f} | {u["tokens_per_s"]:,.0f} | '
                 f'{u["call_s"] / r["call_s"]:.1f}x | {1e3 * r["call_s"]:.0f} | '
                 f'{1e3 * u["call_s"]:.0f} |')
  return '\n'.join(lines)


def main(argv=None):
  args = parse_args(argv)
  batch_sizes = [int(b) for b in args.batch_sizes.split(',')]
  rows = []
  for shortlist in [int(s) for s in args.shortlists.split(',') if s]:
    rows += bench_decoder(decoder_config(shortlist), batch_sizes, args)
  if args.coca:
    rows += bench_coca(batch_sizes, args)
  print(markdown(rows))
  os.makedirs(args.out, exist_ok=True)
  path = os.path.join(args.out, 'bench_decode.json')
  with open(path, 'w') as f:
    json.dump({'rows': rows, 'devices': [str(d) for d in jax.devices()], 'args': vars(args),
               'image_tokens': [IMAGE_TOKENS, IMAGE_WIDTH]}, f, indent=2)
  print(f'wrote {path}')


if __name__ == '__main__':
  main()
