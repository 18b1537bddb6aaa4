"""All-gather losses: `shard_map` bodies that gather the other devices' embeddings.

Called inside a `shard_map` whose batch is split over `axis_name` (a mesh axis name or a tuple of
them; a tuple is linearised in its order, as `PartitionSpec(axis_name)` splits the batch). Device
p holds rows `p*b .. p*b+b-1` of the global batch, computes its rows (and, for the contrastive loss,
its columns) of the global `N x N` logit matrix with the positives at label offset `p*b`, and the
loss is the psum over devices divided by N. Autodiff transposes `all_gather` into a reduce-scatter,
so each device's embeddings receive the gradient from every device's logits. Memory per device is
O(b*N): it grows with the number of devices (see `losses.ring` for the O(b^2) versions).
"""
import jax
import jax.numpy as jnp
from jax import lax

from losses.reference import check_embeddings
from losses.reference import check_scalar
from losses.reference import similarity_logits


def _cross_entropy_sum(logits_bxN, labels_b):
  positives_b = jnp.take_along_axis(logits_bxN, labels_b[:, None], axis=1)[:, 0]
  return jnp.sum(jax.nn.logsumexp(logits_bxN, axis=1) - positives_b)


def allgather_contrastive_loss(img, txt, logit_scale, axis_name):
  """Symmetric InfoNCE over the global batch; img, txt are this device's `(b, dim)` rows."""
  check_embeddings(img, txt)
  check_scalar('logit_scale', logit_scale)
  with jax.named_scope('allgather_contrastive_loss'):
    b = img.shape[0]
    n = lax.axis_size(axis_name)
    scale = jnp.exp(jnp.asarray(logit_scale, jnp.float32))
    img_NxD = lax.all_gather(img, axis_name, tiled=True)
    txt_NxD = lax.all_gather(txt, axis_name, tiled=True)
    labels_b = lax.axis_index(axis_name) * b + jnp.arange(b)
    img_to_txt = _cross_entropy_sum(similarity_logits(img, txt_NxD, scale), labels_b)
    txt_to_img = _cross_entropy_sum(similarity_logits(txt, img_NxD, scale), labels_b)
    return lax.psum(img_to_txt + txt_to_img, axis_name) / (2 * n * b)


def allgather_sigmoid_loss(img, txt, logit_scale, logit_bias, axis_name):
  """SigLIP over the global batch: this device's images against every device's texts."""
  check_embeddings(img, txt)
  check_scalar('logit_scale', logit_scale)
  check_scalar('logit_bias', logit_bias)
  with jax.named_scope('allgather_sigmoid_loss'):
    b = img.shape[0]
    n = lax.axis_size(axis_name)
    scale = jnp.exp(jnp.asarray(logit_scale, jnp.float32))
    txt_NxD = lax.all_gather(txt, axis_name, tiled=True)
    logits_bxN = similarity_logits(img, txt_NxD, scale) + jnp.asarray(logit_bias, jnp.float32)
    labels_b = lax.axis_index(axis_name) * b + jnp.arange(b)
    z_bxN = jnp.where(labels_b[:, None] == jnp.arange(n * b)[None, :], 1.0, -1.0)
    return -lax.psum(jnp.sum(jax.nn.log_sigmoid(z_bxN * logits_bxN)), axis_name) / (n * b)
