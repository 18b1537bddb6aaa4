"""NaFlex training (`TrainConfig.naflex_seq_lengths`, batches of patches and grids): the loss and
every parameter gradient on meshes (8,), (2,4) and (2,2,2) equal one device's; the train step
compiles once per sequence length (fixed and token-budget batching); a loaded transformers
`Siglip2Model` fine-tunes in this mode; bad settings are errors before anything compiles."""
import dataclasses

import chex
import jax
import numpy as np
import pytest

import clip
import losses
from clip import model
from clip import sharding
from clip.train import objectives
from clip.train import training
from data import naflex_batching
from experiments import checkpoint_families_recent
from tests import numpy_reference
from tests.numpy_reference import perturbed
from tests.train import test_training

PATCH = 8
# A SigLIP-like tower with a class token, registers and the MAP head, and learned positions
# resized to each image's grid: the options whose padding handling the gradients go through.
# One block per tower: the tests compile several sharded steps.
CFG = clip.CLIPConfig(32, clip.VisionConfig('vit', 32, 1, 2, 32, PATCH, pool='map', registers=2),
                      clip.TextConfig(32, 1, 2, context_length=8, vocab_size=64,
                                      eot_token_id=63),
                      logit_bias=True)
GRIDS = ((2, 5), (3, 3), (1, 12), (4, 2), (2, 2), (6, 1), (3, 4), (1, 1))  # (h, w) <= 12 patches


def naflex_batch(cfg, grids, seq_len, seed=0):
  """A NaFlex batch: random normalised patches for each (h, w) grid, zeros after them."""
  rng = np.random.default_rng(seed)
  n, k = len(grids), cfg.vision.patch_size ** 2 * 3
  patches = rng.standard_normal((n, seq_len, k)).astype(np.float32)
  shapes = np.asarray(grids, np.int32)
  patches[np.arange(seq_len) >= shapes.prod(1)[:, None]] = 0
  return {'patches': patches, 'spatial_shapes': shapes,
          'tokens': test_training.openai_reference.random_tokens(rng, n, cfg)}


def _relative(a, b):
  return float(np.abs(np.asarray(a) - np.asarray(b)).max() / (np.abs(np.asarray(b)).max() + 1e-30))


def _value_and_grad(mesh_sizes, batch, params, tcfg):
  mesh = sharding.make_mesh(*mesh_sizes, devices=jax.devices()[:int(np.prod(mesh_sizes))])
  f = jax.value_and_grad(objectives.clip_objective(CFG, tcfg, mesh), has_aux=True)
  with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
    (loss, (_, aux)), grads = jax.jit(f)(params, {}, training.global_batch(mesh, batch),
                                         jax.random.PRNGKey(3))
  return jax.device_get((loss, aux, grads))


@pytest.fixture(scope='module')
def one_device():
  tcfg = training.TrainConfig(batch_size=8, total_steps=3, warmup_steps=1, loss='sigmoid',
                              naflex_seq_lengths=(16,))
  params, _ = model.split_batch_stats(perturbed(model.init_params(jax.random.PRNGKey(0), CFG)))
  batch = naflex_batch(CFG, GRIDS, 16)
  return tcfg, params, batch, _value_and_grad((1, 1, 1), batch, params, tcfg)


@pytest.mark.parametrize('mesh_sizes', [(8, 1, 1), (2, 4, 1), (2, 2, 2)],
                         ids=['8', '2x4', '2x2x2'])
def test_sharded_naflex_step_equals_one_device(one_device, mesh_sizes):
  tcfg, params, batch, (loss_ref, _, grads_ref) = one_device
  loss, _, grads = _value_and_grad(mesh_sizes, batch, params, tcfg)
  assert _relative(loss, loss_ref) < 1e-5  # (accuracy is per device shard: not compared)
  chex.assert_trees_all_equal_shapes(grads, grads_ref)
  worst = numpy_reference.worst_relative_error(grads, grads_ref)
  assert worst[1] < 1e-5, worst
  # Every tower parameter gets a gradient: the padding-aware path reaches all of them.
  assert all(np.abs(g).max() > 0 for g in jax.tree.leaves(grads_ref['visual']))


def test_padding_values_change_no_gradient(one_device):
  tcfg, params, batch, (loss_ref, _, grads_ref) = one_device
  noisy = dict(batch, patches=batch['patches'].copy())
  pad = np.arange(16) >= batch['spatial_shapes'].prod(1)[:, None]
  noisy['patches'][pad] = np.random.default_rng(9).standard_normal(
      (int(pad.sum()), PATCH * PATCH * 3)) * 100
  loss, _, grads = _value_and_grad((1, 1, 1), noisy, params, tcfg)
  assert loss == loss_ref
  chex.assert_trees_all_equal(grads, grads_ref)


def test_one_compile_per_sequence_length():
  """Six token-budget steps over two lengths (each drawn at least twice; the batch size changes
  with the length) compile the step twice."""
  lengths, budget = (8, 16), 96
  tcfg = training.TrainConfig(batch_size=4, total_steps=6, warmup_steps=1, loss='sigmoid',
                              naflex_seq_lengths=lengths, naflex_tokens_per_batch=budget)
  mesh = sharding.make_mesh(2, 1, 1, devices=jax.devices()[:2])
  plan = naflex_batching.NaFlexBatching(PATCH, lengths, tokens_per_batch=budget,
                                        batch_multiple=2, seed=1)
  drawn = [plan.step_shape(g) for g in range(6)]
  assert sorted(drawn).count((12, 8)) >= 2 and drawn.count((6, 16)) >= 2, drawn  # 96 // S
  setup = training.setup(CFG, tcfg, mesh)
  state, history = setup.state, []
  for g, (b, s) in enumerate(drawn):
    grids = [GRIDS[(g + i) % len(GRIDS)] for i in range(b)]
    grids = [(h, w) if h * w <= s else (1, s) for h, w in grids]
    state, metrics = setup.train_step(state,
                                      training.global_batch(mesh, naflex_batch(CFG, grids, s, g)))
    history.append(float(metrics['loss']))
  assert np.all(np.isfinite(history))
  # The jitted step's cache: one executable per length, other grids and batches reuse them.
  assert setup.train_step._cache_size() == len(lengths)  # pylint: disable=protected-access


