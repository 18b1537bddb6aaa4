"""SigLIP tokenizers: token for token transformers' `SiglipTokenizer` and `Siglip2Tokenizer`
(and open_clip's SigLIP 2 pipeline) on tiny SentencePiece models trained here with the real
models' conventions; decoding; bad input raises.

The real files cannot be fetched in tests, so two models are trained on a generated corpus:
- like SigLIP's T5 vocabularies (big_vision `c4_en` = t5-data `cc_en.32000`): unigram,
  `nmt_nfkc` normalisation, dummy prefix, `<pad>` 0, `</s>` 1, `<unk>` 2, no BOS; the names are
  the ones `SiglipTokenizer`'s defaults look up;
- like SigLIP 2's Gemma vocabulary (big_vision `gemma_tokenizer.model`): BPE with byte fallback,
  split digits, identity normalisation, no dummy prefix, whitespace kept, `<pad>` 0, `<eos>` 1,
  `<bos>` 2, `<unk>` 3, and user-defined pieces (`<mask>`, turn markers, newline, tab and space
  runs).

transformers is the reference for texts without the strings it cuts out as tokens (`_plain`);
for those, the contract is SentencePiece's (as big_vision trained with): they are text.
"""
# pylint: disable=protected-access,redefined-outer-name
import functools
import importlib.util
import os
import re
import shutil
import warnings

import chex
import numpy as np
import pytest
import sentencepiece
from transformers import GemmaTokenizer
from transformers import Siglip2Tokenizer
from transformers import SiglipTokenizer

from clip import siglip_tokenizer
from experiments.references import open_clip as open_clip_reference
from experiments.references import packages as reference_packages

SEED = 0
NUM_RANDOM_TEXTS = 1500
CONTEXT_LENGTH = 64

SIGLIP_SPEC = dict(model_type='unigram', vocab_size=400, pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                   pad_piece='<pad>', eos_piece='</s>', unk_piece='<unk>')
# Runs of spaces (up to MAX_SPACE_RUN), newlines and tabs too: the case where transformers and
# SentencePiece part ways (see test_long_space_runs_are_sentencepieces).
MAX_SPACE_RUN = 8
SIGLIP2_USER_DEFINED = ['<mask>', '<start_of_turn>', '<end_of_turn>',
                        *('\n' * k for k in range(1, 9)), *('\t' * k for k in range(1, 5)),
                        *('▁' * k for k in range(2, MAX_SPACE_RUN + 1))]
SIGLIP2_SPEC = dict(model_type='bpe', vocab_size=700, pad_id=0, eos_id=1, bos_id=2, unk_id=3,
                    pad_piece='<pad>', eos_piece='<eos>', bos_piece='<bos>', unk_piece='<unk>',
                    byte_fallback=True, split_digits=True, normalization_rule_name='identity',
                    add_dummy_prefix=False, remove_extra_whitespaces=False,
                    allow_whitespace_only_pieces=True, user_defined_symbols=SIGLIP2_USER_DEFINED)
# Strings transformers matches in the raw text as tokens (its special tokens and, for Gemma, the
# user-defined pieces), which this tokenizer reads as text: see `_plain`.
MARKUP = ('</s>', '<unk>', '<pad>', '<eos>', '<bos>', '<mask>', '<start_of_turn>', '<end_of_turn>')

