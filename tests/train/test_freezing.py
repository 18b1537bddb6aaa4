"""Frozen means frozen (`clip/train/freezing.py`): what a freeze pattern names stays bit-identical
through training for every optimiser, with MultiSteps and grad_cache accumulation, in the stacked
(scan) and the per-layer layout, in either tower; a ResNet's frozen BatchNorm buffers keep their
statistics; a frozen logit scale is never clamped and SigLIP's is not clamped at all; a pattern
that matches nothing is an error.

The references are independent of `clip.train.freezing`: expected masks are written by hand per leaf
(optimiser tests), or come from the patterns matched against `files.flatten(unstack_layers(.))`
(train-step tests). Compiling a train step dominates the time, so three module-scoped runs each
freeze several things at once and the tests below read them, one kind per test."""
import dataclasses
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import clip
from clip.train import finetune
from clip.train import freezing
from clip import model
from clip.train import optim
from clip.train import training
from clip.formats import files
from tests.train import test_training

LR, WD = 0.1, 0.5
LN115 = float(np.log(115.0))  # SigLIP's released temperatures are about 110..118
RESNET = clip.VisionConfig('resnet', 8, (1, 1, 1, 1), 4, 32)
TEXT = clip.TextConfig(32, 2, 2, context_length=16, vocab_size=128, eot_token_id=127)
VIT = clip.VisionConfig('vit', 32, 2, 2, 16, 8)

# Optimiser-level: a stacked visual block of 3 layers, a per-layer text block, a matrix that
# trains and the logit scale; Muon orthogonalises the matrices (per layer when stacked).
SHAPES = {
    'visual.transformer.resblocks.attn.in_proj_weight': (3, 12, 4),
    'visual.transformer.resblocks.ln_1.weight': (3, 4),
    'visual.proj': (4, 6),
    'transformer.resblocks.0.mlp.c_fc.weight': (8, 4),
    'transformer.resblocks.0.mlp.c_fc.bias': (8,),
    'logit_scale': (),
}
OPT_FREEZE = (r'visual\.transformer\.resblocks\.1\..*', r'transformer\.resblocks\.0\.mlp\.c_fc\..*',
              'logit_scale')


def hand_mask(path, shape):
  """OPT_FREEZE's mask, element by element, written out for SHAPES."""
  frozen = np.zeros(shape, bool)
  if path.startswith('visual.transformer.resblocks.'):
    frozen[1] = True  # layer 1 of the stacked (L=3, ...) leaves
  if path.startswith('transformer.resblocks.0.mlp.c_fc.') or path == 'logit_scale':
    frozen[...] = True
  return frozen


def random_tree(seed):
  rng = np.random.default_rng(seed)
  return files.nest({k: jnp.asarray(rng.standard_normal(s), jnp.float32)
                       for k, s in SHAPES.items()})


@pytest.mark.parametrize('name,accumulation_steps', [(name, 1) for name in optim.OPTIMIZERS]
                         + [('adafactor', 2)])
