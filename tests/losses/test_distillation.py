"""losses/distillation.py: the KD reference against a float64 numpy formula (values,
finite-difference gradients; with and without jit) and against open_clip's `DistillClipLoss` in
torch; the all-gather and ring versions against the reference on meshes (8,), (2,4), (2,2,2), in
value and in the gradients w.r.t. img, txt and logit_scale, the teacher's gradients exactly zero;
teacher and student of different widths; both teacher forms (its own scale, MobileCLIP's
temperature); large logits; the ring's memory flat in the device count; bad inputs."""
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import losses
from experiments.references import open_clip as open_clip_reference
from tests.losses.test_reference import FD_RTOL
from tests.losses.test_reference import FP32_RTOL
from tests.losses.test_reference import assert_rel_close
from tests.losses.test_reference import embeddings
from tests.losses.test_reference import finite_difference_grads
from tests.losses.test_reference import rel_err
from tests.numpy_reference import np_distillation

LOG_SCALE, TEACHER_LOG_SCALE, TAU = np.log(10.0), np.log(50.0), 0.03
STUDENT, TEACHER = 16, 24  # widths: the two models' embeddings need not match
BF16_GRAD_RTOL = 1e-2  # embedding gradients are returned in bf16 (8 mantissa bits)
ARGNUMS = (0, 1, 2, 3, 4, 5)  # img, txt, logit_scale and the teacher's three: all differentiated

# (mesh shape, axis names, batch axes): the batch over one axis, over two, over two of three.
MESHES = {
    '8': ((8,), ('data',), ('data',)),
    '2x4': ((2, 4), ('data', 'fsdp'), ('data', 'fsdp')),
    '2x2x2': ((2, 2, 2), ('data', 'fsdp', 'tensor'), ('data', 'fsdp')),
}
# The teacher's scalar, passed positionally so that it can be differentiated: its own log scale
# (open_clip) or a temperature (MobileCLIP), with its linear scale for the numpy formula.
FORMS = {
    'teacher_scale': (lambda s: dict(teacher_logit_scale=s), TEACHER_LOG_SCALE,
                      np.exp(TEACHER_LOG_SCALE)),
    'temperature': (lambda s: dict(teacher_temperature=s), TAU, 1 / TAU),
}


def kd_args(n=32, d=STUDENT, e=TEACHER, seed=0):
  """(img, txt, logit_scale, teacher_img, teacher_txt): the teacher's embeddings a noisy copy of
  the student's lifted to width e, so that the two models roughly agree, as after training."""
  rng = np.random.default_rng(seed)
  img, txt = embeddings(rng, n, d), embeddings(rng, n, d)
  lift = rng.standard_normal((d, e)) / np.sqrt(d)
  teacher = [x @ lift + 0.5 * embeddings(rng, n, e) for x in (img, txt)]
  teacher = [(t / np.linalg.norm(t, axis=1, keepdims=True)).astype(np.float32) for t in teacher]
  return img, txt, LOG_SCALE, *teacher


def with_form(fn, form):
  """fn(img, txt, logit_scale, teacher_img, teacher_txt, teacher_scalar), the scalar passed as
  the keyword of `form`."""
  keyword = FORMS[form][0]
  return lambda *a: fn(*a[:5], **keyword(a[5]))


def assert_teacher_grads_zero(grads):
  for g in grads[3:]:
    np.testing.assert_array_equal(g, np.zeros_like(g))


class ReferenceTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(('teacher_scale', 'teacher_scale'),
                                  ('temperature', 'temperature'))
  def test_reference_matches_float64_definition(self, form):
    """Widths 4 (student) and 3 (teacher); gradients against central differences of the formula."""
    args = (*kd_args(n=6, d=4, e=3), FORMS[form][1])
    fn = self.variant(jax.value_and_grad(with_form(losses.distillation_loss, form), ARGNUMS))
    value, grads = fn(*args)
    np_fn = lambda img, txt, s: np_distillation(img, txt, s, args[3], args[4], FORMS[form][2])
    assert rel_err(value, np_fn(*args[:3])) < FP32_RTOL
    assert_rel_close(grads[:3], finite_difference_grads(np_fn, args[:3]), FD_RTOL)
    assert_teacher_grads_zero(grads)


