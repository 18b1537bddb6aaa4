"""Knowledge distillation (KD) between the image-text logits of a student and a frozen teacher.

The KD term of open_clip's `DistillClipLoss` (open_clip/loss.py): for the global batch's logits
`S = exp(logit_scale) img . txt^T` of the student and `T` of the teacher, each with its own scale,

  KD = (CE(T, S) + CE(T^T, S^T)) / 2,  CE(T, S) = -mean_i sum_j softmax(T_i)_j log_softmax(S_i)_j,

image->text rows and text->image columns averaged. The teacher's logits are scaled either by its
own (frozen, log-space) `teacher_logit_scale`, `T = exp(teacher_logit_scale) t_img . t_txt^T`
(open_clip), or by a teacher temperature tau, `T = t_img . t_txt^T / tau` (MobileCLIP, Vasu et al.
CVPR 2024, arXiv:2311.17049, whose distillation loss compares `softmax(U V^T / tau)` of the teacher
with the student's; their training code, apple/ml-mobileclip training/open_clip.patch, replaces
the teacher's scale by `--distill-logit-scale`, i.e. 1 / tau: 100 for MobileCLIP
(configs/run_datacompdr12m.sh), 70 and 60 for MobileCLIP2's two teachers (run_dfndr2b.sh), whose
ensemble is not built here). Exactly one of the two must be given. The paper writes KL
divergences; their code, like open_clip's, the cross-entropy used here: the two differ by the
teacher's entropy, a constant with no gradient.

Student and teacher embeddings are L2-normalised `(batch, dim)` rows, row i of each model
describing pair i; the two models' widths may differ, their batches may not. Gradients flow to
`img`, `txt` and `logit_scale` only: the teacher's embeddings and scalar pass through
`lax.stop_gradient`, so their gradients are exactly zero. Logits and the loss are in fp32.

Three versions equal in value and gradients: `distillation_loss` (one device),
`allgather_distillation_loss` and `ring_distillation_loss` (`shard_map` bodies, as in
`losses.allgather` and `losses.ring`), and `make_distillation_loss` builds either on a mesh.
"""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P

from losses.make import _batch_axes
from losses.reference import check_embeddings
from losses.reference import check_scalar
from losses.reference import similarity_logits
from losses.ring import _axes
from losses.ring import _lse_merge
from losses.ring import _lse_stats
from losses.ring import _outer_grads
from losses.ring import _shift
from losses.ring import _varying


def check_distillation_inputs(img, txt, logit_scale, teacher_img, teacher_txt,
                              teacher_logit_scale, teacher_temperature):
  """Raises ValueError/TypeError unless both models' embeddings are float `(batch, dim)` pairs of
  one batch (widths may differ), the scales are real scalars, and exactly one of
  `teacher_logit_scale` and `teacher_temperature` is given, the temperature finite and > 0 (when
  its value is known: under a trace, a bad temperature makes the loss NaN instead)."""
  check_embeddings(img, txt)
  check_scalar('logit_scale', logit_scale)
  try:
    check_embeddings(teacher_img, teacher_txt)
  except (TypeError, ValueError) as e:
    raise type(e)(f'teacher: {e}') from None
  if np.shape(teacher_img)[0] != np.shape(img)[0]:
    raise ValueError(f'the teacher batch must equal the student batch {np.shape(img)[0]}, got '
                     f'teacher embeddings of shape {np.shape(teacher_img)}')
  if (teacher_logit_scale is None) == (teacher_temperature is None):
    raise ValueError('give exactly one of teacher_logit_scale (open_clip: the teacher\'s own '
                     'scale) and teacher_temperature (MobileCLIP: teacher logits = cosine / tau), '
                     f'got {"both" if teacher_temperature is not None else "neither"}')
  if teacher_logit_scale is not None:
    check_scalar('teacher_logit_scale', teacher_logit_scale)
    return
  check_scalar('teacher_temperature', teacher_temperature)
  if not isinstance(teacher_temperature, jax.core.Tracer):
    tau = float(teacher_temperature)
    if not (math.isfinite(tau) and tau > 0):
      raise ValueError(f'teacher_temperature must be finite and > 0, got {tau}')


def teacher_scale(teacher_logit_scale, teacher_temperature):
  """The fp32 multiplier of the teacher's cosine similarities, gradient stopped:
  `exp(teacher_logit_scale)`, or `1 / teacher_temperature` (NaN unless the temperature is > 0)."""
  if teacher_temperature is None:
    scale = jnp.exp(jnp.asarray(teacher_logit_scale, jnp.float32))
  else:
    tau = jnp.asarray(teacher_temperature, jnp.float32)
    scale = jnp.where(tau > 0, 1 / tau, jnp.nan)
  return lax.stop_gradient(scale)