# Pieces the test texts are built from, each aimed at one step of the pipelines.
PIECES = {
    'ascii': ['a photo of a cat', 'Two DOGS playing', 'MiXeD CaSe', 'the', 'x', 'New York City',
              'e-mail', 'snake_case', 'http://example.com/a?b=c', 'C++', 'user@example.org'],
    'contractions': ["it's", "don't", "we're", "I've", "O'Neil", "rock 'n' roll", 'it’s'],
    'accents': ['café', 'naïve', 'São Paulo', 'Zürich', 'Ångström', 'straße', 'İstanbul', 'ΣΟΦΙΑΣ',
                'ΟΔΟΣ ΣΑΣ', 'Ελληνικά', 'Москва', 'Łódź', 'crème brûlée', 'ǅemal', 'ﬁnance', 'ẞ'],
    'scripts': ['東京タワー', '北京', '한국어', 'العربية', 'עברית', 'हिन्दी', 'ｶﾀｶﾅ',
                'ＦＵＬＬ　ＷＩＤＴＨ', '１２３'],
    'combining': ['e\u0301', 'cafe\u0301', 'n\u0303o', 'a\u0308\u0304', '\u0301alone'],
    'emoji': ['🐶', '❤️', '👍🏽', '👨‍👩‍👧‍👦', '🇫🇷', '😀😃😄'],
    'numbers': ['123', '3.14', '1,000,000', '2024-01-01', '²³', '½', '٣٤', 'Ⅻ', '10%', '$5'],
    'punctuation': ['!!!', '...', '?!?', '--', '—', '<<>>', '@#$%^&*()', '"', "'", '“quote”', '«»',
                    '…', '(a)', '[b]', '{c}', '~', '|', '\\', '/', '_'],
    'whitespace': ['\t', '\n', '\n\n', '\r\n', '\x0b', '\x0c', '\xa0', '\u2002', '\u3000', '\u200b',
                   '\ufeff', '\u2028', '\x85', '\x1c', '   '],
    'controls': ['\x00', '\x7f', '\x1b[31mred\x1b[0m', '\ufffd'],
    'meta': ['▁', '▁▁', 'x▁y', '▁hello'],
    'markup': [*MARKUP, '<MASK>', '</S>', '<s>', '<START_OF_TURN>'],
}
SEPARATORS = [' ', ' ', ' ', '', '  ', '\t', '\n', '\xa0']
EDGE_CASES = ['', ' ', '   ', '\n\t ', '.', '...', '!!!', '?!', '—', '_', '▁', 'A',
              'a photo of a cat.', 'A PHOTO OF A CAT.', 'a  photo   of\ta\ncat',
              '  leading and trailing  ', 'a café in São Paulo', 'Ελληνικά  και\tрусский', 'ΟΔΟΣ',
              'İ', '東京タワー 🐶', '1234567890', 'snake_case_words', 'x' * 200]


def training_texts(n, seed=SEED):
  """`n` sentences of made-up and common words: mixed case, punctuation, digits, unicode, extra
  whitespace."""
  rng = np.random.default_rng(seed)
  syllables = ['ka', 'to', 'ri', 'ne', 'sa', 'mo', 'lu', 'pe', 'di', 'ga', 'zo', 'fi', 'qu', 'th',
               'ch', 'sh', 'an', 'en', 'on', 'er', 'st', 'ou', 'ée', 'ü', 'ß', 'ñ', 'ö']
  common = [*PIECES['ascii'], *PIECES['accents'], 'photo', 'dog', 'snow', 'Москва', '東京']
  seps = [' ', ' ', ' ', '  ', ', ', '. ', '! ', '? ', ' - ', '\t', '_', '\n', ' (', ') ']
  texts = []
  for _ in range(n):
    words = []
    for _ in range(rng.integers(1, 15)):
      r = rng.random()
      if r < 0.4:
        word = common[rng.integers(len(common))]
      elif r < 0.5:
        word = str(rng.integers(0, 100_000))
      else:
        word = ''.join(syllables[rng.integers(len(syllables))] for _ in range(rng.integers(1, 5)))
      words.append(word.upper() if rng.random() < 0.05 else
                   word.capitalize() if rng.random() < 0.2 else word)
      words.append(seps[rng.integers(len(seps))])
    texts.append(''.join(words))
  return texts


def random_texts(n, categories, seed=SEED):
  """`n` texts of 0-20 pieces from random `categories`; every 50th is 60-120 pieces long."""
  rng = np.random.default_rng(seed)
  categories = sorted(categories)
  texts = []
  for i in range(n):
    count = int(rng.integers(0, 21)) if i % 50 else int(rng.integers(60, 120))
    parts = []
    for _ in range(count):
      pieces = PIECES[categories[rng.integers(len(categories))]]
      parts.append(pieces[rng.integers(len(pieces))])
      parts.append(SEPARATORS[rng.integers(len(SEPARATORS))])
    texts.append(''.join(parts))
  return texts


