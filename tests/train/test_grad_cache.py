"""clip/train/grad_cache.py: two-pass accumulation equals one step on the whole batch (loss and
every parameter gradient; every loss and the meshes (8,), (2,4) and (2,2,2) in a covering
design), its temporary memory is that of a micro-batch step plus the embeddings, and bad
settings are errors before anything compiles."""
import dataclasses

import chex
import jax
import numpy as np
import pytest

import losses
from clip.train import grad_cache
from clip import model
from clip.train import objectives
from clip import sharding
from clip.train import training
from tests.train import test_training
from tests import numpy_reference
from tests.numpy_reference import perturbed

K = 4
BATCH = 32  # micro-batches of 8: one example per device on 8 devices


def _setup(loss, mesh_sizes, vision=None):
  cfg = dataclasses.replace(test_training.TINY, logit_bias=losses.takes_bias(loss),
                            vision=vision or test_training.TINY.vision)
  tcfg = training.TrainConfig(batch_size=BATCH, total_steps=3, warmup_steps=1, loss=loss,
                              accumulation_steps=K, accumulation='grad_cache')
  mesh = sharding.make_mesh(*mesh_sizes)
  params = perturbed(model.init_params(jax.random.PRNGKey(0), cfg))
  params, stats = model.split_batch_stats(params)
  batch = training.global_batch(mesh, test_training.batches(cfg, BATCH, 1)[0])
  return cfg, tcfg, mesh, params, stats, batch


def _relative(a, b):
  return float(np.abs(np.asarray(a) - np.asarray(b)).max() / (np.abs(np.asarray(b)).max() + 1e-30))


# A covering design, not the 4 x 3 cross-product (CI time): every mesh takes a softmax and a
# sigmoid loss, one all-gather and one ring, and every loss runs on a multi-axis mesh.
COVERING = [('contrastive', (8, 1, 1)), ('ring_sigmoid', (8, 1, 1)),
            ('sigmoid', (2, 4, 1)), ('ring_contrastive', (2, 4, 1)),
            ('contrastive', (2, 2, 2)), ('ring_sigmoid', (2, 2, 2))]


def test_the_covering_design_covers_every_loss_and_mesh():
  assert {loss for loss, _ in COVERING} == set(losses.LOSSES)
  for sizes in {m for _, m in COVERING}:
    on_mesh = {loss for loss, m in COVERING if m == sizes}
    assert {'sigmoid' in l for l in on_mesh} == {True, False}, sizes
    assert {l.startswith('ring_') for l in on_mesh} == {True, False}, sizes
  assert {loss for loss, m in COVERING if sum(v > 1 for v in m) > 1} == set(losses.LOSSES)


@pytest.mark.parametrize('loss,mesh_sizes', COVERING,
                         ids=[f'{l}-{"x".join(str(v) for v in m if v > 1)}' for l, m in COVERING])
def test_two_passes_equal_one_step_on_the_whole_batch(loss, mesh_sizes):
  cfg, tcfg, mesh, params, stats, batch = _setup(loss, mesh_sizes)
  key = jax.random.PRNGKey(5)
  whole = jax.value_and_grad(objectives.clip_objective(cfg, tcfg, mesh), has_aux=True)
  two_pass = grad_cache.value_and_grad(cfg, tcfg, mesh)
  with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
    (loss_ref, (_, aux_ref)), grads_ref = jax.jit(whole)(params, stats, batch, key)
    (loss_gc, (_, aux_gc)), grads_gc = jax.jit(two_pass)(params, stats, batch, key)
  assert _relative(loss_gc, loss_ref) < 1e-5
  np.testing.assert_allclose(aux_gc['accuracy'], aux_ref['accuracy'], rtol=1e-6)
  chex.assert_trees_all_equal_shapes(grads_gc, grads_ref)
  worst = numpy_reference.worst_relative_error(grads_gc, grads_ref)
  assert worst[1] < 1e-5, worst


def _step_temp_bytes(cfg, batch_size, k, accumulation):
  mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  tcfg = training.TrainConfig(batch_size=batch_size, total_steps=3, warmup_steps=1,
                              accumulation_steps=k, accumulation=accumulation)
  state, step, _, _, _ = training.setup(cfg, tcfg, mesh)
  r, sh = cfg.image_resolution, sharding.batch_sharding(mesh)
  batch = {'image': jax.ShapeDtypeStruct((batch_size, r, r, 3), np.float32, sharding=sh),
           'tokens': jax.ShapeDtypeStruct((batch_size, cfg.context_length), np.int32, sharding=sh)}
  return step.lower(state, batch).compile().memory_analysis().temp_size_in_bytes


