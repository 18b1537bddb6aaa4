"""OpenAI's text tower: token + position embedding, causal blocks, ln_final, EOT pooling."""
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from clip import layers
from clip import sharding
from clip import transformer


def init(key, cfg, embed_dim):
  """`cfg` is a TextConfig; keys are the top-level torch keys of OpenAI's CLIP text side."""
  k = lambda i: jax.random.fold_in(key, i)
  return {
      'token_embedding': {'weight': layers.normal(k(0), (cfg.vocab_size, cfg.width), 0.02)},
      'positional_embedding': layers.normal(k(1), (cfg.context_length, cfg.width), 0.01),
      'transformer': transformer.init(k(2), cfg.width, cfg.layers),
      'ln_final': layers.init_layer_norm(cfg.width),
      'text_projection': layers.normal(k(3), (cfg.width, embed_dim), cfg.width ** -0.5),
  }


def apply(params, tokens_NxL, cfg, dtype=jnp.float32, remat=False):
  """int tokens (N, L<=context) -> (N, embed_dim), pooled at the largest id (EOT) of each row."""
  length = tokens_NxL.shape[1]
  # The lookup reads a gathered table (as FSDP gathers every weight it uses): a gather from the
  # sharded table would come out split along the width, not the batch.
  table_VxD = sharding.constrain(params['token_embedding']['weight'].astype(dtype), P())
  x_NxLxD = sharding.constrain_batch(table_VxD[tokens_NxL])
  x_NxLxD = x_NxLxD + params['positional_embedding'][:length].astype(dtype)
  causal_LxL = jnp.tril(jnp.ones((length, length), bool))
  eot_N = jnp.argmax(tokens_NxL, axis=-1)
  # Only the EOT position is pooled and ln_final is per token, so the last block runs there alone.
  x_NxLxD = transformer.apply(params['transformer'], x_NxLxD, cfg.heads, causal_LxL,
                              depth=max(cfg.layers - 1, 0), remat=remat)
  if cfg.layers:
    last = params['transformer']['resblocks'][str(cfg.layers - 1)]
    x_NxD = transformer.causal_block_at(last, x_NxLxD, eot_N, cfg.heads)
  else:
    x_NxD = jnp.take_along_axis(x_NxLxD, eot_N[:, None, None], axis=1)[:, 0]
  x_NxD = layers.layer_norm(params['ln_final'], x_NxD)
  return x_NxD @ params['text_projection'].astype(dtype)
