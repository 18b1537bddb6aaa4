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


def path_mask(patterns):
  """params -> bool tree: True where the '.'-joined path fully matches one of the regexes."""
  compiled = [re.compile(p) for p in patterns]

  def mask(params):
    def matches(key_path, _):
      path = '.'.join(str(getattr(k, 'key', k)) for k in key_path)
      return any(c.fullmatch(path) for c in compiled)
    return jax.tree_util.tree_map_with_path(matches, params)
  return mask


def layer_depth(path, num_layers):
  """The depth of an image-tower parameter for layer-wise learning-rate decay: the patch / stem
  embedding 0, residual block i (ViT `resblocks.i`, ResNet `layer{s}`) i + 1, everything after
  the last block (ln_post, proj, attnpool, a classification head, the text tower) num_layers + 1."""
  if not path.startswith('visual.'):
    return num_layers + 1
  block = re.match(r'visual\.transformer\.resblocks\.(\d+)\.', path)
  if block:
    return int(block.group(1)) + 1
  stage = re.match(r'visual\.layer(\d)\.', path)
  if stage:
    return int(stage.group(1))
  if re.match(r'visual\.(conv\d|bn\d|class_embedding|positional_embedding|ln_pre)', path):
    return 0
  return num_layers + 1


def scale_by_layer_decay(decay):
  """Multiplies each update by decay ** (num_layers + 1 - depth): the last layers train at the
  full learning rate, the embedding at decay ** (num_layers + 1) of it (BEiT / ELECTRA)."""
  def factors(tree):
    paths = ['.'.join(str(getattr(k, 'key', k)) for k in p)
             for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
    blocks = [int(m.group(1)) for p in paths
              if (m := re.match(r'visual\.transformer\.resblocks\.(\d+)\.', p))]
    num_layers = max(blocks) + 1 if blocks else 4  # ResNets: 4 stages
    return jax.tree_util.tree_map_with_path(
        lambda kp, _: decay ** (num_layers + 1 - layer_depth(
            '.'.join(str(getattr(k, 'key', k)) for k in kp), num_layers)), tree)

  def update(updates, state, params=None):
    del params
    return jax.tree.map(lambda u, f: u * f, updates, factors(updates)), state
  return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def make_optimizer(name, learning_rate, weight_decay, warmup_steps, total_steps, b1=0.9,
                   b2=0.98, eps=1e-6, clip_norm=1.0, accumulation_steps=1, freeze=(),
                   layer_decay=1.0):
  """(optimizer, lr schedule). AdamW defaults are OpenAI's (b2=0.98, eps=1e-6); `clip_norm=None`
  turns clipping off; `accumulation_steps > 1` sums gradients over that many calls before one
  update (optax.MultiSteps). Parameters whose path matches a `freeze` regex get zero gradients
  (not counted by clipping) and zero updates (no weight decay either): they stay bit-identical.
  `layer_decay < 1` scales the image tower's updates by depth (`scale_by_layer_decay`)."""
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
  if not 0 < layer_decay <= 1:
    raise ValueError(f'layer_decay must be in (0, 1], got {layer_decay}')
  if layer_decay < 1:
    opt = optax.chain(opt, scale_by_layer_decay(layer_decay))
  if clip_norm is not None:
    opt = optax.chain(optax.clip_by_global_norm(clip_norm), opt)
  if freeze:
    frozen = optax.masked(optax.set_to_zero(), path_mask(freeze))
    opt = optax.chain(frozen, opt, frozen)
  if accumulation_steps > 1:
    opt = optax.MultiSteps(opt, accumulation_steps)
  return opt, lr