@pytest.mark.parametrize('form', list(FORMS))
def test_reference_equals_open_clip_distill_clip_loss(form):
  """open_clip's `DistillClipLoss` (torch, float64) takes linear scales: the student's exp(t), and
  the teacher's exp(its scale) or, as MobileCLIP's patch of it passes, 1 / tau."""
  torch = pytest.importorskip('torch')
  oc = open_clip_reference.import_open_clip()
  args = (*kd_args(n=16), FORMS[form][1])
  value, grads = jax.value_and_grad(with_form(losses.distillation_loss, form), (0, 1, 2))(*args)
  img, txt, scale = (torch.tensor(np.float64(x), requires_grad=True)
                     for x in (args[0], args[1], np.exp(LOG_SCALE)))
  teacher = (torch.tensor(np.float64(x)) for x in (args[3], args[4], FORMS[form][2]))
  kd = oc.loss.DistillClipLoss()(img, txt, scale, *teacher, output_dict=True)['distill_loss']
  kd.backward()
  assert rel_err(value, kd.item()) < FP32_RTOL
  # d/d log(scale) = scale * d/d scale
  expected = (img.grad.numpy(), txt.grad.numpy(), scale.grad.item() * np.exp(LOG_SCALE))
  assert_rel_close(grads, expected, FP32_RTOL)


@functools.lru_cache(maxsize=None)
def mesh_of(mesh_name):
  shape, names, batch_axes = MESHES[mesh_name]
  devices = np.asarray(jax.devices()[:int(np.prod(shape))]).reshape(shape)
  return Mesh(devices, names), batch_axes


@functools.lru_cache(maxsize=None)
def sharded_value_and_grad(name, mesh_name, form):
  mesh, batch_axes = mesh_of(mesh_name)
  loss = losses.make_distillation_loss(name, mesh, batch_axes)
  return jax.jit(jax.value_and_grad(with_form(loss, form), ARGNUMS))


def reference_value_and_grad(args, form):
  return jax.value_and_grad(with_form(losses.distillation_loss, form), ARGNUMS)(*args)


@pytest.mark.parametrize('mesh_name,form', [('8', 'teacher_scale'), ('2x4', 'teacher_scale'),
                                            ('2x2x2', 'teacher_scale'), ('2x2x2', 'temperature')])
@pytest.mark.parametrize('name', sorted(losses.DISTILLATION_LOSSES))
def test_sharded_equals_reference(name, mesh_name, form):
  """The two teacher forms differ only in the teacher's linear scale, an input of the same
  shard_map program: the temperature is run on one mesh."""
  args = (*kd_args(), FORMS[form][1])
  value, grads = sharded_value_and_grad(name, mesh_name, form)(*args)
  ref_value, ref_grads = reference_value_and_grad(args, form)
  assert rel_err(value, ref_value) < FP32_RTOL
  assert_rel_close(grads[:3], ref_grads[:3], FP32_RTOL)
  assert_teacher_grads_zero(grads)


def test_ring_in_bf16():
  """bf16 embeddings of both models (a bf16 teacher): products exact in the fp32 accumulation;
  the ring's custom VJP returns bf16 gradients. (The all-gather loss is plain autodiff.)"""
  args = (*(x if np.ndim(x) == 0 else jnp.asarray(x, jnp.bfloat16) for x in kd_args()),
          TEACHER_LOG_SCALE)
  value, grads = sharded_value_and_grad('ring_distillation', '2x4', 'teacher_scale')(*args)
  ref_value, ref_grads = reference_value_and_grad(args, 'teacher_scale')
  assert grads[0].dtype == grads[1].dtype == jnp.bfloat16
  assert rel_err(value, ref_value) < FP32_RTOL
  assert_rel_close(grads[:2], ref_grads[:2], BF16_GRAD_RTOL)
  assert rel_err(grads[2], ref_grads[2]) < FP32_RTOL


@pytest.mark.parametrize('name', sorted(losses.DISTILLATION_LOSSES))
def test_stable_at_large_logits(name):
  """Student scale 1000, teacher temperature 1e-3, texts the images reversed (student) or rolled by
  a device (teacher): each row's best match (logit 1000) sits on another device, so the ring's
  running maxima rescale, and the two models disagree, so the loss is far from 0."""
  img, _, _, t_img, _ = kd_args()
  args = (img, img[::-1].copy(), np.log(1000.0), t_img, np.roll(t_img, 8, axis=0), 1e-3)
  value, grads = sharded_value_and_grad(name, '2x2x2', 'temperature')(*args)
  ref_value, ref_grads = reference_value_and_grad(args, 'temperature')
  assert np.isfinite(value) and all(np.isfinite(g).all() for g in grads)
  assert rel_err(value, np_distillation(*args[:5], 1 / args[5])) < FP32_RTOL
  assert rel_err(value, ref_value) < FP32_RTOL
  assert_rel_close(grads[:3], ref_grads[:3], FP32_RTOL)


@pytest.mark.parametrize('body', [losses.allgather_distillation_loss,
                                  losses.ring_distillation_loss])
