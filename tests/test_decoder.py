"""clip/decoder.py: the captioning decoder against float64 numpy for every block option, tied or
separate head, projected or unprojected image tokens, and CapPa's parallel-prediction inputs;
the KV-cached `step` equals teacher forcing position by position; inside a full model behind every
ViT option (pooling, registers, scan, remat, bf16) its loss trains the ViT and every decoder
weight; the weights export to torch's layout and back bit for bit; bad configs are clear errors."""
import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.sharding import PartitionSpec as P

import clip
from clip.train import captioning
from clip import configs
from clip import decoder
from clip import layers
from clip import model
from clip import sharding
from clip import vit
from clip.formats import files
from clip.formats import openai
from tests.numpy_reference import BLOCK_OPTIONS
from tests.numpy_reference import MUST_DIFFER
from tests.numpy_reference import RTOL
from tests.numpy_reference import TEXT
from tests.numpy_reference import VISION
from tests.numpy_reference import np_decoder
from tests.numpy_reference import np_norm
from tests.numpy_reference import perturbed_numpy
from tests.numpy_reference import rel_err
from tests.numpy_reference import text_tokens
from tests.numpy_reference import to_np

# Decoders over the ViT of VISION (tokens 32 wide); 24 wide ones need the image projection.
DECODER = dict(layers=2, heads=4, context_length=12, vocab_size=64)
DECODER_CASES = {
    'tied-projected': dict(width=24),
    'untied-unprojected-qk_norm': dict(width=32, tie_embedding=False, image_projection=False,
                                       qk_norm=True),
    'rmsnorm-normformer': dict(width=24, norm='rmsnorm', norm_placement='normformer'),
    'swiglu-no_bias': dict(width=24, tie_embedding=False, bias=False, **BLOCK_OPTIONS['swiglu']),
    'everything-norm-eps': dict(width=24, tie_embedding=False, norm_eps=0.5,
                                **BLOCK_OPTIONS['everything']),
}
IMAGE_WIDTH = VISION['width']
apply_jit = jax.jit(decoder.apply, static_argnames=('cfg', 'execution'))
init_jit = jax.jit(decoder.init, static_argnums=(1, 2),
                   compiler_options={'xla_backend_optimization_level': 0})


def decoder_config(name):
  return configs.DecoderConfig(**DECODER, **DECODER_CASES[name])


@functools.cache
def decoder_params(dcfg):
  """Per-layer params, every leaf perturbed (cached: a test must not change them)."""
  return perturbed_numpy(init_jit(jax.random.PRNGKey(0), dcfg, IMAGE_WIDTH))


@functools.cache
def model_params(cfg):
  """A whole model's per-layer params, every leaf perturbed (cached as `decoder_params`)."""
  return perturbed_numpy(clip.init(jax.random.PRNGKey(0), dataclasses.replace(cfg, scan=False)))


def image_tokens(n, t=10, seed=1):
  return np.random.default_rng(seed).standard_normal((n, t, IMAGE_WIDTH)).astype(np.float32)


@pytest.mark.parametrize('name', sorted(DECODER_CASES))
def test_decoder_matches_numpy(name):
  dcfg = decoder_config(name)
  params = decoder_params(dcfg)
  image = image_tokens(3)
  tokens = text_tokens(np.random.default_rng(2), 3, 12, 64)
  out = apply_jit(params, image, tokens, dcfg)
  chex.assert_shape(out, (3, 12, 64))
  assert out.dtype == jnp.float32
  assert rel_err(out, np_decoder(to_np(params), image.astype(np.float64), tokens, dcfg)) < RTOL
  assert ('head' in params) != dcfg.tie_embedding
  assert ('image_proj' in params) == dcfg.image_projection
  assert ('ln_attn' in params['transformer']['resblocks']['0']) == (
      dcfg.norm_placement == 'normformer')
  if dcfg.norm_eps is not None:
    default_eps = dataclasses.replace(dcfg, norm_eps=None)
    expected = np_decoder(to_np(params), image.astype(np.float64), tokens, default_eps)
    assert rel_err(out, expected) > MUST_DIFFER


