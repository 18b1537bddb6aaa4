"""Caption generation and caption scoring with the captioning decoder of `clip/decoder.py`.

  greedy(params, image_NxTxW, cfg, start_id, max_length, execution, use_cache) -> (N, max_length)
  beam_search(params, image_NxTxW, cfg, start_id, max_length, beam_size, length_penalty,
              execution, use_cache) -> (tokens (N, max_length), scores (N,))
  sequence_log_likelihood(params, image_NxTxW, tokens_NxL, cfg, execution) -> (N,)
  generative_zero_shot_scores(params, image_NxTxW, class_tokens_CxL, cfg, execution, chunk)
      -> (N, C);  generative_classify(...) -> (N,)

`params` are the decoder's (`params['text_decoder']` of a full model), `cfg` its DecoderConfig,
the image tokens (N, T, W) those of `clip.model.image_features_and_tokens(params, images,
cfg_clip)[1]`; `start_id` is the model's own tokenizer's start token, `start_token_id(cfg_clip)`
(49406 for OpenAI's BPE; a tokenizer without one is refused there), and class prompts are rows of
that tokenizer (`clip.get_tokenizer(cfg_clip)`).
Generated rows look like the tokenizer's: `start_id`, the generated tokens, the end-of-text token
`cfg.eot_id`, then 0 padding; a row that reaches `max_length` without it is cut there. A decoder
with a vocabulary shortlist (`cfg.output_ids`) scores only those ids: decoding maps its score
columns back to token ids (`decoder.output_token`), and a caption holding another id has
probability 0 (log-likelihood -inf; the public scoring functions refuse it).

Decoding is one jitted `lax.while_loop` over fixed-shape buffers (N, max_length), all rows in
parallel, that stops once every row is done (greedy) or no beam can still improve (beam search):
one compilation per shape and static setting. The KV cache (`decoder.init_cache`,
`decoder.step`) holds the image's cross-attention keys and values, projected once, and the
self-attention keys and values of the positions decoded so far: a step runs one position. Without
it (`use_cache=False`, the reference and the benchmark's baseline, experiments/bench_decode.py)
every step re-runs `decoder.apply` over the whole (N, max_length) buffer; causal attention keeps
the positions not yet written from reaching the scores read, so both give the same tokens (up to
exact ties of fp32 scores that differ in rounding).

Beam search (`clip.eval.search`, which also holds the loops for CoCa's decoder) is the
alive/finished formulation of flax's and T5X's, with GNMT's length normaliser
`length_normalizer(length, length_penalty) = ((5 + length) / 6) ** length_penalty`; a candidate
finishes only within the best beam_size of its step (Hugging Face's `BeamSearchScorer`), so
beam_size 1 is greedy decoding exactly.

Scoring (CapPa's generative zero-shot protocol, Tschannen et al. 2023, sec. 4; big_vision's
`evaluators/proj/cappa/scoring_classifier.py`): every class prompt is scored by its
log-likelihood given the image, summed over its tokens up to its end-of-text token, and the
image is classified by the highest; classes run in chunks so memory stays bounded.
"""
import collections.abc
import functools

import jax
import jax.numpy as jnp
import numpy as np

from clip.train import captioning
from clip import configs
from clip import decoder
from clip import model
from clip import processing
from clip.eval import search

length_normalizer = search.length_normalizer


# ---------------------------------------------------------------- the start token

def start_token_id(cfg):
  """The id every caption row of the model `cfg` (a CLIPConfig with a captioning decoder) starts
  with: its own tokenizer's start-of-text token, `clip.get_tokenizer(cfg).sot_id` (OpenAI's
  49406). The decoder is trained on rows that begin with it (it predicts the first word from it),
  so a tokenizer without one (SigLIP's SentencePiece: rows begin with the text) raises
  `clip.TokenizerError` naming it, as `get_tokenizer` does for one that is unknown or not the
  model's."""
  if not isinstance(cfg, configs.CLIPConfig):
    raise TypeError(f'expected a clip.CLIPConfig (the whole model\'s, whose tokenizer says the '
                    f'start token), got {type(cfg).__name__}')
  if cfg.decoder is None:
    raise ValueError('this model has no captioning decoder (cfg.decoder is None): it generates '
                     'and scores no captions')
  tok = processing.get_tokenizer(cfg)
  if tok.sot_id is None:
    raise processing.TokenizerError(
        f'this model\'s tokenizer, {cfg.tokenizer}, has no start-of-text token (its rows begin '
        'with the text), but the captioning decoder reads a start token before the caption and '
        'predicts the first word from it: captions cannot be generated or scored with this '
        'tokenizer. Give the model a tokenizer with a start token (cfg.tokenizer, e.g. OpenAI\'s '
        'BPE, clip.TokenizerConfig()) and a decoder trained on its rows')
  return tok.sot_id


