"""The model's tokenizer and preprocess config as pipelines take them: checked where given, the
tokenizer's context length and padding read from what it returns, full rows found by it."""
import functools

import numpy as np
import pytest

import clip
from clip import processing_configs
from data import model_inputs


def test_check_preprocess_names_what_to_pass():
  config = processing_configs.PreprocessConfig()
  assert model_inputs.check_preprocess(config) == config
  with pytest.raises(TypeError, match=r'cfg\.preprocess\), got NoneType'):
    model_inputs.check_preprocess(None)


def test_check_tokenize_and_image_dtype_name_what_to_pass():
  assert model_inputs.check_tokenize(clip.tokenize) is clip.tokenize
  with pytest.raises(TypeError, match=r"a callable texts -> int \(N, L\).*got 'clip'"):
    model_inputs.check_tokenize('clip')
  assert model_inputs.check_image_dtype('uint8') == 'uint8'
  with pytest.raises(ValueError, match="'float32' or 'uint8', got 'float16'"):
    model_inputs.check_image_dtype('float16')


def test_tokenizer_layout_of_openai_tokens_and_of_a_padding_end_token():
  """OpenAI's tokenizer pads with 0 after its end token; a SigLIP-like one pads with its end
  token itself, so an empty text's row is that token throughout."""
  assert model_inputs.tokenizer_layout(functools.partial(clip.tokenize, context_length=16)) == (
      16, (0, False))
  siglip_like = lambda texts: np.array([[5, 6, 1, 1], [7, 1, 1, 1], [1, 1, 1, 1]])
  assert model_inputs.tokenizer_layout(siglip_like) == (4, (1, True))
  with pytest.raises(ValueError, match=r'int \(3, context_length\), got float64 \(3,\)'):
    model_inputs.tokenizer_layout(lambda texts: np.zeros(3))


def test_filled_rows_against_the_texts_that_fill_the_context():
  tokenize = functools.partial(clip.tokenize, context_length=6, truncate=True)
  texts = ['a cat', 'one two three four', 'one two three four five six seven', '']
  # fits with room (3 tokens + 2), exactly full (4 + 2 = 6), truncated, empty
  expected = [False, True, True, False]
  np.testing.assert_array_equal(
      model_inputs.filled_rows(tokenize(texts), *model_inputs.tokenizer_layout(tokenize)[1]),
      expected)
  # a tokenizer whose end token also pads: full when either of the last two is not padding
  tokens = np.array([[5, 1, 1, 1], [5, 6, 1, 1], [5, 6, 7, 1], [5, 6, 7, 8]])
  np.testing.assert_array_equal(model_inputs.filled_rows(tokens, 1, True),
                                [False, False, True, True])
