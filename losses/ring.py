"""Ring losses: `shard_map` bodies in O(b^2 + b*d) memory per device, whatever the device count.

Device p holds the pairs `p*b .. p*b+b-1` of the global batch (`axis_name` is a mesh axis or a tuple
of them, linearised in its order). It starts with its own block, the only one with positives, then
the text chunks travel around the ring with `ppermute` (p -> p+1): at step k device p holds the
texts of device p-k and adds the all-negative block `img_p . txt_{p-k}`. Only one b x b block of
logits is alive at a time, and autodiff never sees the ring: a `custom_vjp` keeps only O(b*d)
residuals, and a text's gradient travels with the text and is passed home by one last shift.

- Sigmoid: the loss is a sum of independent pair terms, so a block's gradient is known as soon
  as the block is; differentiated, the one trip computes loss and gradients together (3 b x b x d
  matmuls a block, as many as the all-gather version) and the backward pass only scales them.
- Softmax: image->text rows keep an online (streaming) log-sum-exp and the text->image column
  statistics travel with their text chunk, so one ring serves both directions; the backward pass
  runs the ring again and recomputes each block, normalised by the saved log-sum-exps (as in
  DisCo-CLIP / Inf-CL).

The custom VJPs see the scale and bias as device-varying (see `_varying`) and return each
device's share of their gradient; the transpose of that cast sums the shares, so the gradients
are right wherever they are taken, inside or outside the `shard_map` (the default
`check_vma=True` typing is assumed).
"""
import functools

import jax
import jax.numpy as jnp
from jax import lax

from losses.reference import check_embeddings
from losses.reference import check_scalar
from losses.reference import similarity_logits


def _axes(axis_name):
  if isinstance(axis_name, str):
    return (axis_name,)
  if isinstance(axis_name, tuple) and axis_name and all(isinstance(a, str) for a in axis_name):
    return axis_name
  raise TypeError(f'axis_name must be a mesh axis name or a tuple of them, got {axis_name!r}')


def _varying(x, axes):
  """`x` typed as varying over `axes`: pcast's transpose sums the custom VJP's per-device
  cotangents back onto an invariant input (a replicated scale, say)."""
  missing = tuple(a for a in axes if a not in jax.typeof(x).mat.varying)
  return lax.pcast(x, missing, to='varying') if missing else x


def _shift(tree, axes):
  """Each device passes `tree` to the next one on the ring, p -> p+1 mod n."""
  n = lax.axis_size(axes)
  perm = [(p, (p + 1) % n) for p in range(n)]
  return jax.tree.map(lambda x: lax.ppermute(x, axes, perm), tree)


def _outer_grads(g_bxb, img_bxD, y_bxD, scale):
  """Gradients of `sum(g * scale * img . y)` w.r.t. img and y, in fp32."""
  dimg_bxD = scale * jnp.einsum('ij,jd->id', g_bxb, y_bxD, preferred_element_type=jnp.float32)
  dy_bxD = scale * jnp.einsum('ij,id->jd', g_bxb, img_bxD, preferred_element_type=jnp.float32)
  return dimg_bxD, dy_bxD


def _sigmoid_logits(img, y_bxD, scale, bias, positives):
  """One block's logits and SigLIP's z: +1 on the diagonal of the own block, -1 elsewhere."""
  b = img.shape[0]
  z = 2 * jnp.eye(b, dtype=jnp.float32) - 1 if positives else -1.0
  return similarity_logits(img, y_bxD, scale) + bias, z


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _ring_sigmoid(img, txt, log_scale, bias, axes):
  n, b = lax.axis_size(axes), img.shape[0]
  scale = jnp.exp(log_scale)

  def block_loss(y_bxD, positives):
    logits_bxb, z = _sigmoid_logits(img, y_bxD, scale, bias, positives)
    return -jnp.sum(jax.nn.log_sigmoid(z * logits_bxb))

  def step(_, carry):
    y_bxD, loss = carry
    y_bxD = _shift(y_bxD, axes)
    return y_bxD, loss + block_loss(y_bxD, False)

  _, loss = lax.fori_loop(1, n, step, (txt, block_loss(txt, True)))
  return lax.psum(loss, axes) / (n * b)


