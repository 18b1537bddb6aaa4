"""The custom-architecture options of the towers (issue 9), each against an independent numpy
definition: norms, NormFormer, gated MLPs, qk-norm, biases, RoPE, sin-cos positions, registers,
cls / gap / map pooling, bidirectional text with padding; stacked (scan) vs per-layer layouts.
SigLIP's and open_clip's options too: tanh GELU, norm epsilon, patch bias, no ln_pre, last-position
text pooling over unmasked padding, a biased text projection and the logit bias."""
import dataclasses
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import clip
from clip import configs
from clip import layers
from clip import sharding
from clip import text
from clip import training
from clip import transformer
from clip import vit

RTOL = 2e-5
ACT_TOL = 2e-6  # an fp32 activation against its float64 formula, for |x| <= 6
MUST_DIFFER = 3 * RTOL  # a wrong option (GELU swapped, default epsilon) moves the output more


# ---------------------------------------------------------------- numpy definitions

def np_norm(p, x, kind, eps=None):
  """`eps` None: torch's LayerNorm default 1e-5, or 1e-6 for RMSNorm."""
  p = {k: np.asarray(v, np.float64) for k, v in p.items()}
  if kind == 'rmsnorm':
    eps = 1e-6 if eps is None else eps
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * p['weight']
  eps = 1e-5 if eps is None else eps
  y = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + eps) * p['weight']
  return y + p.get('bias', 0.0)


def np_act(kind, x):
  if kind == 'quick_gelu':
    return x / (1 + np.exp(-1.702 * x))
  if kind == 'swiglu':
    return x / (1 + np.exp(-x))
  if kind == 'gelu_tanh':
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))
  erf = np.vectorize(math.erf)
  return 0.5 * x * (1 + erf(x / np.sqrt(2)))  # exact GELU (gelu, geglu)


def np_linear(p, x):
  return x @ np.asarray(p['weight'], np.float64).T + np.asarray(p.get('bias', 0.0), np.float64)


def np_rope(x, positions, theta=10000.0):
  """RoPE by its complex-number definition: pair (i, i + d/2) times exp(i * pos * theta^(-2i/d))."""
  half = x.shape[-1] // 2
  freqs = theta ** (-np.arange(half) / half)
  z = (x[..., :half] + 1j * x[..., half:]) * np.exp(
      1j * np.asarray(positions, np.float64)[..., None, None] * freqs)
  return np.concatenate([z.real, z.imag], -1)


