"""The residual attention block stack shared by the ViT and the text tower (OpenAI's `Transformer`).

Params: `{'resblocks': {'0': block, '1': block, ...}}`, each block with torch keys
`ln_1, attn.{in_proj_weight, in_proj_bias, out_proj}, ln_2, mlp.{c_fc, c_proj}`.
"""
import jax
import jax.numpy as jnp

from clip import layers
from clip import sharding


def init(key, width, depth):
  """OpenAI's `initialize_parameters` stds for attention and MLP weights."""
  attn_std = width ** -0.5
  proj_std = width ** -0.5 * (2 * depth) ** -0.5
  fc_std = (2 * width) ** -0.5

  def init_block(k):
    k_attn, k_fc, k_proj = jax.random.split(k, 3)
    return {
        'ln_1': layers.init_layer_norm(width),
        'attn': layers.init_multi_head_attention(k_attn, width, attn_std, proj_std),
        'ln_2': layers.init_layer_norm(width),
        'mlp': {'c_fc': layers.init_linear(k_fc, width, 4 * width, std=fc_std),
                'c_proj': layers.init_linear(k_proj, 4 * width, width, std=proj_std)},
    }

  return {'resblocks': {str(i): init_block(jax.random.fold_in(key, i)) for i in range(depth)}}


def block(p, x_NxLxD, heads, mask_LxL=None):
  x_NxLxD = x_NxLxD + layers.multi_head_attention(p['attn'], layers.layer_norm(p['ln_1'], x_NxLxD),
                                                  heads, mask_LxL)
  return x_NxLxD + layers.mlp(p['mlp'], layers.layer_norm(p['ln_2'], x_NxLxD))


def causal_block_at(p, x_NxLxD, pos_N, heads):
  """`block` with a causal mask, evaluated only at one position per row: (N, D).

  Equal to `block(p, x, heads, causal)[arange(N), pos_N]`, but the queries, the attention output
  and the MLP run on N rows instead of N*L; the keys and values still see every position <= pos.
  """
  d = x_NxLxD.shape[-1]
  w, b = p['attn']['in_proj_weight'], p['attn']['in_proj_bias']
  h_NxLxD = layers.layer_norm(p['ln_1'], x_NxLxD)
  h_NxD = jnp.take_along_axis(h_NxLxD, pos_N[:, None, None], axis=1)[:, 0]
  q_Nx1xD = layers.linear({'weight': w[:d], 'bias': b[:d]}, h_NxD)[:, None]
  k_NxLxD, v_NxLxD = jnp.split(layers.linear({'weight': w[d:], 'bias': b[d:]}, h_NxLxD), 2, -1)
  mask_Nx1x1xL = (jnp.arange(x_NxLxD.shape[1]) <= pos_N[:, None])[:, None, None, :]
  out_NxD = layers.attention(q_Nx1xD, k_NxLxD, v_NxLxD, heads, mask_Nx1x1xL)[:, 0]
  x_NxD = jnp.take_along_axis(x_NxLxD, pos_N[:, None, None], axis=1)[:, 0]
  x_NxD = x_NxD + layers.linear(p['attn']['out_proj'], out_NxD)
  return x_NxD + layers.mlp(p['mlp'], layers.layer_norm(p['ln_2'], x_NxD))


def apply(p, x_NxLxD, heads, mask_LxL=None, depth=None, remat=False):
  """The first `depth` blocks (all by default).

  `remat` recomputes each block in the backward pass, keeping only the block inputs. The blocks
  then run as one `lax.scan` over their stacked weights: in an unrolled loop XLA is free to
  schedule every recomputation early, and on the CPU it does, so the temporaries do not shrink
  at all; under scan they do (tests/test_training.py checks `memory_analysis`)."""
  depth = len(p['resblocks']) if depth is None else depth
  x_NxLxD = sharding.constrain_batch(x_NxLxD)
  if remat and depth:
    blocks = [p['resblocks'][str(i)] for i in range(depth)]
    stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *blocks)

    @jax.checkpoint
    def step(x, block_params):
      return sharding.constrain_batch(block(block_params, x, heads, mask_LxL)), None

    return jax.lax.scan(step, x_NxLxD, stacked)[0]
  for i in range(depth):
    with jax.named_scope(f'resblock_{i}'):
      x_NxLxD = sharding.constrain_batch(block(p['resblocks'][str(i)], x_NxLxD, heads, mask_LxL))
  return x_NxLxD
