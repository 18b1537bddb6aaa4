"""The captioning objective: teacher-forced next-token cross-entropy with CapPa's parallel
prediction ("Image Captioners Are Scalable Vision Learners Too", Tschannen et al. 2023, sec. 3;
big_vision's `models/proj/cappa/cappa.py`), over the decoder of `clip/decoder.py`.

Captions are the tokenizer's rows: a start token, the caption, the end-of-text token
(`cfg.eot_id`), then padding. Autoregressive rows read `tokens[:, :-1]` causally and predict
`tokens[:, 1:]`; the loss covers every target up to and including the first end-of-text token,
never the padding after it.

Parallel prediction (a `parallel_fraction` of the rows, per example, from the step's key; CapPa
uses 0.75): the row's input is its targets themselves with a `mask_ratio` of the caption's
positions (CapPa: all of them) replaced by the mask embedding, attended in both directions
(big_vision feeds these rows unshifted for the same reason: a shifted input would show each
target one position to the left). The draw is over caption positions only: padding is never
masked, and it is neither attended (a key mask) nor scored. The loss of such a row covers its
masked positions (all of them at CapPa's ratio 1; an unmasked input would show its own target).
"""
import jax
import jax.numpy as jnp

from clip import configs
from clip import decoder


def check_fractions(parallel_fraction, mask_ratio):
  """Raises ValueError unless both are probabilities, `mask_ratio` > 0."""
  if not 0.0 <= parallel_fraction <= 1.0:
    raise ValueError(f'the parallel-prediction fraction must be in [0, 1], got {parallel_fraction}')
  if not 0.0 < mask_ratio <= 1.0:
    raise ValueError(f'the parallel-prediction mask ratio must be in (0, 1], got {mask_ratio}')


def targets_and_valid(tokens_NxL, eot_id):
  """`(targets (N, L-1), valid (N, L-1))`: the next tokens and whether each is part of the caption
  (at or before the row's first `eot_id`; a row without one is all valid)."""
  targets = tokens_NxL[:, 1:]
  is_eot = targets == eot_id
  after_eot = (jnp.cumsum(is_eot, axis=1) - is_eot) > 0
  return targets, ~after_eot


def parallel_masks(key, valid_NxL, parallel_fraction, mask_ratio):
  """`(masked (N, L), parallel (N,))`: which rows are trained by parallel prediction (each with
  probability `parallel_fraction`) and, in those rows, which caption positions are masked:
  `round(mask_ratio * caption length)` of them, uniformly drawn, never padding."""
  k_rows, k_pos = jax.random.split(key)
  n = valid_NxL.shape[0]
  parallel_N = jax.random.uniform(k_rows, (n,)) < parallel_fraction
  scores_NxL = jnp.where(valid_NxL, jax.random.uniform(k_pos, valid_NxL.shape), 2.0)
  rank_NxL = jnp.argsort(jnp.argsort(scores_NxL, axis=1), axis=1)
  count_N = jnp.round(mask_ratio * valid_NxL.sum(axis=1)).astype(jnp.int32)
  masked_NxL = (rank_NxL < count_N[:, None]) & valid_NxL & parallel_N[:, None]
  return masked_NxL, parallel_N


def target_log_probs(logits_NxLxS, columns_NxL):
  """log p (N, L) fp32 of each position's target score column; -inf for a column < 0 (an id the
  decoder's `output_ids` shortlist does not hold: `decoder.output_index`)."""
  logp_NxLxS = jax.nn.log_softmax(logits_NxLxS.astype(jnp.float32), axis=-1)
  picked_NxL = jnp.take_along_axis(logp_NxLxS, jnp.maximum(columns_NxL, 0)[..., None],
                                   axis=-1)[..., 0]
  return jnp.where(columns_NxL < 0, -jnp.inf, picked_NxL)


def cross_entropy(logits_NxLxV, targets_NxL, weights_NxL):
  """`(mean next-token cross-entropy over the weighted positions, their top-1 accuracy)`;
  `targets_NxL` are score columns (>= 0)."""
  nll_NxL = -target_log_probs(logits_NxLxV, targets_NxL)
  w_NxL = weights_NxL.astype(jnp.float32)
  count = jnp.maximum(w_NxL.sum(), 1.0)
  hits = (jnp.argmax(logits_NxLxV, axis=-1) == targets_NxL).astype(jnp.float32)
  return (nll_NxL * w_NxL).sum() / count, (hits * w_NxL).sum() / count


def loss(params, image_NxTxW, tokens_NxL, cfg, key, parallel_fraction=0.75, mask_ratio=1.0,
         execution=configs.Execution()):
  """Captioning loss of decoder `params` on image tokens (N, T, W) and caption tokens (N, L):
  `(mean cross-entropy per scored token, {'token_accuracy', 'unscorable_tokens'})`, the last
  the count of caption tokens outside the decoder's `output_ids` shortlist (left out of the
  loss; the main job logs it, and it is 0 when the shortlist covers the data)."""
  targets, valid = targets_and_valid(tokens_NxL, cfg.eot_id)
  masked, parallel = None, None
  inputs = tokens_NxL[:, :-1]
  weights = valid
  if parallel_fraction > 0:
    masked, parallel = parallel_masks(key, valid, parallel_fraction, mask_ratio)
    inputs = jnp.where(parallel[:, None], targets, inputs)
    weights = valid & (~parallel[:, None] | masked)
  logits = decoder.apply(params, image_NxTxW, inputs, cfg, execution, masked, parallel, valid)
  columns = decoder.output_index(targets, cfg)
  unscorable = weights & (columns < 0)  # an id outside `cfg.output_ids`: counted, not scored
  value, accuracy = cross_entropy(logits, jnp.maximum(columns, 0), weights & ~unscorable)
  return value, {'token_accuracy': accuracy, 'unscorable_tokens': unscorable.sum()}
