"""The residual attention block stack shared by the ViT and the text tower (OpenAI's `Transformer`),
with the tower config's `BlockOptions` (norm kind and placement, MLP kind, qk-norm, biases).

Params, per-layer (torch keys): `{'resblocks': {'0': block, '1': block, ...}}`, each block with
`ln_1, attn.{in_proj_weight, in_proj_bias, out_proj}, ln_2, mlp.{c_fc, c_proj}` (plus `ln_attn`,
`attn.head_scale`, `mlp.ln` for NormFormer, `attn.ln_inner`, `mlp.ln` for sub-LN, `attn.{q,k}_norm`,
`attn.{q_bias, v_bias}` for k_bias=False, `mlp.c_gate` when configured).
Stacked: `{'resblocks': block}` whose leaves carry a leading layer axis, run by `lax.scan`.
"""
import jax
import jax.numpy as jnp

from clip import configs
from clip import layers
from clip import sharding

# What `jax.checkpoint` keeps of a block for the backward pass ('block': only its input).
REMAT_POLICIES = {'block': None, 'dots': jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


def init_block(key, cfg, depth):
  """One block with OpenAI's `initialize_parameters` stds for attention and MLP weights."""
  width = cfg.width
  attn_std = width ** -0.5
  proj_std = width ** -0.5 * (2 * depth) ** -0.5
  fc_std = (2 * width) ** -0.5
  normformer = cfg.norm_placement == 'normformer'
  subln = cfg.norm_placement == 'subln'
  k_attn, k_fc, k_proj = jax.random.split(key, 3)
  p = {
      'ln_1': layers.init_norm(width, cfg.norm, cfg.bias),
      'attn': layers.init_multi_head_attention(
          k_attn, width, attn_std, proj_std, cfg.bias, cfg.heads,
          qk_norm=cfg.norm if cfg.qk_norm else None, head_scale=normformer, k_bias=cfg.k_bias,
          inner_norm=cfg.norm if subln else None),
      'ln_2': layers.init_norm(width, cfg.norm, cfg.bias),
      'mlp': layers.init_mlp(k_fc, k_proj, width, cfg.hidden_dim, cfg.mlp, cfg.bias, fc_std,
                             proj_std, norm_kind=cfg.norm if normformer or subln else None),
  }
  if normformer:
    p['ln_attn'] = layers.init_norm(width, cfg.norm, cfg.bias)
  return p


def init(key, cfg, stacked=False):
  blocks = [init_block(jax.random.fold_in(key, i), cfg, cfg.layers) for i in range(cfg.layers)]
  if stacked:
    return {'resblocks': stack_blocks(blocks)}
  return {'resblocks': {str(i): b for i, b in enumerate(blocks)}}


# ---------------------------------------------------------------- stacked <-> per-layer layouts

def is_stacked(resblocks):
  """True for the stacked layout (block keys with a leading layer axis), False for '0', '1', ..."""
  return not all(k.isdigit() for k in resblocks)


def stack_blocks(blocks):
  """A list of per-layer block dicts -> one block dict with a leading layer axis."""
  return jax.tree.map(lambda *leaves: jnp.stack(leaves), *blocks)


def unstack_blocks(stacked):
  """One stacked block dict -> `{'0': block, '1': block, ...}` (the torch-keyed layout)."""
  n = len(jax.tree.leaves(stacked)[0])
  return {str(i): jax.tree.map(lambda a, i=i: a[i], stacked) for i in range(n)}


def num_layers(p):
  blocks = p['resblocks']
  return len(jax.tree.leaves(blocks)[0]) if is_stacked(blocks) else len(blocks)


def layer(p, i):
  """Block `i`'s parameters in either layout."""
  blocks = p['resblocks']
  return jax.tree.map(lambda a: a[i], blocks) if is_stacked(blocks) else blocks[str(i)]


# ---------------------------------------------------------------- apply

def attention(p, h_NxQxD, cfg, mask, kv_NxKxD=None, q_pos=None, k_pos=None, implementation='xla',
              rope_angles=None):
  """A block's attention (`layers.multi_head_attention`: `mask` a `layers.Mask` or booleans,
  True = attend; `rope_angles` EVA's 2-D RoPE), then NormFormer's norm when the block has one."""
  # Positions come only from a tower with `pos_embedding='rope'` (the text tower's option).
  rope_theta = None if q_pos is None else cfg.rope_theta
  out = layers.multi_head_attention(p['attn'], h_NxQxD, cfg.heads, mask, kv_NxKxD, cfg.norm,
                                    q_pos, k_pos, rope_theta, cfg.norm_eps, implementation,
                                    rope_angles)
  return layers.norm(p['ln_attn'], out, cfg.norm, cfg.norm_eps) if 'ln_attn' in p else out


def cached_self_attention(p, h_Nx1xD, keys, values, position, mask, cfg, implementation='xla'):
  """A block's self-attention at one position, for decoding with a KV cache: the (normed) input
  `h_Nx1xD` (N, 1, D)'s keys and values written at `position` of the cached `keys`, `values`
  (N, P, heads, head_dim), its query attending to them under `mask` (`layers.attention_heads`'),
  then NormFormer's norm when the block has one -> (out (N, 1, D), keys, values). The cached
  steps of `clip/decoder.py` and `clip/coca_decoding.py` run it."""
  q, k, v = layers.attention_projections(p['attn'], h_Nx1xD, cfg.heads, cfg.norm, cfg.norm_eps)
  keys = jax.lax.dynamic_update_slice_in_dim(keys, k, position, axis=1)
  values = jax.lax.dynamic_update_slice_in_dim(values, v, position, axis=1)
  out = layers.attention_output(
      p['attn'], layers.attention_heads(q, keys, values, mask, implementation), cfg.norm,
      cfg.norm_eps)
  if 'ln_attn' in p:
    out = layers.norm(p['ln_attn'], out, cfg.norm, cfg.norm_eps)
  return out, keys, values


def mlp(p, x, cfg):
  return layers.mlp(p['mlp'], layers.norm(p['ln_2'], x, cfg.norm, cfg.norm_eps), cfg.mlp, cfg.norm,
                    cfg.norm_eps)


def block(p, x_NxLxD, cfg, mask=None, positions=None, implementation='xla', rope_angles=None):
  """Pre-norm residual block (`res_post`: the norms after each branch instead); `positions` (L,)
  turn on RoPE, `rope_angles` (L, head_dim/2) EVA's 2-D RoPE; `mask` (a `layers.Mask` or
  booleans, True = attend) and the attention's `implementation` as `layers.attention_heads`'."""
  attend = lambda h: attention(p, h, cfg, mask, q_pos=positions, k_pos=positions,
                               implementation=implementation, rope_angles=rope_angles)
  if cfg.norm_placement == 'res_post':
    x_NxLxD = x_NxLxD + layers.norm(p['ln_1'], attend(x_NxLxD), cfg.norm, cfg.norm_eps)
    out = layers.mlp(p['mlp'], x_NxLxD, cfg.mlp, cfg.norm, cfg.norm_eps)
    return x_NxLxD + layers.norm(p['ln_2'], out, cfg.norm, cfg.norm_eps)
  x_NxLxD = x_NxLxD + attend(layers.norm(p['ln_1'], x_NxLxD, cfg.norm, cfg.norm_eps))
  return x_NxLxD + mlp(p, x_NxLxD, cfg)


def causal_block_at(p, x_NxLxD, pos_N, cfg, positions=None, implementation='xla'):
  """`block` with a causal mask, evaluated only at one position per row: (N, D).

  Equal to `block(p, x, cfg, causal)[arange(N), pos_N]`, but the queries, the attention output
  and the MLP run on N rows instead of N*L; the keys and values still see every position <= pos
  (the first pos + 1 keys of each row: a key-length mask).
  """
  h_NxLxD = layers.norm(p['ln_1'], x_NxLxD, cfg.norm, cfg.norm_eps)
  take = lambda t: jnp.take_along_axis(t, pos_N[:, None, None], axis=1)  # (N, 1, D)
  mask = layers.Mask(kv_lengths_N=pos_N + 1)
  q_pos = None if positions is None else pos_N[:, None]
  out_Nx1xD = attention(p, take(h_NxLxD), cfg, mask, h_NxLxD, q_pos, positions, implementation)
  x_NxD = (take(x_NxLxD) + out_Nx1xD)[:, 0]
  return x_NxD + mlp(p, x_NxD, cfg)


def apply(p, x_NxLxD, cfg, mask=None, depth=None, execution=configs.Execution(), positions=None,
          rope_angles=None):
  """The first `depth` blocks (all by default); see `run_blocks` for `execution.remat` and
  `execution.scan`; the attention runs as `execution.attention` says. `execution.dtype` is the
  caller's to apply (the tower casts `x` and the weights)."""
  run = lambda bp, x: sharding.constrain_batch(block(bp, x, cfg, mask, positions,
                                                     execution.attention, rope_angles))
  return run_blocks(p, x_NxLxD, run, execution, depth)


def run_blocks(p, x_NxLxD, run, execution, depth=None):
  """`x = run(block_params, x)` for the first `depth` blocks of `p['resblocks']` (all by default).

  Stacked parameters, `execution.scan` or a `remat` policy run the blocks as one `lax.scan` over
  their stacked weights (per-layer weights are stacked on the fly): one block to compile. `remat`
  checkpoints each block ('block': keep its input; 'dots': also the weight matmuls). Remat needs
  the scan: in an unrolled loop XLA is free to schedule every recomputation early, and on the CPU
  it does, so the temporaries do not shrink at all (tests/train/test_training.py checks
  `memory_analysis`)."""
  blocks = p['resblocks']
  stacked = is_stacked(blocks)
  depth = num_layers(p) if depth is None else depth
  x_NxLxD = sharding.constrain_batch(x_NxLxD)
  if not depth:
    return x_NxLxD
  if stacked or execution.scan or execution.remat != 'none':
    if stacked:
      weights = blocks if depth == num_layers(p) else jax.tree.map(lambda a: a[:depth], blocks)
    else:
      weights = stack_blocks([blocks[str(i)] for i in range(depth)])

    def step(x, block_params):
      return run(block_params, x), None

    if execution.remat != 'none':
      step = jax.checkpoint(step, policy=REMAT_POLICIES[execution.remat])
    return jax.lax.scan(step, x_NxLxD, weights)[0]
  for i in range(depth):
    with jax.named_scope(f'resblock_{i}'):
      x_NxLxD = run(blocks[str(i)], x_NxLxD)
  return x_NxLxD
