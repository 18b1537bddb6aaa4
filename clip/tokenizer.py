"""OpenAI's CLIP tokenizer: byte-level BPE over cleaned, lower-cased text, batched to int32.

Token for token the same as OpenAI's `clip.tokenize` (github.com/openai/CLIP,
`clip/simple_tokenizer.py`, MIT licence, Copyright (c) 2021 OpenAI), from whose release the
bundled `bpe_simple_vocab_16e6.txt.gz` (the 48,894 merges) is copied unchanged. The pipeline is
theirs: `ftfy.fix_text`, `html.unescape` twice, whitespace runs to one space, lower case, their
regex split, bytes to printable characters, BPE with `</w>` marking a word's end,
`<|startoftext|>` = 49406 and `<|endoftext|>` = 49407, zero padding.

It is faster by skipping work whose result is known, never by approximating:
- where ftfy's result is known (no entities, controls, ligatures or width forms, NFC, no
  mojibake by ftfy's own test; curly quotes straightened) ftfy and `html.unescape` are skipped,
  which otherwise cost most of the time for typical captions;
- each word's ids are cached (word -> tuple of ids), so a word is split and merged once;
- merges are ranked once, in a dict keyed by symbol pair.
"""
import functools
import gzip
import html
import itertools
import os
import re
import unicodedata

import ftfy
import ftfy.badness
import ftfy.chardata
import ftfy.fixes
import numpy as np
import regex

VOCAB_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                          'bpe_simple_vocab_16e6.txt.gz')
NUM_MERGES = 49152 - 256 - 2
SOT = 49406
EOT = 49407
VOCAB_SIZE = 49408

# OpenAI's split: special tokens, contractions, letter runs, single digits, other-symbol runs.
# Reordered (letters and digits first) without changing a match: the alternatives that come first
# in OpenAI's order start with '<' or an apostrophe, which are neither letters nor digits.
_WORD_RE = regex.compile(r"""[\p{L}]+|[\p{N}]|'(?:s|t|re|ve|m|ll|d)|<\|startoftext\|>|"""
                         r"""<\|endoftext\|>|[^\s\p{L}\p{N}]+""", regex.IGNORECASE)
# The same on lower-case ASCII, where the stdlib engine is quicker; [\t\n\x0b\x0c\r ] is what
# `regex` calls \s in ASCII (the stdlib's \s also takes \x1c-\x1f).
_ASCII_WORD_RE = re.compile(r"""[a-z]+|[0-9]|'(?:s|t|re|ve|m|ll|d)|<\|startoftext\|>|"""
                            r"""<\|endoftext\|>|[^\t\n\x0b\x0c\r a-z0-9]+""")
_WHITESPACE_RE = regex.compile(r'\s+')


def _char_class(codepoints):
  """A regex class matching exactly `codepoints`, as ranges."""
  ranges, points = [], sorted(set(codepoints))
  for c in points:
    if ranges and ranges[-1][1] == c - 1:
      ranges[-1][1] = c
    else:
      ranges.append([c, c])
  return '[' + ''.join(f'\\U{a:08x}-\\U{b:08x}' for a, b in ranges) + ']'


# The fields of ftfy's config, i.e. its list of fixers, when the shortcut below was written.
_FTFY_FIELDS = ('unescape_html', 'remove_terminal_escapes', 'fix_encoding', 'restore_byte_a0',
                'replace_lossy_sequences', 'decode_inconsistent_utf8', 'fix_c1_controls',
                'fix_latin_ligatures', 'fix_character_width', 'uncurl_quotes', 'fix_line_breaks',
                'fix_surrogates', 'remove_control_chars', 'normalization', 'max_decode_length',
                'explain')
# Characters that some step of ftfy.fix_text or html.unescape acts on: entities, C0/C1 controls
# (and the escape sequences they start), line breaks, surrogates, Latin ligatures, half- and
# full-width forms; curly quotes (which ftfy straightens) are handled apart.
_FTFY_CHARS_RE = re.compile(_char_class([
    ord('&'), ord('\r'), 0x2028, 0x2029, *range(0x80, 0xa0), *range(0xd800, 0xe000),
    *ftfy.chardata.CONTROL_CHARS, *ftfy.chardata.LIGATURES, *ftfy.chardata.WIDTH_MAP]))
_CURLY_QUOTES_RE = re.compile(_char_class([0x02bc, *range(0x2018, 0x2020)]))
_FTFY_SHORTCUT = ftfy.TextFixerConfig._fields == _FTFY_FIELDS


