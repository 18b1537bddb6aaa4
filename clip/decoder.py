"""Captioning text decoder: causal self-attention, cross-attention to image tokens, MLP per block.

The decoder of CapPa ("Image Captioners Are Scalable Vision Learners Too", Tschannen et al.
2023; big_vision's `models/proj/cappa/cappa.py`) and of CoCa's multimodal text decoder, in the
text tower's plain style. Params (torch-style keys under `text_decoder.`):

  token_embedding.weight (V, D), positional_embedding (context_length, D), mask_embedding (D,)
  image_proj.{weight (D, W), bias}          with `image_projection` (W: the image tokens' width)
  transformer.resblocks.<i>.{ln_1, attn, ln_cross, cross_attn, ln_2, mlp}   (+ ln_attn: NormFormer)
  ln_final, and head.{weight (S, D), bias}  unless `tie_embedding`

Scores cover the `S = cfg.num_outputs` ids of `cfg.output_ids` (a vocabulary shortlist), or the
whole vocabulary; `output_index` / `output_token` map between ids and score columns.

`attn` / `cross_attn` are nn.MultiheadAttention's packed layout; cross-attention takes queries
from the caption and keys / values from the (projected) image tokens. `mask_embedding` is the
input of CapPa's parallel prediction: masked positions see it instead of their token.

Two ways to run it, equal up to fp32 rounding (tests/test_decoder.py):
`apply` runs whole captions (teacher forcing, training, scoring); `init_cache` + `step` decode
one position at a time with the self-attention keys and values cached (`clip/eval/generation.py`).
"""
import typing

import jax
import jax.numpy as jnp
import numpy as np

from clip import configs
from clip import layers
from clip import sharding
from clip import transformer


def init(key, cfg, image_width, stacked=False):
  """`cfg` is a DecoderConfig; `image_width` the width of the image tokens it attends to."""
  k = lambda i: jax.random.fold_in(key, i)
  d = cfg.width
  params = {'token_embedding': {'weight': layers.normal(k(0), (cfg.vocab_size, d), 0.02)},
            'positional_embedding': layers.normal(k(1), (cfg.context_length, d), 0.01),
            'mask_embedding': layers.normal(k(2), (d,), 0.02)}
  if cfg.image_projection:
    params['image_proj'] = layers.init_linear(k(3), image_width, d, cfg.bias)
  blocks = [_init_block(jax.random.fold_in(k(4), i), cfg) for i in range(cfg.layers)]
  params['transformer'] = {'resblocks': transformer.stack_blocks(blocks) if stacked
                           else {str(i): b for i, b in enumerate(blocks)}}
  params['ln_final'] = layers.init_norm(d, cfg.norm, cfg.bias)
  if not cfg.tie_embedding:
    params['head'] = layers.init_linear(k(5), d, cfg.num_outputs, cfg.bias, std=d ** -0.5)
  return params


def _init_block(key, cfg):
  """The text tower's block (OpenAI's stds) plus a cross-attention with its own pre-norm."""
  p = transformer.init_block(jax.random.fold_in(key, 0), cfg, cfg.layers)
  std = cfg.width ** -0.5
  p['ln_cross'] = layers.init_norm(cfg.width, cfg.norm, cfg.bias)
  p['cross_attn'] = layers.init_multi_head_attention(
      jax.random.fold_in(key, 1), cfg.width, std, std * (2 * cfg.layers) ** -0.5, cfg.bias,
      cfg.heads, qk_norm=cfg.norm if cfg.qk_norm else None)
  return p


# ---------------------------------------------------------------- whole captions

def image_memory(params, image_NxTxW, cfg, execution=configs.Execution()):
  """Image tokens (N, T, W) -> what cross-attention reads (N, T, D): projected when configured."""
  x = image_NxTxW.astype(execution.dtype)
  if cfg.image_projection != ('image_proj' in params):
    raise ValueError(f'DecoderConfig.image_projection={cfg.image_projection}, but the params '
                     f'{"lack" if cfg.image_projection else "have"} image_proj: params and '
                     'config of different decoders')
  if cfg.image_projection:
    x = layers.linear(params['image_proj'], x)
  elif x.shape[-1] != cfg.width:
    raise ValueError(f'image tokens of width {x.shape[-1]} do not fit decoder width {cfg.width} '
                     'without image_projection')
  return sharding.constrain_batch(x)


