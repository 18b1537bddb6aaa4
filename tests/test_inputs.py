"""Bad input to the public model functions raises, naming what was expected and what was given;
the bf16 compute option stays close to fp32."""
import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import clip
from clip import vit

CFG = clip.CLIPConfig(16, clip.VisionConfig('vit', 32, 2, 2, 32, 8), clip.TextConfig(32, 2, 2, 8, 50))


@pytest.fixture(scope='module')
def params():
  return clip.init(jax.random.PRNGKey(0), CFG)


@pytest.fixture(scope='module')
def batch():
  rng = np.random.default_rng(0)
  images = rng.standard_normal((2, 32, 32, 3)).astype(np.float32)
  tokens = np.zeros((2, 8), np.int32)
  tokens[:, 0], tokens[:, 1:4], tokens[:, 4] = 48, rng.integers(1, 48, (2, 3)), 49
  return images, tokens


@pytest.mark.parametrize('shape, message', [
    ((2, 64, 64, 3), r'must be \(N, 32, 32, 3\) for this model, got \(2, 64, 64, 3\)'),
    ((2, 32, 32, 1), r'got \(2, 32, 32, 1\)'),
    ((2, 3, 32, 32), r'got \(2, 3, 32, 32\)'),
    ((32, 32, 3), 'rank 4'),
])
def test_bad_image_shapes(params, shape, message):
  with pytest.raises(ValueError, match=message):
    clip.encode_image(params, np.zeros(shape, np.float32), CFG)


def test_uint8_images(params):
  with pytest.raises(TypeError, match='floating point'):
    clip.encode_image(params, np.zeros((1, 32, 32, 3), np.uint8), CFG)


def test_bad_tokens(params, batch):
  _, tokens = batch
  with pytest.raises(ValueError, match='length 9, longer than the context length 8'):
    clip.encode_text(params, np.zeros((2, 9), np.int32), CFG)
  with pytest.raises(TypeError, match='integers'):
    clip.encode_text(params, tokens.astype(np.float32), CFG)
  with pytest.raises(ValueError, match=r'shape \(N, L\)'):
    clip.encode_text(params, tokens[0], CFG)


def test_shorter_token_rows_use_the_leading_positions(params, batch):
  """OpenAI's tokens are zero padded, and attention is causal: cutting padding changes nothing."""
  _, tokens = batch
  np.testing.assert_allclose(clip.encode_text(params, tokens[:, :5], CFG),
                             clip.encode_text(params, tokens, CFG), rtol=1e-5, atol=1e-6)


def test_training_features_of_a_vit_are_its_inference_features(params, batch):
  """Without BatchNorm, training features are `encode_image`'s and the (empty) stats come back."""
  trainable, stats = clip.split_batch_stats(params)
  features, stats_after = clip.training_image_features(trainable, stats, batch[0], CFG)
  chex.assert_trees_all_equal(features, clip.encode_image(params, batch[0], CFG))
  assert stats_after is stats


@pytest.mark.parametrize('arch', ['vit', 'resnet'])
def test_bf16_compute_is_close_to_fp32(arch, batch):
  vision = (CFG.vision if arch == 'vit' else clip.VisionConfig('resnet', 8, (1, 1, 1, 1), 4, 32))
  cfg = dataclasses.replace(CFG, vision=vision)
  params = clip.init(jax.random.PRNGKey(1), cfg)
  bf16 = dataclasses.replace(cfg, dtype='bfloat16')
  images, tokens = batch
  for fn, x in ((clip.encode_image, images), (clip.encode_text, tokens)):
    full, half = fn(params, x, cfg), fn(params, x, bf16)
    assert half.dtype == jnp.float32  # features come back in fp32
    chex.assert_trees_all_close(half, full, atol=0.05 * float(jnp.abs(full).max()))
    assert not np.array_equal(half, full)  # bf16 really was used
  assert {x.dtype for x in jax.tree.leaves(params)} <= {jnp.dtype('float32'), jnp.dtype('int32')}


def test_public_functions_compile_once(params, batch, monkeypatch):
  """A second call with new values of the same shapes is not traced again: the ViT tower, which
  `encode_image` calls once per trace, may be traced 0 more times."""
  images, tokens = batch
  clip.encode_image(params, images, CFG)
  chex.clear_trace_counter()
  monkeypatch.setattr(vit, 'apply', chex.assert_max_traces(vit.apply, n=0))
  clip.encode_image(params, images + 1, CFG)
  with pytest.raises(AssertionError, match='traced > 0 times'):  # the counter does see a trace
    clip.encode_image(params, images[:1], CFG)
