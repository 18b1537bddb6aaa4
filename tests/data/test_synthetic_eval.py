"""The synthetic set's evaluation of a model (zero-shot, retrieval, captioning): its zero-shot
top-1 against `zero_shot.classify`'s, its refusals before any work."""
import dataclasses

import jax
import numpy as np
import pytest

import clip
from clip import processing
from clip.eval import zero_shot
from data import synthetic
from data import synthetic_eval
from experiments.configs import cappa_small
from experiments.configs import tiny
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


def test_zero_shot_top1_is_classify_s(monkeypatch):
  """One image pass and one prompt pass for every task give each task's accuracy as
  `zero_shot.classify` (per task: its own classifier, images encoded again) does."""
  monkeypatch.setattr(synthetic_eval, 'TASKS', ('size', 'colour'))  # 3 and 8 classes
  cfg = tiny.get_config().model
  params = clip.init(jax.random.PRNGKey(3), cfg)
  n, seed = 40, 2  # classify's batches of 32: a padded last one
  results = synthetic_eval.evaluate(params, cfg, n, seed)
  tokenizer = processing.get_tokenizer(cfg)
  for split, start in synthetic_eval.SPLIT_STARTS:
    ds = synthetic.SyntheticCaptions(seed=seed, resolution=cfg.image_resolution, split=split)
    sample = ds.get(np.arange(start, start + n))
    images = processing.normalize(sample['image'].astype(np.float32) / 255, cfg)
    for task in synthetic_eval.TASKS:
      weights = zero_shot.classifier_weights_from_tokens(
          params, tokenizer(ds.prompts(task))[:, None], cfg)
      top, _ = zero_shot.classify(params, images, weights, cfg, k=1)
      labels = ds.labels(sample, task)
      assert len(set(top[:, 0])) > 1, (split, task)  # the random model does tell classes apart
      assert results[f'{split}/{task}_top1'] == np.mean(top[:, 0] == labels), (split, task)