def embed(params, tokens_NxL, cfg, dtype, mask_NxL=None, offset=0):
  """Token + position embeddings (N, L, D) for positions `offset ...`; `mask_NxL` (True =
  masked) replaces a token by `mask_embedding` (CapPa's parallel prediction)."""
  table = sharding.constrain(params['token_embedding']['weight'].astype(dtype), sharding.P())
  x_NxLxD = sharding.constrain_batch(table[tokens_NxL])
  if mask_NxL is not None:
    x_NxLxD = jnp.where(mask_NxL[..., None], params['mask_embedding'].astype(dtype), x_NxLxD)
  positions = jax.lax.dynamic_slice_in_dim(params['positional_embedding'], offset,
                                           tokens_NxL.shape[1])
  return x_NxLxD + positions.astype(dtype)


def _cross(p, x_NxLxD, memory_NxTxD, cfg, implementation):
  h_NxLxD = layers.norm(p['ln_cross'], x_NxLxD, cfg.norm, cfg.norm_eps)
  return x_NxLxD + layers.multi_head_attention(p['cross_attn'], h_NxLxD, cfg.heads, None,
                                               memory_NxTxD, cfg.norm, norm_eps=cfg.norm_eps,
                                               implementation=implementation)


def block(p, x_NxLxD, memory_NxTxD, cfg, mask, implementation='xla'):
  """Pre-norm self-attention (under `mask`, a `layers.Mask` or booleans, True = attend),
  cross-attention to the image memory, MLP; each with a residual; the attention runs as
  `implementation` (`layers.attention_heads`)."""
  h_NxLxD = layers.norm(p['ln_1'], x_NxLxD, cfg.norm, cfg.norm_eps)
  x_NxLxD = x_NxLxD + transformer.attention(p, h_NxLxD, cfg, mask, implementation=implementation)
  x_NxLxD = _cross(p, x_NxLxD, memory_NxTxD, cfg, implementation)
  return x_NxLxD + transformer.mlp(p, x_NxLxD, cfg)


def logits(params, x_NxLxD, cfg):
  """ln_final, then the scores (N, L, S) of the `cfg.num_outputs` ids in fp32: the tied token
  embedding (its `output_ids` rows) or `head`."""
  x_NxLxD = layers.norm(params['ln_final'], x_NxLxD, cfg.norm, cfg.norm_eps)
  if 'head' in params:
    out = layers.linear(params['head'], x_NxLxD)
  else:
    table_VxD = params['token_embedding']['weight']
    if cfg.output_ids is not None:
      table_VxD = table_VxD[np.asarray(cfg.output_ids)]
    out = x_NxLxD @ table_VxD.astype(x_NxLxD.dtype).T
  return out.astype(jnp.float32)


def output_index(tokens, cfg):
  """Token ids -> their score columns (the ids themselves without a shortlist), -1 for an id
  the shortlist does not hold."""
  if cfg.output_ids is None:
    return tokens
  table = np.full((cfg.vocab_size,), -1, np.int32)
  table[np.asarray(cfg.output_ids)] = np.arange(len(cfg.output_ids))
  return jnp.asarray(table)[tokens]


def output_token(index, cfg):
  """Score columns -> token ids (the inverse of `output_index`)."""
  if cfg.output_ids is None:
    return index
  return jnp.asarray(np.asarray(cfg.output_ids, np.int32))[index]


def self_attention_mask(length, bidirectional_N=None, valid_NxL=None):
  """Causal (`layers.Mask(causal=True)`); with `bidirectional_N` (N,) those rows attend to every
  valid key instead (`valid_NxL`, True = a caption position, not padding): booleans (N, 1, L, L),
  True = attend."""
  if bidirectional_N is None:
    return layers.Mask(causal=True)
  causal_LxL = jnp.tril(jnp.ones((length, length), bool))
  full_NxLxL = jnp.broadcast_to(valid_NxL[:, None, :], (valid_NxL.shape[0], length, length))
  return jnp.where(bidirectional_N[:, None, None], full_NxLxL, causal_LxL)[:, None]


