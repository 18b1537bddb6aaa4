"""clip/transformer.py's residual block against float64 numpy, for every block option (norms,
NormFormer, gated MLPs, qk-norm, no biases), with and without a causal mask; one causal position
equals the full block; the norm epsilon reaches every norm of a block; every tower's attention
runs as its `Execution` says, with structured masks."""
import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clip import configs
from clip import decoder
from clip import layers
from clip import resnet
from clip import text
from clip import transformer
from clip import vit
from tests.numpy_reference import BLOCK_OPTIONS
from tests.numpy_reference import MUST_DIFFER
from tests.numpy_reference import RTOL
from tests.numpy_reference import TEXT
from tests.numpy_reference import VISION
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


# ---------------------------------------------------------------- the attention every tower runs

def dot_product_attention_calls(monkeypatch, run, *args):
  """`(implementation, is_causal, key lengths given, dense mask given)` of every call
  `run(*args)` makes to `jax.nn.dot_product_attention` (traced by `jax.eval_shape`: nothing
  runs)."""
  calls, real = [], jax.nn.dot_product_attention

  def recording(*args, implementation=None, **kwargs):
    calls.append((implementation, kwargs['is_causal'],
                  kwargs['key_value_seq_lengths'] is not None, kwargs['mask'] is not None))
    return real(*args, implementation='xla', **kwargs)

  monkeypatch.setattr(jax.nn, 'dot_product_attention', recording)
  jax.eval_shape(run, *args)
  monkeypatch.undo()
  return calls


def tower_runs(execution):
  """{tower: (run, its abstract params, its attention calls' masks as `(is_causal, key lengths
  given, dense mask given)`)} for small towers of 2 blocks, `run(params)` under `execution`."""
  abstract = lambda init, *args: jax.eval_shape(lambda: init(jax.random.PRNGKey(0), *args))
  images = jnp.zeros((2, 24, 24, 3))
  tokens = jnp.zeros((2, 12), jnp.int32).at[:, 5].set(63)
  vit_map = configs.VisionConfig(**VISION, pool='map')
  rn = configs.VisionConfig('resnet', 8, (1, 1, 1, 1), 4, 64)
  openai_text = configs.TextConfig(**TEXT, eot_token_id=63)
  siglip_text = configs.TextConfig(**TEXT, eot_token_id=63, causal=False, pool='map')
  dcfg = configs.DecoderConfig(**TEXT, eot_token_id=63)
  dec = abstract(decoder.init, dcfg, VISION['width'])
  memory = jnp.zeros((2, 10, VISION['width']))
  cache = jax.eval_shape(lambda p: decoder.init_cache(p, memory, dcfg, execution), dec)
  both = (jnp.array([True, False]), jnp.ones((2, 12), bool))  # one bidirectional row
  plain, causal, lengths, dense = ((False, False, False), (True, False, False),
                                   (False, True, False), (False, False, True))
  return {
      'vit-map': (lambda p: vit.apply(p, images, vit_map, execution),
                  abstract(vit.init, vit_map, 16), [plain] * 3),
      'resnet': (lambda p: resnet.apply(p, jnp.zeros((2, 64, 64, 3)), rn, execution),
                 abstract(resnet.init, rn, 16), [plain]),
      'text-causal-eot': (lambda p: text.apply(p, tokens, openai_text, execution),
                          abstract(text.init, openai_text, 16), [causal, lengths]),
      'text-padded-map': (lambda p: text.apply(p, tokens, siglip_text, execution),
                          abstract(text.init, siglip_text, 16), [lengths] * 2 + [dense]),
      'decoder': (lambda p: decoder.apply(p, memory, tokens, dcfg, execution), dec,
                  [causal, plain] * 2),
      'decoder-bidirectional-rows': (
          lambda p: decoder.apply(p, memory, tokens, dcfg, execution, None, *both), dec,
          [dense, plain] * 2),
      'decoder-cached-step': (
          lambda p_cache: decoder.step(*p_cache, tokens[:, 0], 3, dcfg, execution), (dec, cache),
          [lengths, plain] * 2),
  }


@pytest.mark.parametrize('implementation', ['xla', 'cudnn', 'einsum'])
def test_every_tower_attends_as_its_execution_says(implementation, monkeypatch):
  """Every attention of every tower (blocks, causal EOT position, MAP and ResNet pools, the
  decoder's self- and cross-attention, its cached step) goes through `dot_product_attention`
  with the implementation asked for, causal and key-length masks structured (what lets cuDNN
  skip the masked blocks), or through the einsum only."""
  runs = tower_runs(configs.Execution(attention=implementation))
  for tower, (run, params, masks) in runs.items():
    calls = dot_product_attention_calls(monkeypatch, run, params)
    expected = [] if implementation == 'einsum' else [(implementation, *m) for m in masks]
    assert calls == expected, tower