def test_a_loaded_siglip2_naflex_checkpoint_fine_tunes(tmp_path):
  """transformers' Siglip2Model saved as a folder, loaded by clip.load, trained a few steps on
  its own processor's NaFlex inputs (clip.naflex_preprocess): the sigmoid loss falls on a fixed
  batch, and the first step's loss is the one the loaded model gives outside training."""
  folder = str(tmp_path / 'siglip2')
  checkpoint_families_recent.hf_siglip2_model(seed=4).save_pretrained(folder)
  params, cfg = clip.load(folder)
  tcfg = training.TrainConfig(batch_size=4, total_steps=4, warmup_steps=0, loss='sigmoid',
                              learning_rate=1e-3, naflex_seq_lengths=(16,), schedule='constant')
  mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  setup = training.setup(cfg, tcfg, mesh, init_params=lambda key: params)
  images = checkpoint_families_recent.naflex_images(0, ((40, 20), (20, 40), (33, 33), (8, 64)))
  pixels, mask, shapes = clip.naflex_preprocess(images, cfg.vision.patch_size, 16, cfg)
  tokens = np.random.default_rng(1).integers(0, cfg.text.vocab_size,
                                             (4, cfg.text.context_length)).astype(np.int32)
  batch = {'patches': pixels, 'spatial_shapes': shapes, 'tokens': tokens}
  img = clip.encode_image_naflex(params, pixels, mask, shapes, cfg)
  txt = clip.encode_text(params, tokens, cfg)
  want = losses.sigmoid_loss(model.l2_normalize(img), model.l2_normalize(txt),
                             params['logit_scale'], params['logit_bias'])
  state, history = setup.state, []
  for _ in range(4):
    state, metrics = setup.train_step(state, training.global_batch(mesh, batch))
    history.append(float(metrics['loss']))
  np.testing.assert_allclose(history[0], float(want), rtol=1e-5)
  assert history[-1] < history[0], history


def test_bad_naflex_settings_fail_before_compiling():
  kw = dict(batch_size=4, total_steps=3, warmup_steps=1, loss='sigmoid')
  with pytest.raises(ValueError, match='naflex_seq_lengths must be a tuple of ints >= 1'):
    training.TrainConfig(**kw, naflex_seq_lengths=(0, 16))
  with pytest.raises(ValueError, match='naflex_seq_lengths is empty'):
    training.TrainConfig(**kw, naflex_tokens_per_batch=64)
  with pytest.raises(ValueError, match='at least the longest length 16'):
    training.TrainConfig(**kw, naflex_seq_lengths=(8, 16), naflex_tokens_per_batch=8)
  with pytest.raises(ValueError, match='accumulation'):
    training.TrainConfig(**kw, naflex_seq_lengths=(8,), accumulation_steps=2,
                         accumulation='grad_cache')
  with pytest.raises(ValueError, match='non-empty sequence'):
    naflex_batching.NaFlexBatching(PATCH, (), batch_size=4)
  with pytest.raises(ValueError, match='at least one patch per image'):
    naflex_batching.NaFlexBatching(PATCH, (0,), batch_size=4)
  with pytest.raises(ValueError, match='fits 4 image.s. of the longest length 16; every step '
                                       'needs at least batch_multiple 8'):
    naflex_batching.NaFlexBatching(PATCH, (8, 16), tokens_per_batch=64, batch_multiple=8)
  with pytest.raises(ValueError, match='exactly one of'):
    naflex_batching.NaFlexBatching(PATCH, (8,), batch_size=4, tokens_per_batch=64)
  mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  tcfg = training.TrainConfig(**kw, naflex_seq_lengths=(8,))
  resnet = dataclasses.replace(CFG, vision=clip.VisionConfig('resnet', 16, (1, 1, 1, 1), 32,
                                                             32))
  with pytest.raises(ValueError, match='NaFlex images need a ViT image tower'):
    training.setup(resnet, tcfg, mesh)


def test_plan_is_a_function_of_the_step():
  """The same steps give the same shapes whatever is asked first; examples_before sums the
  batch sizes; lengths are drawn roughly uniformly."""
  plan = naflex_batching.NaFlexBatching(PATCH, (64, 16, 32), tokens_per_batch=256, seed=3)
  assert plan.seq_lengths == (16, 32, 64)
  steps = np.arange(3000)
  lengths = plan.seq_len(steps)
  assert [plan.seq_len(int(g)) for g in steps[:50][::-1]] == list(lengths[:50][::-1])
  counts = np.bincount(np.searchsorted(plan.seq_lengths, lengths))
  assert counts.min() > 900, counts
  sizes = plan.batch_size_for(lengths)
  assert plan.examples_before(3000) == int(sizes.sum())
  assert plan.examples_before(17) == int(sizes[:17].sum())
  assert plan.shapes() == [(16, 16), (8, 32), (4, 64)]
  other = naflex_batching.NaFlexBatching(PATCH, (16, 32, 64), tokens_per_batch=256, seed=4)
  assert (other.seq_len(steps) != lengths).any()