def apply(params, image_NxTxW, tokens_NxL, cfg, execution=configs.Execution(), mask_NxL=None,
          bidirectional_N=None, valid_NxL=None):
  """Teacher forcing: image tokens (N, T, W) and input tokens (N, L <= context_length) -> the
  next-token scores (N, L, S) over `cfg.output_ids` (S = V without a shortlist), fp32. Position
  i's scores predict token i + 1 of the caption.

  CapPa's parallel prediction: `mask_NxL` (True = input replaced by `mask_embedding`) and
  `bidirectional_N` (rows attending in both directions, to the `valid_NxL` positions only)."""
  length = tokens_NxL.shape[1]
  if length > cfg.context_length:
    raise ValueError(f'decoder input of length {length} is longer than its context '
                     f'{cfg.context_length}')
  dtype = jnp.dtype(execution.dtype)
  memory_NxTxD = image_memory(params, image_NxTxW, cfg, execution)
  x_NxLxD = embed(params, tokens_NxL, cfg, dtype, mask_NxL)
  mask = self_attention_mask(length, bidirectional_N, valid_NxL)
  run = lambda p, x: sharding.constrain_batch(block(p, x, memory_NxTxD, cfg, mask,
                                                    execution.attention))
  x_NxLxD = transformer.run_blocks(params['transformer'], x_NxLxD, run, execution)
  return logits(params, x_NxLxD, cfg)


# ---------------------------------------------------------------- one position at a time

class Cache(typing.NamedTuple):
  """Decoding state for N rows, per layer: the self-attention keys and values
  `(layers, N, context_length, heads, head_dim)`, filled up to the current position, and the
  cross-attention keys and values of the image memory `(layers, N, T, heads, head_dim)`,
  computed once."""
  keys: jax.Array
  values: jax.Array
  cross_keys: jax.Array
  cross_values: jax.Array


def init_cache(params, image_NxTxW, cfg, execution=configs.Execution()):
  """An empty cache for the rows of `image_NxTxW`, with the image's cross-attention keys and
  values projected once per layer."""
  memory = image_memory(params, image_NxTxW, cfg, execution)
  cross = [layers.attention_projections(transformer.layer(params['transformer'], i)['cross_attn'],
                                        memory[:, :1], cfg.heads, cfg.norm, cfg.norm_eps,
                                        kv_NxKxD=memory)[1:] for i in range(cfg.layers)]
  n, hd = memory.shape[0], cfg.width // cfg.heads
  zeros = jnp.zeros((cfg.layers, n, cfg.context_length, cfg.heads, hd), memory.dtype)
  return Cache(zeros, zeros, jnp.stack([k for k, _ in cross]), jnp.stack([v for _, v in cross]))


def step(params, cache, tokens_N, position, cfg, execution=configs.Execution()):
  """Decodes one position for every row: `tokens_N` (N,) at `position` (a scalar, traced
  allowed) -> (scores (N, S) fp32 for position + 1, the cache with this position's keys and
  values), in the cache's dtype, the attention as `execution.attention`. Equal to
  `apply(...)[:, position]` fed the same prefix (causal rows). A concrete
  position outside [0, context_length) raises (under jit the caller bounds it: a traced one
  past the end would be clamped by the cache update)."""
  if not isinstance(position, jax.core.Tracer) and not 0 <= int(position) < cfg.context_length:
    raise ValueError(f'decoding position {int(position)} is outside the decoder\'s context '
                     f'[0, {cfg.context_length})')
  dtype = cache.cross_keys.dtype
  x_Nx1xD = embed(params, tokens_N[:, None], cfg, dtype, offset=position)
  impl = execution.attention
  visible = layers.Mask(kv_lengths_N=jnp.full(tokens_N.shape, position + 1, jnp.int32))
  keys, values = [], []
  for i in range(cfg.layers):
    p = transformer.layer(params['transformer'], i)
    h_Nx1xD = layers.norm(p['ln_1'], x_Nx1xD, cfg.norm, cfg.norm_eps)
    out, k, v = transformer.cached_self_attention(p, h_Nx1xD, cache.keys[i], cache.values[i],
                                                  position, visible, cfg, impl)
    keys.append(k)
    values.append(v)
    x_Nx1xD = x_Nx1xD + out
    h_Nx1xD = layers.norm(p['ln_cross'], x_Nx1xD, cfg.norm, cfg.norm_eps)
    q = layers.attention_projections(p['cross_attn'], h_Nx1xD, cfg.heads, cfg.norm, cfg.norm_eps,
                                     kv_NxKxD=h_Nx1xD)[0]
    out = layers.attention_heads(q, cache.cross_keys[i], cache.cross_values[i], None, impl)
    x_Nx1xD = x_Nx1xD + layers.attention_output(p['cross_attn'], out)
    x_Nx1xD = x_Nx1xD + transformer.mlp(p, x_Nx1xD, cfg)
  cache = Cache(jnp.stack(keys), jnp.stack(values), cache.cross_keys, cache.cross_values)
  return logits(params, x_Nx1xD, cfg)[:, 0], cache