def _ftfy_fast(text):
  """`ftfy.fix_text(text)` where it is cheap to know, which `html.unescape` leaves alone; None
  where it is not (the caller then runs both).

  Each fixer of ftfy 6 is the identity on text without the characters in `_FTFY_CHARS_RE`, except
  the encoding fix, which acts only on text that `is_bad` flags, NFC, and `uncurl_quotes`. So
  such text comes back unchanged if it is not bad and is NFC; with curly quotes, straightened,
  if neither it nor the straightened text is bad (ftfy checks both: a change means another
  pass). Non-ASCII text with line breaks is left to ftfy, which judges each line on its own.
  A future ftfy with other fixers gets no shortcut.
  """
  if not _FTFY_SHORTCUT or _FTFY_CHARS_RE.search(text):
    return None
  if text.isascii():
    return text
  if '\n' in text or len(text) > 1_000_000 or ftfy.badness.is_bad(text):
    return None
  if _CURLY_QUOTES_RE.search(text):
    text = ftfy.fixes.uncurl_quotes(text)
    if ftfy.badness.is_bad(text):  # ftfy's second pass; today's is_bad implies the first's
      return None
  return text if unicodedata.is_normalized('NFC', text) else None


def clean(text):
  """OpenAI's normalisation: ftfy, html.unescape twice, whitespace runs to one space, lower case.

  Skips ftfy and html.unescape where their result is known (most captions), since they cost
  most of the time.
  """
  fixed = _ftfy_fast(text)
  if fixed is None:
    fixed = html.unescape(html.unescape(ftfy.fix_text(text)))
  elif fixed.isascii():  # its whitespace is \t \n \f and space, which str.split knows too
    return ' '.join(fixed.split()).lower()
  return _WHITESPACE_RE.sub(' ', fixed.strip()).strip().lower()


def _bytes_to_unicode():
  """Byte -> printable character, OpenAI's table: printable Latin-1 bytes map to themselves, the
  other 68 bytes to U+0100 onwards in byte order, so BPE never sees whitespace or controls."""
  printable = [*range(ord('!'), ord('~') + 1), *range(ord('¡'), ord('¬') + 1),
               *range(ord('®'), ord('ÿ') + 1)]
  others = [b for b in range(256) if b not in printable]
  return dict(zip(printable + others, map(chr, printable + [256 + i for i in range(len(others))])))


def shorten(text, width=60):
  """`repr(text)`, cut at `width` characters (for error messages)."""
  return repr(text if len(text) <= width else text[:width] + '...')


def check_id_rows(tokens):
  """`tokens` as an integer array of one row (1-D) or of rows (2-D), else a ValueError."""
  tokens = np.asarray(tokens)
  if tokens.ndim not in (1, 2) or (tokens.size and not np.issubdtype(tokens.dtype, np.integer)):
    raise ValueError(f'decode expects a 1-D or 2-D integer array of ids, got shape '
                     f'{tokens.shape} of dtype {tokens.dtype}')
  return tokens


def check_texts(texts):
  """A str is a batch of one; otherwise any iterable of str."""
  if isinstance(texts, str):
    return [texts]
  if isinstance(texts, (bytes, bytearray)) or not hasattr(texts, '__iter__'):
    raise TypeError(f'texts must be a str or a sequence of str, got {type(texts).__name__}')
  texts = list(texts)
  for i, text in enumerate(texts):
    if not isinstance(text, str):
      raise TypeError(f'texts[{i}] must be a str, got {type(text).__name__}: {text!r:.60}')
  return texts