def test_parallel_prediction_inputs_match_numpy():
  """CapPa's parallel rows: masked inputs read `mask_embedding`, bidirectional rows attend to
  their valid keys only (the padding keys are changed below and must not matter), causal rows
  stay causal. A shorter input than the context uses the first positions."""
  dcfg = decoder_config('everything-norm-eps')
  params = decoder_params(dcfg)
  rng = np.random.default_rng(3)
  image = image_tokens(4)
  tokens = text_tokens(rng, 4, 11, 64)
  valid = np.arange(11)[None] <= tokens.argmax(-1)[:, None]
  mask = valid & (rng.random((4, 11)) < 0.6)
  bidirectional = np.array([True, False, True, True])
  out = apply_jit(params, image, tokens, dcfg, mask_NxL=mask, bidirectional_N=bidirectional,
                  valid_NxL=valid)
  expected = np_decoder(to_np(params), image.astype(np.float64), tokens, dcfg, mask,
                        bidirectional, valid)
  assert rel_err(out, expected) < RTOL
  noisy = np.where(valid, tokens, rng.integers(0, 64, tokens.shape))
  out_noisy = apply_jit(params, image, noisy, dcfg, mask_NxL=mask, bidirectional_N=bidirectional,
                        valid_NxL=valid)
  np.testing.assert_allclose(np.where(valid[..., None], out_noisy, 0),
                             np.where(valid[..., None], out, 0), rtol=1e-5, atol=1e-5)
  causal = np_decoder(to_np(params), image.astype(np.float64), tokens, dcfg, mask)
  assert rel_err(out[1], causal[1]) < RTOL
  assert rel_err(out[0], causal[0]) > MUST_DIFFER  # the bidirectional rows do see ahead


@pytest.mark.parametrize('name,stacked', [('tied-projected', False),
                                         ('everything-norm-eps', True)])
