"""OpenAI's text tower: token + position embedding, causal blocks, ln_final, EOT pooling; with the
TextConfig options (first-token / map pooling, RoPE, bidirectional attention, block options)."""
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from clip import configs
from clip import layers
from clip import pooling
from clip import sharding
from clip import transformer


def init(key, cfg, embed_dim, stacked=False):
  """`cfg` is a TextConfig; keys are the top-level torch keys of OpenAI's CLIP text side."""
  k = lambda i: jax.random.fold_in(key, i)
  params = {'token_embedding': {'weight': layers.normal(k(0), (cfg.vocab_size, cfg.width), 0.02)}}
  if cfg.pos_embedding == 'learned':
    params['positional_embedding'] = layers.normal(k(1), (cfg.context_length, cfg.width), 0.01)
  params['transformer'] = transformer.init(k(2), cfg, stacked)
  params['ln_final'] = layers.init_norm(cfg.width, cfg.norm, cfg.bias)
  if cfg.pool == 'map':
    params['attn_pool'] = pooling.init(k(4), cfg)
  if cfg.projection_bias:
    params['text_projection'] = layers.init_linear(k(3), cfg.width, embed_dim)
  elif cfg.projection:
    params['text_projection'] = layers.normal(k(3), (cfg.width, embed_dim), cfg.width ** -0.5)
  return params


def eot_positions(tokens_NxL, cfg):
  """(N,) position of the first `cfg.eot_id` in each row (as transformers' CLIPTextTransformer for
  a non-legacy eos_token_id); OpenAI's argmax of the ids is the same whenever that id is the
  largest one, as in OpenAI's vocabulary."""
  return jnp.argmax(tokens_NxL == cfg.eot_id, axis=-1)


def reads_padding(cfg):
  """Whether the feature of a row depends on the positions after its end-of-text token: pooling
  the last position, or attention / map pooling over every position (`mask_padding=False` where
  the end-of-text token would be the bound). Such a tower gives a row shorter than the context
  another feature than the same row padded by its tokenizer, so it takes full rows only
  (`check_length`); the others read nothing past the end-of-text token."""
  return cfg.pool == 'last' or not cfg.uses_eot


def check_length(length, cfg):
  """Raises ValueError unless rows of `length` tokens give the features of the model's own
  (padded) rows: at most the context length, and exactly it for a tower that `reads_padding`."""
  if length > cfg.context_length:
    raise ValueError(f'tokens have length {length}, longer than the context length '
                     f'{cfg.context_length} of this model')
  if length != cfg.context_length and reads_padding(cfg):
    reads = ('pools the last position' if cfg.pool == 'last' else
             f'{"pools" if cfg.pool == "map" else "attends to"} every position')
    raise ValueError(f'tokens have length {length}, but this text tower (pool={cfg.pool!r}, '
                     f'causal={cfg.causal}, mask_padding={cfg.mask_padding}) {reads}, padding '
                     f'included: it takes rows of exactly its context length '
                     f'{cfg.context_length}, padded as its tokenizer pads them '
                     '(clip.get_tokenizer(cfg) returns such rows); a shorter row would get '
                     'another feature than the same text padded')


def apply(params, tokens_NxL, cfg, execution=configs.Execution()):
  """int tokens (N, L<=context) -> (N, embed_dim). The end-of-text position of a row is the first
  occurrence of `cfg.eot_id`; what follows it is padding (masked out of bidirectional attention
  and map pooling unless `cfg.mask_padding` is False). `pool='last'` pools position L - 1 of the
  given tokens, so the public entry points (`clip.model.check_tokens`, `check_length`) give a
  tower that `reads_padding` full rows only. Token values are not checked here
  (`clip.model.check_token_values` does, outside jit): an id outside the vocabulary is clamped by
  the gather, a row without `cfg.eot_id` pools at position 0."""
  length = tokens_NxL.shape[1]
  dtype = jnp.dtype(execution.dtype)
  # The lookup reads a gathered table (as FSDP gathers every weight it uses): a gather from the
  # sharded table would come out split along the width, not the batch.
  table_VxD = sharding.constrain(params['token_embedding']['weight'].astype(dtype), P())
  x_NxLxD = sharding.constrain_batch(table_VxD[tokens_NxL])
  if cfg.pos_embedding == 'learned':
    x_NxLxD = x_NxLxD + params['positional_embedding'][:length].astype(dtype)
  positions_L = jnp.arange(length) if cfg.pos_embedding == 'rope' else None
  eot_N = eot_positions(tokens_NxL, cfg) if cfg.uses_eot else None
  masked = cfg.mask_padding and eot_N is not None
  valid_NxL = (jnp.arange(length) <= eot_N[:, None]) if masked else None
  if cfg.causal:
    mask = layers.Mask(causal=True)
  else:
    mask = None if valid_NxL is None else layers.Mask(kv_lengths_N=eot_N + 1)
  run = lambda x, depth=None: transformer.apply(params['transformer'], x, cfg, mask, depth,
                                                execution, positions_L)
  if cfg.pool == 'eot' and cfg.causal:
    # Only the EOT position is pooled and ln_final is per token, so the last block runs there alone.
    x_NxLxD = run(x_NxLxD, cfg.layers - 1)
    last = transformer.layer(params['transformer'], cfg.layers - 1)
    x_NxD = transformer.causal_block_at(last, x_NxLxD, eot_N, cfg, positions_L,
                                        execution.attention)
    x_NxD = layers.norm(params['ln_final'], x_NxD, cfg.norm, cfg.norm_eps)
  elif cfg.pool == 'map':
    x_NxLxD = layers.norm(params['ln_final'], run(x_NxLxD), cfg.norm, cfg.norm_eps)
    x_NxD = pooling.apply(params['attn_pool'], x_NxLxD, cfg, valid_NxL, execution.attention)
  else:
    x_NxLxD = run(x_NxLxD)
    pos_N = eot_N if cfg.pool == 'eot' else jnp.full(
        (tokens_NxL.shape[0],), 0 if cfg.pool == 'first' else length - 1, jnp.int32)
    x_NxD = jnp.take_along_axis(x_NxLxD, pos_N[:, None, None], axis=1)[:, 0]
    x_NxD = layers.norm(params['ln_final'], x_NxD, cfg.norm, cfg.norm_eps)
  projection = params.get('text_projection')
  if isinstance(projection, dict):
    x_NxD = layers.linear(projection, x_NxD)
  elif projection is not None:
    x_NxD = x_NxD @ projection.astype(dtype)
  return x_NxD
