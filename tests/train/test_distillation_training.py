"""Distillation in the train step (`clip.train.distillation`): a frozen teacher of another size and
tokenizer adds `distill_weight * KD` to the contrastive loss. The objective's value equals the
float64 formula on the models' own embeddings; its loss and every student gradient on meshes
(8,), (2,4) and (2,2,2) equal one device's; the compiled step gives the teacher no gradient and
leaves its parameters bit-identical; stored (offline) teacher embeddings give the online loss;
bad settings fail before compiling."""
import dataclasses

import chex
import jax
import numpy as np
import pytest

import clip
from clip import model
from clip import sharding
from clip.train import distillation
from clip.train import objectives
from clip.train import training
from tests import numpy_reference
from tests.losses.test_reference import np_contrastive
from tests.numpy_reference import np_distillation
from tests.numpy_reference import perturbed
from tests.train import test_training

STUDENT = clip.CLIPConfig(32, clip.VisionConfig('vit', 32, 1, 2, 16, 8),
                          clip.TextConfig(32, 1, 2, context_length=8, vocab_size=64,
                                          eot_token_id=63))
# Another width, resolution, context length and vocabulary (OpenAI's BPE, which it can run): the
# batches carry its own inputs.
TEACHER = clip.CLIPConfig(48, clip.VisionConfig('vit', 48, 1, 2, 24, 8),
                          clip.TextConfig(48, 1, 2, context_length=12))
WEIGHT = 0.7
BATCH = 8


def _batch(seed=0):
  rng = np.random.default_rng(seed)
  tokens = lambda cfg: test_training.openai_reference.random_tokens(rng, BATCH, cfg)
  image = lambda cfg: rng.standard_normal(
      (BATCH, cfg.image_resolution, cfg.image_resolution, 3)).astype(np.float32)
  return {'image': image(STUDENT), 'tokens': tokens(STUDENT), 'teacher_image': image(TEACHER),
          'teacher_tokens': tokens(TEACHER)}


def _tcfg(**kw):
  return training.TrainConfig(**{**dict(batch_size=BATCH, total_steps=4, warmup_steps=1,
                                        distill_weight=WEIGHT), **kw})


def _params(cfg, seed):
  return model.split_batch_stats(perturbed(model.init_params(jax.random.PRNGKey(seed), cfg)))[0]


@pytest.fixture(scope='module')
def teacher():
  return distillation.Teacher.of(_params(TEACHER, 1), TEACHER)


def _value_and_grad(mesh_sizes, batch, params, tcfg, teacher):
  mesh = sharding.make_mesh(*mesh_sizes, devices=jax.devices()[:int(np.prod(mesh_sizes))])
  objective = objectives.clip_objective(STUDENT, tcfg, mesh, teacher)
  f = jax.value_and_grad(objective, has_aux=True)
  teacher_params = distillation.place(teacher, mesh)
  with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
    (loss, (_, aux)), grads = jax.jit(f)(params, {}, training.global_batch(mesh, batch),
                                         jax.random.PRNGKey(3), teacher_params)
  return jax.device_get((loss, aux, grads))


@pytest.fixture(scope='module')
def one_device(teacher):
  tcfg, params, batch = _tcfg(), _params(STUDENT, 0), _batch()
  return tcfg, params, batch, _value_and_grad((1, 1, 1), batch, params, tcfg, teacher)


def test_objective_is_contrastive_plus_weighted_kd_of_the_float64_formula(one_device, teacher):
  """The step's terms against the float64 formulas on the embeddings each model gives outside
  training (the teacher through its own inputs)."""
  _, params, batch, (loss, aux, _) = one_device
  emb = lambda p, cfg, im, tok: (np.asarray(model.l2_normalize(clip.encode_image(p, im, cfg))),
                                 np.asarray(model.l2_normalize(clip.encode_text(p, tok, cfg))))
  img, txt = emb(params, STUDENT, batch['image'], batch['tokens'])
  t_img, t_txt = emb(teacher.params, TEACHER, batch['teacher_image'], batch['teacher_tokens'])
  contrastive = np_contrastive(img, txt, params['logit_scale'])
  kd = np_distillation(img, txt, params['logit_scale'], t_img, t_txt,
                       np.exp(np.float64(teacher.params['logit_scale'])))
  np.testing.assert_allclose(aux['contrastive_loss'], contrastive, rtol=1e-5)
  np.testing.assert_allclose(aux['distill_loss'], kd, rtol=1e-5)
  np.testing.assert_allclose(loss, contrastive + WEIGHT * kd, rtol=1e-5)
  assert abs(kd - contrastive) > 1e-3  # the two terms differ: the sum checks the weight


@pytest.mark.parametrize('mesh_sizes', [(8, 1, 1), (2, 4, 1), (2, 2, 2)],
                         ids=['8', '2x4', '2x2x2'])
def test_sharded_distillation_equals_one_device(one_device, teacher, mesh_sizes):
  tcfg, params, batch, (loss_ref, aux_ref, grads_ref) = one_device
  tcfg = dataclasses.replace(tcfg, distill_loss='ring_distillation') if mesh_sizes[1] == 4 else tcfg
  loss, aux, grads = _value_and_grad(mesh_sizes, batch, params, tcfg, teacher)
  np.testing.assert_allclose(loss, loss_ref, rtol=1e-5)
  np.testing.assert_allclose(aux['distill_loss'], aux_ref['distill_loss'], rtol=1e-5)
  chex.assert_trees_all_equal_shapes(grads, grads_ref)
  worst = numpy_reference.worst_relative_error(grads, grads_ref)
  assert worst[1] < 1e-5, worst


