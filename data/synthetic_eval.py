"""The built-in set's evaluation of a CLIP model: zero-shot accuracy per task and retrieval.

The main job ends with it, the loss ablation scores every run with it, LiT reports it before and
after: unseen images of the (shape, colour) pairs training saw ('train' split, from
`synthetic.UNSEEN_START`) and the pairs training never showed ('heldout').

  results = synthetic_eval.evaluate(params, cfg, n=1024, seed=1)
  results['heldout/colour_shape_top1'], results['heldout/image_to_text_R@1']
"""
import numpy as np

import clip
from clip import batching
from clip import model
from clip import processing
from clip.eval import generation
from clip.eval import metrics
from clip.eval import retrieval
from clip.eval import zero_shot
from data import synthetic

SPLIT_STARTS = (('train', synthetic.UNSEEN_START), ('heldout', 0))
TASKS = ('colour_shape', 'shape', 'colour', 'count', 'size')
CAPTION_ATTRIBUTES = ('shape', 'colour', 'size', 'count')


def evaluate(params, cfg, n, seed):
  """{'<split>/<task>_top1', '<split>/<task>_chance', '<split>/<retrieval metric>', ...,
  'num_examples'} on `n` images per split drawn with `seed` (use another seed than training's).
  A model with a captioning decoder adds, per split, `generative_<task>_top1` (CapPa's
  generative zero-shot: the class prompt of highest log-likelihood) and `caption_<attribute>`
  (the fraction of greedy captions naming the image's shape, colour, size, count; 'all': every
  one right); a captioner without a text tower has only these.

  Texts go through the model's tokenizer (`clip.get_tokenizer(cfg)`), images are normalised with
  its mean and std (`cfg.preprocess`; they are drawn at its resolution, so nothing is resized).
  Generation and generative scores start each row with the tokenizer's start token: a captioner
  whose tokenizer has none (SentencePiece) raises `clip.TokenizerError` (a ValueError)."""
  tokenizer = model_tokenizer(cfg)
  results = {}
  for split, start in SPLIT_STARTS:
    ds = synthetic.SyntheticCaptions(seed=seed, resolution=cfg.image_resolution, split=split)
    sample = ds.get(np.arange(start, start + n))
    images = processing.normalize(sample['image'].astype(np.float32) / 255, cfg)
    if cfg.text is not None:
      results.update(_contrastive(params, cfg, tokenizer, ds, sample, images, split))
    if cfg.decoder is not None:
      results.update(_captioning(params, cfg, tokenizer, ds, sample, images, split))
  results['num_examples'] = n
  return results


def model_tokenizer(cfg):
  """The model's tokenizer as `evaluate` uses it, or the error `evaluate` would raise (a job
  calls it before training): a captioner's needs a start token (`generation.start_token_id`)."""
  if cfg.decoder is not None:
    generation.start_token_id(cfg)
  return processing.get_tokenizer(cfg)


def _contrastive(params, cfg, tokenizer, ds, sample, images, split):
  """Zero-shot top-1 per task and retrieval. The images go through the image tower once for all
  tasks and retrieval, and every task's prompts through the text tower in one pass: a task's top-1
  is the class of highest cosine (`metrics.classification_metrics`, as the sharded
  `evaluators.Synthetic`), which is `zero_shot.classify`'s up to float32 ties (its softmax, or
  SigLIP's sigmoid, keeps the order but may round two close classes to one probability)."""
  results = {}
  image_NxD = metrics.check_finite(np.asarray(clip.encode_image(params, images, cfg)),
                                   'image features')
  unit_NxD = np.asarray(model.l2_normalize(image_NxD))
  prompts = {task: ds.prompts(task) for task in TASKS}
  tokens = tokenizer([p for task in TASKS for p in prompts[task]])[:, None]
  weights_DxC = zero_shot.classifier_weights_from_tokens(params, tokens, cfg)  # unit columns
  start = 0
  for task in TASKS:
    stop = start + len(prompts[task])
    scores_NxC = unit_NxD @ weights_DxC[:, start:stop]
    start = stop
    results[f'{split}/{task}_top1'] = float(
        metrics.classification_metrics(scores_NxC, ds.labels(sample, task))['acc1'])
    results[f'{split}/{task}_chance'] = 1 / len(ds.classnames(task))
  recall = retrieval.retrieval_metrics(
      image_NxD, clip.encode_text(params, tokenizer(sample['caption']), cfg))
  results.update({f'{split}/{k}': float(v) for k, v in recall.items()})
  return results


def _captioning(params, cfg, tokenizer, ds, sample, images, split, batch_size=256):
  results, decoder, dec = {}, params['text_decoder'], cfg.decoder
  in_batches = lambda fn, x, desc: batching.map_batches(fn, x, batch_size, desc, 'images')
  image_tokens = in_batches(lambda x: model.image_features_and_tokens(params, x, cfg)[1], images,
                            'image tokens')
  for task in TASKS:
    prompts = tokenizer(ds.prompts(task))
    scores = in_batches(lambda x: generation.generative_zero_shot_scores(decoder, x, prompts, dec),
                        image_tokens, f'generative {task}')
    results[f'{split}/generative_{task}_top1'] = float(np.mean(
        scores.argmax(axis=1) == ds.labels(sample, task)))
  captions = in_batches(
      lambda x: generation.greedy(decoder, x, dec, tokenizer.sot_id, dec.context_length),
      image_tokens, 'captions')
  parsed = [ds.parse_caption(tokenizer.decode(row)) for row in captions]
  right = {a: np.array([p[a] for p in parsed]) == sample[a] for a in CAPTION_ATTRIBUTES}
  for attribute, hits in right.items():
    results[f'{split}/caption_{attribute}'] = float(hits.mean())
  results[f'{split}/caption_all'] = float(np.mean(np.all(list(right.values()), axis=0)))
  results[f'{split}/caption_examples'] = [tokenizer.decode(row) for row in captions[:4]]
  return results
