"""Optimisers for CLIP training: optax chains with warmup + cosine, OpenAI's weight-decay mask,
gradient clipping and accumulation."""
import re

import jax
import optax

OPTIMIZERS = ('adamw', 'lion', 'adafactor')

# OpenAI (and open_clip) exclude gains, biases, embeddings and the logit scale from weight decay.
NO_DECAY = re.compile(r'(.*[._])?(bias|ln_\w+\.weight|bn\d\.weight|downsample\.1\.weight|'
                      r'class_embedding|positional_embedding|token_embedding\.weight|logit_scale|'
                      r'logit_bias)')


def decay_mask(params):
  """True where weight decay applies: matrices and convolution kernels, as OpenAI's CLIP."""
  def decays(key_path, _):
    path = '.'.join(str(getattr(k, 'key', k)) for k in key_path)
    return not NO_DECAY.fullmatch(path)
  return jax.tree_util.tree_map_with_path(decays, params)


def schedule(learning_rate, warmup_steps, total_steps, end_fraction=0.0):
  """Linear warmup from 0 to `learning_rate`, then cosine decay to `end_fraction` of it."""
  if not 0 <= warmup_steps < total_steps:
    raise ValueError(f'warmup_steps must be in [0, total_steps={total_steps}), got {warmup_steps}')
  return optax.warmup_cosine_decay_schedule(0.0, learning_rate, max(warmup_steps, 1), total_steps,
                                            end_value=learning_rate * end_fraction)


def make_optimizer(name, learning_rate, weight_decay, warmup_steps, total_steps, b1=0.9,
                   b2=0.98, eps=1e-6, clip_norm=1.0, accumulation_steps=1):
  """(optimizer, lr schedule). AdamW defaults are OpenAI's (b2=0.98, eps=1e-6); `clip_norm=None`
  turns clipping off; `accumulation_steps > 1` sums gradients over that many calls before one
  update (optax.MultiSteps)."""
  if name not in OPTIMIZERS:
    raise ValueError(f'optimizer must be one of {OPTIMIZERS}, got {name!r}')
  if accumulation_steps < 1:
    raise ValueError(f'accumulation_steps must be >= 1, got {accumulation_steps}')
  lr = schedule(learning_rate, warmup_steps, total_steps)
  if name == 'adamw':
    opt = optax.adamw(lr, b1, b2, eps, weight_decay=weight_decay, mask=decay_mask)
  elif name == 'lion':
    opt = optax.lion(lr, b1, b2, weight_decay=weight_decay, mask=decay_mask)
  else:
    opt = optax.adafactor(lr, weight_decay_rate=weight_decay or None,
                          weight_decay_mask=decay_mask)
  if clip_norm is not None:
    opt = optax.chain(optax.clip_by_global_norm(clip_norm), opt)
  if accumulation_steps > 1:
    opt = optax.MultiSteps(opt, accumulation_steps)
  return opt, lr