class Tokenizer:
  """OpenAI's byte-level BPE with a word cache. `cache_size` bounds the cache (it is emptied when
  full), so tokenizing an endless stream of new words cannot exhaust memory."""

  def __init__(self, vocab_path=VOCAB_PATH, cache_size=1_000_000):
    with gzip.open(vocab_path, 'rt', encoding='utf-8') as f:
      lines = f.read().split('\n')[1:NUM_MERGES + 1]
    merges = [tuple(line.split()) for line in lines]
    if len(merges) != NUM_MERGES or any(len(m) != 2 for m in merges):
      raise ValueError(f'{vocab_path} must hold {NUM_MERGES} merges of two symbols after its '
                       f'header line, got {len(merges)} lines')
    self._byte_to_char = _bytes_to_unicode()
    chars = list(self._byte_to_char.values())
    vocab = chars + [c + '</w>' for c in chars] + [a + b for a, b in merges]
    vocab += ['<|startoftext|>', '<|endoftext|>']
    self._encoder = {symbol: i for i, symbol in enumerate(vocab)}
    self.symbols = vocab  # id -> BPE symbol, as OpenAI's `decoder`
    self._char_to_byte = {c: b for b, c in self._byte_to_char.items()}
    self._ranks = {pair: i for i, pair in enumerate(merges)}
    self._cache_size = cache_size
    self._cache = {}
    self._reset_cache()

  def _reset_cache(self):
    self._cache.clear()
    self._cache.update({'<|startoftext|>': (SOT,), '<|endoftext|>': (EOT,)})

  def _bpe(self, word):
    """The ids of one word: its UTF-8 bytes as characters, merged lowest rank first; each step
    merges every non-overlapping occurrence of the best pair, left to right (as OpenAI)."""
    symbols = [self._byte_to_char[b] for b in word.encode('utf-8')]
    symbols[-1] += '</w>'
    rank_of = self._ranks.get
    while len(symbols) > 1:
      pairs = list(zip(symbols, symbols[1:]))
      ranks = list(map(rank_of, pairs, itertools.repeat(NUM_MERGES, len(pairs))))
      best = min(ranks)
      if best == NUM_MERGES:  # no pair left to merge
        break
      first, second = pairs[ranks.index(best)]
      merged, i, n = [], 0, len(symbols)
      while i < n:
        if i + 1 < n and symbols[i] == first and symbols[i + 1] == second:
          merged.append(first + second)
          i += 2
        else:
          merged.append(symbols[i])
          i += 1
      symbols = merged
    ids = tuple(self._encoder[s] for s in symbols)
    if len(self._cache) >= self._cache_size:
      self._reset_cache()
    self._cache[word] = ids
    return ids

  def _extend(self, ids, text):
    """Appends the ids of `text` (without SOT/EOT) to the list `ids`."""
    text = clean(text)
    words = (_ASCII_WORD_RE if text.isascii() else _WORD_RE).findall(text)
    cache = self._cache
    for word in words:
      try:
        ids.extend(cache[word])
      except KeyError:
        ids.extend(self._bpe(word))
    return ids

  def encode(self, text):
    """The BPE ids of one text, without SOT/EOT (OpenAI's `SimpleTokenizer.encode`)."""
    if not isinstance(text, str):
      raise TypeError(f'text must be a str, got {type(text).__name__}')
    return self._extend([], text)

  def tokenize(self, texts, context_length=77, truncate=False):
    """np.int32 (N, context_length): SOT, ids, EOT, zeros. Too long raises ValueError unless
    `truncate`, which cuts the row and ends it with EOT."""
    texts = check_texts(texts)
    if isinstance(context_length, bool) or not isinstance(context_length, (int, np.integer)):
      raise TypeError(f'context_length must be an int, got {type(context_length).__name__}')
    if context_length < 2:
      raise ValueError(f'context_length must be >= 2 (room for SOT and EOT), got {context_length}')
    tokens_NxL = np.zeros((len(texts), context_length), np.int32)
    for i, text in enumerate(texts):
      ids = self._extend([SOT], text)
      ids.append(EOT)
      if len(ids) > context_length:
        if not truncate:
          raise ValueError(f'texts[{i}] {shorten(text)} is {len(ids)} tokens with SOT and EOT, '
                           f'longer than context_length={context_length}; pass truncate=True to '
                           'cut it')
        ids = ids[:context_length]
        ids[-1] = EOT
      tokens_NxL[i, :len(ids)] = ids
    return tokens_NxL

  __call__ = tokenize

  def decode(self, tokens):
    """Text of one row of ids (or a list of texts for a 2-D array): stops at the first EOT, drops
    SOT and trailing zero padding; words are separated by spaces, as OpenAI's `decode`."""
    tokens = check_id_rows(tokens)
    if tokens.ndim == 2:
      return [self.decode(row) for row in tokens]
    ids = tokens.tolist()
    if EOT in ids:
      ids = ids[:ids.index(EOT)]
    else:  # a text's last token always ends a word (id >= 256), so trailing zeros are padding
      while ids and ids[-1] == 0:
        ids.pop()
    bad = [i for i in ids if not 0 <= i < VOCAB_SIZE]
    if bad:
      raise ValueError(f'token ids must be in [0, {VOCAB_SIZE}), got {bad[:5]}')
    symbols = ''.join(self.symbols[i] for i in ids if i != SOT)
    text = bytes(self._char_to_byte[c] for c in symbols).decode('utf-8', errors='replace')
    return text.replace('</w>', ' ').rstrip(' ')


@functools.lru_cache(maxsize=None)
def default_tokenizer():
  """The shared Tokenizer over the bundled vocabulary, loaded on first use."""
  return Tokenizer()


def tokenize(texts, context_length=77, truncate=False):
  """OpenAI's `clip.tokenize` as np.int32 (N, context_length); a str is a batch of one."""
  return default_tokenizer().tokenize(texts, context_length, truncate)


def decode(tokens):
  """The text of a row of ids (debugging aid): see `Tokenizer.decode`."""
  return default_tokenizer().decode(tokens)
