"""open_clip's CoCa (clip/coca.py) decoded one position at a time: a KV cache, greedy captions
and beam search.

A CoCa caption position runs through two causal stacks: the unimodal text tower (token
embedding, positions, causal blocks with open_clip's legacy padding mask: key j is hidden when
token j - 1 is `cfg.pad_id`, key 0 never) and the multimodal decoder (per layer a causal
self-attention block, then a cross-attention block reading the image tokens after `ln_1_kv`).
The cache holds, per layer of each, the keys and values of the positions decoded so far, which
keys the legacy mask leaves visible, and the image's cross-attention keys and values, projected
once: a step runs one position (`step`), where recomputing (`use_cache=False`, the reference)
re-runs both towers over the whole token buffer. Both give the scores of `coca.decode` on the
same prefix up to fp32 rounding (tests/test_coca_decoding.py).

  init_cache(params, image_NxTxD, cfg, length) -> Cache;  step(...) -> (scores (N, V), Cache)
  caption(...)       greedy, open_clip's `generate(generation_type='top_k', top_k=1)` (what
                     `clip.coca.caption` runs)
  beam_caption(...)  beam search (`clip.eval.search.beam_loop`, as the captioning decoder's)

Beam search is not open_clip's: open_clip's `_generate_beamsearch` is a group (diverse) beam
search over raw logits with transformers' `BeamSearchScorer`, which transformers 5 removed. Ours
ranks beams by their log-probability (GNMT's length normaliser) and is tested against an
exhaustive search over every caption of a tiny model.
"""
import functools
import typing

import jax
import jax.numpy as jnp

from clip import coca
from clip import layers
from clip import model
from clip import transformer
from clip.eval import search


class Cache(typing.NamedTuple):
  """Decoding state of N rows over P positions: per layer of the text tower, its keys and values
  `text_keys`, `text_values` (text layers, N, P, heads, head_dim) and `text_visible` (N, P + 1),
  True where a key is visible under the legacy padding mask (column j + 1 is set when token j is
  decoded); per layer of the multimodal decoder, its self-attention keys and values
  `keys`, `values` (decoder layers, N, P, heads, head_dim) and the image's cross-attention keys
  and values `cross_keys`, `cross_values` (decoder layers, N, T, heads, head_dim)."""
  text_keys: jax.Array
  text_values: jax.Array
  text_visible: jax.Array
  keys: jax.Array
  values: jax.Array
  cross_keys: jax.Array
  cross_values: jax.Array


def max_positions(cfg):
  """The most positions a caption decodes: both stacks' context (the text tower's positional
  table has one more row, for its class token)."""
  return min(cfg.decoder.context_length, cfg.text.context_length)