def _soft_cross_entropy_sum(teacher_bxN, student_bxN):
  """`sum_i -sum_j softmax(teacher_i)_j log_softmax(student_i)_j`, as `lse(s_i) - E_p[s_i]`."""
  p_bxN = jax.nn.softmax(teacher_bxN, axis=1)
  return jnp.sum(jax.nn.logsumexp(student_bxN, axis=1) - jnp.sum(p_bxN * student_bxN, axis=1))


@jax.jit
def _reference(img, txt, log_scale, teacher_img, teacher_txt, t_scale):
  s_BxB = similarity_logits(img, txt, jnp.exp(jnp.asarray(log_scale, jnp.float32)))
  t_BxB = similarity_logits(teacher_img, teacher_txt, t_scale)
  both = _soft_cross_entropy_sum(t_BxB, s_BxB) + _soft_cross_entropy_sum(t_BxB.T, s_BxB.T)
  return both / (2 * img.shape[0])


def distillation_loss(img, txt, logit_scale, teacher_img, teacher_txt, teacher_logit_scale=None,
                      teacher_temperature=None):
  """KD from the teacher's to the student's image-text logits, both directions, on one device.

  Args:
    img, txt: the student's `(B, D)` embeddings; `logit_scale` its log-space scale.
    teacher_img, teacher_txt: the teacher's `(B, E)` embeddings (E may differ from D).
    teacher_logit_scale: the teacher's log-space scale (open_clip), or None with
      `teacher_temperature`, tau > 0 (MobileCLIP: teacher logits = cosine / tau).
  Returns:
    The fp32 scalar `(CE(T, S) + CE(T^T, S^T)) / 2` (module docstring), in nats.
  Raises:
    ValueError, TypeError: see `check_distillation_inputs`.
  """
  check_distillation_inputs(img, txt, logit_scale, teacher_img, teacher_txt,
                            teacher_logit_scale, teacher_temperature)
  return _reference(img, txt, logit_scale, lax.stop_gradient(teacher_img),
                    lax.stop_gradient(teacher_txt),
                    teacher_scale(teacher_logit_scale, teacher_temperature))


def _allgather(img, txt, log_scale, teacher_img, teacher_txt, t_scale, axis_name):
  b, n = img.shape[0], lax.axis_size(axis_name)
  scale = jnp.exp(jnp.asarray(log_scale, jnp.float32))
  img_NxD, txt_NxD = (lax.all_gather(x, axis_name, tiled=True) for x in (img, txt))
  t_img, t_txt = lax.stop_gradient(teacher_img), lax.stop_gradient(teacher_txt)
  t_img_NxE, t_txt_NxE = (lax.all_gather(x, axis_name, tiled=True) for x in (t_img, t_txt))
  img_to_txt = _soft_cross_entropy_sum(similarity_logits(t_img, t_txt_NxE, t_scale),
                                       similarity_logits(img, txt_NxD, scale))
  txt_to_img = _soft_cross_entropy_sum(similarity_logits(t_txt, t_img_NxE, t_scale),
                                       similarity_logits(txt, img_NxD, scale))
  return lax.psum(img_to_txt + txt_to_img, axis_name) / (2 * n * b)


def allgather_distillation_loss(img, txt, logit_scale, teacher_img, teacher_txt,
                                teacher_logit_scale=None, teacher_temperature=None, *, axis_name):
  """`distillation_loss` over the global batch as a `shard_map` body: every array is this device's
  `(b, dim)` rows, split over `axis_name`. Both models' embeddings are all-gathered; each device
  computes its rows and columns of both `N x N` logit matrices (O(b*N) memory) and the loss is
  psummed. Raises as `distillation_loss`."""
  check_distillation_inputs(img, txt, logit_scale, teacher_img, teacher_txt,
                            teacher_logit_scale, teacher_temperature)
  with jax.named_scope('allgather_distillation_loss'):
    return _allgather(img, txt, logit_scale, teacher_img, teacher_txt,
                      teacher_scale(teacher_logit_scale, teacher_temperature), axis_name)


def _teacher_stats(t_bxb, s_bxb, axis):
  """(max, sum of exp(t - max), sum of exp(t - max) * s) along `axis`: the teacher's streaming
  softmax and the student logits' expectation under it, `E_p[s] = last / middle`."""
  m = jnp.max(t_bxb, axis=axis)
  e_bxb = jnp.exp(t_bxb - jnp.expand_dims(m, axis))
  return m, jnp.sum(e_bxb, axis=axis), jnp.sum(e_bxb * s_bxb, axis=axis)


