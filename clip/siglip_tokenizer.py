"""SigLIP's and SigLIP 2's tokenizers: SentencePiece over a `.model` file, batched to int32.

Token for token the same as transformers' tokenizers on the same model file, called as SigLIP's
model cards do, `tokenizer(texts, padding='max_length', max_length=64, truncation=True)`:

- `kind='siglip'` (SigLIP, big_vision's `c4_en` / `mc4` T5 vocabularies: `<pad>` 0, `</s>` 1,
  `<unk>` 2): transformers' `SiglipTokenizer` (`models/siglip/tokenization_siglip.py`). Its
  `canonicalize_text` cleans the text: lower case, ASCII punctuation (`string.punctuation`)
  removed, whitespace runs to one space, stripped; `tokenize` reads SentencePiece's meta symbol
  '▁' in the text as a space. Then `</s>` is appended and rows are padded with `</s>` too
  (SigLIP's `pad_token`; big_vision's `tokenize(eos='sticky', pad_value=1)`, whose own cleaning
  only lower-cases ASCII, `tf.strings.lower`, and keeps punctuation).
- `kind='siglip2'` (SigLIP 2, big_vision's `gemma_tokenizer.model`: `<pad>` 0, `<eos>` 1, `<bos>`
  2, `<unk>` 3): transformers' `Siglip2Tokenizer` (`models/siglip2/tokenization_siglip2.py`,
  the Gemma tokenizer behind a `Lowercase` normalizer) set up as open_clip's `SigLipTokenizer`
  builds SigLIP 2's: no BOS, `<eos>` appended, padded on the right with `<pad>`. The text is
  only lower-cased (big_vision's demo: `lower|tok(model="gemma", bos="no", eos="sticky")`), each
  character on its own as the `Lowercase` normalizer does, so a final 'Σ' becomes 'σ' where
  `str.lower` gives 'ς'.
- `clean='canonicalize'` with either kind: open_clip's pipeline for its SigLIP and SigLIP 2
  models (`HFTokenizer(clean='canonicalize')`), which cleans the text its own way first
  (`canonicalize_open_clip`).

Truncation keeps the end of sequence token last (transformers' `truncation=True`, big_vision's
`eos='sticky'`); without `truncate=True` a text too long for the context raises instead.

The text is encoded by SentencePiece itself, as big_vision trained both models, so two things
transformers does differently are left out:
- it matches its special tokens' strings ('</s>', '<unk>', '<eos>', '<mask>', ...) in the raw
  text and emits their ids; here they are text, as in big_vision and open_clip (which strip '<',
  '/' and '>' first). For SigLIP, the ids equal transformers' with `split_special_tokens=True`
  on every text;
- for Gemma it matches user-defined pieces in the raw text, before lower-casing and before
  spaces become '▁', and leaves runs of spaces to BPE merges; SentencePiece takes the longest
  user-defined piece of the lower-cased text (e.g. of a space run), which can differ for text
  holding '▁' or longer space runs than the model's longest.
"""
import functools
import html
import os
import re
import string

import ftfy
import numpy as np
import sentencepiece

from clip.tokenizer import check_id_rows
from clip.tokenizer import check_texts
from clip.tokenizer import shorten

KINDS = ('siglip', 'siglip2')
CONTEXT_LENGTH = 64  # both SigLIPs' text length

_PUNCTUATION = str.maketrans('', '', string.punctuation)
_WHITESPACE_RE = re.compile(r'\s+')


def canonicalize_siglip(text):
  """SigLIP's text cleaning, transformers' `SiglipTokenizer.canonicalize_text` after its
  `tokenize` turned '▁' into spaces: lower case, no ASCII punctuation, single spaces, stripped.

  (big_vision's `canonicalize_text`, which open_clip copies, first turns '_' into a space;
  transformers' removes it, and so does this one.)
  """
  text = text.replace('▁', ' ').lower().translate(_PUNCTUATION)
  return _WHITESPACE_RE.sub(' ', text).strip()


