"""MetaCLIP 2 worldwide's tokenizer: open_clip's `HFTokenizer` over an XLM-RoBERTa-style
tokenizer (XLM-V, `facebook/xlm-v-base`: a SentencePiece unigram vocabulary, `<s>` 0, `<pad>` 1,
`</s>` 2, `<unk>` 3), run by the `tokenizers` library from the folder's `tokenizer.json` in
transformers 5's `XLMRobertaTokenizer` pipeline.

Token for token open_clip's `HFTokenizer(name, context_length, clean)` (open_clip 3.3,
`open_clip/tokenizer.py`), which cleans each text (`clean='whitespace'`, its default and MetaCLIP
2's: ftfy, HTML unescaping twice, whitespace runs to one space, stripped; or `'canonicalize'`)
and then calls transformers' tokenizer with `max_length=context_length, padding='max_length',
truncation=True`: `<s>`, the text's ids, `</s>`, then `<pad>` to the context length. Truncation
cuts the text's ids to leave room for `<s>` and `</s>`, so a row always ends its text with `</s>`
(the id MetaCLIP 2 pools at); without `truncate=True` a text too long raises instead.

`clean='none'` is transformers' own `XLMRobertaTokenizer` (transformers' `MetaClip2Model`
folders), which cleans nothing.

transformers 5 does not run `tokenizer.json` as it is: its `XLMRobertaTokenizer` keeps the file's
unigram vocabulary, added tokens and SentencePiece charsmap, and rebuilds the rest (the charsmap
alone as normalizer; WhitespaceSplit then Metaspace with a prefix space; `<s>` $A `</s>`); so does
this module. transformers 4 (`XLMRobertaTokenizerFast`) ran the file as it is, whose older
converter also turned runs of spaces into one and had no WhitespaceSplit: the two differ on text
ending in whitespace, which open_clip's cleaning strips. tests/formats/test_metaclip2.py holds
ours equal to transformers 5 for both layouts of the file.
"""
import base64
import html
import json
import os

import ftfy
import numpy as np

from clip.siglip_tokenizer import canonicalize_open_clip
from clip.siglip_tokenizer import check_context_length
from clip.siglip_tokenizer import decode_rows
from clip.siglip_tokenizer import load_once
from clip.tokenizer import check_texts
from clip.tokenizer import shorten

TOKENIZER_FILE = 'tokenizer.json'
CONTEXT_LENGTH = 77  # MetaCLIP 2's text length
_SPECIAL = {'bos': '<s>', 'eos': '</s>', 'pad': '<pad>'}


def clean_whitespace(text):
  """open_clip's `clean='whitespace'` (`_clean_whitespace`): ftfy, HTML unescaping twice, then
  whitespace runs (`str.split`'s) to one space, stripped; case and punctuation kept."""
  text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
  return ' '.join(text.split())


# TokenizerConfig.clean -> the function (open_clip's names; 'none': transformers' own).
CLEANS = {'whitespace': clean_whitespace, 'canonicalize': canonicalize_open_clip,
          'none': str}


def _charsmap(tokenizer_file):
  """The SentencePiece charsmap of a `tokenizer.json`'s normalizer (bytes), or None."""
  with open(tokenizer_file, encoding='utf-8') as f:
    normalizer = json.load(f).get('normalizer') or {}
  for n in normalizer.get('normalizers', [normalizer]):
    if n.get('type') == 'Precompiled' and n.get('precompiled_charsmap'):
      return base64.b64decode(n['precompiled_charsmap'])
  return None


def _as_transformers5(tok, charsmap, bos_id, eos_id):
  """`tok` with transformers 5's `XLMRobertaTokenizer` pipeline around its vocabulary."""
  from tokenizers import decoders  # pylint: disable=g-import-not-at-top
  from tokenizers import normalizers  # pylint: disable=g-import-not-at-top
  from tokenizers import pre_tokenizers  # pylint: disable=g-import-not-at-top
  from tokenizers import processors  # pylint: disable=g-import-not-at-top
  tok.normalizer = None if charsmap is None else normalizers.Precompiled(charsmap)
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.WhitespaceSplit(),
      pre_tokenizers.Metaspace(replacement='▁', prepend_scheme='always')])
  tok.decoder = decoders.Metaspace(replacement='▁', prepend_scheme='always')
  tok.post_processor = processors.TemplateProcessing(
      single='<s> $A </s>', pair='<s> $A </s> </s> $B </s>',
      special_tokens=[('<s>', bos_id), ('</s>', eos_id)])
  return tok