def test_every_optimizer_leaves_frozen_elements_bit_identical(name, accumulation_steps):
  """Each update equals the same optimiser's without freezing, fed gradients zeroed where frozen,
  then zeroed there (so clipping and the moments never see frozen gradients); frozen elements,
  a single layer of a stacked leaf included, never move despite weight decay."""
  plain = training.TrainConfig(optimizer=name, learning_rate=LR, weight_decay=WD, warmup_steps=0,
                               total_steps=10 * accumulation_steps, b1=0.8, b2=0.9, eps=1e-3,
                               clip_norm=1.0, accumulation_steps=accumulation_steps,
                               schedule='constant')
  frozen_opt, _ = optim.make_optimizer(dataclasses.replace(plain, freeze=OPT_FREEZE))
  plain_opt, _ = optim.make_optimizer(plain)
  params = start = random_tree(0)
  mask = files.nest({k: hand_mask(k, s) for k, s in SHAPES.items()})
  state, plain_state = frozen_opt.init(params), plain_opt.init(params)
  frozen_update, plain_update = jax.jit(frozen_opt.update), jax.jit(plain_opt.update)
  for step in range(2 * accumulation_steps):
    grads = random_tree(10 + step)
    updates, state = frozen_update(grads, state, params)
    zeroed = jax.tree.map(lambda g, m: jnp.where(m, 0.0, g), grads, mask)
    plain, plain_state = plain_update(zeroed, plain_state, params)
    # (two programs: XLA may sum the clipping norm in another order)
    chex.assert_trees_all_close(updates, jax.tree.map(lambda u, m: jnp.where(m, 0.0, u),
                                                      plain, mask), rtol=1e-5, atol=1e-7)
    params = optax.apply_updates(params, updates)
  for path, before in files.flatten(start).items():
    after, frozen = np.asarray(files.flatten(params)[path]), hand_mask(path, before.shape)
    np.testing.assert_array_equal(after[frozen], np.asarray(before)[frozen], err_msg=path)
    if not frozen.all():
      assert not np.array_equal(after[~frozen], np.asarray(before)[~frozen]), path


def test_masks_follow_per_layer_names_in_both_layouts():
  cfg = dataclasses.replace(test_training.TINY, text=TEXT)
  per_layer = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype),
                           jax.eval_shape(clip.init_params, jax.random.PRNGKey(0), cfg))
  patterns = (r'transformer\.resblocks\.1\.attn\..*', r'visual\.transformer\.resblocks\.0\..*')
  (unstacked,) = freezing.masks(patterns, per_layer)
  (stacked,) = freezing.masks(patterns, clip.stack_layers(per_layer))
  as_arrays = lambda m, like: jax.tree.map(lambda f, x: np.broadcast_to(
      f.reshape(f.shape + (1,) * (x.ndim - f.ndim)), x.shape), m, like)
  chex.assert_trees_all_equal(as_arrays(stacked, clip.stack_layers(per_layer)),
                              clip.stack_layers(as_arrays(unstacked, per_layer)))
  flat = files.flatten(unstacked)
  assert {k for k, v in flat.items() if v} == {
      k for k in flat if any(re.fullmatch(p, k) for p in patterns)}
  assert flat['transformer.resblocks.1.attn.in_proj_weight']
  assert not flat['transformer.resblocks.1.mlp.c_fc.weight']


@pytest.mark.parametrize('pattern', [
    r'transformer\.resblocks\.attn\..*',  # the stacked layout's own name: not a torch key
    r'visual\.layer9\..*', 'logit_scal'])
def test_a_pattern_that_matches_nothing_is_refused_before_compiling(pattern):
  cfg = dataclasses.replace(test_training.TINY, text=TEXT, scan=True)
  tcfg = training.TrainConfig(batch_size=8, total_steps=2, warmup_steps=0,
                              freeze=('logit_scale', pattern))
  with pytest.raises(ValueError, match=rf'freeze pattern {re.escape(repr(pattern))} matches no '
                                       r'parameter or BatchNorm buffer.*, e\.g\. \w+'):
    training.setup(cfg, tcfg, test_training.single_device_mesh())


def test_patterns_see_batchnorm_buffers_and_must_be_regexes():
  params, stats = clip.split_batch_stats(jax.eval_shape(
      clip.init_params, jax.random.PRNGKey(0), dataclasses.replace(test_training.TINY,
                                                                   vision=RESNET, text=TEXT)))
  freezing.check((r'visual\.bn1\.running_.*',), params, stats)  # a buffer only: accepted
  with pytest.raises(ValueError, match='matches no parameter'):
    freezing.check((r'visual\.bn1\.running_.*',), params)
  with pytest.raises(ValueError, match=r"freeze pattern 'visual\[' is not a valid regex"):
    training.TrainConfig(freeze=('visual[',))


