"""The residual attention block stack shared by the ViT and the text tower (OpenAI's `Transformer`).

Params: `{'resblocks': {'0': block, '1': block, ...}}`, each block with torch keys
`ln_1, attn.{in_proj_weight, in_proj_bias, out_proj}, ln_2, mlp.{c_fc, c_proj}`.
"""
import jax

from clip import layers


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


def apply(p, x_NxLxD, heads, mask_LxL=None):
  for i in range(len(p['resblocks'])):
    with jax.named_scope(f'resblock_{i}'):
      x_NxLxD = block(p['resblocks'][str(i)], x_NxLxD, heads, mask_LxL)
  return x_NxLxD
