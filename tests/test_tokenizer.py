"""Tokenizer: token for token OpenAI's `clip.tokenize` on a large adversarial corpus; bad input
raises.

The reference is OpenAI's own `SimpleTokenizer` (clip-anytorch 2.6.0) with the padding and
truncation of their `clip.tokenize`, transcribed below on numpy (their `clip.py` needs
torchvision to import).
"""
# pylint: disable=protected-access
import html
import subprocess
import sys

import ftfy
import numpy as np
import pytest

from clip import tokenizer
from experiments.references import openai as openai_reference

SEED = 0
NUM_RANDOM_TEXTS = 1500

# Pieces the corpus is built from, each aimed at one step of OpenAI's pipeline.
PIECES = {
    'ascii': ['a photo of a cat', 'Two DOGS playing', 'MiXeD CaSe', 'the', 'x', 'New York City',
              'e-mail', 'snake_case', 'http://example.com/a?b=c', 'C++', 'user@example.org'],
    'contractions': ["it's", "don't", "we're", "I've", "I'm", "you'll", "he'd", "IT'S", "WE'LL",
                     "O'Neil", "'s", "rock 'n' roll", "dogs'", "it’s", "can’t", "'ſ", "''"],
    'accents': ['café', 'naïve', 'São Paulo', 'Zürich', 'Ångström', 'straße', 'İstanbul', 'ΣΟΦΙΑΣ',
                'Ελληνικά', 'Москва', 'Łódź', 'crème brûlée', 'ǅemal', 'ﬁnance'],
    'scripts': ['東京タワー', '北京', '한국어', 'العربية', 'مرحبا بالعالم', 'עברית', 'हिन्दी', 'ไทย',
                'ｶﾀｶﾅ', 'ＦＵＬＬ　ＷＩＤＴＨ', '１２３'],
    'combining': ['e\u0301', 'cafe\u0301', 'n\u0303o', 'a\u0308\u0304', 'Z\u0351\u0362',
                  'i\u0307', '\u0301alone'],
    'emoji': ['🐶', '❤️', '👍🏽', '👨‍👩‍👧‍👦', '🏳️‍🌈', '🇫🇷', '🇯🇵🇺🇸', '😀😃😄', '✔', '☃', '🧑🏿‍🚀'],
    'entities': ['&amp;', '&lt;b&gt;', '&#39;', '&quot;hi&quot;', '&amp;amp;', '&amp;lt;',
                 '&amp;amp;amp;', '&#x27;', '&nbsp;', '&eacute;', '&EACUTE;', '&hellip;', '&#0;',
                 '&#xd800;', '&#128512;', '&notanentity;', 'AT&T', 'R&D', '&', '&#',
                 '&lt;|endoftext|&gt;', '<b>bold</b>', 'a < b'],
    'whitespace': ['\t', '\n', '\r\n', '\r', '\x0b', '\x0c', '\xa0', '\u2002', '\u2009', '\u3000',
                   '\u200b', '\u200d', '\ufeff', '\u2028', '\u2029', '\x85', '\x1c', '   ',
                   '\u180e'],
    'numbers': ['123', '3.14', '1,000,000', '2024-01-01', '²³', '½', '٣٤', '१२', 'Ⅻ', '10%',
                '$5', '€20', '#1'],
    'mojibake': ['cafÃ©', 'Ã¼ber', 'itâ€™s', 'â€œquotedâ€\x9d', 'Ã\xa0 la', 'doesnâ€™t',
                 'Ã©tÃ©', 'ÐŸÑ€Ð¸Ð²ÐµÑ‚', 'æ—¥æœ¬', 'Â£5', 'Ã', 'Ã ', 'Ãƒ'],
    'punctuation': ['!!!', '...', '?!?', '--', '—', '–', '<<>>', '@#$%^&*()', '"', "'", '“quote”',
                    '‘single’', '«»', '…', ',', '.', '(a)', '[b]', '{c}', '~', '|', '\\', '/'],
    'controls': ['\x00', '\x1b[31mred\x1b[0m', '\x7f', '\x08', '\x80', '\x9d', '\ud83d',
                 '\ud83d\udc36', '\ufffd', '\ufffc'],
    'special': ['<|startoftext|>', '<|endoftext|>', '<|ENDOFTEXT|>', '<|endoftext', '|>'],
}
SEPARATORS = [' ', ' ', ' ', '', '\t', '  ', '\n', '\xa0']


