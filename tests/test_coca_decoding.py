"""CoCa's KV-cached decoding and beam search (clip/coca_decoding.py) on a tiny random-weight
CoCa (every parameter random): the cached step's scores against teacher forcing (`coca.decode`),
and beam search against an exhaustive search over every caption of a 6-id vocabulary, scored by
teacher forcing in numpy. Greedy captions against open_clip: tests/formats/test_coca.py."""
import functools
import itertools

import jax
import numpy as np
import pytest

from clip import coca
from clip import coca_decoding
from clip.eval import search

VOCAB, SOT, EOS, PAD = 6, 4, 5, 0
# Two text blocks: the legacy padding mask reaches the second block's keys.
TINY = {
    'embed_dim': 32,
    'vision_cfg': {'image_size': 16, 'layers': 1, 'width': 32, 'head_width': 8, 'patch_size': 8,
                   'attentional_pool': True, 'attn_pooler_heads': 4, 'attn_pooler_queries': 3},
    'text_cfg': {'context_length': 8, 'vocab_size': VOCAB, 'width': 32, 'heads': 4, 'layers': 2,
                 'embed_cls': True},
    'multimodal_cfg': {'context_length': 8, 'vocab_size': VOCAB, 'width': 32, 'heads': 4,
                       'layers': 1},
}


@functools.cache
def _model(seed=0, eos_boost=0.0):
  """(params, cfg): every parameter drawn at random, norms' gains around 1; `eos_boost` raises
  the end-of-text score (by that multiple of `ln_final.bias` in its column) so that the best
  captions finish rather than run to the length limit."""
  cfg = coca.config_from_open_clip(TINY)
  rng = np.random.default_rng(seed)
  flat = {}
  for key, shape in coca.expected_shapes(cfg).items():
    noise = rng.standard_normal(shape).astype(np.float32)
    gain = key.endswith('.weight') and len(shape) == 1
    flat[key] = 1 + 0.2 * noise if gain else 0.5 * noise
  flat['text_decoder.text_projection'][:, EOS] += eos_boost * flat['text_decoder.ln_final.bias']
  return coca.from_state_dict(flat, cfg), cfg


def _images(n=4):
  return np.random.default_rng(1).standard_normal((n, 16, 16, 3)).astype(np.float32)