def lower_siglip2(text):
  """SigLIP 2's text cleaning: each character lower-cased on its own, as the Rust `Lowercase`
  normalizer of transformers' `Siglip2Tokenizer`; `str.lower` differs only in giving a word's
  final 'Σ' as 'ς'."""
  return text.lower() if 'Σ' not in text else ''.join(map(str.lower, text))


def canonicalize_open_clip(text):
  """open_clip's `clean='canonicalize'` (`open_clip/tokenizer.py`, its SigLIP and SigLIP 2
  models): ftfy and HTML unescaping (`basic_clean`), then big_vision's `canonicalize_text`: '_' to
  a space, ASCII punctuation removed, lower case, whitespace runs to one space, stripped."""
  text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
  text = text.replace('_', ' ').translate(_PUNCTUATION).lower()
  return ' '.join(text.split())


# TokenizerConfig.clean -> the function; None: transformers' rule for each kind.
CLEANS = {'siglip': canonicalize_siglip, 'lower': lower_siglip2,
          'canonicalize': canonicalize_open_clip}
_DEFAULT_CLEAN = {'siglip': 'siglip', 'siglip2': 'lower'}


def check_context_length(context_length, minimum=1, room='the end of sequence token'):
  """`context_length` as an int >= `minimum` (`room`: what must fit); TypeError or ValueError."""
  if isinstance(context_length, bool) or not isinstance(context_length, (int, np.integer)):
    raise TypeError(f'context_length must be an int, got {type(context_length).__name__}')
  if context_length < minimum:
    raise ValueError(f'context_length must be >= {minimum} (room for {room}), got '
                     f'{context_length}')
  return int(context_length)


def _load(model_file):
  """The SentencePieceProcessor of `model_file`; FileNotFoundError or ValueError if it is none."""
  if not isinstance(model_file, (str, os.PathLike)):
    raise TypeError(f'model_file must be a path (str or os.PathLike), got '
                    f'{type(model_file).__name__}')
  if not os.path.isfile(model_file):
    raise FileNotFoundError(f'model_file must be an existing SentencePiece .model file, got '
                            f'{os.fspath(model_file)!r}, which does not exist')
  try:
    return sentencepiece.SentencePieceProcessor(model_file=os.fspath(model_file))
  except (RuntimeError, OSError) as e:
    raise ValueError(f'model_file must be a SentencePiece model, {os.fspath(model_file)!r} is '
                     f'not: {e}') from e


class SentencePieceTokenizer:
  """SigLIP's (`kind='siglip'`) or SigLIP 2's (`kind='siglip2'`) tokenizer over a SentencePiece
  model file: see the module docstring for what each does and whose it equals."""

  def __init__(self, model_file, context_length=CONTEXT_LENGTH, kind='siglip', clean=None):
    if kind not in KINDS:
      raise ValueError(f'kind must be one of {KINDS}, got {kind!r}')
    clean = clean or _DEFAULT_CLEAN[kind]
    if clean not in CLEANS:
      raise ValueError(f'clean must be one of {tuple(CLEANS)}, got {clean!r}')
    self.context_length = check_context_length(context_length)
    self.kind = kind
    self.clean = clean
    self._sp = _load(model_file)
    self.model_file = os.fspath(model_file)
    self._clean = CLEANS[clean]
    self.vocab_size = self._sp.get_piece_size()
    self.eos_id = self._sp.eos_id()
    # SigLIP pads with its EOS ('</s>'); SigLIP 2 with Gemma's '<pad>'.
    self.pad_id = self.eos_id if kind == 'siglip' else self._sp.pad_id()
    if self.eos_id < 0 or self.pad_id < 0:
      raise ValueError(f'{kind} needs a model with an end of sequence token and a pad token, got '
                       f'eos_id={self.eos_id} and pad_id={self._sp.pad_id()} in '
                       f'{self.model_file!r}')

  def encode(self, text):
    """The ids of one cleaned text, without the end of sequence token."""
    if not isinstance(text, str):
      raise TypeError(f'text must be a str, got {type(text).__name__}')
    return self._encode([text])[0]

  def _encode(self, texts):
    return self._sp.encode([self._clean(text) for text in texts])

  def tokenize(self, texts, context_length=None, truncate=False):
    """np.int32 (N, context_length): ids, EOS, padding; `context_length` defaults to the
    tokenizer's. A text too long raises ValueError unless `truncate`, which keeps the first
    `context_length - 1` ids and the EOS."""
    texts = check_texts(texts)
    if context_length is None:
      context_length = self.context_length
    length = check_context_length(context_length)
    tokens_NxL = np.full((len(texts), length), self.pad_id, np.int32)
    for i, ids in enumerate(self._encode(texts)):
      if len(ids) >= length:
        if not truncate:
          raise ValueError(f'texts[{i}] {shorten(texts[i])} is {len(ids) + 1} tokens with the '
                           f'end of sequence token, longer than context_length={length}; pass '
                           'truncate=True to cut it')
        ids = ids[:length - 1]
      tokens_NxL[i, :len(ids)] = ids
      tokens_NxL[i, len(ids)] = self.eos_id
    return tokens_NxL

  __call__ = tokenize

  def decode(self, tokens):
    """The text of one row of ids up to its first EOS (a list of texts for a 2-D array): the
    cleaned text, where every piece was known (SentencePiece writes ' ⁇ ' for `<unk>`)."""
    return decode_rows(tokens, self.eos_id, self.vocab_size, self._sp.decode)