def _teacher_merge(stats, t_bxb, s_bxb, axis):
  m, total, weighted = stats
  m_block, total_block, weighted_block = _teacher_stats(t_bxb, s_bxb, axis)
  m_new = jnp.maximum(m, m_block)
  old, new = jnp.exp(m - m_new), jnp.exp(m_block - m_new)
  return m_new, total * old + total_block * new, weighted * old + weighted_block * new


def _stats(s_bxb, t_bxb, axis):
  return _lse_stats(s_bxb, axis), _teacher_stats(t_bxb, s_bxb, axis)


def _merge(stats, s_bxb, t_bxb, axis):
  return _lse_merge(stats[0], s_bxb, axis), _teacher_merge(stats[1], t_bxb, s_bxb, axis)


def _finish(stats):
  """Per row (or column): the soft cross-entropy `lse(s) - E_p[s]`, and the student's and the
  teacher's log-sum-exps as (max, log of the sum), which the backward pass normalises by: kept
  apart, `exp((s - max) - log_sum)` stays exact where `exp(s - lse)` would lose lse's low bits
  (logits near 1000 in fp32)."""
  (m, total), (m_t, total_t, weighted) = stats
  return m + jnp.log(total) - weighted / total_t, ((m, jnp.log(total)), (m_t, jnp.log(total_t)))


def _softmax(x_bxb, lse, axis):
  m, log_total = (jnp.expand_dims(v, axis) for v in lse)
  return jnp.exp((x_bxb - m) - log_total)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _ring_kd(img, txt, log_scale, teacher_img, teacher_txt, t_scale, axes):
  return _ring_kd_fwd(img, txt, log_scale, teacher_img, teacher_txt, t_scale, axes)[0]


def _ring_kd_fwd(img, txt, log_scale, teacher_img, teacher_txt, t_scale, axes):
  """One trip: each row keeps the student's streaming log-sum-exp and the teacher's streaming
  softmax with the student logits' running expectation under it; a text chunk carries its
  column statistics, so both directions are done in one pass."""
  n, b = lax.axis_size(axes), img.shape[0]
  scale = jnp.exp(log_scale)
  blocks = lambda y, ty: (similarity_logits(img, y, scale),
                          similarity_logits(teacher_img, ty, t_scale))

  def step(_, carry):
    y_bxD, ty_bxE, cols, rows = carry
    y_bxD, ty_bxE, cols = _shift((y_bxD, ty_bxE, cols), axes)
    s_bxb, t_bxb = blocks(y_bxD, ty_bxE)
    return y_bxD, ty_bxE, _merge(cols, s_bxb, t_bxb, 0), _merge(rows, s_bxb, t_bxb, 1)

  s_bxb, t_bxb = blocks(txt, teacher_txt)
  init = (txt, teacher_txt, _stats(s_bxb, t_bxb, 0), _stats(s_bxb, t_bxb, 1))
  _, _, cols, rows = lax.fori_loop(1, n, step, init)
  (row_ce_b, row_lses), (col_ce_b, col_lses) = _finish(rows), _finish(_shift(cols, axes))
  loss = lax.psum(jnp.sum(row_ce_b) + jnp.sum(col_ce_b), axes) / (2 * n * b)
  return loss, (img, txt, log_scale, teacher_img, teacher_txt, t_scale, row_lses, col_lses)


def _ring_kd_bwd(axes, res, ct):
  """The ring again: d loss / d s = softmax(s) - softmax(t) per row and per column, each block
  recomputed and normalised by the saved log-sum-exps. The teacher gets no cotangent."""
  img, txt, log_scale, teacher_img, teacher_txt, t_scale, (row_lse, row_tlse), cols = res
  n, b = lax.axis_size(axes), img.shape[0]
  scale = jnp.exp(log_scale)
  w = ct / (2 * n * b)

  def block_grads(y_bxD, ty_bxE, y_cols):
    s_bxb = similarity_logits(img, y_bxD, scale)
    t_bxb = similarity_logits(teacher_img, ty_bxE, t_scale)
    col_lse, col_tlse = y_cols
    g_bxb = w * (_softmax(s_bxb, row_lse, 1) - _softmax(t_bxb, row_tlse, 1) +
                 _softmax(s_bxb, col_lse, 0) - _softmax(t_bxb, col_tlse, 0))
    return (*_outer_grads(g_bxb, img, y_bxD, scale), jnp.sum(g_bxb * s_bxb))

  def step(_, carry):
    travelling, dimg_bxD, dlog_scale = carry
    y_bxD, ty_bxE, y_cols, dy_bxD = _shift(travelling, axes)
    dimg_block_bxD, dy_block_bxD, dlog_scale_block = block_grads(y_bxD, ty_bxE, y_cols)
    return ((y_bxD, ty_bxE, y_cols, dy_bxD + dy_block_bxD), dimg_bxD + dimg_block_bxD,
            dlog_scale + dlog_scale_block)

  dimg_bxD, dtxt_bxD, dlog_scale = block_grads(txt, teacher_txt, cols)
  init = ((txt, teacher_txt, cols, dtxt_bxD), dimg_bxD, dlog_scale)
  travelling, dimg_bxD, dlog_scale = lax.fori_loop(1, n, step, init)
  dtxt_bxD = _shift(travelling[3], axes)  # after n shifts in all, each text gradient is home
  return dimg_bxD.astype(img.dtype), dtxt_bxD.astype(txt.dtype), dlog_scale, None, None, None


