"""clip/train/captioning.py: targets and their caption mask; CapPa's parallel-prediction masks (row
fraction, masked count per row, never padding); the loss against float64 numpy, autoregressive
and parallel (masked rows read their targets, unshifted); a captioner (CapPa, text=None) and a
SigLIP + captioning model train the same on data, FSDP and tensor-parallel meshes as on one
device; objectives that do not fit the model are clear errors."""
import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clip.train import captioning
from clip import configs
from clip import decoder
from clip.train import objectives
from clip import sharding
from clip.train import training
from tests.numpy_reference import RTOL
from tests.numpy_reference import TEXT
from tests.numpy_reference import VISION
from tests.numpy_reference import caption_valid
from tests.numpy_reference import np_cross_entropy
from tests.numpy_reference import np_decoder
from tests.numpy_reference import perturbed_numpy
from tests.numpy_reference import text_tokens
from tests.numpy_reference import to_np
from tests.train.test_training import run
from tests.train.test_training import single_device_mesh

DCFG = configs.DecoderConfig(24, 2, 4, context_length=12, vocab_size=64, tie_embedding=False,
                             norm='rmsnorm', qk_norm=True)
EOT = DCFG.eot_id
loss_jit = jax.jit(captioning.loss,
                   static_argnames=('cfg', 'parallel_fraction', 'mask_ratio', 'execution'))


@functools.cache
def decoder_params():
  init = jax.jit(decoder.init, static_argnums=(1, 2),
                 compiler_options={'xla_backend_optimization_level': 0})
  return perturbed_numpy(init(jax.random.PRNGKey(0), DCFG, 32))


def inputs(n, seed=0):
  """Image tokens (n, 10, 32) and caption rows of every length, padded with zeros."""
  rng = np.random.default_rng(seed)
  return rng.standard_normal((n, 10, 32)).astype(np.float32), text_tokens(rng, n, 12, 64)


# ---------------------------------------------------------------- targets and masks

def test_targets_and_valid_on_hand_written_rows():
  tokens = np.array([[8, 1, 2, 9, 0, 0],
                     [8, 9, 0, 0, 0, 0],
                     [8, 1, 2, 3, 4, 5],   # no end-of-text token: every target counts
                     [8, 3, 9, 9, 0, 0],   # the first end-of-text token ends the caption
                     [9, 3, 4, 9, 0, 0]])  # the input's first token is no target
  targets, valid = captioning.targets_and_valid(jnp.asarray(tokens), 9)
  np.testing.assert_array_equal(targets, tokens[:, 1:])
  np.testing.assert_array_equal(valid, [[1, 1, 1, 0, 0],
                                        [1, 0, 0, 0, 0],
                                        [1, 1, 1, 1, 1],
                                        [1, 1, 0, 0, 0],
                                        [1, 1, 1, 0, 0]])
  random_rows = text_tokens(np.random.default_rng(0), 50, 12, 64)
  np.testing.assert_array_equal(captioning.targets_and_valid(random_rows, EOT)[1],
                                caption_valid(random_rows, EOT))


def binomial_bound(p, n):
  """Five standard deviations of the mean of n Bernoulli(p) draws (exact at p = 0 or 1)."""
  return 5 * np.sqrt(p * (1 - p) / np.maximum(n, 1))


@pytest.mark.parametrize('fraction,ratio', [(0.75, 1.0), (0.3, 0.5), (1.0, 0.25), (0.0, 1.0)])
def test_parallel_masks_draw_rows_and_positions_as_configured(fraction, ratio):
  n, length = 4000, 15
  rng = np.random.default_rng(1)
  lengths = rng.integers(1, length + 1, n)
  valid = np.arange(length)[None] < lengths[:, None]
  masked, parallel = jax.device_get(
      captioning.parallel_masks(jax.random.PRNGKey(2), jnp.asarray(valid), fraction, ratio))
  assert masked.shape == (n, length) and parallel.shape == (n,)
  assert abs(parallel.mean() - fraction) <= binomial_bound(fraction, n)
  assert not (masked & ~valid).any()  # never padding
  assert not masked[~parallel].any()  # autoregressive rows read every token
  np.testing.assert_array_equal(masked[parallel].sum(1), np.round(ratio * lengths[parallel]))
  # Uniform over the caption: position j of a parallel row of length l is masked with
  # probability round(ratio * l) / l.
  rows = parallel[:, None] & valid
  expected_j = (rows * (np.round(ratio * lengths) / lengths)[:, None]).sum(0) / rows.sum(0).clip(1)
  observed_j = masked.sum(0) / rows.sum(0).clip(1)
  assert (np.abs(observed_j - expected_j) <= binomial_bound(expected_j, rows.sum(0)) + 1e-9).all()
  other, _ = captioning.parallel_masks(jax.random.PRNGKey(3), jnp.asarray(valid), fraction, ratio)
  assert fraction == 0 or (np.asarray(other) != masked).any()