def np_mha(p, xq, xkv, heads, norm_kind, mask=None, q_pos=None, k_pos=None, theta=10000.0,
           eps=None):
  d = xq.shape[-1]
  w = np.asarray(p['in_proj_weight'], np.float64)
  b = np.asarray(p.get('in_proj_bias', np.zeros(3 * d)), np.float64)
  split = lambda t: t.reshape(*t.shape[:-1], heads, d // heads)
  q, k, v = (split(x @ w[i * d:(i + 1) * d].T + b[i * d:(i + 1) * d])
             for i, x in enumerate((xq, xkv, xkv)))
  if 'q_norm' in p:
    q, k = np_norm(p['q_norm'], q, norm_kind, eps), np_norm(p['k_norm'], k, norm_kind, eps)
  if q_pos is not None:
    q, k = np_rope(q, q_pos, theta), np_rope(k, k_pos, theta)
  scores = np.einsum('nqhd,nkhd->nhqk', q, k) / np.sqrt(d // heads)
  if mask is not None:
    scores = np.where(mask, scores, -np.inf)
  probs = np.exp(scores - scores.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  out = np.einsum('nhqk,nkhd->nqhd', probs, v)
  if 'head_scale' in p:
    out = out * np.asarray(p['head_scale'], np.float64)[:, None]
  return np_linear(p['out_proj'], out.reshape(*out.shape[:2], d))


def np_mlp(p, x, kind, norm_kind, eps=None):
  if 'c_gate' in p:
    h = np_act(kind, np_linear(p['c_gate'], x)) * np_linear(p['c_fc'], x)
  else:
    h = np_act(kind, np_linear(p['c_fc'], x))
  if 'ln' in p:
    h = np_norm(p['ln'], h, norm_kind, eps)
  return np_linear(p['c_proj'], h)


def np_block(p, x, cfg, mask=None, positions=None):
  eps = cfg.norm_eps
  h = np_norm(p['ln_1'], x, cfg.norm, eps)
  a = np_mha(p['attn'], h, h, cfg.heads, cfg.norm, mask, positions, positions,
             getattr(cfg, 'rope_theta', 1e4), eps)
  if 'ln_attn' in p:
    a = np_norm(p['ln_attn'], a, cfg.norm, eps)
  x = x + a
  return x + np_mlp(p['mlp'], np_norm(p['ln_2'], x, cfg.norm, eps), cfg.mlp, cfg.norm, eps)


def np_map(p, x, cfg, mask=None):
  eps = cfg.norm_eps
  probe = np.broadcast_to(np.asarray(p['probe'], np.float64), (x.shape[0], 1, x.shape[-1]))
  y = np_mha(p['attn'], probe, x, cfg.map_heads, cfg.norm,
             None if mask is None else mask[:, None, None, :], eps=eps)
  y = y + np_mlp(p['mlp'], np_norm(p['ln_2'], y, cfg.norm, eps), cfg.mlp, cfg.norm, eps)
  return y[:, 0]


def np_sincos(grid, width, temperature=10000.0):
  """The 2-D sin-cos table written out element by element."""
  quarter = width // 4
  table = np.zeros((grid * grid, width))
  for y in range(grid):
    for x in range(grid):
      for k in range(quarter):
        omega = temperature ** (-k / (quarter - 1))
        row = y * grid + x
        table[row, k] = math.sin(x * omega)
        table[row, quarter + k] = math.cos(x * omega)
        table[row, 2 * quarter + k] = math.sin(y * omega)
        table[row, 3 * quarter + k] = math.cos(y * omega)
  return table


def np_vision(p, images, cfg):
  g, s, d = cfg.grid_size, cfg.patch_size, cfg.width
  n = images.shape[0]
  patches = images.reshape(n, g, s, g, s, 3).transpose(0, 1, 3, 5, 2, 4).reshape(n, g * g, -1)
  x = patches @ np.asarray(p['conv1']['weight'], np.float64).reshape(d, -1).T
  if cfg.patch_bias:
    x = x + np.asarray(p['conv1']['bias'])
  cls = cfg.pool == 'cls'
  if cls:
    x = np.concatenate([np.broadcast_to(np.asarray(p['class_embedding']), (n, 1, d)), x], 1)
  if cfg.pos_embedding == 'learned':
    x = x + np.asarray(p['positional_embedding'])
  else:
    x = x + np.concatenate([np.zeros((int(cls), d)), np_sincos(g, d)])
  if cfg.registers:
    regs = np.broadcast_to(np.asarray(p['registers']), (n, cfg.registers, d))
    x = np.concatenate([x[:, :int(cls)], regs, x[:, int(cls):]], 1)
  if cfg.ln_pre:
    x = np_norm(p['ln_pre'], x, cfg.norm, cfg.norm_eps)
  for i in range(cfg.layers):
    x = np_block(p['transformer']['resblocks'][str(i)], x, cfg)
  if cls:
    pooled = np_norm(p['ln_post'], x[:, 0], cfg.norm, cfg.norm_eps)
  else:
    tokens = np_norm(p['ln_post'], x if cfg.pool_registers else x[:, cfg.registers:], cfg.norm,
                     cfg.norm_eps)
    pooled = tokens.mean(1) if cfg.pool == 'gap' else np_map(p['attn_pool'], tokens, cfg)
  return pooled @ np.asarray(p['proj']) if 'proj' in p else pooled


def np_text(p, tokens, cfg):
  n, length = tokens.shape
  x = np.asarray(p['token_embedding']['weight'], np.float64)[tokens]
  if cfg.pos_embedding == 'learned':
    x = x + np.asarray(p['positional_embedding'])[:length]
  positions = np.arange(length) if cfg.pos_embedding == 'rope' else None
  eot = tokens.argmax(-1)
  valid = np.arange(length)[None] <= eot[:, None] if cfg.mask_padding else None
  if cfg.causal:
    mask = np.tril(np.ones((length, length), bool))
  else:
    mask = None if valid is None else valid[:, None, None, :]
  for i in range(cfg.layers):
    x = np_block(p['transformer']['resblocks'][str(i)], x, cfg, mask, positions)
  x = np_norm(p['ln_final'], x, cfg.norm, cfg.norm_eps)
  if cfg.pool == 'map':
    pooled = np_map(p['attn_pool'], x, cfg, valid)
  else:
    pooled = x[np.arange(n), {'eot': eot, 'first': 0, 'last': length - 1}[cfg.pool]]
  if cfg.projection_bias:
    return np_linear(p['text_projection'], pooled)  # nn.Linear: (embed_dim, width) and a bias
  return pooled @ np.asarray(p['text_projection']) if 'text_projection' in p else pooled


def perturbed(params, seed=0):
  """Every leaf moved off its initial value (ones, zeros), so each parameter matters."""
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  return treedef.unflatten([x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


def to_np(params):
  return jax.tree.map(lambda x: np.asarray(x, np.float64), params)


def rel_err(actual, expected):
  return float(np.abs(np.asarray(actual, np.float64) - expected).max() / np.abs(expected).max())


def text_tokens(rng, n, length, vocab):
  """Rows of SOT, words, EOT (the largest id), then zero padding; various lengths."""
  tokens = np.zeros((n, length), np.int32)
  for i in range(n):
    m = int(rng.integers(1, length - 1))
    tokens[i, :m] = rng.integers(1, vocab - 1, m)
    tokens[i, m] = vocab - 1
  return tokens


VISION = dict(arch='vit', width=32, layers=2, heads=4, image_resolution=24, patch_size=8)
TEXT = dict(width=32, layers=2, heads=4, context_length=12, vocab_size=64)

BLOCK_OPTIONS = {
    'openai': {},
    'rmsnorm': dict(norm='rmsnorm'),
    'normformer': dict(norm_placement='normformer'),
    'gelu': dict(mlp='gelu', mlp_dim=48),
    'gelu_tanh': dict(mlp='gelu_tanh'),
    'geglu': dict(mlp='geglu'),
    'swiglu': dict(mlp='swiglu', mlp_dim=40),
    'qk_norm': dict(qk_norm=True),
    'no_bias': dict(bias=False),
    'everything': dict(norm='rmsnorm', norm_placement='normformer', mlp='swiglu', qk_norm=True,
                       bias=False),
}


# ---------------------------------------------------------------- primitives

def test_rms_norm_matches_its_definition():
  x = np.random.default_rng(0).standard_normal((3, 5, 16)).astype(np.float32)
  p = {'weight': np.linspace(0.5, 2, 16).astype(np.float32)}
  np.testing.assert_allclose(layers.rms_norm(p, x), np_norm(p, x.astype(np.float64), 'rmsnorm'),
                             rtol=1e-5, atol=1e-6)
  assert layers.init_norm(16, 'rmsnorm').keys() == {'weight'}


def test_rope_matches_the_complex_definition_and_scores_depend_on_offsets_only():
  rng = np.random.default_rng(0)
  q, k = rng.standard_normal((2, 1, 6, 2, 8)).astype(np.float32)
  pos = np.arange(6)
  np.testing.assert_allclose(layers.rope(q, pos), np_rope(q.astype(np.float64), pos), atol=1e-5)
  score = lambda m, n: float(jnp.vdot(layers.rope(q[:, :1], jnp.array([m]))[0, 0, 0],
                                      layers.rope(k[:, :1], jnp.array([n]))[0, 0, 0]))
  for m, n, shift in ((3, 1, 5), (0, 4, 11), (7, 7, 2)):
    assert score(m, n) == pytest.approx(score(m + shift, n + shift), abs=1e-4)
  assert abs(score(3, 1) - score(3, 2)) > 1e-3  # and the offset does matter
  np.testing.assert_allclose(np.linalg.norm(layers.rope(q, pos), axis=-1),
                             np.linalg.norm(q, axis=-1), rtol=1e-5)  # a rotation


def test_sincos_table_matches_its_formula():
  np.testing.assert_allclose(layers.sincos_2d(5, 24), np_sincos(5, 24), atol=1e-6)


def test_gelu_tanh_is_the_tanh_formula_not_the_exact_gelu():
  x = np.linspace(-6, 6, 1201).astype(np.float32)
  x64 = x.astype(np.float64)
  for kind in ('gelu_tanh', 'gelu'):
    np.testing.assert_allclose(layers.ACTIVATIONS[kind](x), np_act(kind, x64), rtol=0, atol=ACT_TOL)
  gap = np.abs(np_act('gelu_tanh', x64) - np_act('gelu', x64)).max()  # 4.7e-4 at |x| = 2.7
  assert gap > 100 * ACT_TOL
  # and a block would notice the swap
  cfg = configs.TextConfig(**TEXT, mlp='gelu_tanh', causal=False)
  p = perturbed(transformer.init_block(jax.random.PRNGKey(0), cfg, cfg.layers))
  x = np.random.default_rng(1).standard_normal((2, 7, 32)).astype(np.float32)
  out = transformer.block(p, x, cfg)
  assert rel_err(out, np_block(to_np(p), x.astype(np.float64), cfg)) < RTOL
  exact = dataclasses.replace(cfg, mlp='gelu')
  assert rel_err(out, np_block(to_np(p), x.astype(np.float64), exact)) > MUST_DIFFER


def test_norm_epsilon_matters_on_small_variance_rows():
  """Rows of variance ~1e-6, where 1e-6 and 1e-5 give different norms: the epsilon given is used,
  and None is each kind's default (LayerNorm 1e-5 as torch, RMSNorm 1e-6)."""
  x = (1e-3 * (np.random.default_rng(0).standard_normal((4, 16)) + 0.5)).astype(np.float32)
  x64 = x.astype(np.float64)
  for kind in ('layernorm', 'rmsnorm'):
    p = perturbed(layers.init_norm(16, kind))
    for eps in (None, 1e-6, 1e-5):
      assert rel_err(layers.norm(p, x, kind, eps), np_norm(p, x64, kind, eps)) < RTOL
    assert rel_err(np_norm(p, x64, kind, 1e-6), np_norm(p, x64, kind, 1e-5)) > MUST_DIFFER
  p = perturbed(layers.init_norm(16))
  assert rel_err(layers.norm(p, x), np_norm(p, x64, 'layernorm', 1e-6)) > MUST_DIFFER  # 1e-5


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


# ---------------------------------------------------------------- towers

VISION_CASES = {
    'cls': {},
    'gap': dict(pool='gap'),
    'gap-registers-dropped': dict(pool='gap', registers=3),
    'gap-registers-kept': dict(pool='gap', registers=3, pool_registers=True),
    'map': dict(pool='map', pool_heads=2),
    'map-sincos-registers': dict(pool='map', pos_embedding='sincos2d', registers=2),
    'cls-sincos-registers': dict(pos_embedding='sincos2d', registers=1),
    'siglip-like': dict(pool='map', pos_embedding='sincos2d', mlp='gelu', norm='rmsnorm',
                        qk_norm=True, projection=False),
    'cls-patch-bias-norm-eps': dict(patch_bias=True, norm_eps=0.5),  # ln_pre=False: SIGLIP_LIKE
}


@pytest.mark.parametrize('name', sorted(VISION_CASES))
def test_vision_tower_matches_numpy(name):
  vision = configs.VisionConfig(**VISION, **VISION_CASES[name])
  cfg = configs.CLIPConfig(32, vision, configs.TextConfig(**TEXT))
  params = perturbed(clip.init(jax.random.PRNGKey(0), cfg))
  images = np.random.default_rng(2).standard_normal((2, 24, 24, 3)).astype(np.float32)
  out = clip.encode_image(params, images, cfg)
  assert rel_err(out, np_vision(to_np(params['visual']), images.astype(np.float64), vision)) < RTOL
  assert ('class_embedding' in params['visual']) == (vision.pool == 'cls')
  assert ('positional_embedding' in params['visual']) == (vision.pos_embedding == 'learned')
  assert ('attn_pool' in params['visual']) == (vision.pool == 'map')
  assert ('ln_pre' in params['visual']) == vision.ln_pre
  assert ('bias' in params['visual']['conv1']) == vision.patch_bias
  if vision.norm_eps is not None:
    default_eps = dataclasses.replace(vision, norm_eps=None)
    assert rel_err(out, np_vision(to_np(params['visual']), images.astype(np.float64),
                                  default_eps)) > MUST_DIFFER


def test_gap_pooling_is_the_mean_of_the_patch_tokens():
  """Pooling alone, against numpy on the tower's own tokens: registers dropped unless kept."""
  for keep in (False, True):
    vision = configs.VisionConfig(**VISION, pool='gap', registers=2, pool_registers=keep,
                                  projection=False)
    cfg = configs.CLIPConfig(32, vision, configs.TextConfig(**TEXT))
    p = perturbed(clip.init(jax.random.PRNGKey(0), cfg))['visual']
    images = np.random.default_rng(3).standard_normal((2, 24, 24, 3)).astype(np.float32)
    tokens = np.asarray(vit.tokens(p, images, vision), np.float64)
    assert tokens.shape == (2, 2 + 9, 32)
    expected = np_norm(to_np(p)['ln_post'], tokens if keep else tokens[:, 2:], 'layernorm').mean(1)
    assert rel_err(vit.pool(p, jnp.asarray(tokens, jnp.float32), vision), expected) < RTOL


TEXT_CASES = {
    'eot-causal': {},
    'eot-bidirectional': dict(causal=False),
    'first-bidirectional': dict(pool='first', causal=False),
    'map-causal': dict(pool='map'),
    'map-bidirectional-rope': dict(pool='map', causal=False, pos_embedding='rope'),
    'eot-rope-everything': dict(pos_embedding='rope', rope_theta=500.0,
                                **BLOCK_OPTIONS['everything']),
    'no-projection': dict(projection=False, mlp='geglu'),
    'map-bidirectional-unmasked-norm-eps': dict(pool='map', causal=False, mask_padding=False,
                                                norm_eps=0.5),
    'eot-norm-eps-gelu-tanh': dict(norm_eps=0.5, mlp='gelu_tanh', qk_norm=True),
}


@pytest.mark.parametrize('name', sorted(TEXT_CASES))
def test_text_tower_matches_numpy(name):
  text_cfg = configs.TextConfig(**TEXT, **TEXT_CASES[name])
  cfg = configs.CLIPConfig(32, configs.VisionConfig(**VISION), text_cfg)
  params = perturbed(clip.init(jax.random.PRNGKey(0), cfg))
  tokens = text_tokens(np.random.default_rng(4), 5, 12, 64)
  out = clip.encode_text(params, tokens, cfg)
  assert rel_err(out, np_text(to_np(params), tokens, text_cfg)) < RTOL
  assert ('positional_embedding' in params) == (text_cfg.pos_embedding == 'learned')
  assert isinstance(params.get('text_projection'), dict) == text_cfg.projection_bias
  if text_cfg.norm_eps is not None:
    default_eps = dataclasses.replace(text_cfg, norm_eps=None)
    assert rel_err(out, np_text(to_np(params), tokens, default_eps)) > MUST_DIFFER


@pytest.mark.parametrize('text_options', [dict(causal=False), dict(causal=False, pool='map'),
                                          dict(pool='map')])
def test_padding_after_eot_is_masked_out(text_options):
  cfg = configs.CLIPConfig(32, configs.VisionConfig(**VISION),
                           configs.TextConfig(**TEXT, **text_options))
  params = perturbed(clip.init(jax.random.PRNGKey(0), cfg))
  tokens = text_tokens(np.random.default_rng(5), 4, 12, 64)
  noisy = tokens.copy()
  after_eot = np.arange(12)[None] > tokens.argmax(-1)[:, None]
  noisy[after_eot] = np.random.default_rng(6).integers(1, 60, after_eot.sum())
  chex.assert_trees_all_close(clip.encode_text(params, noisy, cfg),
                              clip.encode_text(params, tokens, cfg), rtol=1e-5, atol=1e-6)


def test_last_position_pooling_with_and_without_the_padding_mask():
  """pool='last' against numpy. mask_padding=False (SigLIP) attends to the padding: other padding
  tokens change every row. Masked, they change nothing (the pooled last position keeps its
  token)."""
  tokens = np.pad(text_tokens(np.random.default_rng(5), 4, 10, 64), ((0, 0), (0, 2)))
  between = (np.arange(12)[None] > tokens.argmax(-1)[:, None]) & (np.arange(12)[None] < 11)
  noisy = tokens.copy()
  noisy[between] = np.random.default_rng(6).integers(1, 60, between.sum())
  for mask_padding in (True, False):
    text_cfg = configs.TextConfig(**TEXT, pool='last', causal=False, mask_padding=mask_padding)
    cfg = configs.CLIPConfig(32, configs.VisionConfig(**VISION), text_cfg)
    params = perturbed(text.init(jax.random.PRNGKey(0), text_cfg, 32))
    clean, changed = clip.encode_text(params, tokens, cfg), clip.encode_text(params, noisy, cfg)
    assert rel_err(clean, np_text(to_np(params), tokens, text_cfg)) < RTOL
    assert rel_err(changed, np_text(to_np(params), noisy, text_cfg)) < RTOL
    if mask_padding:
      chex.assert_trees_all_close(changed, clean, rtol=1e-5, atol=1e-6)
    else:
      for row in range(4):
        assert rel_err(changed[row], np.asarray(clean[row], np.float64)) > MUST_DIFFER


def test_biased_text_projection_is_a_torch_linear():
  """projection_bias=True: `text_projection` in nn.Linear's layout, weight (embed_dim, width)."""
  text_cfg = configs.TextConfig(**TEXT, projection_bias=True)
  cfg = configs.CLIPConfig(16, configs.VisionConfig(**VISION), text_cfg)
  params = perturbed(text.init(jax.random.PRNGKey(0), text_cfg, 16))  # the text tower's keys only
  assert jax.tree.map(jnp.shape, params['text_projection']) == {'weight': (16, 32), 'bias': (16,)}
  tokens = text_tokens(np.random.default_rng(4), 5, 12, 64)
  out = clip.encode_text(params, tokens, cfg)
  chex.assert_shape(out, (5, 16))
  assert rel_err(out, np_text(to_np(params), tokens, text_cfg)) < RTOL


# ---------------------------------------------------------------- SigLIP

SIGLIP_LIKE = configs.CLIPConfig(
    32, configs.VisionConfig(**VISION, pool='map', ln_pre=False, patch_bias=True, mlp='gelu_tanh',
                             norm_eps=1e-6, projection=False),
    configs.TextConfig(**TEXT, causal=False, mask_padding=False, pool='last', projection_bias=True,
                       mlp='gelu_tanh', norm_eps=1e-6), logit_bias=True)


def shrink_residual_stream(params, factor=1e-3):
  """Every writer into the residual streams (embeddings, attention and MLP outputs, in the blocks
  and the MAP head) scaled down: each norm then sees a variance of 1e-8 to 3e-6, where an epsilon
  of 1e-5 instead of 1e-6 changes the output."""
  writers = ('conv1', 'positional_embedding', 'token_embedding', 'out_proj', 'c_proj')
  return jax.tree_util.tree_map_with_path(
      lambda path, x: x * factor if any(w in jax.tree_util.keystr(path) for w in writers) else x,
      params)


def test_siglip_like_towers_and_biased_logits_match_numpy():
  params = shrink_residual_stream(perturbed(clip.init(jax.random.PRNGKey(0), SIGLIP_LIKE)))
  visual, vision, text_cfg = params['visual'], SIGLIP_LIKE.vision, SIGLIP_LIKE.text
  assert 'ln_pre' not in visual and 'proj' not in visual and 'bias' in visual['conv1']
  assert set(params['text_projection']) == {'weight', 'bias'}
  images = np.random.default_rng(2).standard_normal((3, 24, 24, 3)).astype(np.float32)
  tokens = text_tokens(np.random.default_rng(4), 4, 12, 64)
  np_params = to_np(params)
  img = np_vision(np_params['visual'], images.astype(np.float64), vision)
  txt = np_text(np_params, tokens, text_cfg)
  img_out = clip.encode_image(params, images, SIGLIP_LIKE)
  txt_out = clip.encode_text(params, tokens, SIGLIP_LIKE)
  assert rel_err(img_out, img) < RTOL
  assert rel_err(txt_out, txt) < RTOL
  for wrong in (dict(norm_eps=None), dict(mlp='gelu')):  # each option shows in each tower
    assert rel_err(img_out, np_vision(np_params['visual'], images.astype(np.float64),
                                      dataclasses.replace(vision, **wrong))) > MUST_DIFFER
    assert rel_err(txt_out, np_text(np_params, tokens,
                                    dataclasses.replace(text_cfg, **wrong))) > MUST_DIFFER

  logits_per_image, logits_per_text = clip.apply(params, images, tokens, SIGLIP_LIKE)
  unit = lambda f: f / np.linalg.norm(f, axis=-1, keepdims=True)
  expected = (np.exp(np_params['logit_scale']) * unit(img) @ unit(txt).T
              + np_params['logit_bias'])
  assert rel_err(logits_per_image, expected) < RTOL
  assert rel_err(logits_per_text, expected.T) < RTOL


# ---------------------------------------------------------------- stacked layout

SCAN_CASE = configs.CLIPConfig(
    32, configs.VisionConfig(**VISION, pool='map', registers=2, norm='rmsnorm', mlp='geglu'),
    configs.TextConfig(**TEXT, pos_embedding='rope', qk_norm=True), logit_bias=True)


@pytest.mark.parametrize('remat', ['none', 'block', 'dots'])
def test_stacked_layout_gives_identical_outputs_and_gradients(remat):
  per_layer = perturbed(clip.init(jax.random.PRNGKey(0), SCAN_CASE))
  stacked = clip.stack_layers(per_layer)
  scan_cfg = dataclasses.replace(SCAN_CASE, scan=True, remat=remat)
  assert stacked['transformer']['resblocks']['attn']['in_proj_weight'].shape == (2, 96, 32)
  images = np.random.default_rng(7).standard_normal((2, 24, 24, 3)).astype(np.float32)
  tokens = text_tokens(np.random.default_rng(8), 2, 12, 64)

  def loss(params, cfg):
    logits, _ = clip.apply(params, images, tokens, cfg)
    return jnp.sum(jnp.sin(logits))

  value, grads = jax.value_and_grad(loss)(per_layer, SCAN_CASE)
  value_s, grads_s = jax.value_and_grad(loss)(stacked, scan_cfg)
  np.testing.assert_allclose(value_s, value, rtol=1e-5)
  chex.assert_trees_all_close(clip.unstack_layers(grads_s), grads, rtol=1e-4, atol=2e-5)


def test_stack_unstack_round_trip_and_torch_export():
  per_layer = clip.init(jax.random.PRNGKey(0), SCAN_CASE)
  stacked = clip.init(jax.random.PRNGKey(0), dataclasses.replace(SCAN_CASE, scan=True))
  chex.assert_trees_all_equal(clip.stack_layers(per_layer), stacked)
  chex.assert_trees_all_equal(clip.unstack_layers(stacked), per_layer)
  chex.assert_trees_all_equal(clip.stack_layers(stacked), stacked)  # idempotent
  exported = clip.to_torch_state_dict(stacked)
  assert 'visual.transformer.resblocks.1.mlp.c_gate.weight' in exported
  assert exported.keys() == clip.to_torch_state_dict(per_layer).keys()


def test_stacking_a_gap_in_the_layers_is_a_clear_error():
  per_layer = clip.init(jax.random.PRNGKey(0), SCAN_CASE)
  blocks = per_layer['transformer']['resblocks']
  blocks['2'] = blocks.pop('1')
  with pytest.raises(ValueError, match=r"numbered 0\.\.1 to be stacked; got \['0', '2'\]"):
    clip.stack_layers(per_layer)


def test_stacked_parameters_shard_with_an_unsplit_layer_axis():
  stacked = jax.eval_shape(clip.init, jax.random.PRNGKey(0), dataclasses.replace(SCAN_CASE, scan=True))
  specs = sharding.param_specs(stacked)
  assert specs['visual']['transformer']['resblocks']['attn']['in_proj_weight'] == \
      sharding.P(None, 'tensor', 'fsdp')
  assert specs['transformer']['resblocks']['mlp']['c_proj']['weight'] == \
      sharding.P(None, 'fsdp', 'tensor')
  assert specs['visual']['attn_pool']['attn']['in_proj_weight'] == sharding.P('tensor', 'fsdp')


# ---------------------------------------------------------------- configs

def test_logit_bias_starts_as_siglip():
  params = clip.init(jax.random.PRNGKey(0), SCAN_CASE)
  assert float(params['logit_bias']) == -10.0
  assert float(params['logit_scale']) == pytest.approx(math.log(10.0))


def test_sincos_and_gap_models_change_resolution():
  from clip import weights  # pylint: disable=g-import-not-at-top
  for options in (dict(pool='gap'), dict(pool='map', pos_embedding='sincos2d')):
    cfg = configs.CLIPConfig(32, configs.VisionConfig(**VISION, **options), configs.TextConfig(**TEXT))
    params = clip.init(jax.random.PRNGKey(0), cfg)
    new_params, new_cfg = weights.interpolate_pos_embed(params, cfg, 32)
    if 'positional_embedding' in params['visual']:
      assert new_params['visual']['positional_embedding'].shape == (16, 32)
    out = clip.encode_image(new_params, np.zeros((1, 32, 32, 3), np.float32), new_cfg)
    chex.assert_tree_all_finite(out)


@pytest.mark.parametrize('make, message', [
    (lambda: configs.VisionConfig(**VISION, pool='map', pool_heads=0), 'pool_heads'),
    (lambda: configs.VisionConfig(**VISION, pool='map', pool_heads=3), 'map-pooling heads'),
    (lambda: configs.VisionConfig(**VISION, pool='avg'), "pool must be one of"),
    (lambda: configs.VisionConfig(**{**VISION, 'width': 30, 'heads': 3}, pos_embedding='sincos2d'),
     'divisible by 4'),
    (lambda: configs.VisionConfig(**VISION, registers=2, pool_registers=True), 'pool_registers'),
    (lambda: configs.VisionConfig('resnet', 8, (1, 1, 1, 1), 4, 64, norm='rmsnorm'),
     'not to a ResNet'),
    (lambda: configs.TextConfig(**{**TEXT, 'width': 24, 'heads': 8}, pos_embedding='rope'),
     'must be even'),
    (lambda: configs.TextConfig(**TEXT, pool='first'), 'first token only'),
    (lambda: configs.TextConfig(**TEXT, mlp='relu'), 'mlp must be one of'),
    (lambda: configs.TextConfig(**TEXT, norm='batchnorm'), 'norm must be one of'),
    (lambda: configs.TextConfig(**TEXT, causal=False, mask_padding=False),
     'mask_padding=False would let'),
    (lambda: configs.TextConfig(**TEXT, projection=False, projection_bias=True),
     'projection_bias=True needs projection=True'),
    (lambda: configs.TextConfig(**TEXT, norm_eps=0.0), 'norm_eps must be None'),
    (lambda: configs.VisionConfig('resnet', 8, (1, 1, 1, 1), 4, 64, ln_pre=False),
     r"not to a ResNet: \['ln_pre=False'\]"),
    (lambda: configs.VisionConfig('resnet', 8, (1, 1, 1, 1), 4, 64, patch_bias=True),
     r"not to a ResNet: \['patch_bias=True'\]"),
    (lambda: configs.CLIPConfig(16, configs.VisionConfig(**VISION, projection=False),
                                configs.TextConfig(**TEXT)), 'projection=False'),
    (lambda: configs.CLIPConfig(32, configs.VisionConfig(**VISION), configs.TextConfig(**TEXT),
                                remat='full'), 'remat must be one of'),
])
def test_bad_combinations_are_rejected_when_built(make, message):
  with pytest.raises(ValueError, match=message):
    make()


# ---------------------------------------------------------------- training

def test_custom_architecture_trains_the_same_on_every_strategy():
  """Stacked blocks, MAP heads, RoPE, NormFormer, SwiGLU, qk-norm and registers under data,
  FSDP and tensor parallelism follow the single-device trajectory."""
  from tests.test_training import batches, run, single_device_mesh  # pylint: disable=g-import-not-at-top
  block = dict(norm='rmsnorm', norm_placement='normformer', mlp='swiglu', qk_norm=True)
  cfg = configs.CLIPConfig(
      32, configs.VisionConfig(**VISION, pool='map', registers=2, pos_embedding='sincos2d', **block),
      configs.TextConfig(**TEXT, pos_embedding='rope', pool='map', causal=False, **block),
      scan=True, remat='dots', logit_bias=True)
  tcfg = training.TrainConfig(batch_size=16, total_steps=3, warmup_steps=1, loss='sigmoid')
  data = batches(cfg, 16, 3)
  _, reference = run(cfg, tcfg, single_device_mesh(), data)
  for sizes in [(2, 2, 2), (1, 2, 4)]:
    _, history = run(cfg, tcfg, sharding.make_mesh(*sizes), data)
    for key in ('loss', 'grad_norm', 'logit_bias'):
      np.testing.assert_allclose([h[key] for h in history], [h[key] for h in reference],
                                 rtol=5e-5, err_msg=f'{key} on mesh {sizes}')
  assert reference[-1]['loss'] < reference[0]['loss']


def test_custom_checkpoint_round_trips_through_torch(tmp_path):
  import torch  # pylint: disable=g-import-not-at-top
  params = perturbed(clip.init(jax.random.PRNGKey(0), SCAN_CASE))
  torch.save(clip.to_torch_state_dict(clip.stack_layers(params)), tmp_path / 'custom.pt')
  loaded, cfg = clip.load(tmp_path / 'custom.pt', config=SCAN_CASE)
  chex.assert_trees_all_equal(loaded, jax.device_get(params))
  stacked, _ = clip.load(tmp_path / 'custom.pt', config=dataclasses.replace(SCAN_CASE, scan=True))
  chex.assert_trees_all_equal(clip.unstack_layers(stacked), jax.device_get(params))
  with pytest.raises(clip.CheckpointError, match='missing'):
    clip.load(tmp_path / 'custom.pt', config=dataclasses.replace(
        SCAN_CASE, vision=dataclasses.replace(SCAN_CASE.vision, norm_placement='normformer')))