_ring_kd.defvjp(_ring_kd_fwd, _ring_kd_bwd)


def _ring(img, txt, log_scale, teacher_img, teacher_txt, t_scale, axis_name):
  axes = _axes(axis_name)
  args = (img, txt, jnp.asarray(log_scale, jnp.float32), lax.stop_gradient(teacher_img),
          lax.stop_gradient(teacher_txt), t_scale)
  return _ring_kd(*(_varying(x, axes) for x in args), axes)


def ring_distillation_loss(img, txt, logit_scale, teacher_img, teacher_txt,
                           teacher_logit_scale=None, teacher_temperature=None, *, axis_name):
  """`allgather_distillation_loss` in O(b^2 + b*(D+E)) memory per device, whatever the device
  count: both models' text chunks travel a `ppermute` ring (as in `losses.ring`) and one trip
  keeps, per row and per column, the student's streaming log-sum-exp and the teacher's streaming
  softmax with the student logits' running expectation under it; a `custom_vjp` runs the ring
  again for the gradients. Raises as `distillation_loss`."""
  check_distillation_inputs(img, txt, logit_scale, teacher_img, teacher_txt,
                            teacher_logit_scale, teacher_temperature)
  with jax.named_scope('ring_distillation_loss'):
    return _ring(img, txt, logit_scale, teacher_img, teacher_txt,
                 teacher_scale(teacher_logit_scale, teacher_temperature), axis_name)


# Registered names -> shard_map bodies taking the teacher's resolved (linear) scale.
DISTILLATION_LOSSES = {'distillation': _allgather, 'ring_distillation': _ring}


def make_distillation_loss(name, mesh, batch_axes=('data',)):
  """`loss(img, txt, logit_scale, teacher_img, teacher_txt, teacher_logit_scale=None,
  teacher_temperature=None)` on global `(batch, dim)` arrays whose batch is split over
  `batch_axes` of `mesh` (as `losses.make_loss`): 'distillation' all-gathers, 'ring_distillation'
  runs the O(b^2) ring. The loss comes back replicated, equal in value and gradients to
  `distillation_loss` on the global batch.

  Raises:
    ValueError: an unknown name or batch axes (here); when called, the errors of
      `distillation_loss`, or a global batch not divisible by the batch axes' device count.
  """
  if name not in DISTILLATION_LOSSES:
    raise ValueError(f'distillation loss must be one of {sorted(DISTILLATION_LOSSES)}, got '
                     f'{name!r}')
  axes = _batch_axes(mesh, batch_axes)
  ways = int(np.prod([mesh.shape[a] for a in axes]))
  rows = P(axes, None)
  sharded = jax.jit(jax.shard_map(
      functools.partial(DISTILLATION_LOSSES[name], axis_name=axes), mesh=mesh,
      in_specs=(rows, rows, P(), rows, rows, P()), out_specs=P()))

  def loss(img, txt, logit_scale, teacher_img, teacher_txt, teacher_logit_scale=None,
           teacher_temperature=None):
    check_distillation_inputs(img, txt, logit_scale, teacher_img, teacher_txt,
                              teacher_logit_scale, teacher_temperature)
    if np.shape(img)[0] % ways:
      raise ValueError(f'global batch {np.shape(img)[0]} must be divisible by the {ways} devices '
                       f'of batch axes {axes} in mesh {dict(mesh.shape)}')
    return sharded(img, txt, logit_scale, teacher_img, teacher_txt,
                   teacher_scale(teacher_logit_scale, teacher_temperature))

  loss.__name__ = f'{name}_loss'
  return loss