def test_lit_freezes_the_whole_image_tower_batchnorm_buffers_included():
  params, stats = clip.split_batch_stats(jax.eval_shape(
      clip.init_params, jax.random.PRNGKey(0), dataclasses.replace(test_training.TINY,
                                                                   vision=RESNET, text=TEXT)))
  frozen = training.TrainConfig(lock_image_tower=True).frozen
  param_mask, stats_mask = freezing.masks(frozen, params, stats)
  assert all(jax.tree.leaves(stats_mask))
  flat = files.flatten(param_mask)
  assert {k for k, v in flat.items() if v} == {k for k in flat if k.startswith('visual.')}


# Train steps: each run freezes several kinds of thing at once and trains the rest for two
# updates, from a start whose logit scale is a SigLIP checkpoint's t = ln 115.
CLASSES = 5


def clip_run(cfg, **tcfg):
  return dict(cfg=cfg, tcfg=tcfg, objective=None, batch_keys=('image', 'tokens'))


def lp_run(cfg, **tcfg):
  """LP-FT's head-only phase (`experiments/finetune.py --lp-steps`): an image classifier."""
  return dict(cfg=cfg, tcfg=dict(tcfg, freeze=(r'visual\..*',)),
              objective=finetune.image_classification_objective(cfg), batch_keys=('image', 'label'))


RUNS = {
    # CLIP family (clamped to [0, ln 100]): the frozen t = ln 115 must not be clamped; one ResNet
    # stage and one per-layer text block frozen
    'clip_resnet': clip_run(
        clip.CLIPConfig(32, RESNET, TEXT),
        freeze=('logit_scale', r'visual\.layer1\..*', r'transformer\.resblocks\.0\..*')),
    # the image tower of a ResNet classifier frozen (issue 31.2's case), Lion, MultiSteps
    'lp_resnet': lp_run(clip.CLIPConfig(32, RESNET, TEXT), optimizer='lion', learning_rate=1e-3,
                        accumulation_steps=2, total_steps=4),
    # SigLIP (no clamp): t = ln 115 trains; one layer of the stacked ViT, and the MLP of one
    # stacked text layer, frozen; Muon, grad_cache
    'siglip_vit_scan': clip_run(
        clip.CLIPConfig(32, VIT, TEXT, scan=True, logit_bias=True), loss='sigmoid',
        optimizer='muon', accumulation_steps=2, accumulation='grad_cache',
        freeze=(r'visual\.transformer\.resblocks\.1\..*', r'transformer\.resblocks\.0\.mlp\..*')),
}


def start_params(spec):
  cfg = spec['cfg']
  params = dict(clip.init(jax.random.PRNGKey(1), cfg), logit_scale=jnp.float32(LN115))
  if spec['objective'] is None:
    return params
  head = np.random.default_rng(0).standard_normal((cfg.embed_dim, CLASSES)).astype(np.float32)
  return finetune.image_classifier_params(params, head)


def make_batches(spec, n):
  cfg, rng = spec['cfg'], np.random.default_rng(2)
  data = test_training.batches(cfg, 8, n, seed=2)
  if spec['objective'] is None:
    return data
  return [{'image': b['image'], 'label': rng.integers(0, CLASSES, 8)} for b in data]


def per_layer(params, batch_stats):
  return files.flatten(model.unstack_layers(model.update_batch_stats(params, batch_stats)))


@pytest.fixture(scope='module', params=list(RUNS))
def run(request):
  """`(name, {torch key: (before, after)}, the keys the patterns name, tcfg)`."""
  spec = RUNS[request.param]
  tcfg = training.TrainConfig(**{'batch_size': 8, 'total_steps': 2, 'warmup_steps': 0,
                                 'learning_rate': 1e-2, 'weight_decay': 0.5, **spec['tcfg']})
  start = start_params(spec)
  mesh = test_training.single_device_mesh()
  state, step, _, _, _ = training.setup(spec['cfg'], tcfg, mesh, init_params=lambda key: start,
                                        objective=spec['objective'],
                                        batch_keys=spec['batch_keys'])
  for batch in make_batches(spec, tcfg.total_steps):
    state, _ = step(state, training.global_batch(mesh, batch))
  before = files.flatten(model.unstack_layers(jax.device_get(start)))
  after = per_layer(*jax.device_get((state['params'], state['batch_stats'])))
  assert before.keys() == after.keys()
  frozen = {k for k in before if any(re.fullmatch(p, k) for p in tcfg.frozen)}
  return request.param, {k: (before[k], after[k]) for k in before}, frozen, tcfg


