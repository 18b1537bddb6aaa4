"""CLIP's towers in float64 numpy, written from their definitions and independent of `clip/`: the
reference the layer, block, pooling, tower and model tests compare against (norms, NormFormer,
gated MLPs, qk-norm, biases, RoPE, sin-cos positions, registers, cls / gap / map pooling,
bidirectional text with padding; SigLIP's and open_clip's options too: tanh GELU, norm epsilon,
patch bias, no ln_pre, last-position text pooling, a biased text projection), and the
knowledge-distillation loss (`np_distillation`). Also the tolerances, helpers and small configs
those tests share."""
import math

import jax
import numpy as np

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


def worst_relative_error(actual_tree, expected_tree):
  """(dotted path, error) of the leaf with the largest max |a - b| / max |b| between two
  trees of the same structure (e.g. two runs' gradients)."""
  def one(path, a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    name = '.'.join(str(getattr(k, 'key', getattr(k, 'idx', k))) for k in path)
    return name, float(np.abs(a - b).max() / (np.abs(b).max() + 1e-30))
  errors = jax.tree_util.tree_map_with_path(one, actual_tree, expected_tree)
  return max(jax.tree.leaves(errors, is_leaf=lambda x: isinstance(x, tuple)),
             key=lambda item: item[1])


def text_tokens(rng, n, length, vocab):
  """Rows of SOT, words, EOT (the largest id), then zero padding; various lengths."""
  tokens = np.zeros((n, length), np.int32)
  for i in range(n):
    m = int(rng.integers(1, length - 1))
    tokens[i, :m] = rng.integers(1, vocab - 1, m)
    tokens[i, m] = vocab - 1
  return tokens


# ---------------------------------------------------------------- the small configs they share

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


def perturbed_numpy(params, seed=0):
  """`perturbed` drawn by numpy: the same moves off the initial values, without compiling a
  random op for every leaf shape (seconds for a whole model)."""
  rng = np.random.default_rng(seed)
  move = lambda x: np.asarray(x) + np.float32(0.1) * rng.standard_normal(np.shape(x), np.float32)
  return jax.tree.map(move, params)


# ---------------------------------------------------------------- the captioning decoder

def np_decoder_block(p, x, memory, cfg, attend):
  """Pre-norm self-attention under `attend` (True = attend), NormFormer's norm after it when
  present, pre-norm cross-attention from the caption to `memory`, MLP; each with a residual."""
  eps = cfg.norm_eps
  h = np_norm(p['ln_1'], x, cfg.norm, eps)
  a = np_mha(p['attn'], h, h, cfg.heads, cfg.norm, attend, eps=eps)
  if 'ln_attn' in p:
    a = np_norm(p['ln_attn'], a, cfg.norm, eps)
  x = x + a
  x = x + np_mha(p['cross_attn'], np_norm(p['ln_cross'], x, cfg.norm, eps), memory, cfg.heads,
                 cfg.norm, eps=eps)
  return x + np_mlp(p['mlp'], np_norm(p['ln_2'], x, cfg.norm, eps), cfg.mlp, cfg.norm, eps)


def np_decoder_attend(length, bidirectional=None, valid=None):
  """(N or 1, 1, L, L), True = attend: causal, except the `bidirectional` rows, whose every
  query sees the `valid` keys of its row."""
  causal = np.tril(np.ones((length, length), bool))
  if bidirectional is None:
    return causal[None, None]
  attend = np.stack([np.broadcast_to(v, (length, length)) if b else causal
                     for b, v in zip(bidirectional, valid)])
  return attend[:, None]


def np_decoder(p, image, tokens, cfg, mask=None, bidirectional=None, valid=None):
  """Next-token scores (N, L, V) of the captioning decoder on image tokens (N, T, W): token
  embeddings (`mask_embedding` where `mask`) plus positions, the blocks over the (projected)
  image tokens, ln_final, then the tied embedding or `head`."""
  length = tokens.shape[1]
  x = np.asarray(p['token_embedding']['weight'])[tokens]
  if mask is not None:
    x = np.where(mask[..., None], np.asarray(p['mask_embedding']), x)
  x = x + np.asarray(p['positional_embedding'])[:length]
  memory = np_linear(p['image_proj'], image) if 'image_proj' in p else image
  attend = np_decoder_attend(length, bidirectional, valid)
  for i in range(cfg.layers):
    x = np_decoder_block(p['transformer']['resblocks'][str(i)], x, memory, cfg, attend)
  x = np_norm(p['ln_final'], x, cfg.norm, cfg.norm_eps)
  return np_linear(p.get('head', p['token_embedding']), x)


def np_cross_entropy(logits, targets, weights):
  """(mean -log softmax at the target over the weighted positions, their top-1 accuracy)."""
  logits = np.asarray(logits, np.float64)
  shifted = logits - logits.max(-1, keepdims=True)
  logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
  nll = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
  hits = logits.argmax(-1) == targets
  return (nll * weights).sum() / weights.sum(), (hits * weights).sum() / weights.sum()


def caption_valid(tokens, eot_id):
  """(N, L-1): whether each next token is part of the caption, written as a loop over rows: the
  targets up to and including the first `eot_id` (all of them in a row without one)."""
  valid = np.zeros((tokens.shape[0], tokens.shape[1] - 1), bool)
  for i, row in enumerate(tokens[:, 1:]):
    ends = np.flatnonzero(row == eot_id)
    valid[i, :ends[0] + 1 if len(ends) else len(row)] = True
  return valid


# ---------------------------------------------------------------- knowledge distillation

def np_distillation(img, txt, log_scale, teacher_img, teacher_txt, teacher_scale):
  """open_clip's `DistillClipLoss` KD term in float64: the mean over rows of
  `-sum_j softmax(T_i)_j log_softmax(S_i)_j`, for the logits per image and per text, averaged;
  `S = exp(log_scale) img . txt^T`, `T = teacher_scale t_img . t_txt^T` (a linear scale: the
  teacher's exp(logit_scale), or MobileCLIP's 1 / tau)."""
  f64 = lambda x: np.asarray(x, np.float64)
  s = np.exp(f64(log_scale)) * f64(img) @ f64(txt).T
  t = f64(teacher_scale) * f64(teacher_img) @ f64(teacher_txt).T

  def log_softmax(x):
    shifted = x - x.max(1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(1, keepdims=True))

  cross_entropy = lambda t, s: -(np.exp(log_softmax(t)) * log_softmax(s)).sum(1).mean()
  return (cross_entropy(t, s) + cross_entropy(t.T, s.T)) / 2