# ---------------------------------------------------------------- input checks

def _check_decoder(params, cfg):
  if not isinstance(cfg, configs.DecoderConfig):
    raise TypeError(f'cfg must be a DecoderConfig, got {type(cfg).__name__}')
  if not isinstance(params, collections.abc.Mapping) or 'token_embedding' not in params:
    keys = sorted(params) if isinstance(params, collections.abc.Mapping) else type(params).__name__
    raise ValueError(f'params must be the decoder\'s (`params["text_decoder"]` of a full model), '
                     f'with token_embedding; got {keys}')


def _check_image(params, image_NxTxW, cfg):
  shape = getattr(image_NxTxW, 'shape', None)
  if shape is None or len(shape) != 3:
    raise ValueError(f'image tokens must have shape (N, T, W), rank 3; got shape {shape} '
                     '(clip.model.image_features_and_tokens(...)[1] gives them)')
  width = params['image_proj']['weight'].shape[1] if 'image_proj' in params else cfg.width
  if shape[2] != width:
    raise ValueError(f'this decoder reads image tokens of width {width}, got width {shape[2]} '
                     f'(shape {tuple(shape)})')


def _check_int(value, name):
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise TypeError(f'{name} must be an int, got {value!r}')


def _check_decoding(cfg, start_id, max_length):
  _check_int(start_id, 'start_id')
  _check_int(max_length, 'max_length')
  if not 2 <= max_length <= cfg.context_length:
    raise ValueError(f'max_length must be in [2, {cfg.context_length}] (a start token, at least '
                     f'one generated, at most the context length {cfg.context_length}); got '
                     f'max_length {max_length}')
  if not 0 <= start_id < cfg.vocab_size:
    raise ValueError(f'start_id must be a token id in [0, {cfg.vocab_size}), got {start_id}')


def _check_tokens(tokens, cfg, what):
  """Shape, dtype and (when concrete) values of int tokens (rows, L), 2 <= L <= context_length."""
  shape = getattr(tokens, 'shape', None)
  if shape is None or len(shape) != 2 or not 2 <= shape[1] <= cfg.context_length:
    raise ValueError(f'{what} must have shape (rows, L) with 2 <= L <= {cfg.context_length} '
                     f'(the context length); got shape {shape}')
  if not jnp.issubdtype(tokens.dtype, jnp.integer):
    raise TypeError(f'{what} must be integers, got dtype {tokens.dtype}')
  if isinstance(tokens, jax.core.Tracer):
    return
  values = np.asarray(tokens)
  try:
    model.check_ids(values, cfg.vocab_size)
  except ValueError as error:
    raise ValueError(f'{what}: {error}') from None
  if cfg.output_ids is not None:
    _check_scorable(values, cfg, what)


def _check_scorable(values_NxL, cfg, what):
  """Raises unless every scored token (after the first, up to the first EOT) is one the
  decoder's shortlist `cfg.output_ids` can output: another has probability 0."""
  targets, valid = (np.asarray(a) for a in captioning.targets_and_valid(values_NxL, cfg.eot_id))
  bad = valid & ~np.isin(targets, cfg.output_ids)
  if bad.any():
    row, pos = np.argwhere(bad)[0]
    raise ValueError(f'{what}: token id {targets[row, pos]} at row {row}, position {pos + 1} is '
                     f'not among the {cfg.num_outputs} ids the decoder scores (cfg.output_ids), '
                     'so its caption has probability 0')


# ---------------------------------------------------------------- the next token's scores

def _scorer(params, image_RxTxW, cfg, execution, use_cache):
  """The `search.Scorer` of `decoder`: from the KV cache (the state), or by re-running
  `decoder.apply` over the whole token buffer (state `()`), whose causal mask keeps positions
  after i out of the scores read."""
  if use_cache:
    cache = decoder.init_cache(params, image_RxTxW, cfg, execution)
    return search.Scorer(cache, lambda tokens_RxL, i, cache: decoder.step(
        params, cache, tokens_RxL[:, i], i, cfg, execution), _take_rows)
  scores_at = lambda tokens_RxL, i, state: (
      decoder.apply(params, image_RxTxW, tokens_RxL, cfg, execution)[:, i], state)
  return search.Scorer((), scores_at, _take_rows)