def init_cache(params, image_NxTxD, cfg, length):
  """An empty cache of `length` positions for the rows of `image_NxTxD` (the image tokens of
  `coca.image_features_and_tokens`, fp32), the image's cross-attention keys and values projected
  once per decoder layer. Raises ValueError for a length outside [1, `max_positions(cfg)`]."""
  if not 1 <= length <= max_positions(cfg):
    raise ValueError(f'a cache of {length} positions: need 1 to {max_positions(cfg)} (the context)')
  t, dec = cfg.text, cfg.decoder
  cross = []
  for i in range(dec.layers):
    c = params['text_decoder']['cross_attn'][str(i)]
    kv_NxTxD = layers.layer_norm(c['ln_1_kv'], image_NxTxD)
    cross.append(layers.attention_projections(c['attn'], kv_NxTxD[:, :1], dec.heads, dec.norm,
                                              dec.norm_eps, kv_NxKxD=kv_NxTxD)[1:])
  n, dtype = image_NxTxD.shape[0], params['text']['token_embedding']['weight'].dtype
  text = jnp.zeros((t.layers, n, length, t.heads, t.width // t.heads), dtype)
  own = jnp.zeros((dec.layers, n, length, dec.heads, dec.width // dec.heads), dtype)
  visible_NxP1 = jnp.zeros((n, length + 1), bool).at[:, 0].set(True)
  return Cache(text, text, visible_NxP1, own, own, jnp.stack([k for k, _ in cross]),
               jnp.stack([v for _, v in cross]))


def _causal_block_step(p, x_Nx1xD, keys, values, position, mask, tower, impl):
  """`transformer.block` (pre-norm) at one position: its keys and values written at `position`
  of the cached `keys`, `values` (N, P, H, d) -> (x (N, 1, D), keys, values)."""
  h_Nx1xD = layers.norm(p['ln_1'], x_Nx1xD, tower.norm, tower.norm_eps)
  out, keys, values = transformer.cached_self_attention(p, h_Nx1xD, keys, values, position, mask,
                                                        tower, impl)
  x_Nx1xD = x_Nx1xD + out
  return x_Nx1xD + transformer.mlp(p, x_Nx1xD, tower), keys, values


def _text_step(params, cache, tokens_N, position, cfg):
  """The text tower at `position` -> (its block output (N, 1, D), text keys, values, visible)."""
  p, t, impl = params['text'], cfg.text, cfg.execution.attention
  positions = jax.lax.dynamic_index_in_dim(p['positional_embedding'], position, keepdims=True)
  x_Nx1xD = p['token_embedding']['weight'][tokens_N][:, None] + positions
  length = cache.text_keys.shape[2]
  visible_NxP = cache.text_visible[:, :length] & (jnp.arange(length) <= position)
  mask = visible_NxP[:, None, None, :]
  keys, values = [], []
  for i in range(t.layers):
    x_Nx1xD, k, v = _causal_block_step(transformer.layer(p['transformer'], i), x_Nx1xD,
                                       cache.text_keys[i], cache.text_values[i], position, mask,
                                       t, impl)
    keys.append(k)
    values.append(v)
  # Legacy mask: the next position's key is visible unless this token is padding.
  visible = jax.lax.dynamic_update_index_in_dim(cache.text_visible, tokens_N != cfg.pad_id,
                                                position + 1, axis=1)
  return x_Nx1xD, jnp.stack(keys), jnp.stack(values), visible


def step(params, cache, tokens_N, position, cfg):
  """Decodes one position for every row: `tokens_N` (N,) at `position` (a scalar, traced
  allowed) -> (next-token scores (N, vocab) fp32 for position + 1, the cache with this position
  written). Equal to `coca.decode(...)[:, position]` on the same prefix up to fp32 rounding.
  A concrete position outside the cache's [0, P) raises ValueError (under jit the caller bounds
  it: a traced one past the end would be clamped by the cache update)."""
  length = cache.keys.shape[2]
  if not isinstance(position, jax.core.Tracer) and not 0 <= int(position) < length:
    raise ValueError(f'decoding position {int(position)} is outside the cache\'s [0, {length})')
  x_Nx1xD, text_keys, text_values, visible = _text_step(params, cache, tokens_N, position, cfg)
  p, dec, impl = params['text_decoder'], cfg.decoder, cfg.execution.attention
  mask = layers.Mask(kv_lengths_N=jnp.full(tokens_N.shape, position + 1, jnp.int32))
  keys, values = [], []
  for i in range(dec.layers):
    x_Nx1xD, k, v = _causal_block_step(p['resblocks'][str(i)], x_Nx1xD, cache.keys[i],
                                       cache.values[i], position, mask, dec, impl)
    keys.append(k)
    values.append(v)
    c = p['cross_attn'][str(i)]
    h_Nx1xD = layers.layer_norm(c['ln_1'], x_Nx1xD)
    q = layers.attention_projections(c['attn'], h_Nx1xD, dec.heads, dec.norm, dec.norm_eps,
                                     kv_NxKxD=h_Nx1xD)[0]
    out = layers.attention_heads(q, cache.cross_keys[i], cache.cross_values[i], None, impl)
    out = layers.attention_output(c['attn'], out, dec.norm, dec.norm_eps)
    if 'ln_attn' in c:
      out = layers.norm(c['ln_attn'], out, dec.norm, dec.norm_eps)
    x_Nx1xD = x_Nx1xD + out
    x_Nx1xD = x_Nx1xD + transformer.mlp(c, x_Nx1xD, dec)
  x_Nx1xD = layers.layer_norm(p['ln_final'], x_Nx1xD)
  scores_NxV = (x_Nx1xD @ p['text_projection']).astype(jnp.float32)[:, 0]
  return scores_NxV, Cache(text_keys, text_values, visible, jnp.stack(keys), jnp.stack(values),
                           cache.cross_keys, cache.cross_values)


def take_rows(state, rows_R):
  """The cache of rows `rows_R` (each beam's parent's); the image's keys and values are the same
  for every beam of an image. No cache (`()`): nothing to move."""
  if not state:
    return state
  take = lambda a, axis: jnp.take(a, rows_R, axis=axis)
  return state._replace(text_keys=take(state.text_keys, 1), text_values=take(state.text_values, 1),
                        text_visible=take(state.text_visible, 0), keys=take(state.keys, 1),
                        values=take(state.values, 1))


def scorer(params, image_RxTxD, cfg, length, use_cache=True):
  """The `clip.eval.search.Scorer` of CoCa's decoder over token buffers (R, length + 1): from the
  cache (`init_cache`, `step`), or (`use_cache=False`, the reference) by re-running the text
  tower and `coca.decode` over the whole buffer every step, whose causal masks keep the
  positions after i out of the scores read."""
  if use_cache:
    cache = init_cache(params, image_RxTxD, cfg, length)
    return search.Scorer(cache, lambda tokens_RxL, i, cache: step(params, cache, tokens_RxL[:, i],
                                                                  i, cfg), take_rows)

  def scores_at(tokens_RxL, i, state):
    text_RxLxD = coca.text_features_and_tokens(params, tokens_RxL[:, :-1], cfg)[1]
    scores_RxLxV = coca.decode(params, image_RxTxD, text_RxLxD, cfg)
    return jax.lax.dynamic_index_in_dim(scores_RxLxV, i, axis=1, keepdims=False), state

  return search.Scorer((), scores_at, take_rows)


# ---------------------------------------------------------------- captions

def _check_arguments(cfg, sot_id, eos_id, seq_len, min_seq_len=0):
  limit = max_positions(cfg) + 1
  if not 0 <= min_seq_len < seq_len <= limit:
    raise ValueError(f'need 0 <= min_seq_len < seq_len <= {limit} (the context + 1); got '
                     f'min_seq_len {min_seq_len}, seq_len {seq_len}')
  for name, value in (('sot_id', sot_id), ('eos_id', eos_id)):
    if not 0 <= value < cfg.text.vocab_size:
      raise ValueError(f'{name} {value} is outside the vocabulary [0, {cfg.text.vocab_size})')


def caption(params, images_NxHxWx3, cfg, sot_id, eos_id, seq_len=30, min_seq_len=5,
            use_cache=True):
  """`clip.coca.caption` (its docstring says the semantics): greedy captions (N, seq_len) int32,
  from the cache, or with `use_cache=False` by re-running both towers over the whole buffer every
  step (the reference). Raises ValueError unless min_seq_len < seq_len <= context + 1 and the ids
  are in the vocabulary, and as `model.check_images`."""
  _check_arguments(cfg, sot_id, eos_id, seq_len, min_seq_len)
  model.check_images(images_NxHxWx3, cfg)
  return _caption(params, images_NxHxWx3, cfg, jnp.int32(sot_id), jnp.int32(eos_id), seq_len,
                  min_seq_len, use_cache)


@functools.partial(jax.jit, static_argnames=('cfg', 'seq_len', 'min_seq_len', 'use_cache'))
def _caption(params, images_NxHxWx3, cfg, sot_id, eos_id, seq_len, min_seq_len, use_cache):
  image_NxTxD = coca.image_features_and_tokens(params, images_NxHxWx3, cfg)[1]
  n = images_NxHxWx3.shape[0]
  tokens_NxL = jnp.full((n, seq_len), cfg.pad_id, jnp.int32).at[:, 0].set(sot_id)
  scores = scorer(params, image_NxTxD, cfg, max(seq_len - 1, 1), use_cache)  # seq_len 1: no step

  def body(i, carry):
    tokens_NxL, done_N, state = carry
    scores_NxV, state = scores.scores_at(tokens_NxL, i, state)
    scores_NxV = jnp.where((i + 1 < min_seq_len) & (jnp.arange(scores_NxV.shape[1]) == eos_id),
                           -jnp.inf, scores_NxV)
    best_N = jnp.where(i + 2 == seq_len, eos_id, jnp.argmax(scores_NxV, axis=1).astype(jnp.int32))
    new_N = jnp.where(done_N, cfg.pad_id, best_N)
    tokens_NxL = jax.lax.dynamic_update_index_in_dim(tokens_NxL, new_N, i + 1, axis=1)
    return tokens_NxL, done_N | (new_N == eos_id) | (new_N == cfg.pad_id), state

  init = (tokens_NxL, jnp.zeros((n,), bool), scores.state)
  return jax.lax.fori_loop(0, seq_len - 1, body, init)[0]


def beam_caption(params, images_NxHxWx3, cfg, sot_id, eos_id, seq_len=30, beam_size=4,
                 length_penalty=0.0, use_cache=True):
  """The best beam per image: `(tokens (N, seq_len) int32, scores (N,) fp32)`, rows as
  `caption`'s (sot_id, the generated tokens, eos_id, then `cfg.pad_id`; a row that reaches
  seq_len without eos_id is cut there), the score `log p(caption | image) /
  search.length_normalizer(generated tokens, length_penalty)` (`log p` summed over the generated
  tokens up to and including eos_id, by teacher forcing: `coca.apply`'s scores). Only eos_id ends
  a beam (a generated pad_id is a token, masked as padding by the text tower, as in teacher
  forcing); no minimum length. Beam search as `clip.eval.search.beam_loop`; not open_clip's group
  beam search (see the module docstring). Raises ValueError / TypeError for beam_size not an
  int >= 1, a negative length_penalty, and as `caption`."""
  if not 2 <= seq_len <= max_positions(cfg) + 1:
    raise ValueError(f'seq_len must be in [2, {max_positions(cfg) + 1}] (the start token and at '
                     f'least one generated, at most the context + 1), got {seq_len}')
  _check_arguments(cfg, sot_id, eos_id, seq_len)
  if isinstance(beam_size, bool) or not isinstance(beam_size, int) or beam_size < 1:
    raise ValueError(f'beam_size must be an int >= 1, got {beam_size!r}')
  if not length_penalty >= 0:
    raise ValueError('length_penalty must be >= 0 (the stopping bound assumes a normaliser that '
                     f'grows with the length), got {length_penalty}')
  model.check_images(images_NxHxWx3, cfg)
  return _beam_caption(params, images_NxHxWx3, cfg, jnp.int32(sot_id), jnp.int32(eos_id),
                       seq_len, beam_size, jnp.float32(length_penalty), use_cache)[:2]


@functools.partial(jax.jit, static_argnames=('cfg', 'seq_len', 'beam_size', 'use_cache'))
def _beam_caption(params, images_NxHxWx3, cfg, sot_id, eos_id, seq_len, beam_size,
                  length_penalty, use_cache):
  """`(tokens (N, seq_len), scores (N,), the last position decoded)`."""
  image_NxTxD = coca.image_features_and_tokens(params, images_NxHxWx3, cfg)[1]
  scores = scorer(params, jnp.repeat(image_NxTxD, beam_size, axis=0), cfg, seq_len - 1,
                  use_cache)
  return search.beam_loop(scores, images_NxHxWx3.shape[0], beam_size, sot_id, seq_len,
                          length_penalty, eos_id, cfg.pad_id)