# ---------------------------------------------------------------- the loss against numpy

def test_autoregressive_loss_is_the_cross_entropy_up_to_the_end_of_text():
  """parallel_fraction 0: every row reads `tokens[:, :-1]` causally and is scored on its caption
  up to and including the end-of-text token; what follows it (padding) changes nothing."""
  params = decoder_params()
  image, tokens = inputs(5)
  value, metrics = loss_jit(params, image, tokens, DCFG, jax.random.PRNGKey(0), 0.0)
  logits = np_decoder(to_np(params), image.astype(np.float64), tokens[:, :-1], DCFG)
  expected, accuracy = np_cross_entropy(logits, tokens[:, 1:], caption_valid(tokens, EOT))
  np.testing.assert_allclose(value, expected, rtol=RTOL)
  np.testing.assert_allclose(metrics['token_accuracy'], accuracy, rtol=1e-6)
  after_eot = np.arange(12)[None] > tokens.argmax(-1)[:, None]
  noisy = np.where(after_eot, np.random.default_rng(1).integers(0, 63, tokens.shape), tokens)
  np.testing.assert_allclose(loss_jit(params, image, noisy, DCFG, jax.random.PRNGKey(0), 0.0)[0],
                             value, rtol=1e-6)


def test_mixed_batch_loss_matches_numpy():
  """Half the rows parallel, half their caption masked: those rows read their targets (unshifted)
  with the drawn positions masked, attend in both directions over the caption and are scored on
  the masked positions only; the other rows as above."""
  params = decoder_params()
  image, tokens = inputs(8, seed=2)
  key = jax.random.PRNGKey(4)
  value, metrics = loss_jit(params, image, tokens, DCFG, key, 0.5, 0.5)
  valid = caption_valid(tokens, EOT)
  masked, parallel = jax.device_get(captioning.parallel_masks(key, jnp.asarray(valid), 0.5, 0.5))
  assert 0 < parallel.sum() < 8
  targets = tokens[:, 1:]
  inputs_NxL = np.where(parallel[:, None], targets, tokens[:, :-1])
  logits = np_decoder(to_np(params), image.astype(np.float64), inputs_NxL, DCFG, masked,
                      parallel, valid)
  expected, accuracy = np_cross_entropy(logits, targets, valid & (~parallel[:, None] | masked))
  np.testing.assert_allclose(value, expected, rtol=RTOL)
  np.testing.assert_allclose(metrics['token_accuracy'], accuracy, rtol=1e-6)


def test_a_fully_masked_row_sees_its_caption_only_as_targets():
  """CapPa's rows (every caption position masked): the scores are those of `mask_embedding`
  inputs over the caption, whatever the tokens (start token, words, padding); the tokens enter
  the loss only as its targets."""
  params = decoder_params()
  image, tokens = inputs(4, seed=3)
  valid = caption_valid(tokens, EOT)
  other = np.where(np.arange(12)[None] < tokens.argmax(-1)[:, None],  # same length, new words
                   np.random.default_rng(5).integers(0, 63, tokens.shape), tokens)
  other[:, 0] = 7
  other[:, 1:][~valid] = 11
  assert (other[:, 1:][valid] != tokens[:, 1:][valid]).any()
  apply = jax.jit(decoder.apply, static_argnames=('cfg',))
  scores = apply(params, image, np.zeros_like(tokens[:, 1:]), DCFG, mask_NxL=valid,
                 bidirectional_N=np.ones(4, bool), valid_NxL=valid)
  for rows in (tokens, other):
    value = loss_jit(params, image, rows, DCFG, jax.random.PRNGKey(0), 1.0, 1.0)[0]
    expected = captioning.cross_entropy(scores, jnp.asarray(rows[:, 1:]), valid)[0]
    np.testing.assert_allclose(value, expected, rtol=1e-5)


# ---------------------------------------------------------------- training on every strategy

VISION_TINY = configs.VisionConfig(**{**VISION, 'layers': 1})
CAPPA = configs.CLIPConfig(32, VISION_TINY, None, decoder=configs.DecoderConfig(
    32, 1, 4, context_length=12, vocab_size=64, tie_embedding=False, image_projection=False))
