"""Tokenizer throughput: `clip.tokenizer` against OpenAI's `SimpleTokenizer` (+ their padding).

All tokenizers see the same generated captions (mostly plain English, some with accents, emoji,
HTML entities, mojibake, digits and odd whitespace). "cold" is a fresh instance (empty word
cache; loading the vocabulary is timed apart, as `load_s`), "warm" a second pass over the same
captions on that instance. The table gives texts and tokens per second (median of `--repeats`
runs), the speed-up over OpenAI's, and how many rows equal OpenAI's token for token.
Hugging Face's `CLIPTokenizerFast`, built offline from the same vocabulary, is an extra column
when `transformers` can build it; it normalises text without ftfy, so its match rate is shown.

  python -m experiments.bench_tokenizer --n 10000
  python -m experiments.bench_tokenizer --quick
"""
import argparse
import gzip
import inspect
import json
import os
import platform
import tempfile
import time

import numpy as np

from clip import tokenizer
from experiments.references import openai as openai_reference

NOUNS = ('dog cat man woman child car bus bicycle house tree street beach mountain river table '
         'chair plate pizza sandwich cake phone laptop book bird horse cow sheep boat train plane '
         'kitchen bedroom window door road field sky cloud flower garden city bridge shirt dress '
         'hat umbrella ball kite skateboard surfboard wave snow forest lake park bench clock '
         'sign fence wall logo poster illustration painting portrait t-shirt mug').split()
ADJECTIVES = ('red blue green yellow white black small large old young happy wooden vintage '
              'modern beautiful cute empty crowded sunny snowy wet dark bright colorful '
              'abstract minimalist rustic elegant').split()
VERBS = ('sitting standing running walking lying holding riding eating playing looking flying '
         'parked hanging floating jumping').split()
PLACES = ('on the beach', 'in a kitchen', 'next to a window', 'on a wooden table', 'in the park',
          'at night', 'in the snow', 'under a tree', 'on the street', 'in front of a building',
          'near the river', 'on a white background', 'in the city', 'at sunset')
EXTRAS = ('café', 'naïve', 'São Paulo', 'Zürich', 'jalapeño', 'crème brûlée', 'Ελλάδα', '東京',
          'Москва', '🐶', '❤️', '👨‍👩‍👧', '🇫🇷', 'Â©', 'itâ€™s', 'â€œhelloâ€\x9d', '&amp;', '&quot;',
          '&#39;', '–', '“quoted”', '\u00a0', '\t', '\n')
TEMPLATES = ('{a} {adj} {noun} {verb} {place}', 'a photo of a {adj} {noun}',
             '{Adj} {noun} and {noun2} {place}', '{noun}s {verb} {place}, {n} of them',
             'Stock photo: {adj} {noun} {verb} {place}. {name}\'s collection',
             'close-up of the {noun}\'s {noun2} - {name} {n}', '{ADJ} {NOUN} FOR SALE!!!',
             '{a} {adj} {noun} with {a2} {adj2} {noun2} {place} #{name} #{noun}')


def _fake_word(rng):
  """Long-tail words (names, brands): syllables never seen before, so cold caches miss."""
  syllables = ('ka', 'lo', 'mi', 'ren', 'sto', 'vel', 'qu', 'ax', 'bri', 'dor', 'zen', 'ph', 'ul')
  return ''.join(rng.choice(syllables, rng.integers(2, 5))).capitalize()


def captions(n, seed=0, extra_fraction=0.15):
  """`n` caption-like texts; `extra_fraction` of them get a non-ASCII / HTML / whitespace extra."""
  rng = np.random.default_rng(seed)
  pick = lambda words: words[rng.integers(len(words))]
  out = []
  for _ in range(n):
    noun, adj = pick(NOUNS), pick(ADJECTIVES)
    text = pick(TEMPLATES).format(
        a='a', a2='an' if rng.random() < 0.2 else 'a', adj=adj, Adj=adj.capitalize(),
        ADJ=adj.upper(), adj2=pick(ADJECTIVES), noun=noun, NOUN=noun.upper(),
        noun2=pick(NOUNS), verb=pick(VERBS), place=pick(PLACES), n=int(rng.integers(1, 2025)),
        name=_fake_word(rng))
    if rng.random() < extra_fraction:
      words = text.split(' ')
      words.insert(int(rng.integers(len(words) + 1)), pick(EXTRAS))
      text = ' '.join(words)
    out.append(text)
  return out


