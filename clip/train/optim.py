"""Optimisers for CLIP training: optax chains with a warmup schedule, OpenAI's weight-decay mask,
gradient clipping and accumulation."""
import re

import jax
import jax.numpy as jnp
import optax

from clip.train import freezing
from clip import sharding

OPTIMIZERS = ('adamw', 'lion', 'adafactor', 'muon')
SCHEDULES = ('cosine', 'linear', 'constant')
# Muon's updates scaled to AdamW's RMS (Liu et al. 2025, "Muon is scalable for LLM training"), so
# that both branches share one learning rate and weight decay tuned for AdamW.
MUON_RMS = 0.2

# OpenAI (and open_clip) exclude gains, biases, embeddings and the logit scale from weight decay;
# here also the other architectures' norms (NormFormer's mlp.ln, QK-norm) and MAP head's probe.
NO_DECAY = re.compile(r'(.*[._])?(bias|ln(_\w+)?\.weight|[qk]_norm\.weight|bn\d\.weight|'
                      r'downsample\.1\.weight|class_embedding|positional_embedding|'
                      r'token_embedding\.weight|mask_embedding|registers|probe|head_scale|'
                      r'logit_scale|logit_bias)')


# Matrices stored (in, out) rather than torch's (out, in).
IN_OUT = re.compile(r'visual\.proj|text_projection')


def decay_mask(params):
  """True where weight decay applies: matrices and convolution kernels, as OpenAI's CLIP."""
  return jax.tree_util.tree_map_with_path(
      lambda kp, _: not NO_DECAY.fullmatch(sharding.dotted_path(kp)), params)


def muon_dimension_numbers(params):
  """The hidden-layer matrices Muon orthogonalises -> their `MuonDimensionNumbers`, every other
  leaf -> None (AdamW). Matrices are the decayed 2-D leaves, so embeddings, biases, gains and the
  logit scale are not; nor are convolution kernels. A stacked (L, out, in) leaf is orthogonalised
  per layer: the axes not named are batch axes."""
  def dims(key_path, x, decays):
    path = sharding.dotted_path(key_path)
    stacked = 1 if sharding.STACKED.search(path) else 0  # the layer axis
    if not decays or len(x.shape) != 2 + stacked:
      return None
    if IN_OUT.fullmatch(path):
      return optax.contrib.MuonDimensionNumbers(reduction_axis=0, output_axis=1)
    return optax.contrib.MuonDimensionNumbers(reduction_axis=1 + stacked, output_axis=stacked)
  return jax.tree_util.tree_map_with_path(dims, params, decay_mask(params))


def schedule(learning_rate, warmup_steps, total_steps, end_fraction=0.0, kind='cosine'):
  """Linear warmup from 0 to `learning_rate` over `warmup_steps`, then until `total_steps` a
  cosine or linear decay to `end_fraction` of it, or `constant`."""
  if kind not in SCHEDULES:
    raise ValueError(f'schedule must be one of {SCHEDULES}, got {kind!r}')
  if not 0 <= warmup_steps < total_steps:
    raise ValueError(f'warmup_steps must be in [0, total_steps={total_steps}), got {warmup_steps}')
  if not 0 <= end_fraction <= 1:
    raise ValueError(f'end_fraction must be in [0, 1], got {end_fraction}')
  decay_steps = total_steps - warmup_steps
  if kind == 'cosine':
    after = optax.cosine_decay_schedule(learning_rate, decay_steps, alpha=end_fraction)
  elif kind == 'linear':
    after = optax.linear_schedule(learning_rate, learning_rate * end_fraction, decay_steps)
  else:
    after = optax.constant_schedule(learning_rate)
  if not warmup_steps:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, learning_rate, warmup_steps), after],
                              [warmup_steps])