def _read(tokenizer_file):
  """The `tokenizers.Tokenizer` of a `tokenizer.json`, without the truncation and padding it may
  carry; FileNotFoundError or ValueError naming the file."""
  if not isinstance(tokenizer_file, (str, os.PathLike)):
    raise TypeError(f'tokenizer_file must be a path, got {type(tokenizer_file).__name__}')
  if not os.path.isfile(tokenizer_file):
    raise FileNotFoundError(f'tokenizer_file must be an existing {TOKENIZER_FILE}, got '
                            f'{os.fspath(tokenizer_file)!r}, which does not exist')
  try:
    import tokenizers  # pylint: disable=g-import-not-at-top  # only for this family
  except ImportError as e:
    raise ImportError('MetaCLIP 2\'s XLM-V tokenizer runs on the `tokenizers` library: pip '
                      'install tokenizers') from e
  try:
    tok = tokenizers.Tokenizer.from_file(os.fspath(tokenizer_file))
  except Exception as e:  # the Rust side raises plain Exceptions
    raise ValueError(f'{os.fspath(tokenizer_file)!r} is not a tokenizers library '
                     f'{TOKENIZER_FILE}: {e}') from e
  tok.no_truncation()
  tok.no_padding()
  return tok


class XLMRTokenizer:
  """open_clip's `HFTokenizer` over the XLM-RoBERTa-style `tokenizer.json` at `tokenizer_file`
  (see the module docstring): `tokenizer(texts, truncate=False)` -> np.int32
  `(N, context_length)`. ValueError if the file's model is not a unigram one or it has no `<s>`,
  `</s>` or `<pad>`."""

  def __init__(self, tokenizer_file, context_length=CONTEXT_LENGTH, clean='whitespace'):
    if clean not in CLEANS:
      raise ValueError(f'clean must be one of {tuple(CLEANS)}, got {clean!r}')
    self._tok = _read(tokenizer_file)
    self.tokenizer_file = os.fspath(tokenizer_file)
    self.clean = clean
    self._clean = CLEANS[clean]
    ids = {k: self._tok.token_to_id(piece) for k, piece in _SPECIAL.items()}
    if None in ids.values():
      raise ValueError(f'{self.tokenizer_file!r} is not an XLM-RoBERTa-style tokenizer: it has no '
                       f'{[_SPECIAL[k] for k, i in ids.items() if i is None]} token')
    self.bos_id, self.eos_id, self.pad_id = ids['bos'], ids['eos'], ids['pad']
    model = type(self._tok.model).__name__
    if model != 'Unigram':
      raise ValueError(f'{self.tokenizer_file!r} is not an XLM-RoBERTa-style tokenizer: its model '
                       f'is {model}, not a SentencePiece Unigram one')
    _as_transformers5(self._tok, _charsmap(tokenizer_file), self.bos_id, self.eos_id)
    self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
    self.context_length = check_context_length(context_length, 2, '<s> and </s>')

  def tokenize(self, texts, context_length=None, truncate=False):
    """np.int32 (N, context_length): `<s>`, ids, `</s>`, `<pad>`s; `context_length` defaults to
    the tokenizer's. A text too long raises ValueError unless `truncate`, which keeps its first
    `context_length - 2` ids between `<s>` and `</s>`."""
    texts = check_texts(texts)
    length = check_context_length(
        self.context_length if context_length is None else context_length, 2, '<s> and </s>')
    tokens_NxL = np.full((len(texts), length), self.pad_id, np.int32)
    encodings = self._tok.encode_batch([self._clean(t) for t in texts], add_special_tokens=False)
    for i, enc in enumerate(encodings):
      if len(enc.ids) + 2 > length:
        if not truncate:
          raise ValueError(f'texts[{i}] {shorten(texts[i])} is {len(enc.ids) + 2} tokens with <s> '
                           f'and </s>, longer than context_length={length}; pass truncate=True '
                           'to cut it')
        enc.truncate(length - 2)
      ids = self._tok.post_process(enc).ids
      tokens_NxL[i, :len(ids)] = ids
    return tokens_NxL

  __call__ = tokenize

  def decode(self, tokens):
    """The text of one row of ids between `<s>` and its first `</s>` (a list of texts for a 2-D
    array): the cleaned text, where every piece was known."""
    return decode_rows(tokens, self.eos_id, self.vocab_size, self._decode)

  def _decode(self, ids):
    return self._tok.decode(ids[1:] if ids[:1] == [self.bos_id] else ids)


def tokenizer_in(folder):
  """The folder's `tokenizer.json`, or None."""
  path = os.path.join(folder, TOKENIZER_FILE)
  return path if os.path.isfile(path) else None


def cached_tokenizer(tokenizer_file, clean='whitespace'):
  """The `XLMRTokenizer` of `tokenizer_file`, loaded once per file version."""
  return load_once(XLMRTokenizer, tokenizer_file, clean=clean)