def test_step_with_its_cache_equals_teacher_forcing(name, stacked):
  """`init_cache`, then `step` at every position (traced: one compilation for all of them) gives
  `apply`'s scores at that position; per-layer and stacked (scan layout) params alike."""
  dcfg = decoder_config(name)
  params = decoder_params(dcfg)
  if stacked:
    params = clip.stack_layers({'text_decoder': params})['text_decoder']
    assert params['transformer']['resblocks']['cross_attn']['in_proj_weight'].shape == (2, 72, 24)
  image = image_tokens(3)
  tokens = text_tokens(np.random.default_rng(4), 3, 12, 64)
  expected = apply_jit(params, image, tokens, dcfg)
  cache = decoder.init_cache(params, image, dcfg)
  chex.assert_shape([cache.keys, cache.values], (2, 3, 12, 4, dcfg.width // 4))
  chex.assert_shape([cache.cross_keys, cache.cross_values], (2, 3, 10, 4, dcfg.width // 4))
  chex.clear_trace_counter()
  step = jax.jit(chex.assert_max_traces(decoder.step, n=1), static_argnames=('cfg',))
  for position in range(12):
    scores, cache = step(params, cache, tokens[:, position], position, cfg=dcfg)
    np.testing.assert_allclose(scores, expected[:, position], rtol=1e-5,
                               atol=2e-5 * np.abs(expected).max(), err_msg=f'at {position}')


# ---------------------------------------------------------------- inside a full model

def captioner(vision_options, dtype='float32', remat='none', scan=False, width=24):
  vision = configs.VisionConfig(**VISION, **vision_options)
  dcfg = configs.DecoderConfig(**DECODER, width=width, tie_embedding=False)
  return configs.CLIPConfig(32, vision, None, dtype=dtype, remat=remat, scan=scan, decoder=dcfg)


MODEL_CASES = {
    'cls-registers-remat-block-unprojected': captioner({'registers': 1}, remat='block', width=32),
    'gap-registers-scan-dots': captioner({'pool': 'gap', 'registers': 2, 'norm': 'rmsnorm'},
                                         scan=True, remat='dots'),
    'map-registers-bf16': captioner({'pool': 'map', 'registers': 1}, dtype='bfloat16'),
}


def model_inputs():
  rng = np.random.default_rng(6)
  return (rng.standard_normal((4, 24, 24, 3)).astype(np.float32), text_tokens(rng, 4, 12, 64))


def expected_decoder_tokens(visual, images, vision):
  """(N, T, D) float64: ln_post of the last block's tokens with the registers dropped, after
  checking `vit.decoder_tokens` against it on the tower's own tokens."""
  tokens = jax.jit(vit.tokens, static_argnums=2)(visual, images, vision)
  prefix, registers = int(vision.pool == 'cls'), vision.registers
  chex.assert_shape(tokens, (len(images), prefix + registers + 9, vision.width))
  t = np.asarray(tokens, np.float64)
  kept = np.concatenate([t[:, :prefix], t[:, prefix + registers:]], 1)
  expected = np_norm(to_np(visual)['ln_post'], kept, vision.norm)
  assert rel_err(vit.decoder_tokens(visual, tokens, vision), expected) < RTOL
  return expected


def caption_loss(params, images, tokens, cfg):
  """(the caption loss of `cfg`'s model, half its rows parallel; the image tokens it read)."""
  _, image_NxTxW = model.image_features_and_tokens(params, images, cfg)
  value, _ = captioning.loss(params['text_decoder'], image_NxTxW, tokens, cfg.decoder,
                             jax.random.PRNGKey(5), 0.5, 1.0, cfg.execution)
  return value, image_NxTxW


caption_loss_jit = jax.jit(caption_loss, static_argnums=3)
caption_loss_and_grad = jax.jit(jax.value_and_grad(caption_loss, has_aux=True), static_argnums=3)


@pytest.mark.parametrize('name', sorted(MODEL_CASES))
def test_decoder_in_a_full_model(name):
  """The decoder reads ln_post of the ViT's tokens without the registers, in the compute dtype;
  its loss is finite and has a gradient on every decoder weight and every ViT weight that feeds
  the tokens (not the pooling head: no text tower reads it); bf16 stays close to fp32."""
  cfg = MODEL_CASES[name]
  params = model_params(cfg)
  images, tokens = model_inputs()
  expected = expected_decoder_tokens(params['visual'], images, cfg.vision)
  params = clip.stack_layers(params) if cfg.scan else params
  valid = captioning.targets_and_valid(tokens, cfg.decoder.eot_id)[1]
  parallel = captioning.parallel_masks(jax.random.PRNGKey(5), valid, 0.5, 1.0)[1]
  assert 0 < parallel.sum() < 4  # both kinds of rows, so `mask_embedding` is used
  (value, image_NxTxW), grads = caption_loss_and_grad(params, images, tokens, cfg)
  assert image_NxTxW.dtype == jnp.dtype(cfg.dtype)
  assert rel_err(image_NxTxW, expected) < (RTOL if cfg.dtype == 'float32' else 3e-2)
  assert np.isfinite(value) and 0 < value < 2 * np.log(64)
  chex.assert_tree_all_finite(grads)
  assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))
  flat = files.flatten(clip.unstack_layers(grads))
  for key, g in flat.items():
    pooling_head = key.startswith(('visual.proj', 'visual.attn_pool.'))
    assert (np.abs(g).max() > 0) != pooling_head, key
  assert sum(k.startswith('text_decoder.') for k in flat) >= 30
  if cfg.dtype != 'float32':
    fp32, _ = caption_loss_jit(params, images, tokens, dataclasses.replace(cfg, dtype='float32'))
    np.testing.assert_allclose(value, fp32, rtol=2e-2)


def test_every_decoder_parameter_has_a_sharding_rule():
  """The rules cover every decoder option, per layer and stacked: its vocabulary and the
  cross-attention split over `tensor` like the text tower's, the mask embedding replicated."""
  mesh = sharding.make_mesh(1, 2, 4)
  for name in ('tied-projected', 'untied-unprojected-qk_norm', 'everything-norm-eps'):
    for scan in (False, True):
      cfg = configs.CLIPConfig(32, configs.VisionConfig(**VISION), None, scan=scan,
                               decoder=decoder_config(name))
      abstract = jax.eval_shape(clip.init_params, jax.random.PRNGKey(0), cfg)
      sharding.param_shardings(mesh, abstract)  # covered, and divisible
      specs = files.flatten(sharding.param_specs(abstract)['text_decoder'])
      block = 'transformer.resblocks.' + ('' if scan else '0.')
      layer = (None,) if scan else ()
      assert specs[block + 'cross_attn.in_proj_weight'] == P(*layer, 'tensor', 'fsdp')
      assert specs[block + 'cross_attn.out_proj.weight'] == P(*layer, 'fsdp', 'tensor')
      assert specs['token_embedding.weight'] == P('tensor', 'fsdp')
      assert specs['mask_embedding'] == P()
      head = {'head.weight': P('tensor', 'fsdp'), 'head.bias': P('tensor')}  # when untied
      assert all(specs[k] == spec for k, spec in head.items() if k in specs)
      assert ('head.weight' in specs) != decoder_config(name).tie_embedding


# ---------------------------------------------------------------- torch export

EXPORT = configs.CLIPConfig(32, configs.VisionConfig(**VISION), None,
                            decoder=configs.DecoderConfig(**DECODER, width=24, qk_norm=True,
                                                          tie_embedding=False,
                                                          norm_placement='normformer'))


def torch_round_trip(params, path):
  torch.save(clip.to_torch_state_dict(params), path)
  loaded = torch.load(path, weights_only=True)
  return loaded, files.nest({k: v.numpy() for k, v in loaded.items()})


def test_decoder_weights_round_trip_through_torch(tmp_path):
  params = model_params(EXPORT)
  state, back = torch_round_trip(params, tmp_path / 'm.pt')
  chex.assert_trees_all_equal(back, params)
  block = 'text_decoder.transformer.resblocks.1.'
  shapes = {'text_decoder.token_embedding.weight': (64, 24),
            'text_decoder.positional_embedding': (12, 24), 'text_decoder.mask_embedding': (24,),
            'text_decoder.image_proj.weight': (24, 32), 'text_decoder.image_proj.bias': (24,),
            'text_decoder.head.weight': (64, 24), 'text_decoder.head.bias': (64,),
            'text_decoder.ln_final.weight': (24,), block + 'ln_cross.weight': (24,),
            block + 'cross_attn.in_proj_weight': (72, 24), block + 'cross_attn.q_norm.weight': (6,),
            block + 'cross_attn.out_proj.weight': (24, 24), block + 'ln_attn.weight': (24,),
            block + 'mlp.c_fc.weight': (96, 24), block + 'mlp.c_proj.weight': (24, 96)}
  assert {k: tuple(state[k].shape) for k in shapes} == shapes
  assert all(state[k].dtype == torch.float32 for k in state if k.startswith('text_decoder.'))
  assert not any(k.startswith('text_decoder.transformer.resblocks.2') for k in state)
  # The packed cross-attention is nn.MultiheadAttention's: the exported tensors load into one
  # strictly (queries from the caption, keys and values from the image) and compute ours.
  prefix = block + 'cross_attn.'
  mha = torch.nn.MultiheadAttention(24, 4, batch_first=True)
  mha.load_state_dict({k[len(prefix):]: v for k, v in state.items()
                       if k.startswith(prefix) and '_norm.' not in k}, strict=True)
  rng = np.random.default_rng(0)
  x, memory = rng.standard_normal((2, 5, 24)), rng.standard_normal((2, 7, 24))
  with torch.no_grad():
    expected = mha(*(torch.tensor(a, dtype=torch.float32) for a in (x, memory, memory)),
                   need_weights=False)[0].numpy()
  cross = params['text_decoder']['transformer']['resblocks']['1']['cross_attn']
  cross = {k: v for k, v in cross.items() if not k.endswith('_norm')}
  ours = layers.multi_head_attention(cross, jnp.asarray(x, jnp.float32), 4,
                                     kv_NxKxD=jnp.asarray(memory, jnp.float32))
  np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-5)


def test_stacked_decoder_exports_per_layer(tmp_path):
  per_layer = model_params(EXPORT)
  stacked = clip.stack_layers(per_layer)
  scan_init = jax.eval_shape(clip.init_params, jax.random.PRNGKey(0),
                             dataclasses.replace(EXPORT, scan=True))
  chex.assert_trees_all_equal_shapes_and_dtypes(stacked, scan_init)
  assert stacked['text_decoder']['transformer']['resblocks']['cross_attn'][
      'in_proj_weight'].shape == (2, 72, 24)
  state, back = torch_round_trip(stacked, tmp_path / 'm.pt')
  assert state.keys() == clip.to_torch_state_dict(per_layer).keys()
  chex.assert_trees_all_equal(back, per_layer)
  chex.assert_trees_all_equal(clip.stack_layers(back), jax.device_get(stacked))


# ---------------------------------------------------------------- bad configs and inputs

def test_bad_decoder_configs_are_clear_errors():
  vit32 = configs.VisionConfig(**VISION)
  with pytest.raises(ValueError, match='decoder width 24 does not fit the image tokens of width '
                     '32: set DecoderConfig.image_projection=True'):
    configs.CLIPConfig(32, vit32, None, decoder=configs.DecoderConfig(
        **DECODER, width=24, image_projection=False))
  resnet = configs.VisionConfig('resnet', 8, (1, 1, 1, 1), 4, 64)
  with pytest.raises(ValueError, match='cross-attends to ViT tokens; got a resnet image tower'):
    configs.CLIPConfig(32, resnet, None, decoder=configs.DecoderConfig(**DECODER, width=32))
  with pytest.raises(ValueError, match=r'must match, got decoder 16, 64, 63 and text 12, 64, 63'):
    configs.CLIPConfig(32, vit32, configs.TextConfig(**TEXT), decoder=configs.DecoderConfig(
        **{**DECODER, 'context_length': 16}, width=32))
  with pytest.raises(ValueError, match='needs a text tower, a decoder, or both'):
    configs.CLIPConfig(32, vit32, None)
  with pytest.raises(ValueError, match='logit_bias=True needs a text tower'):
    configs.CLIPConfig(32, vit32, None, logit_bias=True,
                       decoder=configs.DecoderConfig(**DECODER, width=32))
  for change, message in [({'heads': 5}, 'decoder width 24 is not divisible by heads 5'),
                          ({'context_length': 1}, 'context_length must be > 1'),
                          ({'eot_token_id': 64}, r'eot_token_id must be .* got 64'),
                          ({'pool_heads': 2}, 'pool_heads and projection do not apply')]:
    with pytest.raises(ValueError, match=message):
      configs.DecoderConfig(**{**DECODER, **change}, width=24)


def test_bad_decoder_inputs_are_clear_errors():
  dcfg = decoder_config('untied-unprojected-qk_norm')
  params = decoder_params(dcfg)
  tokens = text_tokens(np.random.default_rng(0), 2, 13, 64)
  with pytest.raises(ValueError, match='decoder input of length 13 is longer than its context 12'):
    decoder.apply(params, image_tokens(2), tokens, dcfg)
  with pytest.raises(ValueError, match='image tokens of width 16 do not fit decoder width 32'):
    decoder.apply(params, image_tokens(2)[..., :16], tokens[:, :12], dcfg)
  resnet = configs.CLIPConfig(32, configs.VisionConfig('resnet', 8, (1, 1, 1, 1), 4, 64),
                              configs.TextConfig(**TEXT))
  with pytest.raises(ValueError, match='image tokens for a decoder come from a ViT, got a resnet'):
    model.image_features_and_tokens({}, np.zeros((1, 64, 64, 3), np.float32), resnet)


def test_params_of_another_decoder_are_refused():
  """A config without image_projection on params that have one (or the reverse) is an error,
  not a silent choice by the params."""
  with_proj = configs.DecoderConfig(width=16, layers=1, heads=2, context_length=6, vocab_size=20)
  without = dataclasses.replace(with_proj, image_projection=False)
  image = np.zeros((1, 3, 16), np.float32)
  tokens = np.zeros((1, 4), np.int32)
  for params_cfg, cfg in ((with_proj, without), (without, with_proj)):
    params = decoder.init(jax.random.PRNGKey(0), params_cfg, 16)
    with pytest.raises(ValueError, match='params and config of different decoders'):
      decoder.apply(params, image, tokens, cfg)


def test_a_decoder_checkpoint_needs_its_config():
  """Shapes cannot say a decoder's options: loading one without config= says to pass it."""
  cfg = configs.CLIPConfig(16, configs.VisionConfig('vit', 16, 1, 2, 16, 8, pool='gap',
                                                    projection=False), None,
                           decoder=configs.DecoderConfig(width=16, layers=1, heads=2,
                                                         context_length=6, vocab_size=20))
  flat = files.flatten(jax.eval_shape(clip.init_params, jax.random.PRNGKey(0), cfg))
  with pytest.raises(files.CheckpointError, match='pass config='):
    openai.infer_config(flat)


def test_a_step_past_the_context_raises():
  cfg = configs.DecoderConfig(width=16, layers=1, heads=2, context_length=6, vocab_size=20)
  params = decoder.init(jax.random.PRNGKey(0), cfg, 16)
  cache = decoder.init_cache(params, np.zeros((1, 3, 16), np.float32), cfg)
  with pytest.raises(ValueError, match=r'position 6 is outside the decoder\'s context \[0, 6\)'):
    decoder.step(params, cache, np.zeros((1,), np.int32), 6, cfg)
