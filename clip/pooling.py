"""Multi-head attention pooling (MAP, as SigLIP's head): a learned probe attends to the tokens,
then a residual MLP; the probe's output is the pooled feature. Used by both towers' `pool='map'`.

Params: `probe (1, D)`, `attn` (packed in-projection as nn.MultiheadAttention), `ln_2`, `mlp`.
"""
import jax
import jax.numpy as jnp

from clip import layers


def init(key, cfg):
  """A MAP head over `cfg.width` tokens with `cfg.map_heads` heads and the tower's norm / MLP."""
  width = cfg.width
  k = lambda i: jax.random.fold_in(key, i)
  std = width ** -0.5
  return {
      'probe': layers.normal(k(0), (1, width), std),
      'attn': layers.init_multi_head_attention(k(1), width, std, std, cfg.bias, cfg.map_heads),
      'ln_2': layers.init_norm(width, cfg.norm, cfg.bias),
      'mlp': layers.init_mlp(k(2), k(3), width, cfg.hidden_dim, cfg.mlp, cfg.bias,
                             (2 * width) ** -0.5, std),
  }


def apply(p, x_NxLxD, cfg, mask_NxL=None, implementation='xla'):
  """(N, L, D) tokens -> (N, D); `mask_NxL` (True = a real token) hides padding from the probe;
  the attention runs as `implementation` (`layers.attention_heads`)."""
  n, _, d = x_NxLxD.shape
  probe_Nx1xD = jnp.broadcast_to(p['probe'].astype(x_NxLxD.dtype), (n, 1, d))
  mask = None if mask_NxL is None else mask_NxL[:, None, None, :]
  y_Nx1xD = layers.multi_head_attention(p['attn'], probe_Nx1xD, cfg.map_heads, mask, x_NxLxD,
                                        cfg.norm, norm_eps=cfg.norm_eps,
                                        implementation=implementation)
  h_Nx1xD = layers.norm(p['ln_2'], y_Nx1xD, cfg.norm, cfg.norm_eps)
  y_Nx1xD = y_Nx1xD + layers.mlp(p['mlp'], h_Nx1xD, cfg.mlp, cfg.norm, cfg.norm_eps)
  return y_Nx1xD[:, 0]