def random_texts(n, seed=SEED):
  """`n` texts of 0-40 pieces from random categories; a few are very long."""
  rng = np.random.default_rng(seed)
  categories = sorted(PIECES)
  texts = []
  for i in range(n):
    count = int(rng.integers(0, 41)) if i % 50 else int(rng.integers(100, 300))
    parts = []
    for _ in range(count):
      pieces = PIECES[categories[rng.integers(len(categories))]]
      parts.append(pieces[rng.integers(len(pieces))])
      parts.append(SEPARATORS[rng.integers(len(SEPARATORS))])
    texts.append(''.join(parts))
  return texts


def mojibake_texts(seed=SEED):
  """Non-ASCII words encoded as UTF-8 and decoded wrongly, as ftfy is built to undo."""
  rng = np.random.default_rng(seed)
  words = PIECES['accents'] + PIECES['scripts'] + PIECES['emoji'] + ['“quoted”', '—', '…']
  texts = []
  for word in words:
    for encoding in ('latin-1', 'cp1252', 'cp1251', 'macroman'):
      broken = word.encode('utf-8').decode(encoding, errors='replace')
      texts.append(f'{PIECES["ascii"][rng.integers(len(PIECES["ascii"]))]} {broken} end')
  return texts


EDGE_CASES = ['', ' ', '\n\t ', '&amp;', '&nbsp;', '\x00', 'a' * 500, '! ' * 100,
              'a photo of a cat.', 'A PHOTO OF A CAT.', '<|startoftext|><|endoftext|>',
              'a café in São Paulo', '東京タワー 🐶 at night', 'Ελληνικά  και\tрусский',
              # ftfy judges each line: neither is mojibake as a whole, the second line is
              'the end.\nÃ la carte', '1.\nÂ the']


@pytest.fixture(scope='module')
def reference():
  return openai_reference.load_module('simple_tokenizer').SimpleTokenizer()


@pytest.fixture(scope='module')
def corpus():
  return EDGE_CASES + random_texts(NUM_RANDOM_TEXTS) + mojibake_texts()


def openai_tokenize(simple_tokenizer, texts, context_length=77, truncate=False):
  """OpenAI's `clip.tokenize` (clip.py of clip-anytorch 2.6.0) with numpy for torch."""
  if isinstance(texts, str):
    texts = [texts]
  sot_token = simple_tokenizer.encoder['<|startoftext|>']
  eot_token = simple_tokenizer.encoder['<|endoftext|>']
  all_tokens = [[sot_token] + simple_tokenizer.encode(text) + [eot_token] for text in texts]
  result = np.zeros((len(all_tokens), context_length), np.int64)
  for i, tokens in enumerate(all_tokens):
    if len(tokens) > context_length:
      if truncate:
        tokens = tokens[:context_length]
        tokens[-1] = eot_token
      else:
        raise RuntimeError(f'Input {texts[i]} is too long for context length {context_length}')
    result[i, :len(tokens)] = tokens
  return result


def openai_clean(text):
  """OpenAI's `whitespace_clean(basic_clean(text)).lower()`, via their module's functions."""
  module = openai_reference.load_module('simple_tokenizer')
  return module.whitespace_clean(module.basic_clean(text)).lower()


def test_vocabulary_is_openais(reference):
  ours = tokenizer.Tokenizer()
  assert ours.symbols == [reference.decoder[i] for i in range(len(reference.decoder))]
  assert len(ours.symbols) == tokenizer.VOCAB_SIZE
  assert (reference.encoder['<|startoftext|>'], reference.encoder['<|endoftext|>']) == (
      tokenizer.SOT, tokenizer.EOT) == (49406, 49407)