SIGLIP_CAPTIONS = configs.CLIPConfig(
    32, VISION_TINY, configs.TextConfig(**{**TEXT, 'layers': 1}), logit_bias=True,
    decoder=configs.DecoderConfig(16, 1, 4, context_length=12, vocab_size=64))
TRAIN = {'cappa': (CAPPA, dict(loss='none', caption_weight=1.0)),
         'sigmoid-and-captions': (SIGLIP_CAPTIONS, dict(loss='sigmoid', caption_weight=0.5))}


def caption_batch(cfg, seed=0):
  rng = np.random.default_rng(seed)
  r = cfg.image_resolution
  return {'image': rng.standard_normal((16, r, r, 3)).astype(np.float32),
          'tokens': text_tokens(rng, 16, 12, 64)}


@pytest.mark.slow  # ~35 s of compilation (three meshes) on a 2-core CPU
@pytest.mark.parametrize('name', sorted(TRAIN))
def test_captioner_trains_the_same_on_every_strategy(name):
  """Data, FSDP and tensor parallelism (the decoder's vocabulary, attention and MLP split over
  `tensor`) follow the single-device trajectory, parallel-prediction masks included. One batch
  three times: the loss must go down."""
  cfg, losses = TRAIN[name]
  tcfg = training.TrainConfig(batch_size=16, total_steps=3, warmup_steps=1, learning_rate=2e-3,
                              **losses)
  data = [caption_batch(cfg)] * 3
  state, reference = run(cfg, tcfg, single_device_mesh(), data)
  keys = ('loss', 'grad_norm', 'caption_loss') + (('logit_bias',) if cfg.text else ())
  for sizes in [(2, 2, 2), (1, 2, 4)]:
    sharded, history = run(cfg, tcfg, sharding.make_mesh(*sizes), data)
    for key in keys:
      np.testing.assert_allclose([h[key] for h in history], [h[key] for h in reference],
                                 rtol=5e-5, err_msg=f'{key} on mesh {sizes}')
    chex.assert_trees_all_close(jax.device_get(sharded['params']),
                                jax.device_get(state['params']), rtol=1e-4, atol=1e-5)
  assert reference[-1]['caption_loss'] < reference[0]['caption_loss']
  assert reference[-1]['loss'] < reference[0]['loss']
  assert ('logit_scale' in state['params']) == (cfg.text is not None)


# ---------------------------------------------------------------- objectives that do not fit

def test_objectives_that_do_not_fit_the_model_are_clear_errors():
  with pytest.raises(ValueError, match=r"caption_weight must be >= 0, and > 0 with loss='none' "
                     r"\(it is the only loss then\); got 0.0 with loss 'none'"):
    training.TrainConfig(loss='none')
  with pytest.raises(ValueError, match='caption_weight must be >= 0.*got -1.0'):
    training.TrainConfig(caption_weight=-1.0)
  with pytest.raises(ValueError, match='caption_weight 0.0 with a decoder in the model config'):
    training.setup(SIGLIP_CAPTIONS, training.TrainConfig(loss='sigmoid'), single_device_mesh())
  no_decoder = dataclasses.replace(SIGLIP_CAPTIONS, decoder=None)
  with pytest.raises(ValueError, match='caption_weight 0.5 with no decoder in the model config'):
    objectives.check_objective(no_decoder, training.TrainConfig(loss='sigmoid', caption_weight=0.5))
  with pytest.raises(ValueError, match=r"loss 'contrastive' compares images with a text tower, "
                     r"and the model has none \(text=None\)"):
    training.setup(CAPPA, training.TrainConfig(loss='contrastive', caption_weight=1.0),
                   single_device_mesh())


@pytest.mark.parametrize('change,message', [
    ({'caption_parallel': 1.5}, r'fraction must be in \[0, 1\], got 1.5'),
    ({'caption_parallel': -0.25}, r'fraction must be in \[0, 1\], got -0.25'),
    ({'caption_mask_ratio': 0.0}, r'mask ratio must be in \(0, 1\], got 0.0'),
    ({'caption_mask_ratio': 1.5}, r'mask ratio must be in \(0, 1\], got 1.5'),
])
def test_bad_parallel_prediction_settings_raise(change, message):
  with pytest.raises(ValueError, match=message):
    training.TrainConfig(loss='none', caption_weight=1.0, **change)