def openai_tokenize(simple_tokenizer, texts, context_length=77, truncate=False):
  """OpenAI's `clip.tokenize` padding and truncation, on numpy instead of torch."""
  sot, eot = simple_tokenizer.encoder['<|startoftext|>'], simple_tokenizer.encoder['<|endoftext|>']
  result = np.zeros((len(texts), context_length), np.int32)
  for i, text in enumerate(texts):
    tokens = [sot] + simple_tokenizer.encode(text) + [eot]
    if len(tokens) > context_length:
      if not truncate:
        raise RuntimeError(f'Input {text} is too long for context length {context_length}')
      tokens = tokens[:context_length]
      tokens[-1] = eot
    result[i, :len(tokens)] = tokens
  return result


def hf_fast_tokenizer(vocab_path):
  """Hugging Face's CLIPTokenizerFast from the bundled merges, padding with id 0 as OpenAI, or
  None when transformers cannot build it offline (or builds one that fails a one-line check)."""
  try:
    # Local, inside the try: transformers is optional (an extra column when it is installed).
    from transformers import CLIPTokenizerFast  # pylint: disable=g-import-not-at-top
    ours = tokenizer.Tokenizer(vocab_path)
    with gzip.open(vocab_path, 'rt', encoding='utf-8') as f:
      merges = f.read().split('\n')[1:tokenizer.NUM_MERGES + 1]
    vocab = {symbol: i for i, symbol in enumerate(ours.symbols)}
    with tempfile.TemporaryDirectory() as d:
      if 'vocab_file' in inspect.signature(CLIPTokenizerFast.__init__).parameters:  # transformers 4
        files = {'vocab_file': os.path.join(d, 'vocab.json'),
                 'merges_file': os.path.join(d, 'merges.txt')}
        with open(files['vocab_file'], 'w', encoding='utf-8') as f:
          json.dump(vocab, f)
        with open(files['merges_file'], 'w', encoding='utf-8') as f:
          f.write('#version: 0.2\n' + '\n'.join(merges) + '\n')
        hf = CLIPTokenizerFast(**files, pad_token='!')
      else:  # transformers 5 takes the tables themselves
        hf = CLIPTokenizerFast(vocab=vocab, merges=[tuple(m.split()) for m in merges],
                               pad_token='!')
    probe = 'a photo of a cat.'
    if hf(probe)['input_ids'] != [tokenizer.SOT, *ours.encode(probe), tokenizer.EOT]:
      raise ValueError(f'it tokenizes {probe!r} as {hf(probe)["input_ids"]}')
    return hf
  except Exception as e:  # pylint: disable=broad-except
    print(f'  skipping Hugging Face CLIPTokenizerFast: {type(e).__name__}: {e}')
    return None


def timed(fn):
  start = time.perf_counter()
  out = fn()
  return time.perf_counter() - start, out


def bench(name, make, run, texts, repeats):
  """Median seconds of a cold pass (fresh instance from `make`) and a warm pass (second run)."""
  cold, warm, load = [], [], []
  for _ in range(repeats):
    t_load, instance = timed(make)
    t_cold, tokens = timed(lambda: run(instance, texts))
    t_warm, _ = timed(lambda: run(instance, texts))
    load.append(t_load), cold.append(t_cold), warm.append(t_warm)
    print(f'  {name}: load {t_load:.3f} s, cold {t_cold:.3f} s, warm {t_warm:.3f} s', flush=True)
  return {'name': name, 'load_s': float(np.median(load)), 'cold_s': float(np.median(cold)),
          'warm_s': float(np.median(warm))}, tokens