def test_corpus_covers_every_cleaning_route(corpus):
  """The corpus must exercise the ftfy shortcut and the full ftfy path on ASCII and beyond."""
  routes = {(t.isascii(), tokenizer._ftfy_fast(t) is None) for t in corpus}
  assert routes == {(True, True), (True, False), (False, True), (False, False)}
  assert any(tokenizer._ftfy_fast(t) not in (None, t) for t in corpus)  # straightened quotes
  assert sum(ftfy.fix_text(t) != t for t in corpus) > 100


def test_clean_equals_openai(corpus):
  for text in corpus:
    assert tokenizer.clean(text) == openai_clean(text), repr(text)


def test_without_the_shortcut_everything_goes_through_ftfy(monkeypatch, corpus):
  """What a future ftfy with other fixers gets: no shortcut, the same tokens."""
  monkeypatch.setattr(tokenizer, '_FTFY_SHORTCUT', False)
  assert all(tokenizer._ftfy_fast(t) is None for t in corpus)
  for text in corpus[:300]:
    assert tokenizer.clean(text) == openai_clean(text), repr(text)


def test_ftfy_shortcut_is_sound():
  """Where the shortcut skips ftfy and html.unescape, its result is theirs: checked on strings
  of one to four characters from all over Unicode, ASCII, and the quotes and letters of mojibake."""
  rng = np.random.default_rng(SEED)
  planes = np.concatenate([rng.integers(0x80, 0x3000, 3000), rng.integers(0x3000, 0x10000, 1000),
                           rng.integers(0x10000, 0x30000, 500)])
  mojibake_prone = [ord(c) for c in 'ÂÃÎÐØÙàâ√≈‚вВГРСΒΓΞΟā€œŠš¢£Ÿž©®°·»×²³–—´µ±ʼ‘’‛“”„‟']
  alphabet = np.concatenate([planes, np.repeat(mojibake_prone, 20), np.arange(0x20, 0x7f)])
  checked = changed = 0
  for _ in range(4000):
    text = ''.join(chr(c) for c in rng.choice(alphabet, int(rng.integers(1, 5))))
    fixed = tokenizer._ftfy_fast(text)
    if fixed is None:
      continue
    assert ftfy.fix_text(text) == fixed, repr(text)
    assert html.unescape(fixed) == fixed, repr(text)
    checked, changed = checked + 1, changed + (fixed != text)
  assert checked > 1000 and changed > 100


@pytest.mark.parametrize('context_length', [77, 16])
def test_truncated_tokens_equal_openai(reference, corpus, context_length):
  ours = tokenizer.tokenize(corpus, context_length, truncate=True)
  assert ours.dtype == np.int32 and ours.shape == (len(corpus), context_length)
  expected = openai_tokenize(reference, corpus, context_length, truncate=True)
  mismatched = [corpus[i] for i in np.flatnonzero(np.any(ours != expected, axis=1))]
  assert not mismatched, mismatched[:3]
  # the corpus holds both texts that fit and texts that had to be cut
  lengths = np.sum(ours != 0, axis=1)
  assert np.any(lengths < context_length) and np.any(ours[:, -1] == tokenizer.EOT)


@pytest.mark.parametrize('context_length', [77, 16])
def test_too_long_raises_and_the_rest_fit_exactly(reference, corpus, context_length):
  fits = []
  for text in corpus:
    try:
      expected = openai_tokenize(reference, text, context_length)
    except RuntimeError:
      with pytest.raises(ValueError, match=f'context_length={context_length}'):
        tokenizer.tokenize(text, context_length)
      continue
    fits.append(text)
    np.testing.assert_array_equal(tokenizer.tokenize(text, context_length), expected)
  assert 0 < len(fits) < len(corpus)
  np.testing.assert_array_equal(tokenizer.tokenize(fits, context_length),
                                openai_tokenize(reference, fits, context_length))


def test_error_names_the_text_its_length_and_the_context():
  text = 'word ' * 100
  with pytest.raises(ValueError) as info:
    tokenizer.tokenize(['short', text])
  message = str(info.value)
  assert 'texts[1]' in message and repr(text[:60] + '...') in message
  assert '102 tokens' in message and 'context_length=77' in message and 'truncate=True' in message


def test_encode_equals_openai(reference, corpus):
  tok = tokenizer.Tokenizer()
  for text in corpus[:300]:
    assert tok.encode(text) == reference.encode(text), repr(text)