def test_memory_is_a_micro_batch_step_plus_the_embeddings():
  """memory_analysis of the whole train step at a global batch of 256: k = 8 needs what a plain
  step on 32 examples needs plus the loss on 256 embeddings (the all-gather loss's 256 x 256
  logits and the (256, d) embeddings and their gradients), far less than k = 1."""
  cfg, b = test_training.TINY, 256
  whole = _step_temp_bytes(cfg, b, 1, 'grad_cache')
  micro = _step_temp_bytes(cfg, b // 8, 1, 'multisteps')
  two_pass = _step_temp_bytes(cfg, b, 8, 'grad_cache')
  loss_bytes = 4 * (2 * b * b + 8 * b * cfg.embed_dim)  # logits and their gradient; embeddings
  assert two_pass <= micro * 1.05 + loss_bytes, (two_pass, micro, loss_bytes)
  assert two_pass < whole / 4, (two_pass, whole)


@pytest.mark.parametrize('change,message', [
    (dict(batch_size=30), 'it must divide'),
    (dict(accumulation='gradcache'), 'accumulation must be one of'),
])
def test_bad_accumulation_settings_raise(change, message):
  base = dict(batch_size=32, accumulation_steps=4, accumulation='grad_cache')
  with pytest.raises(ValueError, match=message):
    training.TrainConfig(**{**base, **change})


def test_a_micro_batch_the_mesh_does_not_divide_raises_before_compiling():
  tcfg = training.TrainConfig(batch_size=32, accumulation_steps=8, accumulation='grad_cache')
  with pytest.raises(ValueError, match=r'micro-batch 4 \(batch_size 32 / 8\) is not divisible'):
    training.setup(test_training.TINY, tcfg, sharding.make_mesh(8, 1, 1))


def test_grad_cache_refuses_what_it_cannot_cache():
  tcfg = training.TrainConfig(batch_size=32, accumulation_steps=4, accumulation='grad_cache')
  mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  with pytest.raises(ValueError, match='custom objective'):
    training.setup(test_training.TINY, tcfg, mesh, objective=lambda *a: None)
  t = test_training.TINY.text
  decoder = test_training.clip.DecoderConfig(width=t.width, layers=1, heads=t.heads,
                                             context_length=t.context_length,
                                             vocab_size=t.vocab_size)
  with pytest.raises(ValueError, match='captioning decoder'):
    grad_cache.value_and_grad(dataclasses.replace(test_training.TINY, decoder=decoder),
                              dataclasses.replace(tcfg, caption_weight=1.0), mesh)


@pytest.mark.slow
def test_a_resnet_normalises_each_micro_batch_and_updates_its_buffers_in_order():
  """BatchNorm under grad_cache: the loss is the whole batch's loss on features each computed
  with its own micro-batch's statistics, and the running buffers are updated once per
  micro-batch, micro-batch 0 first."""
  k = 2
  cfg, tcfg, mesh, params, stats, batch = _setup(
      'contrastive', (8, 1, 1), vision=test_training.clip.VisionConfig('resnet', 8, (1, 1, 1, 1),
                                                                       4, 32))
  tcfg = dataclasses.replace(tcfg, accumulation_steps=k)
  (loss, (new_stats, _)), _ = jax.jit(grad_cache.value_and_grad(cfg, tcfg, mesh))(
      params, stats, batch, jax.random.PRNGKey(0))
  expected_stats, img, txt = stats, [], []
  for m in range(k):
    micro = grad_cache.micro_batch(batch, m, k)
    features, expected_stats = model.training_image_features(params, expected_stats,
                                                             micro['image'], cfg)
    img.append(model.l2_normalize(features))
    txt.append(model.l2_normalize(model.encode_text(params, micro['tokens'], cfg)))
  img, txt = grad_cache.interleave(np.stack(img)), grad_cache.interleave(np.stack(txt))
  expected = losses.contrastive_loss(img, txt, params['logit_scale'])
  assert _relative(loss, expected) < 1e-5
  chex.assert_trees_all_close(new_stats, expected_stats, rtol=1e-5, atol=1e-6)
