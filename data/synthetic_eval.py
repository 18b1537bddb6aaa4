"""The built-in set's evaluation of a CLIP model: zero-shot accuracy per task and retrieval.

The main job ends with it, the loss ablation scores every run with it, LiT reports it before and
after: unseen images of the (shape, colour) pairs training saw ('train' split, from
`synthetic.UNSEEN_START`) and the pairs training never showed ('heldout').

  results = synthetic_eval.evaluate(params, cfg, n=1024, seed=1)
  results['heldout/colour_shape_top1'], results['heldout/image_to_text_R@1']
"""
import numpy as np

from data import synthetic

SPLIT_STARTS = (('train', synthetic.UNSEEN_START), ('heldout', 0))
TASKS = ('colour_shape', 'shape', 'colour', 'count', 'size')


def evaluate(params, cfg, n, seed):
  """{'<split>/<task>_top1', '<split>/<task>_chance', '<split>/<retrieval metric>', ...,
  'num_examples'} on `n` images per split drawn with `seed` (use another seed than training's)."""
  import clip  # pylint: disable=g-import-not-at-top
  from clip import zero_shot  # pylint: disable=g-import-not-at-top
  results = {}
  for split, start in SPLIT_STARTS:
    ds = synthetic.SyntheticCaptions(seed=seed, resolution=cfg.image_resolution, split=split)
    sample = ds.get(np.arange(start, start + n))
    images = clip.normalize_image(sample['image'].astype(np.float32) / 255)
    for task in TASKS:
      tokens = clip.tokenize(ds.prompts(task), cfg.context_length)[:, None]
      weights = zero_shot.classifier_weights_from_tokens(params, cfg, tokens)
      top, _ = zero_shot.classify(params, cfg, images, weights, k=1)
      accuracy = float(np.mean(np.asarray(top)[:, 0] == ds.labels(sample, task)))
      results[f'{split}/{task}_top1'] = accuracy
      results[f'{split}/{task}_chance'] = 1 / len(ds.classnames(task))
    recall = zero_shot.retrieval_metrics(
        clip.encode_image(params, images, cfg),
        clip.encode_text(params, clip.tokenize(sample['caption'], cfg.context_length), cfg))
    results.update({f'{split}/{k}': float(v) for k, v in recall.items()})
  results['num_examples'] = n
  return results