def test_body_differentiated_inside_shard_map(body):
  """Called as a shard_map body with a str axis name and differentiated per device: each device's
  gradient is its rows of the reference's."""
  mesh, _ = mesh_of('8')
  args = (*kd_args(), TAU)

  def per_device(*a):
    kd = lambda *x: body(*x[:5], teacher_temperature=x[5], axis_name='data')
    return jax.value_and_grad(kd, argnums=(0, 1))(*a)

  rows = P('data')
  fn = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(rows, rows, P(), rows, rows, P()),
                             out_specs=(P(), (rows, rows))))
  value, grads = fn(*args)
  ref_value, ref_grads = reference_value_and_grad(args, 'temperature')
  assert rel_err(value, ref_value) < FP32_RTOL
  assert_rel_close(grads, ref_grads[:2], FP32_RTOL)


LOCAL_BATCH, DIM = 256, 64
FLAT = 1.1  # ring: temp bytes at 8 devices <= FLAT * temp bytes at 2
SAVING = 3.0  # all-gather temp bytes >= SAVING * ring temp bytes, at 8 devices


def grad_temp_bytes(name, n):
  """Temp bytes per device of the jitted gradient w.r.t. the student's inputs, LOCAL_BATCH pairs
  a device on n devices (both models DIM wide), compiled from shapes only."""
  mesh = Mesh(np.asarray(jax.devices()[:n]), ('data',))
  emb = jax.ShapeDtypeStruct((n * LOCAL_BATCH, DIM), jnp.float32,
                             sharding=NamedSharding(mesh, P('data')))
  scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=NamedSharding(mesh, P()))
  grad = jax.jit(jax.grad(losses.make_distillation_loss(name, mesh), argnums=(0, 1, 2)))
  return grad.lower(emb, emb, scalar, emb, emb, scalar).compile().memory_analysis(
      ).temp_size_in_bytes


def test_ring_memory_is_flat_in_devices():
  ring = {n: grad_temp_bytes('ring_distillation', n) for n in (2, 8)}
  allgather = grad_temp_bytes('distillation', 8)
  assert ring[8] <= FLAT * ring[2], ring
  assert allgather >= SAVING * ring[8], (allgather, ring)


def test_bad_input_raises():
  img, txt, scale, t_img, t_txt = kd_args(n=8)
  kd = losses.distillation_loss
  with pytest.raises(ValueError, match=r'teacher batch must equal the student batch 8, got '
                     r'teacher embeddings of shape \(6, 24\)'):
    kd(img, txt, scale, t_img[:6], t_txt[:6], TEACHER_LOG_SCALE)
  with pytest.raises(ValueError, match=r'teacher: img and txt must have the same'):
    kd(img, txt, scale, t_img, t_txt[:, :8], TEACHER_LOG_SCALE)
  with pytest.raises(TypeError, match='teacher: txt must be a float array, got dtype int32'):
    kd(img, txt, scale, t_img, t_txt.astype(np.int32), TEACHER_LOG_SCALE)
  for tau in (-0.01, 0.0, np.inf):
    with pytest.raises(ValueError, match=f'teacher_temperature must be finite and > 0, got {tau}'):
      kd(img, txt, scale, t_img, t_txt, teacher_temperature=tau)
  with pytest.raises(ValueError, match='exactly one of teacher_logit_scale .* got both'):
    kd(img, txt, scale, t_img, t_txt, TEACHER_LOG_SCALE, teacher_temperature=TAU)
  with pytest.raises(ValueError, match='exactly one of teacher_logit_scale .* got neither'):
    kd(img, txt, scale, t_img, t_txt)
  with pytest.raises(ValueError, match=r'teacher_temperature must be a scalar, got shape \(1,\)'):
    kd(img, txt, scale, t_img, t_txt, teacher_temperature=np.ones(1))
  mesh, batch_axes = mesh_of('2x4')
  with pytest.raises(ValueError, match="one of .*'ring_distillation'.*got 'kd'"):
    losses.make_distillation_loss('kd', mesh, batch_axes)
  sharded = losses.make_distillation_loss('ring_distillation', mesh, batch_axes)
  with pytest.raises(ValueError, match='global batch 12 must be divisible by the 8 devices'):
    sharded(*kd_args(n=12), TEACHER_LOG_SCALE)
  with pytest.raises(ValueError, match='teacher_temperature must be finite and > 0, got -1.0'):
    sharded(img, txt, scale, t_img, t_txt, teacher_temperature=-1.0)


def test_traced_bad_temperature_gives_nan():
  """Under a trace the temperature's value is unknown: a non-positive one makes the loss NaN."""
  img, txt, scale, t_img, t_txt = kd_args(n=8)
  kd = jax.jit(with_form(losses.distillation_loss, 'temperature'))
  assert np.isnan(kd(img, txt, scale, t_img, t_txt, -TAU))
  assert np.isfinite(kd(img, txt, scale, t_img, t_txt, TAU))