def _zero_frozen(patterns):
  """An optax transformation setting the updates of what `patterns` freeze to zero: whole
  leaves, or the frozen layers of a stacked leaf (`freezing.leaf_masks`). The masks follow the
  tree it is given, so a pattern that names only BatchNorm buffers matches nothing here;
  `training.setup` checks every pattern against the parameters and the buffers together."""
  freezing.compile_patterns(patterns)

  def update(updates, state, params=None):
    del params
    return freezing.zero(freezing.leaf_masks(patterns, updates), updates), state
  return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


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
  full learning rate, the embedding at decay ** (num_layers + 1) of it (BEiT / ELECTRA). Stacked
  blocks (scan layout) get one factor per layer along their leading axis."""
  stacked_block = re.compile(r'visual\.transformer\.resblocks\.\D.*')

  def factors(tree):
    leaves = [(sharding.dotted_path(p), x)
              for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]]
    blocks = [int(m.group(1)) for p, _ in leaves
              if (m := re.match(r'visual\.transformer\.resblocks\.(\d+)\.', p))]
    stacked = [x.shape[0] for p, x in leaves if stacked_block.fullmatch(p)]
    num_layers = max(blocks) + 1 if blocks else stacked[0] if stacked else 4  # ResNets: 4 stages

    def factor(key_path, x):
      path = sharding.dotted_path(key_path)
      if stacked_block.fullmatch(path):
        depth = jnp.arange(1, x.shape[0] + 1).reshape((-1,) + (1,) * (x.ndim - 1))
        return decay ** (num_layers + 1 - depth)
      return decay ** (num_layers + 1 - layer_depth(path, num_layers))
    return jax.tree_util.tree_map_with_path(factor, tree)

  def update(updates, state, params=None):
    del params
    return jax.tree.map(lambda u, f: u * f, updates, factors(updates)), state
  return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def _muon(lr, weight_decay, b1, b2, eps):
  """optax's Muon at a unit step, then weight decay and the schedule for both its branches: its
  own `adam_weight_decay` cannot be masked, so it would decay biases, gains and embeddings."""
  return optax.chain(
      optax.contrib.muon(1.0, eps=eps, adam_b1=b1, adam_b2=b2,
                         muon_weight_dimension_numbers=muon_dimension_numbers,
                         consistent_rms=MUON_RMS),
      optax.scale(-1.0),  # undo the descent sign of its unit learning rate
      optax.add_decayed_weights(weight_decay, decay_mask),
      optax.scale_by_learning_rate(lr))


def make_optimizer(tcfg):
  """(optimizer, lr schedule) of a `TrainConfig`: its optimizer with its learning rate under its
  schedule (`schedule()`), weight decay, AdamW betas and eps (OpenAI's defaults, b2=0.98,
  eps=1e-6), gradient clipping at `clip_norm` (None: none), freezing and layer-wise decay.

  What `tcfg.frozen` names (`clip.train.freezing`: per-layer torch keys, so single layers of
  stacked blocks too) gets zero gradients (not counted by clipping, never in the moments) and
  zero updates (no weight decay either): it stays bit-identical. `layer_decay < 1` scales the
  image tower's updates by depth (`scale_by_layer_decay`). `muon` orthogonalises the momentum of
  the matrices (`muon_dimension_numbers`), scaled to AdamW's RMS (`MUON_RMS`), and trains the
  other leaves with Adam (b1, b2, eps; Nesterov, as optax's Muon). Every optimizer decays the
  leaves `decay_mask` selects, by lr * weight_decay.

  `total_steps` and `warmup_steps` count calls of the step. Under `accumulation='multisteps'`
  with k > 1 (optax.MultiSteps) gradients are summed over k calls before one update, so the
  schedule runs over total_steps / k updates (warmup_steps / k of them warming up); grad_cache
  accumulates inside one call and updates every call."""
  k = 1 if tcfg.accumulation == 'grad_cache' else tcfg.accumulation_steps
  lr = schedule(tcfg.learning_rate, tcfg.warmup_steps // k, tcfg.total_steps // k,
                kind=tcfg.schedule)
  opt = _base_optimizer(tcfg, lr)
  if tcfg.layer_decay < 1:
    opt = optax.chain(opt, scale_by_layer_decay(tcfg.layer_decay))
  if tcfg.clip_norm is not None:
    opt = optax.chain(optax.clip_by_global_norm(tcfg.clip_norm), opt)
  if tcfg.frozen:  # before clipping and the moments (frozen gradients count for nothing), and after
    opt = optax.chain(_zero_frozen(tcfg.frozen), opt, _zero_frozen(tcfg.frozen))
  if k > 1:
    opt = optax.MultiSteps(opt, k)
  return opt, lr


def _base_optimizer(tcfg, lr):
  """`tcfg.optimizer` at learning rate `lr`, decaying what `decay_mask` selects."""
  name, wd, b1, b2, eps = tcfg.optimizer, tcfg.weight_decay, tcfg.b1, tcfg.b2, tcfg.eps
  if name == 'adamw':
    return optax.adamw(lr, b1, b2, eps, weight_decay=wd, mask=decay_mask)
  if name == 'lion':
    return optax.lion(lr, b1, b2, weight_decay=wd, mask=decay_mask)
  if name == 'adafactor':
    return optax.adafactor(lr, weight_decay_rate=wd or None, weight_decay_mask=decay_mask)
  if name == 'muon':
    return _muon(lr, wd, b1, b2, eps)
  raise ValueError(f'optimizer must be one of {OPTIMIZERS}, got {name!r}')