def _take_rows(state, rows_R):
  """The cache's self-attention rows `rows_R` (each beam's parent's); the image's keys and
  values are the same for every beam of an image. No cache: nothing to move."""
  if not state:
    return state
  return state._replace(keys=jnp.take(state.keys, rows_R, axis=1),
                        values=jnp.take(state.values, rows_R, axis=1))


# ---------------------------------------------------------------- greedy

def greedy(params, image_NxTxW, cfg, start_id, max_length, execution=configs.Execution(),
           use_cache=True):
  """Greedy captions (N, max_length) int32 for image tokens (N, T, W): at each position the
  highest-scoring token. Raises ValueError / TypeError on bad arguments: max_length outside
  [2, context_length], start_id outside the vocabulary, image tokens not (N, T, W) of the
  decoder's image width."""
  _check_decoder(params, cfg)
  _check_image(params, image_NxTxW, cfg)
  _check_decoding(cfg, start_id, max_length)
  return _greedy(params, image_NxTxW, cfg, jnp.int32(start_id), max_length, execution,
                 use_cache)[0]


@functools.partial(jax.jit, static_argnames=('cfg', 'max_length', 'execution', 'use_cache'))
def _greedy(params, image_NxTxW, cfg, start_id, max_length, execution, use_cache):
  """`(tokens (N, max_length), the last position decoded)`: the loop stops early when all rows
  are done, which the position shows."""
  n = image_NxTxW.shape[0]
  tokens_NxL = jnp.zeros((n, max_length), jnp.int32).at[:, 0].set(start_id)
  scorer = _scorer(params, image_NxTxW, cfg, execution, use_cache)
  return search.greedy_loop(scorer, tokens_NxL, cfg.eot_id, 0,
                            lambda columns: decoder.output_token(columns, cfg))


# ---------------------------------------------------------------- beam search

def beam_search(params, image_NxTxW, cfg, start_id, max_length, beam_size, length_penalty=0.0,
                execution=configs.Execution(), use_cache=True):
  """The best beam per image: `(tokens (N, max_length) int32, scores (N,) fp32)`, the score
  `log p(caption | image) / length_normalizer(length, length_penalty)` (the log-likelihood at
  penalty 0, `sequence_log_likelihood` of the tokens). `use_cache` as in `greedy`. Raises
  ValueError / TypeError on bad arguments: beam_size < 1, a negative length_penalty, and those
  `greedy` refuses."""
  _check_decoder(params, cfg)
  _check_image(params, image_NxTxW, cfg)
  _check_decoding(cfg, start_id, max_length)
  _check_int(beam_size, 'beam_size')
  if beam_size < 1:
    raise ValueError(f'beam_size must be >= 1, got {beam_size}')
  if not length_penalty >= 0:
    raise ValueError('length_penalty must be >= 0 (the stopping bound assumes a normaliser that '
                     f'grows with the length), got {length_penalty}')
  return _beam_search(params, image_NxTxW, cfg, jnp.int32(start_id), max_length, beam_size,
                      jnp.float32(length_penalty), execution, use_cache)[:2]


@functools.partial(jax.jit, static_argnames=('cfg', 'max_length', 'beam_size', 'execution',
                                             'use_cache'))
def _beam_search(params, image_NxTxW, cfg, start_id, max_length, beam_size, length_penalty,
                 execution, use_cache=True):
  """`(tokens (N, max_length), scores (N,), the last position decoded)`."""
  n = image_NxTxW.shape[0]
  scorer = _scorer(params, jnp.repeat(image_NxTxW, beam_size, axis=0), cfg, execution,
                   use_cache)
  return search.beam_loop(scorer, n, beam_size, start_id, max_length, length_penalty, cfg.eot_id,
                          0, lambda columns: decoder.output_token(columns, cfg))


# ---------------------------------------------------------------- scoring