def test_frozen_keys_are_bit_identical_and_every_other_one_trains(run):
  name, values, frozen, _ = run
  for key, (before, after) in values.items():
    if key in frozen:
      np.testing.assert_array_equal(after, before, err_msg=f'{name}: frozen {key} moved')
    else:
      assert not np.array_equal(after, before), f'{name}: {key} did not train'


@pytest.mark.parametrize('run', ['clip_resnet', 'siglip_vit_scan'], indirect=True)
def test_frozen_layers_of_transformer_blocks_stay(run):
  """Issue 31.3: a per-layer pattern freezes that layer alone, in stacked blocks (scan=True)
  as in per-layer ones."""
  name, values, frozen, _ = run
  blocks = [k for k in values if re.match(r'(visual\.)?transformer\.resblocks\.\d+\.', k)]
  frozen_blocks = [k for k in blocks if k in frozen]
  assert 0 < len(frozen_blocks) < len(blocks), name
  for key in frozen_blocks:
    np.testing.assert_array_equal(values[key][1], values[key][0], err_msg=f'{name}: {key}')
  assert any(not np.array_equal(*values[k]) for k in blocks if k not in frozen), name


@pytest.mark.parametrize('run', ['clip_resnet', 'lp_resnet'], indirect=True)
def test_frozen_batchnorm_buffers_keep_their_statistics(run):
  """Issue 31.2: the running statistics of frozen BN layers do not move; the others' do."""
  name, values, frozen, _ = run
  buffers = [k for k in values if k.rsplit('.', 1)[-1] in model.BATCH_STAT_KEYS]
  assert buffers, name
  for key in buffers:
    before, after = values[key]
    if key in frozen:
      np.testing.assert_array_equal(after, before, err_msg=f'{name}: {key}')
    else:
      assert not np.array_equal(after, before), f'{name}: {key}'
  assert 'visual.layer1.0.bn1.running_var' in frozen


@pytest.mark.parametrize('run', ['clip_resnet', 'siglip_vit_scan'], indirect=True)
def test_logit_scale_is_frozen_or_trains_in_its_family_range(run):
  """Issue 31.1: a frozen t = ln 115 stays bit-identical though the CLIP family clamps to
  ln 100; SigLIP's unfrozen t trains from ln 115, by about lr per update, and is not clamped."""
  name, values, frozen, tcfg = run
  before, after = values['logit_scale']
  assert before == np.float32(LN115)
  if 'logit_scale' in frozen:
    np.testing.assert_array_equal(after, before)
  else:
    assert after != before and abs(after - before) < 3 * tcfg.learning_rate, (name, after)


def test_the_temperature_range_is_the_family_s():
  siglip = dataclasses.replace(test_training.TINY, logit_bias=True, init_logit_scale=LN115)
  assert siglip.logit_scale_range is None  # big_vision trains t unclamped
  assert test_training.TINY.logit_scale_range == (0.0, float(np.log(100.0)))
  training.check_init_logit_scale(siglip)
  with pytest.raises(ValueError, match=r'outside \[0, ln 100'):
    training.check_init_logit_scale(dataclasses.replace(siglip, logit_bias=False))


def test_no_patterns_add_no_operations():
  """The default run is untouched: with nothing frozen, `keep` returns the new values themselves."""
  new = {'a': jnp.ones(3), 'b': {'c': jnp.ones(())}}
  old = jax.tree.map(jnp.zeros_like, new)
  (mask,) = freezing.masks((), new)
  kept = freezing.keep(mask, old, new)
  assert kept['a'] is new['a'] and kept['b']['c'] is new['b']['c']
