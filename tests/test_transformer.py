"""clip/transformer.py's residual block against float64 numpy, for every block option (norms,
NormFormer, gated MLPs, qk-norm, no biases), with and without a causal mask; one causal position
equals the full block; the norm epsilon reaches every norm of a block."""
import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clip import configs
from clip import transformer
from tests.numpy_reference import BLOCK_OPTIONS
from tests.numpy_reference import MUST_DIFFER
from tests.numpy_reference import RTOL
from tests.numpy_reference import TEXT
from tests.numpy_reference import np_block
from tests.numpy_reference import perturbed
from tests.numpy_reference import rel_err
from tests.numpy_reference import to_np


@pytest.mark.parametrize('name', sorted(BLOCK_OPTIONS))
def test_block_matches_numpy(name):
  cfg = configs.TextConfig(**TEXT, **BLOCK_OPTIONS[name], causal=False)
  p = perturbed(transformer.init_block(jax.random.PRNGKey(0), cfg, cfg.layers))
  x = np.random.default_rng(1).standard_normal((2, 7, 32)).astype(np.float32)
  causal = np.tril(np.ones((7, 7), bool))
  for mask in (None, causal):
    out = transformer.block(p, x, cfg, mask)
    assert rel_err(out, np_block(to_np(p), x.astype(np.float64), cfg, mask)) < RTOL
  expected_keys = {'ln_1', 'attn', 'ln_2', 'mlp'} | (
      {'ln_attn'} if cfg.norm_placement == 'normformer' else set())
  assert set(p) == expected_keys
  assert ('c_gate' in p['mlp']) == (cfg.mlp in ('geglu', 'swiglu'))
  assert p['mlp']['c_fc']['weight'].shape == (cfg.hidden_dim, 32)
  assert ('bias' in p['ln_1']) == (cfg.bias and cfg.norm == 'layernorm')
  assert ('in_proj_bias' in p['attn']) == cfg.bias


@pytest.mark.parametrize('name', ['openai', 'everything', 'normformer'])
def test_causal_block_at_one_position_equals_the_full_block(name):
  cfg = configs.TextConfig(**TEXT, **BLOCK_OPTIONS[name], pos_embedding='rope')
  p = perturbed(transformer.init_block(jax.random.PRNGKey(0), cfg, cfg.layers))
  x = np.random.default_rng(1).standard_normal((3, 7, 32)).astype(np.float32)
  pos_N = jnp.array([6, 0, 3])
  positions = jnp.arange(7)
  full = transformer.block(p, x, cfg, jnp.tril(jnp.ones((7, 7), bool)), positions)
  chex.assert_trees_all_close(transformer.causal_block_at(p, x, pos_N, cfg, positions),
                              full[jnp.arange(3), pos_N], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('options', [dict(norm_placement='normformer', qk_norm=True),
                                     BLOCK_OPTIONS['everything']])
def test_norm_eps_reaches_every_norm_of_a_block(options):
  """An epsilon comparable to the activations' variance makes every norm depend on it: ln_1, ln_2,
  NormFormer's ln_attn and mlp.ln, qk-norm's q_norm and k_norm; also at one causal position."""
  cfg = configs.TextConfig(**TEXT, **options, norm_eps=0.5)
  p = perturbed(transformer.init_block(jax.random.PRNGKey(0), cfg, cfg.layers))
  x = np.random.default_rng(1).standard_normal((3, 7, 32)).astype(np.float32)
  causal = np.tril(np.ones((7, 7), bool))
  expected = np_block(to_np(p), x.astype(np.float64), cfg, causal)
  out = transformer.block(p, x, cfg, causal)
  assert rel_err(out, expected) < RTOL
  default_eps = dataclasses.replace(cfg, norm_eps=None)
  assert rel_err(out, np_block(to_np(p), x.astype(np.float64), default_eps, causal)) > MUST_DIFFER
  pos_N = np.array([6, 0, 3])
  at = transformer.causal_block_at(p, x, jnp.asarray(pos_N), cfg)
  assert rel_err(at, expected[np.arange(3), pos_N]) < RTOL
