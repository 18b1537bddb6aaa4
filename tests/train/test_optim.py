"""Optimisers and schedules: each schedule against its formula, Muon orthogonalising exactly the
matrices (per layer when stacked) with AdamW on the rest, the same weight-decay mask for all."""
import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import clip
from clip.train import optim
from clip import sharding
from clip.train import training
from clip.formats import files
from tests.train import test_training

LR, WD = 0.1, 0.5
B1, B2, EPS = 0.8, 0.9, 1e-3
SV_RANGE = (0.6, 1.2)  # Newton-Schulz's singular values, ~U(0.7, 1.1) rather than exactly 1
LAYER_SCALES = np.array([10.0, 1.0, 0.1])  # per-layer gradient scales of the stacked leaf
SHAPES = {
    'visual.transformer.resblocks.attn.in_proj_weight': (3, 24, 8),  # stacked (L, out, in)
    'visual.transformer.resblocks.attn.in_proj_bias': (3, 24),
    'visual.transformer.resblocks.ln_1.weight': (3, 8),
    'visual.transformer.resblocks.attn.q_norm.weight': (3, 4),
    'visual.attn_pool.probe': (1, 8),
    'visual.conv1.weight': (8, 3, 2, 2),
    'visual.class_embedding': (8,),
    'visual.positional_embedding': (5, 8),
    'visual.proj': (8, 4),  # (in, out)
    'transformer.resblocks.0.mlp.c_fc.weight': (16, 8),
    'transformer.resblocks.0.mlp.c_fc.bias': (16,),
    'transformer.resblocks.0.ln_1.weight': (8,),
    'transformer.resblocks.0.mlp.ln.weight': (16,),
    'token_embedding.weight': (10, 8),
    'logit_scale': (),
}
STACKED = 'visual.transformer.resblocks.attn.in_proj_weight'


def optimizer_config(name, weight_decay):
  """`name` at LR, B1, B2, EPS and a constant schedule, unclipped."""
  return training.TrainConfig(optimizer=name, learning_rate=LR, weight_decay=weight_decay,
                              warmup_steps=0, total_steps=10, b1=B1, b2=B2, eps=EPS,
                              clip_norm=None, schedule='constant')
MATRICES = ('visual.proj', 'transformer.resblocks.0.mlp.c_fc.weight')
MUON = (STACKED,) + MATRICES
DECAYED = MUON + ('visual.conv1.weight',)


def random_tree(seed, stacked_scales=None):
  rng = np.random.default_rng(seed)
  flat = {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}
  if stacked_scales is not None:
    flat[STACKED] *= stacked_scales[:, None, None].astype(np.float32)
  return files.nest({k: jnp.asarray(v) for k, v in flat.items()})


def unit_muon_step(update, shape):
  """An update / -(lr * Muon's consistent-RMS scale): ~orthogonal for a fresh state."""
  return -np.asarray(update, np.float64) / (LR * optim.MUON_RMS * np.sqrt(max(shape[-2:])))


def singular_values(x):
  return np.linalg.svd(np.asarray(x, np.float64), compute_uv=False)


def polar(g):
  """The exact orthogonal factor U V^T of g = U S V^T, what Newton-Schulz approximates."""
  u, _, vt = np.linalg.svd(np.asarray(g, np.float64), full_matrices=False)
  return u @ vt


def cosine(a, b):
  return np.sum(a * b) / np.linalg.norm(a) / np.linalg.norm(b)