def _ring_sigmoid_fwd(img, txt, log_scale, bias, axes):
  """The loss is a sum of independent pair terms, so each block's gradient is known as soon as
  the block is: one trip computes loss and gradients, kept as O(b*d) residuals."""
  n, b = lax.axis_size(axes), img.shape[0]
  scale = jnp.exp(log_scale)

  def block(y_bxD, positives):
    logits_bxb, z = _sigmoid_logits(img, y_bxD, scale, bias, positives)
    g_bxb = -z * jax.nn.sigmoid(-z * logits_bxb) / (n * b)  # d loss / d logits
    dimg_bxD, dy_bxD = _outer_grads(g_bxb, img, y_bxD, scale)
    return (-jnp.sum(jax.nn.log_sigmoid(z * logits_bxb)), dimg_bxD, dy_bxD,
            jnp.sum(g_bxb * (logits_bxb - bias)), jnp.sum(g_bxb))

  def step(_, carry):
    y_bxD, dy_bxD, sums = carry
    y_bxD, dy_bxD = _shift((y_bxD, dy_bxD), axes)  # a text's gradient travels with it
    loss, dimg_bxD, dy_block_bxD, dlog_scale, dbias = block(y_bxD, False)
    sums = jax.tree.map(jnp.add, sums, (loss, dimg_bxD, dlog_scale, dbias))
    return y_bxD, dy_bxD + dy_block_bxD, sums

  loss, dimg_bxD, dtxt_bxD, dlog_scale, dbias = block(txt, True)
  init = (txt, dtxt_bxD, (loss, dimg_bxD, dlog_scale, dbias))
  _, dtxt_bxD, (loss, dimg_bxD, dlog_scale, dbias) = lax.fori_loop(1, n, step, init)
  dtxt_bxD = _shift(dtxt_bxD, axes)  # after n shifts in all, each text gradient is home
  grads = (dimg_bxD.astype(img.dtype), dtxt_bxD.astype(txt.dtype), dlog_scale, dbias)
  return lax.psum(loss, axes) / (n * b), grads


def _ring_sigmoid_bwd(axes, grads, ct):
  del axes
  return tuple((ct * g).astype(g.dtype) for g in grads)


_ring_sigmoid.defvjp(_ring_sigmoid_fwd, _ring_sigmoid_bwd)


def ring_sigmoid_loss(img, txt, logit_scale, logit_bias, axis_name):
  """SigLIP over the global batch, chunked on a ppermute ring; img, txt are `(b, dim)`."""
  check_embeddings(img, txt)
  check_scalar('logit_scale', logit_scale)
  check_scalar('logit_bias', logit_bias)
  axes = _axes(axis_name)
  with jax.named_scope('ring_sigmoid_loss'):
    scalars = (jnp.asarray(logit_scale, jnp.float32), jnp.asarray(logit_bias, jnp.float32))
    return _ring_sigmoid(*(_varying(x, axes) for x in (img, txt, *scalars)), axes)


def _lse_stats(logits_bxb, axis):
  """(max, sum of exp(logits - max)) along `axis`: a streaming log-sum-exp's state."""
  m = jnp.max(logits_bxb, axis=axis)
  return m, jnp.sum(jnp.exp(logits_bxb - jnp.expand_dims(m, axis)), axis=axis)


def _lse_merge(stats, logits_bxb, axis):
  m, s = stats
  m_block, s_block = _lse_stats(logits_bxb, axis)
  m_new = jnp.maximum(m, m_block)
  return m_new, s * jnp.exp(m - m_new) + s_block * jnp.exp(m_block - m_new)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _ring_contrastive(img, txt, log_scale, axes):
  return _ring_contrastive_fwd(img, txt, log_scale, axes)[0]


