"""The processing configs: the tokenizer's and the image preprocessing's fields are validated when
built (naming the field and what it got) and normalised; normalisation against its formula."""
import jax
import numpy as np
import pytest

import clip
from clip import processing_configs


def test_normalize_image():
  images = np.random.default_rng(0).random((2, 4, 4, 3), dtype=np.float32)
  expected = (images - np.array(clip.IMAGE_MEAN)) / np.array(clip.IMAGE_STD)
  np.testing.assert_allclose(clip.normalize_image(images), expected, atol=1e-6)
  np.testing.assert_allclose(clip.normalize_image(jax.numpy.asarray(images)), expected, atol=1e-6)
  with pytest.raises(TypeError, match='uint8'):
    clip.normalize_image((images * 255).astype(np.uint8))
  with pytest.raises(ValueError, match='3'):
    clip.normalize_image(images[..., :2])


def test_normalize_with_a_model_s_own_mean_and_std():
  images = np.random.default_rng(1).random((3, 2, 2, 3), dtype=np.float32)
  got = processing_configs.normalize_with(images, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
  np.testing.assert_allclose(got, images * 2 - 1, atol=1e-6)  # SigLIP's: pixels in [-1, 1]
  assert got.dtype == np.float32


def test_tokenizer_config_defaults_and_refusals():
  assert processing_configs.TokenizerConfig('siglip').clean == 'siglip'   # transformers' rule
  assert processing_configs.TokenizerConfig('siglip2').clean == 'lower'
  assert processing_configs.TokenizerConfig('siglip', model_file=None, clean='canonicalize').clean \
      == 'canonicalize'
  with pytest.raises(ValueError, match="TokenizerConfig.kind must be one of .*, got 'bert'"):
    processing_configs.TokenizerConfig('bert')
  with pytest.raises(ValueError, match='takes no model_file or clean'):
    processing_configs.TokenizerConfig('openai', clean='lower')
  with pytest.raises(ValueError, match='needs a name'):
    processing_configs.TokenizerConfig('unknown')
  with pytest.raises(ValueError, match="TokenizerConfig.clean must be one of .*, got 'upper'"):
    processing_configs.TokenizerConfig('siglip', clean='upper')


def test_preprocess_config_normalises_and_refuses():
  config = processing_configs.PreprocessConfig([0.5, 0.5, 0.5], np.array([0.25, 0.5, 1.0]))
  assert config.mean == (0.5, 0.5, 0.5) and config.std == (0.25, 0.5, 1.0)  # tuples of floats
  assert hash(config) == hash(processing_configs.PreprocessConfig((0.5,) * 3, (0.25, 0.5, 1.0)))
  with pytest.raises(ValueError, match=r'mean must be 3 finite numbers \(RGB\), got \(0.5, 0.5\)'):
    processing_configs.PreprocessConfig((0.5, 0.5))
  with pytest.raises(ValueError, match=r'std must be > 0, got \(0.5, 0.0, 0.5\)'):
    processing_configs.PreprocessConfig(std=(0.5, 0.0, 0.5))
  with pytest.raises(ValueError, match="resize_mode must be one of .*, got 'crop'"):
    processing_configs.PreprocessConfig(resize_mode='crop')
  with pytest.raises(ValueError, match=r'fill_color must be an int in \[0, 255\], got 256'):
    processing_configs.PreprocessConfig(fill_color=256)
