"""Greedy and beam search loops over any captioning decoder that scores the next token.

A decoder comes as a `Scorer` (its state, `scores_at`, `take_rows`): `clip/decoder.py`'s from
`clip.eval.generation`, CoCa's from `clip.coca_decoding`. The loops are traceable (the callers
jit them) `lax.while_loop`s over fixed-shape buffers, all rows in parallel, that stop once every
row is done (greedy) or no beam can still improve (beam search).

Beam search is the alive/finished formulation of flax's `examples/wmt/decode.py` and T5X's
`decoding.beam_search`: per row, `beam_size` alive beams ranked by their summed log-probability,
and finished captions ranked by the length-normalised score `log p / lp(length)`, GNMT's
`lp = ((5 + length) / 6) ** length_penalty` (Wu et al. 2016, eq. 14; 0 = plain log-likelihood),
`length` the generated tokens including the end-of-text one. Each step extends the alive beams by
every token, takes the best 2 x beam_size candidates, finishes those ending in the end-of-text
token and keeps the best others alive (the beam dimension is folded into the state's batch; each
new beam's rows are gathered from its parent's). A candidate finishes only when it ranks within
the best beam_size of the step (Hugging Face's `BeamSearchScorer`), which makes beam_size 1
greedy decoding exactly; beams alive at `max_length` compete with the finished ones at the end.
Only the best finished caption of a row is kept (flax and T5X keep beam_size of them to return
them all), so the search stops as soon as no alive beam, scored as if it grew to `max_length`
(log-probabilities only fall, the normaliser only grows), can beat it.
"""
import functools
import typing

import jax
import jax.numpy as jnp


class Scorer(typing.NamedTuple):
  """What the decoding loops (`greedy_loop`, `beam_loop`) need of a decoder, for R rows:
  `state` (its KV cache, or `()`), `scores_at(tokens_RxL, i, state) -> (scores (R, S) fp32 of
  position i + 1, state)`, reading the tokens up to position i, and `take_rows(state, rows_R)`,
  the state of rows `rows_R` (beam search's parents). `clip.eval.generation._scorer` builds one for
  `clip/decoder.py`, `clip.coca_decoding.scorer` for CoCa's decoder."""
  state: typing.Any
  scores_at: typing.Callable
  take_rows: typing.Callable


class _Greedy(typing.NamedTuple):
  position: jax.Array  # the last position written
  tokens_NxL: jax.Array
  done_N: jax.Array
  state: typing.Any  # the cache, or ()


def greedy_loop(scorer, tokens_NxL, eot_id, pad_id=0, output_token=lambda columns: columns):
  """Greedy decoding (traceable, under the caller's jit): from `tokens_NxL` (N, L), the start
  token at position 0 and `pad_id` after it, writes at each position the highest-scoring token
  (`output_token` maps score columns to ids) until every row has written `eot_id` (then
  `pad_id` after it) or position L - 1 is written -> `(tokens (N, L), the last position
  written)`. `scorer` a `Scorer` of N rows."""
  n, max_length = tokens_NxL.shape

  def body(s):
    scores_NxS, state = scorer.scores_at(s.tokens_NxL, s.position, s.state)
    best_N = output_token(jnp.argmax(scores_NxS, axis=-1)).astype(jnp.int32)
    new_N = jnp.where(s.done_N, pad_id, best_N)
    tokens = jax.lax.dynamic_update_index_in_dim(s.tokens_NxL, new_N, s.position + 1, axis=1)
    return _Greedy(s.position + 1, tokens, s.done_N | (new_N == eot_id), state)

  running = lambda s: (s.position < max_length - 1) & ~jnp.all(s.done_N)
  init = _Greedy(jnp.int32(0), tokens_NxL, jnp.zeros((n,), bool), scorer.state)
  final = jax.lax.while_loop(running, body, init)
  return final.tokens_NxL, final.position


class _Beams(typing.NamedTuple):
  position: jax.Array  # the last position written
  alive_NxKxL: jax.Array
  alive_logp_NxK: jax.Array
  best_NxL: jax.Array  # the best finished caption so far
  best_score_N: jax.Array  # its score; -inf: none yet
  state: typing.Any  # the cache (rows n * K + beam), or ()


def length_normalizer(length, length_penalty):
  """GNMT's `((5 + length) / 6) ** length_penalty` (Wu et al. 2016, eq. 14); 1 at penalty 0."""
  return ((5.0 + length) / 6.0) ** length_penalty