def _ring_contrastive_fwd(img, txt, log_scale, axes):
  n, b = lax.axis_size(axes), img.shape[0]
  scale = jnp.exp(log_scale)
  logits_bxb = similarity_logits(img, txt, scale)
  positives_b = jnp.diagonal(logits_bxb)

  def step(_, carry):
    y_bxD, cols, rows = carry
    y_bxD, cols = _shift((y_bxD, cols), axes)  # column statistics travel with their texts
    logits_bxb = similarity_logits(img, y_bxD, scale)
    return y_bxD, _lse_merge(cols, logits_bxb, 0), _lse_merge(rows, logits_bxb, 1)

  init = (txt, _lse_stats(logits_bxb, 0), _lse_stats(logits_bxb, 1))
  _, cols, rows = lax.fori_loop(1, n, step, init)
  cols = _shift(cols, axes)
  row_lse_b = rows[0] + jnp.log(rows[1])
  col_lse_b = cols[0] + jnp.log(cols[1])
  loss = jnp.sum(row_lse_b - positives_b) + jnp.sum(col_lse_b - positives_b)
  return lax.psum(loss, axes) / (2 * n * b), (img, txt, log_scale, row_lse_b, col_lse_b)


def _ring_contrastive_bwd(axes, res, ct):
  """The ring again: each block is recomputed and normalised by the saved log-sum-exps."""
  img, txt, log_scale, row_lse_b, col_lse_b = res
  n, b = lax.axis_size(axes), img.shape[0]
  scale = jnp.exp(log_scale)
  w = ct / (2 * n * b)

  def block_grads(y_bxD, y_col_lse_b, positives):
    logits_bxb = similarity_logits(img, y_bxD, scale)
    g_bxb = w * (jnp.exp(logits_bxb - row_lse_b[:, None]) +
                 jnp.exp(logits_bxb - y_col_lse_b[None, :]))  # d loss / d logits
    if positives:
      g_bxb -= 2 * w * jnp.eye(b, dtype=jnp.float32)
    return (*_outer_grads(g_bxb, img, y_bxD, scale), jnp.sum(g_bxb * logits_bxb))

  def step(_, carry):
    travelling, dimg_bxD, dlog_scale = carry
    y_bxD, y_col_lse_b, dy_bxD = _shift(travelling, axes)
    dimg_block_bxD, dy_block_bxD, dlog_scale_block = block_grads(y_bxD, y_col_lse_b, False)
    return ((y_bxD, y_col_lse_b, dy_bxD + dy_block_bxD), dimg_bxD + dimg_block_bxD,
            dlog_scale + dlog_scale_block)

  dimg_bxD, dtxt_bxD, dlog_scale = block_grads(txt, col_lse_b, True)
  init = ((txt, col_lse_b, dtxt_bxD), dimg_bxD, dlog_scale)
  travelling, dimg_bxD, dlog_scale = lax.fori_loop(1, n, step, init)
  dtxt_bxD = _shift(travelling[2], axes)  # after n shifts in all, each text gradient is home
  return dimg_bxD.astype(img.dtype), dtxt_bxD.astype(txt.dtype), dlog_scale


_ring_contrastive.defvjp(_ring_contrastive_fwd, _ring_contrastive_bwd)


def ring_contrastive_loss(img, txt, logit_scale, axis_name):
  """Symmetric InfoNCE over the global batch with a streaming log-sum-exp on a ppermute ring."""
  check_embeddings(img, txt)
  check_scalar('logit_scale', logit_scale)
  axes = _axes(axis_name)
  with jax.named_scope('ring_contrastive_loss'):
    args = (img, txt, jnp.asarray(logit_scale, jnp.float32))
    return _ring_contrastive(*(_varying(x, axes) for x in args), axes)