def sequence_log_likelihood(params, image_NxTxW, tokens_NxL, cfg, execution=configs.Execution()):
  """`sum_i log p(tokens[:, i + 1] | tokens[:, :i + 1], image)` (N,) fp32 over the caption's
  targets up to and including its first end-of-text token (all of them in a row without one), by
  teacher forcing. Raises ValueError / TypeError on bad shapes or ids outside the vocabulary."""
  _check_decoder(params, cfg)
  _check_image(params, image_NxTxW, cfg)
  _check_tokens(tokens_NxL, cfg, 'tokens')
  if tokens_NxL.shape[0] != image_NxTxW.shape[0]:
    raise ValueError(f'one caption per image: got {tokens_NxL.shape[0]} token rows for '
                     f'{image_NxTxW.shape[0]} images')
  return _log_likelihood(params, image_NxTxW, tokens_NxL, cfg, execution)


@functools.partial(jax.jit, static_argnames=('cfg', 'execution'))
def _log_likelihood(params, image_NxTxW, tokens_NxL, cfg, execution):
  targets_NxM, valid_NxM = captioning.targets_and_valid(tokens_NxL, cfg.eot_id)
  columns_NxM = decoder.output_index(targets_NxM, cfg)
  scores_NxMxS = decoder.apply(params, image_NxTxW, tokens_NxL[:, :-1], cfg, execution)
  logp_NxM = captioning.target_log_probs(scores_NxMxS, columns_NxM)
  return jnp.where(valid_NxM, logp_NxM, 0.0).sum(axis=1)


def generative_zero_shot_scores(params, image_NxTxW, class_tokens_CxL, cfg,
                                execution=configs.Execution(), chunk=64):
  """`scores (N, C)`: the log-likelihood of every class prompt (tokenizer rows, C, L) given each
  image, `chunk` classes x N images per decoder pass. Positions after the longest prompt's
  end-of-text token are dropped first (they score nothing). Raises ValueError / TypeError on bad
  shapes, ids or chunk."""
  _check_decoder(params, cfg)
  _check_image(params, image_NxTxW, cfg)
  _check_tokens(class_tokens_CxL, cfg, 'class tokens')
  _check_int(chunk, 'chunk')
  if chunk < 1:
    raise ValueError(f'chunk must be >= 1 (classes per decoder pass), got {chunk}')
  if not isinstance(class_tokens_CxL, jax.core.Tracer):
    class_tokens_CxL = class_tokens_CxL[:, :_scored_length(np.asarray(class_tokens_CxL), cfg)]
  chunk = min(chunk, class_tokens_CxL.shape[0])
  return _class_scores(params, image_NxTxW, class_tokens_CxL, cfg, execution, chunk)


def _scored_length(tokens_CxL, cfg):
  """The shortest prefix length holding every row's first end-of-text token (L without one)."""
  is_eot_CxL = tokens_CxL == cfg.eot_id
  if not is_eot_CxL[:, 1:].any(axis=1).all():
    return tokens_CxL.shape[1]
  return max(2, int(np.argmax(is_eot_CxL[:, 1:], axis=1).max()) + 2)


@functools.partial(jax.jit, static_argnames=('cfg', 'execution', 'chunk'))
def _class_scores(params, image_NxTxW, class_tokens_CxL, cfg, execution, chunk):
  n, (c, length) = image_NxTxW.shape[0], class_tokens_CxL.shape
  padded_CxL = jnp.pad(class_tokens_CxL, ((0, -c % chunk), (0, 0)))
  images_RxTxW = jnp.repeat(image_NxTxW, chunk, axis=0)  # row r: image r // chunk

  def score(tokens_BxL):
    tokens_RxL = jnp.broadcast_to(tokens_BxL, (n, chunk, length)).reshape(n * chunk, length)
    return _log_likelihood(params, images_RxTxW, tokens_RxL, cfg, execution).reshape(n, chunk)

  scores_GxNxB = jax.lax.map(score, padded_CxL.reshape(-1, chunk, length))
  return scores_GxNxB.transpose(1, 0, 2).reshape(n, -1)[:, :c]


def generative_classify(params, image_NxTxW, class_tokens_CxL, cfg,
                        execution=configs.Execution(), chunk=64):
  """The class (N,) whose prompt is the most likely caption of each image (the lower index among
  ties); see `generative_zero_shot_scores`."""
  scores_NxC = generative_zero_shot_scores(params, image_NxTxW, class_tokens_CxL, cfg, execution,
                                           chunk)
  return jnp.argmax(scores_NxC, axis=1)
