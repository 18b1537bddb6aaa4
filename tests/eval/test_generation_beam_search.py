"""clip/eval/generation.py's beam search against a plain-Python search, against greedy, against
brute force over every caption of a tiny vocabulary, and on a hand-built decoder where a length
penalty matters (the shared tiny decoder and references: test_generation.py)."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clip import configs
from clip import decoder
from clip.eval import generation
from tests.eval.test_generation import START
from tests.eval.test_generation import TINY
from tests.eval.test_generation import TOL
from tests.eval.test_generation import apply
from tests.eval.test_generation import cut_at_eot
from tests.eval.test_generation import generated_length
from tests.eval.test_generation import log_likelihood_reference
from tests.eval.test_generation import log_softmax64
from tests.eval.test_generation import tiny_model


def beam_search_reference(params, image_1xTxW, cfg, max_length, beam_size, length_penalty):
  """The search of generation.py's docstring for one image, in float64 Python: every prefix
  re-run through `decoder.apply`, candidates ranked by `sorted` (stable: parent, then token)."""
  k = beam_size
  norm = lambda length: ((5.0 + length) / 6.0) ** length_penalty
  alive, finished = [(0.0, (START,))], []
  for i in range(max_length - 1):
    prefixes = np.zeros((len(alive), max_length), np.int32)
    for j, (_, seq) in enumerate(alive):
      prefixes[j, :len(seq)] = seq
    images = jnp.repeat(image_1xTxW, len(alive), axis=0)
    logp = log_softmax64(apply(params, images, prefixes, cfg)[:, i])
    candidates = sorted([(score + logp[j, v], seq + (v,)) for j, (score, seq) in enumerate(alive)
                         for v in range(cfg.vocab_size)], key=lambda c: -c[0])[:2 * k]
    finished += [(score / norm(i + 1), seq) for rank, (score, seq) in enumerate(candidates)
                 if seq[-1] == cfg.eot_id and rank < k]
    finished = sorted(finished, key=lambda c: -c[0])[:k]
    alive = [c for c in candidates if c[1][-1] != cfg.eot_id][:k]
    if len(finished) == k and finished[-1][0] >= alive[0][0] / norm(max_length - 1):
      return finished[0]
  return max(finished + [(score / norm(max_length - 1), seq) for score, seq in alive],
             key=lambda c: c[0])


@pytest.mark.parametrize('length_penalty', [0.0, 0.6])
def test_beam_search_matches_a_reference_search(length_penalty):
  """Cached and uncached beam search against `beam_search_reference`, token for token."""
  for seed in range(2):
    params, cfg, image = tiny_model(seed)
    tokens, scores = generation.beam_search(params, image, cfg, START, 12, 3, length_penalty)
    uncached = generation.beam_search(params, image, cfg, START, 12, 3, length_penalty,
                                      use_cache=False)
    np.testing.assert_array_equal(uncached[0], tokens)
    np.testing.assert_allclose(uncached[1], scores, rtol=TOL)
    for n in range(len(image)):
      score, seq = beam_search_reference(params, image[n:n + 1], cfg, 12, 3, length_penalty)
      np.testing.assert_array_equal(tokens[n], seq + (0,) * (12 - len(seq)))
      np.testing.assert_allclose(scores[n], score, rtol=TOL)


def test_beam_one_is_greedy():
  for seed in range(3):
    params, cfg, image = tiny_model(seed)
    tokens, scores = generation.beam_search(params, image, cfg, START, 12, 1)
    greedy = generation.greedy(params, image, cfg, START, 12)
    np.testing.assert_array_equal(tokens, greedy)
    np.testing.assert_allclose(scores, log_likelihood_reference(params, image, greedy, cfg),
                               rtol=TOL)


def test_beam_search_scores_are_log_likelihoods_and_beat_greedy_here():
  """The reported score is the caption's log-likelihood (normalised with a length penalty), and
  beam 3 finds captions at least as likely as greedy's on these models, more by over a nat on
  average. Beam search does not promise it: without the EOT bias, seed 0's row 3 loses 0.035
  nats to greedy (greedy's prefix falls out of the beam; `beam_search_reference` finds the same
  caption); the reference and exhaustive tests pin the search itself."""
  gains = []
  for seed in range(4):
    params, cfg, image = tiny_model(seed)
    greedy = generation.greedy(params, image, cfg, START, 12)
    tokens, scores = generation.beam_search(params, image, cfg, START, 12, 3)
    likelihood = log_likelihood_reference(params, image, tokens, cfg)
    np.testing.assert_allclose(scores, likelihood, rtol=TOL)
    gains.append(likelihood - log_likelihood_reference(params, image, greedy, cfg))
    tokens, scores = generation.beam_search(params, image, cfg, START, 12, 3, length_penalty=0.6)
    normaliser = ((5.0 + generated_length(tokens, cfg.eot_id)) / 6.0) ** 0.6
    np.testing.assert_allclose(
        scores, log_likelihood_reference(params, image, tokens, cfg) / normaliser, rtol=TOL)
  gains = np.concatenate(gains)
  assert (gains > -TOL).all() and gains.mean() > 1.0, gains


def bigram_decoder(logits_VxV):
  """A decoder built by hand into a bigram model: zero output projections make every block add
  nothing, positions embed as zeros, so the scores after token t are `logits_VxV[t]` (the head
  solves `head(ln_final(embedding[t])) = logits_VxV[t]` for the 5 embeddings)."""
  v = logits_VxV.shape[0]
  params, cfg, image = tiny_model(0, rows=1, vocab_size=v, context_length=4, eot_token_id=None)
  for block in params['transformer']['resblocks'].values():
    for leaf in jax.tree.leaves([block['attn']['out_proj'], block['cross_attn']['out_proj'],
                                 block['mlp']['c_proj']]):
      leaf[...] = 0.0
  params['positional_embedding'][...] = 0.0
  params['ln_final'] = {'weight': np.ones(32, np.float32), 'bias': np.zeros(32, np.float32)}
  e_VxD = params['token_embedding']['weight'].astype(np.float64)
  u_VxD = (e_VxD - e_VxD.mean(1, keepdims=True)) / np.sqrt(e_VxD.var(1, keepdims=True) + 1e-5)
  params['head'] = {'weight': (logits_VxV.T @ np.linalg.pinv(u_VxD.T)).astype(np.float32),
                    'bias': np.zeros(v, np.float32)}
  return params, cfg, image


def test_a_length_penalty_keeps_the_search_going_on_a_hand_built_decoder():
  """After START: EOT (p .5), token 2 (p .45) or 3; after 2, EOT almost surely. Plain
  log-likelihood prefers [START, EOT]; GNMT's penalty 2 prefers [START, 2, EOT], which beam 2
  finds only if it keeps searching once [START, EOT] finished: token 2's bound is its
  log-probability over lp(max_length - 1), not lp of its current length."""
  logits_VxV = np.zeros((5, 5))
  logits_VxV[START] = np.log([1e-3, 1e-3, 0.45, 0.048, 0.5])
  logits_VxV[2, 4] = 12.0
  params, cfg, image = bigram_decoder(logits_VxV)
  logp_VxV = log_softmax64(logits_VxV)
  lp = lambda length, penalty: ((5.0 + length) / 6.0) ** penalty
  for penalty, caption, score in [
      (0.0, [START, 4, 0], logp_VxV[START, 4]),
      (2.0, [START, 2, 4], (logp_VxV[START, 2] + logp_VxV[2, 4]) / lp(2, 2.0))]:
    tokens, scores = generation.beam_search(params, image, cfg, START, 3, 2, penalty)
    np.testing.assert_array_equal(tokens, [caption])
    np.testing.assert_allclose(scores, [score], rtol=TOL)
  np.testing.assert_array_equal(generation.greedy(params, image, cfg, START, 3), [[START, 4, 0]])


@pytest.mark.parametrize('max_length,beam_size,length_penalty', [(3, 5, 0.0), (4, 20, 0.0),
                                                                 (4, 20, 1.0)])
def test_beam_search_is_exhaustive_when_the_beam_holds_every_prefix(max_length, beam_size,
                                                                    length_penalty):
  """Vocabulary 5: a beam as wide as the number of live prefixes finds the best caption of all
  (every token sequence, cut at its EOT), by score; greedy misses it somewhere."""
  small = dict(vocab_size=5, context_length=4, eot_token_id=None)
  cfg = configs.DecoderConfig(**{**TINY, **small})
  captions = np.unique(cut_at_eot(
      [(START,) + t for t in itertools.product(range(5), repeat=max_length - 1)], cfg.eot_id),
      axis=0)
  normaliser = ((5.0 + generated_length(captions, cfg.eot_id)) / 6.0) ** length_penalty
  greedy_missed = False
  for seed in range(3):
    params, _, image = tiny_model(seed, rows=2, eot_bias=0.0, **small)
    tokens, scores = generation.beam_search(params, image, cfg, START, max_length, beam_size,
                                            length_penalty)
    for n in range(2):
      all_scores = log_likelihood_reference(
          params, jnp.repeat(image[n:n + 1], len(captions), 0), captions, cfg) / normaliser
      best = int(np.argmax(all_scores))
      np.testing.assert_array_equal(tokens[n], captions[best])
      np.testing.assert_allclose(scores[n], all_scores[best], rtol=TOL)
    greedy = np.asarray(generation.greedy(params, image, cfg, START, max_length))
    greedy_missed |= (greedy != np.asarray(tokens)).any()
  assert greedy_missed