def beam_loop(scorer, n, beam_size, start_id, max_length, length_penalty, eot_id, pad_id=0,
              output_token=lambda columns: columns):
  """Beam search (traceable, under the caller's jit; see the module's docstring) of N rows of
  length `max_length` that start with `start_id`, end with `eot_id` and are filled with
  `pad_id` after it; `output_token` maps score columns to ids, `scorer` a `Scorer` of the
  N * beam_size rows `n * beam_size + beam` -> `(tokens (N, max_length), scores (N,), the last
  position decoded)`."""
  k = beam_size
  seqs_NxKxL = jnp.full((n, k, max_length), pad_id, jnp.int32).at[:, :, 0].set(start_id)
  # One live beam per row at first: the copies would only repeat its candidates.
  alive_logp_NxK = jnp.full((n, k), -jnp.inf).at[:, 0].set(0.0)
  init = _Beams(jnp.int32(0), seqs_NxKxL, alive_logp_NxK, seqs_NxKxL[:, 0],
                jnp.full((n,), -jnp.inf), scorer.state)
  # What an alive beam could still score: log-probabilities only fall, the normaliser only grows.
  bound_NxK = lambda s: s.alive_logp_NxK / length_normalizer(max_length - 1, length_penalty)
  running = lambda s: ((s.position < max_length - 1)
                       & jnp.any(bound_NxK(s).max(1) > s.best_score_N))
  step = functools.partial(_beam_step, scorer.scores_at, scorer.take_rows, eot_id=eot_id,
                           length_penalty=length_penalty, output_token=output_token)
  final = jax.lax.while_loop(running, step, init)
  # Beams alive at max_length are captions cut there; after an early stop they cannot win.
  alive_score_NxK = jnp.where(final.position == max_length - 1, bound_NxK(final), -jnp.inf)
  tokens_NxL, score_N = _best(final.best_NxL, final.best_score_N, final.alive_NxKxL,
                              alive_score_NxK)
  return tokens_NxL, score_N, final.position


def _best(best_NxL, best_score_N, seqs_NxAxL, score_NxA):
  """The best of a row's current best and A candidates; the current one among ties."""
  score_NxB = jnp.concatenate([best_score_N[:, None], score_NxA], axis=1)
  index_N = jnp.argmax(score_NxB, axis=1)
  seqs_NxBxL = jnp.concatenate([best_NxL[:, None], seqs_NxAxL], axis=1)
  return (jnp.take_along_axis(seqs_NxBxL, index_N[:, None, None], axis=1)[:, 0],
          jnp.take_along_axis(score_NxB, index_N[:, None], axis=1)[:, 0])


def _beam_step(scores_at, take_rows, s, eot_id, length_penalty, output_token):
  """Extends every alive beam by one token: the best finished caption and the new alive beams,
  their state's rows gathered from each one's parent (`take_rows`)."""
  n, k, length = s.alive_NxKxL.shape
  i = s.position
  scores_RxS, state = scores_at(s.alive_NxKxL.reshape(n * k, length), i, s.state)
  width = scores_RxS.shape[-1]
  logp_NxKxS = s.alive_logp_NxK[..., None] + jax.nn.log_softmax(scores_RxS).reshape(n, k, width)
  logp_NxC, flat_NxC = jax.lax.top_k(logp_NxKxS.reshape(n, k * width), 2 * k)
  parent_NxC = flat_NxC // width
  token_NxC = output_token(flat_NxC % width).astype(jnp.int32)
  seqs_NxCxL = jnp.take_along_axis(s.alive_NxKxL, parent_NxC[..., None], axis=1)
  seqs_NxCxL = jax.lax.dynamic_update_index_in_dim(seqs_NxCxL, token_NxC[..., None], i + 1, 2)
  is_eot_NxC = token_NxC == eot_id
  finishing_NxC = is_eot_NxC & (jnp.arange(2 * k) < k)
  finished_score_NxC = jnp.where(
      finishing_NxC, logp_NxC / length_normalizer(i + 1, length_penalty), -jnp.inf)
  best_NxL, best_score_N = _best(s.best_NxL, s.best_score_N, seqs_NxCxL, finished_score_NxC)
  alive_logp_NxK, pick_NxK = jax.lax.top_k(jnp.where(is_eot_NxC, -jnp.inf, logp_NxC), k)
  alive_NxKxL = jnp.take_along_axis(seqs_NxCxL, pick_NxK[..., None], axis=1)
  parent_NxK = jnp.take_along_axis(parent_NxC, pick_NxK, axis=1)
  rows_R = (jnp.arange(n)[:, None] * k + parent_NxK).reshape(n * k)
  return _Beams(i + 1, alive_NxKxL, alive_logp_NxK, best_NxL, best_score_N,
                take_rows(state, rows_R))