@pytest.mark.parametrize('kind', optim.SCHEDULES)
@pytest.mark.parametrize('warmup', [0, 10])
def test_schedules_follow_their_formulas(kind, warmup):
  total, end = 110, 0.1

  def expected(step):
    if step < warmup:
      return LR * step / warmup
    t = min(step - warmup, total - warmup) / (total - warmup)
    decayed = {'cosine': end + (1 - end) * 0.5 * (1 + np.cos(np.pi * t)),
               'linear': 1 - (1 - end) * t, 'constant': 1.0}[kind]
    return LR * decayed
  lr = optim.schedule(LR, warmup, total, end, kind=kind)
  for step in (0, warmup // 2, warmup, 30, (warmup + total) // 2, 100, total, total + 5):
    np.testing.assert_allclose(lr(step), expected(step), rtol=1e-5, atol=1e-8,
                               err_msg=f'{kind} at step {step}')


def test_schedule_keeps_its_positional_signature_and_reaches_the_optimizer():
  np.testing.assert_allclose(optim.schedule(LR, 10, 110, 0.5)(60), LR * 0.75, rtol=1e-5)
  tcfg = training.TrainConfig(total_steps=110, warmup_steps=10, learning_rate=LR,
                              schedule='linear')
  _, lr = optim.make_optimizer(tcfg)
  np.testing.assert_allclose([lr(5), lr(60), lr(110)], [LR / 2, LR / 2, 0.0], rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize('change,message', [
    ({'schedule': 'step'},
     r"schedule must be one of \('cosine', 'linear', 'constant'\), got 'step'"),
    ({'optimizer': 'sgd'},
     r"optimizer must be one of \('adamw', 'lion', 'adafactor', 'muon'\), got 'sgd'"),
])
def test_train_config_rejects_unknown_names(change, message):
  with pytest.raises(ValueError, match=message):
    dataclasses.replace(training.TrainConfig(), **change)


def test_optim_rejects_unknown_names():
  with pytest.raises(ValueError, match=r"schedule must be one of .*, got 'exp'"):
    optim.schedule(LR, 0, 10, kind='exp')
  with pytest.raises(ValueError, match=r"optimizer must be one of .*, got 'sgd'"):
    optim.make_optimizer(dataclasses.replace(training.TrainConfig(), optimizer='sgd'))


def test_weight_decay_mask_of_a_captioning_decoder():
  """The decoder's matrices decay; its token, position and mask embeddings, norms and biases
  do not (the rule of `test_weight_decay_mask_follows_openai`)."""
  t = test_training.TINY.text
  decoder = clip.DecoderConfig(width=t.width, layers=1, heads=t.heads,
                               context_length=t.context_length, vocab_size=t.vocab_size,
                               tie_embedding=False)
  cfg = dataclasses.replace(test_training.TINY, decoder=decoder)
  shapes = files.flatten(jax.eval_shape(clip.init_params, jax.random.PRNGKey(0), cfg))
  mask = files.flatten(optim.decay_mask(shapes))
  expected = {k: len(v.shape) >= 2 and 'embedding' not in k for k, v in shapes.items()}
  assert mask == expected, {k: v for k, v in mask.items() if v != expected[k]}
  assert not mask['text_decoder.mask_embedding'] and mask['text_decoder.head.weight']


@pytest.mark.parametrize('vision', [test_training.TINY.vision,
                                    clip.VisionConfig('resnet', 8, (1, 2, 1, 1), 4, 64)],
                         ids=['vit', 'resnet'])
@pytest.mark.parametrize('stacked', [False, True])
def test_muon_takes_the_hidden_matrices_of_a_real_model(vision, stacked):
  cfg = dataclasses.replace(test_training.TINY, vision=vision)
  params, _ = clip.split_batch_stats(
      jax.eval_shape(clip.init_params, jax.random.PRNGKey(0), cfg))
  if stacked:  # the stacked layout: {'resblocks': {'attn': {'in_proj_weight': (L, 3D, D)}}}
    for tower in (params['transformer'], params['visual'].get('transformer')):
      if tower is not None:
        blocks = [tower['resblocks'][k] for k in sorted(tower['resblocks'])]
        tower['resblocks'] = jax.tree.map(
            lambda *x: jax.ShapeDtypeStruct((len(x),) + x[0].shape, x[0].dtype), *blocks)
  flat = files.flatten(optim.muon_dimension_numbers(params))
  linear = ('attn.in_proj_weight', 'attn.out_proj.weight', 'mlp.c_fc.weight', 'mlp.c_proj.weight',
            'attnpool.q_proj.weight', 'attnpool.k_proj.weight', 'attnpool.v_proj.weight',
            'attnpool.c_proj.weight')
  for path, dims in flat.items():
    if path in ('visual.proj', 'text_projection'):
      expected = (0, 1)
    elif path.endswith(linear):
      expected = (2, 1) if stacked and 'resblocks' in path else (1, 0)
    else:
      expected = None
    assert (dims and tuple(dims)) == expected, (path, dims)


def test_muon_orthogonalises_matrices_per_layer_and_adamw_trains_the_rest():
  opt, _ = optim.make_optimizer(optimizer_config('muon', 0.0))
  adamw = optax.adamw(LR, B1, B2, EPS, weight_decay=0.0, nesterov=True)  # optax Muon's Adam
  params = random_tree(0)
  grads = [random_tree(1, LAYER_SCALES), random_tree(2, LAYER_SCALES)]
  state, adam_state = opt.init(params), adamw.init(params)
  for step, g in enumerate(grads):
    updates, state = opt.update(g, state, params)
    adam_updates, adam_state = adamw.update(g, adam_state, params)
    flat, adam_flat, g_flat = (files.flatten(t) for t in (updates, adam_updates, g))
    for path in SHAPES:
      if path not in MUON:
        np.testing.assert_allclose(flat[path], adam_flat[path], rtol=1e-6, atol=1e-9,
                                   err_msg=f'{path} at step {step}')
    if step:
      continue
    for path in MATRICES:  # fresh state: the update orthogonalises the gradient itself
      u = unit_muon_step(flat[path], SHAPES[path])
      s = singular_values(u)
      assert SV_RANGE[0] < s.min() and s.max() < SV_RANGE[1], (path, s)
      assert cosine(u, polar(g_flat[path])) > 0.95, path
    g_LxOxI = np.asarray(g_flat[STACKED])
    u_LxOxI = unit_muon_step(flat[STACKED], SHAPES[STACKED])
    for layer in range(3):
      s = singular_values(u_LxOxI[layer])
      assert SV_RANGE[0] < s.min() and s.max() < SV_RANGE[1], (layer, s)
      assert cosine(u_LxOxI[layer], polar(g_LxOxI[layer])) > 0.95, layer
    # The set-up would catch a flattened (L * out, in) orthogonalisation: its layers are not
    # orthogonal when their gradients differ in scale.
    flat_LxOxI = polar(g_LxOxI.reshape(-1, 8)).reshape(3, 24, 8) * np.sqrt(3)
    assert singular_values(flat_LxOxI[2]).max() < SV_RANGE[0]


@pytest.mark.parametrize('name', ['adamw', 'lion', 'muon'])
def test_weight_decay_moves_only_the_decayed_leaves(name):
  opt, _ = optim.make_optimizer(optimizer_config(name, WD))
  params = random_tree(0)
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = opt.update(zeros, opt.init(params), params)
  flat, p_flat = files.flatten(updates), files.flatten(params)
  for path in SHAPES:
    expected = -LR * WD * np.asarray(p_flat[path]) if path in DECAYED else np.zeros(SHAPES[path])
    np.testing.assert_allclose(flat[path], expected, rtol=1e-6, atol=1e-9, err_msg=path)


def test_muon_trains_a_sharded_model():
  tcfg = training.TrainConfig(batch_size=16, total_steps=3, warmup_steps=1, optimizer='muon',
                              schedule='linear', learning_rate=1e-3)
  _, history = test_training.run(test_training.TINY, tcfg, sharding.make_mesh(2, 4, 1),
                                 test_training.batches(test_training.TINY, 16, 3, seed=1))
  chex.assert_tree_all_finite([h['loss'] for h in history])
  assert history[-1]['loss'] != history[0]['loss']
  np.testing.assert_allclose([h['learning_rate'] for h in history], [0.0, 1e-3, 5e-4], rtol=1e-6)


def test_layer_decay_scales_each_layer_of_stacked_blocks():
  cfg = clip.CLIPConfig(32, clip.VisionConfig('vit', 32, 3, 2, 16, 8),
                        clip.TextConfig(32, 2, 2, context_length=8, vocab_size=64))
  per_layer = clip.init(jax.random.PRNGKey(0), cfg)
  stacked = clip.stack_layers(per_layer)
  decay = optim.scale_by_layer_decay(0.5)
  ones = lambda tree: jax.tree.map(jnp.ones_like, tree)
  per_layer_factors, _ = decay.update(ones(per_layer), decay.init(per_layer))
  stacked_factors, _ = decay.update(ones(stacked), decay.init(stacked))
  chex.assert_trees_all_close(stacked_factors, clip.stack_layers(per_layer_factors))
  block0 = per_layer_factors['visual']['transformer']['resblocks']['0']['mlp']['c_fc']['weight']
  assert float(block0[0, 0]) == 0.5 ** 3  # block 0 of 3 has depth 1: 0.5 ** (3 + 1 - 1)


@pytest.mark.parametrize('vision', [test_training.TINY.vision,
                                    clip.VisionConfig('resnet', 8, (1, 2, 1, 1), 4, 64)],
                         ids=['vit', 'resnet'])
def test_weight_decay_mask_follows_openai(vision):
  """Decay exactly the matrices and kernels (ndim >= 2) that are not embeddings: never biases
  (in_proj_bias included), LayerNorm / BatchNorm gains, embeddings or the logit scale."""
  cfg = dataclasses.replace(test_training.TINY, vision=vision)
  trainable, _ = clip.split_batch_stats(
      jax.eval_shape(clip.init_params, jax.random.PRNGKey(0), cfg))
  shapes = files.flatten(trainable)
  mask = files.flatten(optim.decay_mask(shapes))
  expected = {k: len(v.shape) >= 2 and 'embedding' not in k for k, v in shapes.items()}
  assert mask == expected, {k: v for k, v in mask.items() if v != expected[k]}
  assert not mask['transformer.resblocks.0.attn.in_proj_bias']


def test_multisteps_schedule_spans_the_updates_not_the_calls():
  """100 calls with k = 4 are 25 updates: warmup over the first 10 / 4 = 2, cosine to 0 at 25;
  a count that is not a multiple of k is an error."""
  tcfg = training.TrainConfig(total_steps=100, warmup_steps=10, accumulation_steps=4)
  _, schedule = optim.make_optimizer(tcfg)
  assert float(schedule(2)) == pytest.approx(tcfg.learning_rate)
  assert float(schedule(25)) == pytest.approx(0.0, abs=1e-12)
  with pytest.raises(ValueError, match='must be a multiple of it'):
    training.TrainConfig(total_steps=10, warmup_steps=1, accumulation_steps=4)