@functools.partial(jax.jit, static_argnames='cfg')
def _teacher_forced(params, image_NxTxD, tokens_RxL, cfg):
  """Scores (R, L, V) of `coca.decode` for token rows, row r reading image r // (R / N)."""
  image_RxTxD = jax.numpy.repeat(image_NxTxD, tokens_RxL.shape[0] // image_NxTxD.shape[0], axis=0)
  text_RxLxD = coca.text_features_and_tokens(params, tokens_RxL, cfg)[1]
  return coca.decode(params, image_RxTxD, text_RxLxD, cfg)


def _image_tokens(params, images, cfg):
  return coca.image_features_and_tokens(params, images, cfg)[1]


def test_cached_steps_equal_teacher_forcing():
  """Position by position, the cache gives `decode`'s scores, with padding (ids 0) inside rows
  that the legacy mask hides from the text tower."""
  params, cfg = _model()
  images = _images()
  tokens = np.array([[SOT, 1, 0, 2, 0, 0, 3, EOS], [SOT, 2, 3, 1, 1, EOS, 0, 0],
                     [SOT, 0, 0, 0, 1, 2, 3, 0], [SOT, 3, 2, 1, 3, 2, 1, 3]], np.int32)
  image = _image_tokens(params, images, cfg)
  expected = np.asarray(_teacher_forced(params, image, tokens, cfg))
  cache = jax.jit(coca_decoding.init_cache, static_argnums=(2, 3))(params, image, cfg, 8)
  step = jax.jit(coca_decoding.step, static_argnames='cfg')
  for i in range(8):
    scores, cache = step(params, cache, tokens[:, i], i, cfg)
    np.testing.assert_allclose(scores, expected[:, i], rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match='outside'):
    coca_decoding.step(params, cache, tokens[:, 0], 8, cfg)


def _all_captions(seq_len):
  """Every row a beam search of `seq_len` can return: sot, non-eos tokens, then eos and padding,
  or seq_len - 1 non-eos tokens (cut) -> (rows (C, seq_len), generated lengths (C,))."""
  words = [t for t in range(VOCAB) if t != EOS]
  rows, lengths = [], []
  for g in range(1, seq_len):
    ends = [(EOS,)] if g < seq_len - 1 else [(EOS,), *[(w,) for w in words]]
    for head in itertools.product(words, repeat=g - 1):
      for end in ends:
        rows.append([SOT, *head, *end] + [PAD] * (seq_len - 1 - g))
        lengths.append(g)
  return np.array(rows, np.int32), np.array(lengths)


def _exhaustive_best(params, images, cfg, seq_len, length_penalty):
  """(best row (N, seq_len), its score (N,), the margin to the second best (N,))."""
  rows_CxL, lengths_C = _all_captions(seq_len)
  c, n = len(rows_CxL), images.shape[0]
  tokens_RxL = np.tile(rows_CxL, (n, 1))
  image = _image_tokens(params, images, cfg)
  scores = np.asarray(_teacher_forced(params, image, tokens_RxL[:, :-1], cfg), np.float64)
  logp = scores - np.log(np.exp(scores).sum(-1, keepdims=True))
  target = np.take_along_axis(logp, tokens_RxL[:, 1:, None], axis=2)[..., 0]
  counted = np.arange(seq_len - 1) < np.tile(lengths_C, n)[:, None]
  total_NxC = np.where(counted, target, 0).sum(1).reshape(n, c)
  total_NxC /= np.asarray(search.length_normalizer(lengths_C, length_penalty))
  order = np.argsort(-total_NxC, axis=1)
  best, second = order[:, 0], order[:, 1]
  rows = np.arange(n)
  return rows_CxL[best], total_NxC[rows, best], total_NxC[rows, best] - total_NxC[rows, second]


# Seeds whose best captions cover: different captions per image (0), captions that finish with
# eos_id (1), captions holding padding ids that the text tower masks (2).
MODELS = ((0, 0.0), (1, 0.5), (2, 0.0))


@pytest.mark.parametrize('length_penalty', [0.0, 1.0])
def test_wide_beam_is_the_exhaustive_best(length_penalty):
  """A beam as wide as every candidate finds the best of all 156 captions of 3 tokens."""
  images, seq_len, bests = _images(), 4, []
  for seed, eos_boost in MODELS:
    params, cfg = _model(seed, eos_boost)
    best, best_score, margin = _exhaustive_best(params, images, cfg, seq_len, length_penalty)
    assert (margin > 1e-3).all()  # a unique best: no tie for rounding to break
    bests.append(best)
    tokens, scores = coca_decoding.beam_caption(params, images, cfg, SOT, EOS, seq_len, 150,
                                                length_penalty)
    np.testing.assert_array_equal(tokens, best)
    np.testing.assert_allclose(scores, best_score, rtol=1e-5)
  # Not a trivial agreement: the cases MODELS is chosen for.
  assert len({tuple(r) for r in bests[0]}) > 1
  assert (bests[1][:, 1:] == EOS).any()
  assert (bests[2][:, 1:] == PAD).all(axis=1).any()


def test_refusals():
  params, cfg = _model()
  images = _images(1)
  beam = functools.partial(coca_decoding.beam_caption, params, images, cfg, SOT, EOS)
  for bad in (0, -1, 1.5, True):
    with pytest.raises(ValueError, match='beam_size'):
      beam(4, bad)
  with pytest.raises(ValueError, match='length_penalty'):
    beam(4, 2, -1.0)
  for bad in (1, 10):
    with pytest.raises(ValueError, match=rf'seq_len must be in \[2, .*got {bad}'):
      beam(bad, 2)
  with pytest.raises(ValueError, match='eos_id'):
    coca_decoding.beam_caption(params, images, cfg, SOT, VOCAB, 4, 2)
  with pytest.raises(ValueError, match='16, 16, 3'):
    coca_decoding.beam_caption(params, images[:, :8], cfg, SOT, EOS, 4, 2)
  with pytest.raises(ValueError, match='cache of 9'):
    coca_decoding.init_cache(params, np.zeros((1, 3, 32), np.float32), cfg, 9)