def format_table(rows, n, n_tokens):
  header = (f'{"tokenizer":<26} {"load s":>7} {"cold texts/s":>13} {"warm texts/s":>13} '
            f'{"cold x":>7} {"warm x":>7} {"rows == OpenAI":>15}')
  lines = [header, '-' * len(header)]
  for r in rows:
    lines.append(f'{r["name"]:<26} {r["load_s"]:>7.3f} {n / r["cold_s"]:>13,.0f} '
                 f'{n / r["warm_s"]:>13,.0f} {r["cold_speedup"]:>7.2f} {r["warm_speedup"]:>7.2f} '
                 f'{r["rows_equal"]:>9}/{n}')
  lines.append(f'({n_tokens:,} tokens incl. SOT/EOT; tokens/s = texts/s x {n_tokens / n:.1f})')
  return '\n'.join(lines)


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--n', type=int, default=10_000, help='number of captions')
  parser.add_argument('--repeats', type=int, default=3, help='cold+warm runs per tokenizer')
  parser.add_argument('--context-length', type=int, default=77)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--extra-fraction', type=float, default=0.15,
                      help='share of captions given a non-ASCII / HTML / whitespace extra')
  parser.add_argument('--no-hf', action='store_true', help='skip Hugging Face CLIPTokenizerFast')
  parser.add_argument('--quick', action='store_true', help='2,000 captions, 1 repeat')
  parser.add_argument('--out', default='results/bench_tokenizer')
  args = parser.parse_args(argv)
  if args.quick:
    args.n, args.repeats = 2000, 1
  return args


def main(argv=None):
  args = parse_args(argv)
  simple_tokenizer = openai_reference.load_module('simple_tokenizer')
  texts = captions(args.n, args.seed, args.extra_fraction)
  ctx = args.context_length
  print(f'{args.n} captions, e.g. {texts[:3]}')
  ref_row, ref_tokens = bench('OpenAI SimpleTokenizer', simple_tokenizer.SimpleTokenizer,
                              lambda t, x: openai_tokenize(t, x, ctx, truncate=True),
                              texts, args.repeats)
  runs = [(ref_row, ref_tokens)]
  runs.append(bench('clip.tokenizer (ours)', tokenizer.Tokenizer,
                    lambda t, x: t.tokenize(x, ctx, truncate=True), texts, args.repeats))
  if not args.no_hf and hf_fast_tokenizer(tokenizer.VOCAB_PATH) is not None:
    runs.append(bench('HF CLIPTokenizerFast', lambda: hf_fast_tokenizer(tokenizer.VOCAB_PATH),
                      lambda t, x: t(x, padding='max_length', max_length=ctx, truncation=True,
                                     return_tensors='np')['input_ids'].astype(np.int32),
                      texts, args.repeats))
  rows = []
  for row, tokens in runs:
    row['cold_speedup'] = ref_row['cold_s'] / row['cold_s']
    row['warm_speedup'] = ref_row['warm_s'] / row['warm_s']
    row['rows_equal'] = int(np.all(tokens == ref_tokens, axis=1).sum())
    rows.append(row)
  n_tokens = int((ref_tokens != 0).sum())
  table = format_table(rows, args.n, n_tokens)
  print(table)
  ftfy_fast = tokenizer._ftfy_fast  # pylint: disable=protected-access
  slow_path = sum(ftfy_fast(t) is None for t in texts)
  result = {'rows': rows, 'n_texts': args.n, 'n_tokens': n_tokens, 'repeats': args.repeats,
            'extra_fraction': args.extra_fraction,
            'context_length': ctx, 'texts_through_ftfy': slow_path, 'table': table,
            'cpu_count': os.cpu_count(), 'machine': platform.machine(),
            'python': platform.python_version()}
  os.makedirs(args.out, exist_ok=True)
  path = os.path.join(args.out, 'bench_tokenizer.json')
  with open(path, 'w') as f:
    json.dump(result, f, indent=2)
  print(f'{slow_path}/{args.n} captions needed ftfy; wrote {path}')


if __name__ == '__main__':
  main()