def decode_rows(tokens, eos_id, vocab_size, decode_ids):
  """`decode_ids(ids)` of the ids of one row before its first `eos_id` (a list for a 2-D array of
  rows); ValueError for an id outside `[0, vocab_size)`."""
  tokens = check_id_rows(tokens)
  if tokens.ndim == 2:
    return [decode_rows(row, eos_id, vocab_size, decode_ids) for row in tokens]
  ids = tokens.tolist()
  if eos_id in ids:
    ids = ids[:ids.index(eos_id)]
  bad = [i for i in ids if not 0 <= i < vocab_size]
  if bad:
    raise ValueError(f'token ids must be in [0, {vocab_size}), got {bad[:5]}')
  return decode_ids(ids)


_EOS_PIECES = {'</s>': 'siglip', '<eos>': 'siglip2'}


def kind_of(model_file):
  """'siglip' for a T5 vocabulary (its end of sequence piece '</s>'), 'siglip2' for Gemma's
  ('<eos>'); a ValueError for a model with neither."""
  sp = _load(model_file)
  piece = sp.id_to_piece(sp.eos_id()) if sp.eos_id() >= 0 else None
  if piece not in _EOS_PIECES:
    raise ValueError(f'{os.fspath(model_file)!r} ends sequences with {piece!r}: neither a SigLIP '
                     '(T5, "</s>") nor a SigLIP 2 (Gemma, "<eos>") SentencePiece model')
  return _EOS_PIECES[piece]


@functools.lru_cache(maxsize=16)
def _cached(cls, path, mtime_ns, options):
  del mtime_ns  # in the key only: a rewritten file is loaded again
  return cls(path, **dict(options))


def load_once(cls, path, **options):
  """`cls(path, **options)`, a tokenizer over the vocabulary file at `path`, built once per
  version of the file."""
  if isinstance(path, (str, os.PathLike)) and os.path.isfile(path):
    path = os.path.abspath(path)
    return _cached(cls, path, os.stat(path).st_mtime_ns, tuple(sorted(options.items())))
  return cls(path, **options)  # raises, saying what is wrong


def cached_tokenizer(model_file, kind, clean=None):
  """The `SentencePieceTokenizer` of `model_file`, loaded once per file version."""
  return load_once(SentencePieceTokenizer, model_file, kind=kind, clean=clean)


def tokenize_siglip(texts, model_file, context_length=CONTEXT_LENGTH, truncate=False, *,
                    kind='siglip'):
  """SigLIP's (or, with `kind='siglip2'`, SigLIP 2's) tokens of `texts` as np.int32
  (N, context_length), like `clip.tokenize`; the tokenizer of `model_file` is cached."""
  return cached_tokenizer(model_file, kind).tokenize(texts, context_length, truncate)