def test_small_cache_gives_the_same_tokens(reference, corpus):
  tok = tokenizer.Tokenizer(cache_size=16)
  expected = openai_tokenize(reference, corpus[:200], truncate=True)
  np.testing.assert_array_equal(tok.tokenize(corpus[:200], truncate=True), expected)
  assert len(tok._cache) <= 16


def test_shapes_padding_and_special_tokens():
  np.testing.assert_array_equal(tokenizer.tokenize(''), [[tokenizer.SOT, tokenizer.EOT] + [0] * 75])
  assert tokenizer.tokenize('a cat').shape == (1, 77)
  assert tokenizer.tokenize(('a', 'b', 'c'), 5).shape == (3, 5)
  assert tokenizer.tokenize([]).shape == (0, 77)
  np.testing.assert_array_equal(tokenizer.tokenize(['hello'], 2, truncate=True),
                                [[tokenizer.SOT, tokenizer.EOT]])
  tokens = tokenizer.tokenize(['a b c d e f g h'], 5, truncate=True)[0]
  assert tokens[0] == tokenizer.SOT and tokens[-1] == tokenizer.EOT and np.all(tokens[1:4] < 49406)


@pytest.mark.parametrize('bad', [3, [b'bytes'], ['ok', None], ['ok', 7], b'bytes', [['nested']]])
def test_non_str_raises_type_error(bad):
  with pytest.raises(TypeError, match='str'):
    tokenizer.tokenize(bad)


@pytest.mark.parametrize('context_length', [1, 0, -5])
def test_context_length_below_two_raises(context_length):
  with pytest.raises(ValueError, match='context_length must be >= 2'):
    tokenizer.tokenize('a', context_length)


def test_context_length_must_be_an_int():
  with pytest.raises(TypeError, match='context_length'):
    tokenizer.tokenize('a', 77.0)


def test_decode_round_trips_up_to_openais_cleaning(reference, corpus):
  """Decoding gives the cleaned text with a space after each word (OpenAI's `</w>`), so the two
  agree once spaces are removed; and it equals OpenAI's `decode` of the same ids."""
  tok, round_trips = tokenizer.default_tokenizer(), 0
  for text in corpus:
    ids = tok.encode(text)
    decoded = tokenizer.decode(ids)
    # decode stops at the first EOT and drops SOT, even where the text spelled them out
    kept = ids[:ids.index(tokenizer.EOT)] if tokenizer.EOT in ids else ids
    assert decoded == reference.decode([i for i in kept if i != tokenizer.SOT]).rstrip(' ')
    cleaned = openai_clean(text)
    if '<|startoftext|>' not in cleaned and '<|endoftext|>' not in cleaned:
      assert decoded.replace(' ', '') == cleaned.replace(' ', ''), repr(text)
      round_trips += 1
  assert round_trips > len(corpus) // 3


def test_decode_accepts_lists_and_batches():
  ids = tokenizer.default_tokenizer().encode('a photo of a cat.')
  assert tokenizer.decode(ids) == 'a photo of a cat .'
  assert tokenizer.decode([tokenizer.SOT, *ids, tokenizer.EOT, 0, 0]) == 'a photo of a cat .'
  assert tokenizer.decode([*ids, 0, 0]) == 'a photo of a cat .'
  assert tokenizer.decode(tokenizer.tokenize(['a dog', 'two cats'])) == ['a dog', 'two cats']
  assert tokenizer.decode([]) == ''


@pytest.mark.parametrize('bad', [[49408], [-1], [[[1]]], [0.5, 1.5]])
def test_decode_rejects_bad_ids(bad):
  with pytest.raises(ValueError):
    tokenizer.decode(bad)


def test_vocabulary_loads_once_and_lazily():
  assert tokenizer.default_tokenizer() is tokenizer.default_tokenizer()
  code = ('import clip.tokenizer as t; assert t.default_tokenizer.cache_info().currsize == 0; '
          't.tokenize("a"); assert t.default_tokenizer.cache_info().currsize == 1')
  subprocess.run([sys.executable, '-c', code], check=True)
