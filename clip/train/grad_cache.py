"""Two-pass gradient accumulation that keeps every negative (GradCache: Gao et al. 2021, "Scaling
Deep Contrastive Learning Batch Size under Memory Limited Setup"; open_clip's `--accum-freq`).

One optimizer step on a global batch of B = k x b examples, in memory of about one micro-batch
of b plus the O(B x embed_dim) embeddings:

1. embed each of the k micro-batches without keeping activations (a `lax.scan` of forward
   passes, nothing to differentiate);
2. compute the contrastive / sigmoid loss of the whole batch on those B embeddings (the usual
   `shard_map` loss, every example's negatives from all k micro-batches) and its gradient with
   respect to the embeddings, the logit scale and bias;
3. re-run each micro-batch with a VJP of its slice of that gradient and sum the parameter
   gradients (a second `lax.scan`; each iteration keeps one micro-batch's activations).

The loss and the gradients equal those of `jax.value_and_grad` of the objective on the whole
batch (tests/train/test_grad_cache.py, every loss and mesh). Micro-batch m holds the rows i with
i % k == m, so each micro-batch is split over the devices like the global batch. A ResNet's
BatchNorm normalises each micro-batch by its own statistics (as k separate steps would) and
updates its running buffers once per micro-batch, in order; FLIP's patch dropout draws each
micro-batch's patches from its own split of the step's key, the same in both passes.
"""
import jax
import jax.numpy as jnp

import losses
from clip.train import objectives
from clip import sharding


def micro_batch(batch, m, k):
  """Micro-batch m of k of a batch whose arrays lead with B = k x b rows: rows m, m + k, ..."""
  return jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(
      x.reshape(x.shape[0] // k, k, *x.shape[1:]), m, axis=1, keepdims=False), batch)


def interleave(parts_KxBxD):
  """(k, b, ...) per-micro-batch results -> (k x b, ...) in the batch's own row order."""
  k, b = parts_KxBxD.shape[:2]
  return jnp.swapaxes(parts_KxBxD, 0, 1).reshape(k * b, *parts_KxBxD.shape[2:])


def deinterleave(x_BxD, k):
  """The inverse of `interleave`: (k x b, ...) -> (k, b, ...)."""
  return jnp.swapaxes(x_BxD.reshape(x_BxD.shape[0] // k, k, *x_BxD.shape[1:]), 0, 1)


def value_and_grad(cfg, tcfg, mesh):
  """`f(params, batch_stats, batch, key) -> ((loss, (batch_stats, metrics)), grads)`, what
  `jax.value_and_grad(objectives.clip_objective(...), has_aux=True)` returns, computed in two
  passes over `tcfg.accumulation_steps` micro-batches. Raises ValueError for a model with a
  captioning decoder (its loss has no cross-batch term to cache: use MultiSteps)."""
  if cfg.decoder is not None:
    raise ValueError('grad_cache accumulation covers the contrastive / sigmoid losses; a model '
                     'with a captioning decoder accumulates with accumulation="multisteps"')
  objectives.check_objective(cfg, tcfg)
  k = tcfg.accumulation_steps
  loss_fn = losses.make_loss(tcfg.loss, mesh, sharding.BATCH_AXES)
  accuracy = objectives.local_accuracy(mesh)

  def embed(params, batch_stats, micro, key):
    images = objectives.batch_images(micro)
    img, _, batch_stats = objectives.image_outputs(params, batch_stats, images, cfg, tcfg, key)
    return objectives.normalised_pair(params, img, micro['tokens'], cfg), batch_stats

  def f(params, batch_stats, batch, key):
    keys = jax.random.split(key, k)

    def first(stats, m):
      (img, txt), stats = embed(params, stats, micro_batch(batch, m, k), keys[m])
      return stats, (img, txt)

    _, (img_KxbxD, txt_KxbxD) = jax.lax.scan(first, batch_stats, jnp.arange(k))
    img, txt = interleave(img_KxbxD), interleave(txt_KxbxD)
    scalars = objectives.loss_scalars(params, tcfg.loss)
    loss, (g_img, g_txt, *g_scalars) = jax.value_and_grad(
        loss_fn, argnums=tuple(range(2 + len(scalars))))(img, txt, *scalars)
    g_img_K, g_txt_K = deinterleave(g_img, k), deinterleave(g_txt, k)

    def second(carry, m):
      grads, stats = carry
      micro = micro_batch(batch, m, k)
      _, vjp, stats = jax.vjp(lambda p: embed(p, stats, micro, keys[m]), params, has_aux=True)
      (g,) = vjp((g_img_K[m], g_txt_K[m]))
      return (jax.tree.map(jnp.add, grads, g), stats), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    (grads, batch_stats), _ = jax.lax.scan(second, (zeros, batch_stats), jnp.arange(k))
    grads = dict(grads, logit_scale=grads['logit_scale'] + g_scalars[0])
    if len(g_scalars) > 1:  # a sigmoid loss's bias
      grads['logit_bias'] = grads['logit_bias'] + g_scalars[1]
    return (loss, (batch_stats, {'accuracy': accuracy(img, txt)})), grads

  return f