def test_the_compiled_step_leaves_the_teacher_frozen(one_device, teacher):
  """Three steps on a (2,2,2) mesh in bfloat16: the step's own teacher gradient norm is 0, the
  teacher's placed parameters come out bit-identical, the student's move; a float32 teacher gives
  the same first KD within bfloat16's precision."""
  mesh = sharding.make_mesh(2, 2, 2)
  tcfg = _tcfg(teacher_dtype='bfloat16')
  bf16 = distillation.Teacher.of(teacher.params, TEACHER, 'bfloat16')
  assert {x.dtype for x in jax.tree.leaves(bf16.params)} == {np.dtype('bfloat16')}
  setup = training.setup(STUDENT, tcfg, mesh, teacher=bf16,
                         init_params=lambda key: _params(STUDENT, 0))
  before = jax.device_get(setup.train_step.teacher_params)
  start = jax.device_get(setup.state['params'])
  state, history = setup.state, []
  for step in range(3):
    state, metrics = setup.train_step(state, training.global_batch(mesh, _batch(step)))
    history.append(jax.device_get(metrics))
  assert [m['teacher_grad_norm'] for m in history] == [0.0] * 3
  chex.assert_trees_all_equal(jax.device_get(setup.train_step.teacher_params), before)
  assert numpy_reference.worst_relative_error(jax.device_get(state['params']), start)[1] > 0
  fp32 = one_device[3][1]  # the float32 teacher's first step: the same batch and student
  np.testing.assert_allclose(history[0]['distill_loss'], fp32['distill_loss'], rtol=2e-2)
  assert history[0]['distill_loss'] != fp32['distill_loss']  # bfloat16 did run


def test_stored_teacher_embeddings_give_the_online_loss(one_device, teacher):
  """Offline distillation (reinforced shards' embeddings in the batch, the teacher's stored
  logit scale) equals the online step on the same batch."""
  tcfg, params, batch, (loss_ref, aux_ref, grads_ref) = one_device
  img = model.l2_normalize(clip.encode_image(teacher.params, batch['teacher_image'], TEACHER))
  txt = model.l2_normalize(clip.encode_text(teacher.params, batch['teacher_tokens'], TEACHER))
  stored = {'image': batch['image'], 'tokens': batch['tokens'],
            'teacher_image_embedding': np.asarray(img),
            'teacher_text_embedding': np.asarray(txt)}
  offline = distillation.Teacher.offline(float(teacher.params['logit_scale']))
  loss, aux, grads = _value_and_grad((2, 1, 1), stored, params, tcfg, offline)
  np.testing.assert_allclose(loss, loss_ref, rtol=1e-6)
  np.testing.assert_allclose(aux['distill_loss'], aux_ref['distill_loss'], rtol=1e-6)
  assert numpy_reference.worst_relative_error(grads, grads_ref)[1] < 1e-5


def test_a_teacher_reading_the_students_inputs_needs_no_teacher_keys():
  same = distillation.Teacher.of(_params(STUDENT, 5), dataclasses.replace(
      STUDENT, text=dataclasses.replace(STUDENT.text, vocab_size=49408, eot_token_id=None)))
  assert distillation.batch_keys(STUDENT, same) == ()
  assert distillation.batch_keys(STUDENT, distillation.Teacher.offline(1.0)) == (
      'teacher_image_embedding', 'teacher_text_embedding')


def test_bad_distillation_settings_fail_before_compiling(teacher):
  with pytest.raises(ValueError, match='distill_weight must be a finite number >= 0, got -0.5'):
    _tcfg(distill_weight=-0.5)
  with pytest.raises(ValueError, match="'teacher': 'teacher.pt'} set but distill_weight is 0"):
    _tcfg(distill_weight=0.0, teacher='teacher.pt')
  with pytest.raises(ValueError, match="'distill_temperature': 0.01} set but distill_weight is"):
    _tcfg(distill_weight=0.0, distill_temperature=0.01)
  with pytest.raises(ValueError, match='distill_loss must be one of'):
    _tcfg(distill_loss='kl')
  with pytest.raises(ValueError, match='distill_temperature must be None'):
    _tcfg(distill_temperature=0.0)
  with pytest.raises(ValueError, match='does not run with grad_cache'):
    _tcfg(accumulation='grad_cache', accumulation_steps=2)
  dtype_error = "teacher_dtype must be float32 or bfloat16, got 'float16'"
  for bad_dtype in (lambda: _tcfg(teacher_dtype='float16'),
                    lambda: distillation.Teacher.of(teacher.params, TEACHER, 'float16')):
    with pytest.raises(ValueError, match=dtype_error):
      bad_dtype()
  unknown = dataclasses.replace(TEACHER, tokenizer=clip.TokenizerConfig(kind='unknown',
                                                                        name='bert-base'))
  with pytest.raises(ValueError, match='the teacher: its tokenizer is unknown.*bert-base'):
    distillation.Teacher.of(teacher.params, unknown)
  mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  with pytest.raises(ValueError, match='needs a teacher exactly when'):
    training.setup(STUDENT, _tcfg(), mesh)
  with pytest.raises(ValueError, match='needs its stored logit_scale or'):
    training.setup(STUDENT, _tcfg(), mesh, teacher=distillation.Teacher.offline())