def _plain(text):
  """Whether `text` holds none of the strings transformers cuts out as tokens before cleaning
  (in any case: SigLIP 2 lower-cases before SentencePiece matches its user-defined pieces), nor
  '▁' (which transformers' Gemma matches as part of user-defined space runs in the raw text),
  nor a run of spaces longer than the longest user-defined one."""
  lower = text.lower()
  return ('▁' not in text and ' ' * (MAX_SPACE_RUN + 1) not in text and
          not any(m in lower for m in MARKUP))


@pytest.fixture(scope='module')
def model_files(tmp_path_factory):
  """{'siglip': path, 'siglip2': path} of the two models, trained on the same corpus."""
  folder = tmp_path_factory.mktemp('spm')
  corpus = folder / 'corpus.txt'
  corpus.write_text('\n'.join(training_texts(600)), encoding='utf-8')
  files = {}
  for kind, spec in (('siglip', SIGLIP_SPEC), ('siglip2', SIGLIP2_SPEC)):
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(folder / kind), character_coverage=0.995,
        minloglevel=2, **spec)
    files[kind] = str(folder / f'{kind}.model')
  return files


# How open_clip's `SigLipTokenizer` builds (and saved for its SigLIP 2 models) the Gemma tokenizer.
SIGLIP2_SETTINGS = dict(add_bos_token=False, add_eos_token=True, padding_side='right')


@pytest.fixture(scope='module')
def siglip2_folder(model_files, tmp_path_factory):
  """A folder holding the SigLIP 2 model as `tokenizer.model`, for transformers to load."""
  folder = tmp_path_factory.mktemp('siglip2')
  shutil.copy(model_files['siglip2'], folder / 'tokenizer.model')
  return str(folder)


@pytest.fixture(scope='module')
def references(model_files, siglip2_folder):
  """transformers' tokenizers on the same files with SigLIP's settings, keyed by kind.

  SigLIP: `SiglipTokenizer` (its defaults are SigLIP's: lower-casing, 64, pad '</s>'). SigLIP 2:
  `Siglip2Tokenizer` with `SIGLIP2_SETTINGS`. `_split` ones read special tokens' strings in the
  text as text (`split_special_tokens=True`).
  """
  siglip2 = functools.partial(Siglip2Tokenizer.from_pretrained, siglip2_folder,
                              **SIGLIP2_SETTINGS)
  return {
      'siglip': SiglipTokenizer(vocab_file=model_files['siglip']),
      'siglip_split': SiglipTokenizer(vocab_file=model_files['siglip'], split_special_tokens=True),
      'siglip2': siglip2(),
      'siglip2_split': siglip2(split_special_tokens=True),
  }


