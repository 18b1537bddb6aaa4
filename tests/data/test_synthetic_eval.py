"""The synthetic set's evaluation of a model (zero-shot, retrieval, captioning): its refusals
before any work."""
import dataclasses

import pytest

import clip
from data import synthetic_eval
from experiments.configs import cappa_small
from tests.data.test_tfrecords import siglip_cfg  # pylint: disable=unused-import


def test_synthetic_eval_refuses_a_captioner_without_a_start_token(siglip_cfg):
  """Generation and generative scores start from the tokenizer's start token: SentencePiece has
  none, and the evaluation says so before any work (OpenAI's has one)."""
  captioner = cappa_small.get_config().model
  assert synthetic_eval.model_tokenizer(captioner).sot_id == clip.tokenizer.SOT
  decoder = dataclasses.replace(captioner.decoder, vocab_size=siglip_cfg.text.vocab_size,
                                eot_token_id=siglip_cfg.text.eot_id, output_ids=None)
  sentencepiece_captioner = dataclasses.replace(captioner, decoder=decoder,
                                                tokenizer=siglip_cfg.tokenizer)
  with pytest.raises(clip.TokenizerError, match='start-of-text token'):
    synthetic_eval.evaluate(None, sentencepiece_captioner, 8, 1)