@pytest.fixture(scope='module')
def corpus():
  """Edge cases, texts without markup, and texts with it."""
  plain = set(PIECES) - {'markup', 'meta'}
  return (EDGE_CASES + random_texts(NUM_RANDOM_TEXTS, plain) +
          random_texts(NUM_RANDOM_TEXTS // 5, PIECES, SEED + 1))


@pytest.fixture(scope='module')
def tokenizers(model_files):
  return {kind: siglip_tokenizer.SentencePieceTokenizer(path, kind=kind)
          for kind, path in model_files.items()}


def hf_tokenize(reference, texts, context_length=CONTEXT_LENGTH):
  """The model cards' call: `padding='max_length', max_length=64, truncation=True`."""
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')  # e.g. on truncating to max_length=1
    ids = reference(texts, padding='max_length', max_length=context_length, truncation=True)
  return np.asarray(ids['input_ids'], np.int32)


def test_models_have_the_real_conventions(model_files, references):
  siglip = sentencepiece.SentencePieceProcessor(model_file=model_files['siglip'])
  gemma = sentencepiece.SentencePieceProcessor(model_file=model_files['siglip2'])
  assert [siglip.id_to_piece(i) for i in range(3)] == ['<pad>', '</s>', '<unk>']
  assert [gemma.id_to_piece(i) for i in range(5)] == ['<pad>', '<eos>', '<bos>', '<unk>', '<mask>']
  assert (references['siglip'].eos_token_id, references['siglip'].pad_token_id) == (1, 1)
  assert (references['siglip2'].eos_token_id, references['siglip2'].pad_token_id) == (1, 0)


def test_corpus_exercises_truncation_and_markup(corpus, tokenizers):
  lengths = [len(tokenizers['siglip'].encode(t)) for t in corpus]
  assert sum(n >= CONTEXT_LENGTH for n in lengths) >= 20
  assert sum(not _plain(t) for t in corpus) >= 100


@pytest.mark.parametrize('kind', siglip_tokenizer.KINDS)
def test_equals_transformers(kind, corpus, tokenizers, references):
  """Every text without special-token strings, padded and truncated: ids equal to transformers'
  default tokenizer, which parses those strings."""
  plain = [t for t in corpus if _plain(t)]
  ours = tokenizers[kind](plain, truncate=True)
  chex.assert_shape(ours, (len(plain), CONTEXT_LENGTH))
  chex.assert_type(ours, np.int32)
  np.testing.assert_array_equal(ours, hf_tokenize(references[kind], plain))


def test_siglip_equals_transformers_reading_special_tokens_as_text(corpus, tokenizers, references):
  np.testing.assert_array_equal(tokenizers['siglip'](corpus, truncate=True),
                                hf_tokenize(references['siglip_split'], corpus))


@pytest.mark.parametrize('kind', siglip_tokenizer.KINDS)
def test_special_token_strings_are_text(kind, tokenizers, references):
  """'</s>' or '<eos>' in a caption does not end it, as transformers' default would."""
  eos = {'siglip': '</s>', 'siglip2': '<eos>'}[kind]
  text = f'a {eos} b'
  row, sp = tokenizers[kind](text)[0], tokenizers[kind]._sp
  end = len(tokenizers[kind].encode(text))
  assert np.flatnonzero(row == 1).tolist()[:1] == [end]
  assert not np.isin(row[:end], [sp.pad_id(), sp.eos_id(), sp.bos_id(), sp.unk_id()]).any()
  assert (hf_tokenize(references[kind], [text])[0] == 1).sum() > (row == 1).sum()
  np.testing.assert_array_equal(row, hf_tokenize(references[f'{kind}_split'], [text])[0])


def test_long_space_runs_are_sentencepieces(tokenizers, references):
  """SentencePiece takes the longest user-defined space run first; transformers' Gemma, whose
  added tokens match only '▁' in the raw text, leaves spaces to BPE merges, which part them
  otherwise beyond the longest run."""
  tokenizer = tokenizers['siglip2']
  run = MAX_SPACE_RUN + 1
  pieces = [tokenizer._sp.id_to_piece(i) for i in tokenizer.encode('a' + ' ' * run + 'b')]
  assert pieces == ['a', '▁' * MAX_SPACE_RUN, '▁', 'b']
  assert (hf_tokenize(references['siglip2'], ['a' + ' ' * run + 'b']) !=
          tokenizer('a' + ' ' * run + 'b')).any()


@pytest.mark.parametrize('kind', siglip_tokenizer.KINDS)
@pytest.mark.parametrize('context_length', [1, 2, 7])
def test_short_contexts_equal_transformers(kind, context_length, corpus, tokenizers, references):
  plain = [t for t in corpus[:300] if _plain(t)]
  np.testing.assert_array_equal(tokenizers[kind](plain, context_length, truncate=True),
                                hf_tokenize(references[kind], plain, context_length))


def test_siglip2_equals_open_clip(corpus, tokenizers, siglip2_folder, tmp_path):
  """open_clip's SigLIP 2 pipeline (its `HFTokenizer` with `clean='canonicalize'`, over the
  Gemma tokenizer its `SigLipTokenizer` builds and saves) is this tokenizer after open_clip's own
  cleaning."""
  reference_packages.install(open_clip_reference.PACKAGES, open_clip_reference.FOLDER, 'open_clip')
  spec = importlib.util.spec_from_file_location(  # the module alone: no torchvision, no timm
      'open_clip_tokenizer', os.path.join(open_clip_reference.FOLDER, 'open_clip', 'tokenizer.py'))
  open_clip_tokenizer = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(open_clip_tokenizer)
  GemmaTokenizer.from_pretrained(siglip2_folder, **SIGLIP2_SETTINGS).save_pretrained(tmp_path)
  theirs = open_clip_tokenizer.HFTokenizer(str(tmp_path), CONTEXT_LENGTH, clean='canonicalize')
  texts = [t for t in corpus if '▁' not in t]  # canonicalize removes the markup's '<'
  cleaned = [open_clip_tokenizer._clean_canonicalize(t) for t in texts]
  np.testing.assert_array_equal(tokenizers['siglip2'](cleaned, truncate=True),
                                theirs(texts).numpy())


@pytest.mark.parametrize('kind', siglip_tokenizer.KINDS)
def test_too_long_raises_and_truncate_keeps_eos(kind, tokenizers, references):
  tokenizer = tokenizers[kind]
  long_text = ' '.join(['a photo of a Cat, and 123 dogs!'] * 20)
  n = len(tokenizer.encode(long_text))
  assert n >= CONTEXT_LENGTH
  with pytest.raises(ValueError, match=rf'texts\[1\] .* is {n + 1} tokens .*context_length=64'):
    tokenizer(['short', long_text])
  cut = tokenizer(['short', long_text], truncate=True)
  assert cut[1, -1] == 1
  np.testing.assert_array_equal(cut[1, :-1], tokenizer.encode(long_text)[:CONTEXT_LENGTH - 1])
  np.testing.assert_array_equal(cut, hf_tokenize(references[kind], ['short', long_text]))


@pytest.mark.parametrize('kind', siglip_tokenizer.KINDS)
def test_a_text_that_just_fits_needs_no_truncate(kind, tokenizers):
  tokenizer = tokenizers[kind]
  candidates = (' '.join(['a cat'] * i + ['a'] * j) for i in range(40) for j in range(6))
  texts = {len(tokenizer.encode(t)): t for t in candidates}
  row = tokenizer(texts[CONTEXT_LENGTH - 1])[0]
  assert row[-1] == 1 and (row[:-1] != 1).all()
  with pytest.raises(ValueError, match=f'is {CONTEXT_LENGTH + 1} tokens'):
    tokenizer(texts[CONTEXT_LENGTH])


@pytest.mark.parametrize('kind', siglip_tokenizer.KINDS)
def test_encode_is_the_row_before_eos(kind, corpus, tokenizers):
  tokenizer = tokenizers[kind]
  for text in corpus[:200]:
    ids = tokenizer.encode(text)
    if len(ids) < CONTEXT_LENGTH:
      row = tokenizer(text)[0]
      assert row[:len(ids)].tolist() == ids and row[len(ids)] == 1
      assert (row[len(ids) + 1:] == tokenizer.pad_id).all()


@pytest.mark.parametrize('kind', siglip_tokenizer.KINDS)
def test_decode_equals_transformers(kind, corpus, tokenizers, references):
  """Rows without `<unk>` (which SentencePiece writes as ' ⁇ ', transformers as '<unk>') nor
  truncation (which may cut a character's bytes: each library replaces them its own way)."""
  tokenizer, reference = tokenizers[kind], references[kind]
  tokens = tokenizer([t for t in corpus if _plain(t) and len(tokenizer.encode(t)) < CONTEXT_LENGTH])
  tokens = tokens[(tokens != tokenizer._sp.unk_id()).all(1)]
  assert len(tokens) > 200
  assert tokenizer.decode(tokens) == reference.batch_decode(tokens, skip_special_tokens=True)


def test_decode_round_trip(corpus, tokenizers, references):
  """SigLIP 2 is lossless up to lower case (byte fallback, identity normalisation); SigLIP gives
  back transformers' canonical text where every character is in the vocabulary."""
  siglip2, lower = tokenizers['siglip2'], references['siglip2'].backend_tokenizer.normalizer
  for text in corpus:
    if len(siglip2.encode(text)) < CONTEXT_LENGTH:
      assert siglip2.decode(siglip2(text)[0]) == lower.normalize_str(text).replace('▁', ' ')
  siglip, canonicalize = tokenizers['siglip'], references['siglip'].canonicalize_text
  unk = siglip._sp.unk_id()
  texts = [t for t in corpus if t.isascii() and t.isprintable() and
           unk not in siglip.encode(t) and len(siglip.encode(t)) < CONTEXT_LENGTH]
  assert len(texts) > 20
  for text in texts:
    assert siglip.decode(siglip(text)[0]) == canonicalize(text)


def test_lower_case_is_per_character_as_transformers(tokenizers, references):
  """A word's final 'Σ': `str.lower` gives 'ς', transformers' `Lowercase` normalizer 'σ'."""
  assert siglip_tokenizer.lower_siglip2('ΟΔΟΣ Σ') == 'οδοσ σ' != 'ΟΔΟΣ Σ'.lower()
  text = 'ΟΔΟΣ ΣΟΦΙΑΣ'
  np.testing.assert_array_equal(tokenizers['siglip2'](text),
                                hf_tokenize(references['siglip2'], [text]))


def test_tokenize_siglip_function(model_files, tokenizers, corpus):
  texts = corpus[:50]
  for kind, path in model_files.items():
    np.testing.assert_array_equal(
        siglip_tokenizer.tokenize_siglip(texts, path, truncate=True, kind=kind),
        tokenizers[kind](texts, truncate=True))
  np.testing.assert_array_equal(
      siglip_tokenizer.tokenize_siglip('a cat', model_files['siglip'], context_length=5),
      tokenizers['siglip']('a cat', context_length=5))
  siglip_tokenizer.tokenize_siglip('a', model_files['siglip'])
  assert siglip_tokenizer._cached.cache_info().hits >= 1


def test_bad_input_raises(model_files, tokenizers, tmp_path):
  tokenizer = tokenizers['siglip']
  with pytest.raises(TypeError, match=r'texts\[1\] must be a str, got int'):
    tokenizer(['a', 3])
  with pytest.raises(TypeError, match='texts must be a str or a sequence of str, got bytes'):
    tokenizer(b'a cat')
  with pytest.raises(TypeError, match='text must be a str, got NoneType'):
    tokenizer.encode(None)
  with pytest.raises(ValueError, match='context_length must be >= 1 .*got 0'):
    tokenizer('a', context_length=0)
  with pytest.raises(ValueError, match='context_length must be >= 1 .*got -3'):
    siglip_tokenizer.SentencePieceTokenizer(model_files['siglip'], context_length=-3)
  with pytest.raises(TypeError, match='context_length must be an int, got float'):
    siglip_tokenizer.tokenize_siglip('a', model_files['siglip'], context_length=64.0)
  with pytest.raises(TypeError, match='context_length must be an int, got bool'):
    tokenizer('a', context_length=True)
  missing = str(tmp_path / 'missing.model')
  with pytest.raises(FileNotFoundError,
                     match=f'existing SentencePiece .model file, got .*{re.escape(missing)}'):
    siglip_tokenizer.SentencePieceTokenizer(missing)
  with pytest.raises(FileNotFoundError, match='missing.model'):
    siglip_tokenizer.tokenize_siglip('a', missing)
  (tmp_path / 'garbage.model').write_bytes(b'not a model')
  with pytest.raises(ValueError, match='must be a SentencePiece model, .*garbage.model'):
    siglip_tokenizer.SentencePieceTokenizer(tmp_path / 'garbage.model')
  with pytest.raises(TypeError, match='model_file must be a path .*got int'):
    siglip_tokenizer.SentencePieceTokenizer(3)
  with pytest.raises(ValueError, match=r"kind must be one of \('siglip', 'siglip2'\), got 'gemma'"):
    siglip_tokenizer.SentencePieceTokenizer(model_files['siglip2'], kind='gemma')
  with pytest.raises(ValueError, match=r'token ids must be in \[0, 400\), got \[400\]'):
    tokenizer.decode([5, 400])
  with pytest.raises(ValueError, match='1-D or 2-D integer array'):
    tokenizer.decode(np.zeros((1, 2, 3), np.int32))


def test_model_without_eos_or_pad_raises(tmp_path):
  corpus = tmp_path / 'corpus.txt'
  corpus.write_text('\n'.join(training_texts(200)), encoding='utf-8')
  sentencepiece.SentencePieceTrainer.train(
      input=str(corpus), model_prefix=str(tmp_path / 'no_pad'), vocab_size=200, minloglevel=2)
  with pytest.raises(ValueError, match='siglip2 needs .* pad token, got eos_id=2 and pad_id=-1'):
    siglip_tokenizer.SentencePieceTokenizer(tmp_path / 'no_pad.model', kind='siglip2')
  assert siglip_tokenizer.SentencePieceTokenizer(tmp_path / 'no_pad.model').pad_id == 2
