"""The layout set's evaluation of a CLIP model, per aspect-ratio bucket: zero-shot and retrieval,
at fixed resolution (every scene squashed to the model's square, as its preprocessing does) or
NaFlex at each of several sequence lengths.

Unseen scenes of the 'train' split (from `synthetic_layout.UNSEEN_START`) and of the 'heldout'
one (shape pairs training never showed together). Zero-shot tasks, each a classification of the
scene among class prompts written by the set's own templates, both ways round ("a circle left
of a square." and "a square right of a circle.", ensembled as prompt templates):
  'layout': which shape is where: (first shape, second shape, axis), 60 classes;
  'colours': which colour is where: (first colour, second colour, axis), 112 classes;
  'patterns': which object is striped: (first pattern, second pattern, axis), 8 classes: what a
    squashed 4:1 scene no longer shows (`synthetic_layout`);
  'order': of the 'layout' scores, the true class against the same shapes swapped (2 classes).
Retrieval: image <-> full caption ("a striped red circle left of a solid blue square.")
recall@1 and @5 among the scenes of the same bucket (overall: all of them).

  results = synthetic_layout_eval.evaluate(params, cfg, n=1000, seed=1)            # fixed
  results = synthetic_layout_eval.evaluate(params, cfg, 1000, 1, seq_lengths=(64, 96))
  results['heldout/len64/4x1/layout_top1'], results['heldout/len64/image_to_text_R@1']
"""
import jax.numpy as jnp
import numpy as np

import clip
from clip import batching
from clip import model
from clip import processing
from clip.eval import metrics
from clip.eval import retrieval
from clip.eval import zero_shot
from data import synthetic_layout as layout

SPLIT_STARTS = (('train', layout.UNSEEN_START), ('heldout', 0))


def _classes(values, distinct):
  return [(a, b, axis) for axis in range(len(layout.AXES)) for a in range(len(values))
          for b in range(len(values)) if a != b or not distinct]


# The classes of each zero-shot task: (first, second, axis) of the labels it names, and the
# template of layout.TEMPLATES that names them (the two objects' shapes and colours differ).
CLASSES = {'layout': _classes(layout.SHAPES, True), 'colours': _classes(layout.COLOURS, True),
           'patterns': _classes(layout.PATTERNS, False)}
PROMPT_TEMPLATE = {'layout': 2, 'colours': 3, 'patterns': 4}
LABEL_KEYS = {'layout': 'shape', 'colours': 'colour', 'patterns': 'pattern'}
RECALL_KS = (1, 5)


def prompts(task):
  """`(classes, 2)` prompts of a task: each class named both ways round ('a circle left of a
  square.', 'a square right of a circle.'), in `CLASSES[task]`'s order."""
  key = LABEL_KEYS[task]
  first, second, axis = (np.array(c) for c in zip(*CLASSES[task]))
  unnamed = np.zeros(len(axis), np.int32)   # what the task's template leaves out
  rows = []
  for swap in (0, 1):
    attrs = {f'{name}_{o}': unnamed for name in layout.OBJECT_LABELS for o in ('first', 'second')}
    attrs.update({f'{key}_first': first, f'{key}_second': second, 'axis': axis,
                  'swap': unnamed + swap, 'template': unnamed + PROMPT_TEMPLATE[task]})
    rows.append(layout.LayoutCaptions.captions(attrs))
  return [list(pair) for pair in zip(*rows)]


def labels(sample, task, swapped=False):
  """int (N,) class indices of `sample` (`LayoutCaptions.get`) in `CLASSES[task]`; `swapped`:
  those of the same objects the other way round."""
  key = LABEL_KEYS[task]
  index = {c: i for i, c in enumerate(CLASSES[task])}
  first, second = sample[f'{key}_first'], sample[f'{key}_second']
  if swapped:
    first, second = second, first
  return np.array([index[(a, b, x)] for a, b, x in zip(first, second, sample['axis'])])


def evaluate(params, cfg, n, seed, seq_lengths=None, batch_size=256):
  """{'<split>[/len<S>][/<bucket>]/<metric>': float, ..., 'num_examples': n} on `n` scenes per
  split drawn with `seed` (another seed than training's): for each split ('train': unseen scenes,
  'heldout': unseen shape pairs), overall and per bucket (`synthetic_layout.BUCKET_NAMES`,
  width x height, e.g. '4x1'; n / 5 scenes each), `<task>_top1` and `<task>_chance` for
  'layout', 'colours', 'patterns', 'order', and retrieval's `image_to_text_R@k`,
  `text_to_image_R@k` (k in RECALL_KS) among the scenes of the bucket.

  `seq_lengths` None: a fixed-resolution model, each scene resized to `cfg.image_resolution` by
  its own preprocessing (`clip.preprocess_images`: squash, or letterbox for 'longest'), keys
  without `len<S>`. A sequence of lengths: a NaFlex model, scenes through
  `clip.naflex_preprocess(images, P, S, cfg)` and `clip.encode_image_naflex`, keys
  `<split>/len<S>/...` for each S. Texts go through the model's tokenizer. Images and prompts run
  in jitted batches of `batch_size` (one compile per S).

  Raises:
    ValueError: n below the number of buckets, an empty or non-positive seq_lengths, a model
      without a text tower, a fixed-resolution model whose preprocessing centre-crops
      ('shortest': it cuts a wide scene's objects out).
  """
  lengths = _check_arguments(cfg, n, seq_lengths)
  tokenizer = processing.get_tokenizer(cfg)
  weights = {task: zero_shot.classifier_weights_from_tokens(
      params, np.asarray(tokenizer(sum(prompts(task), []))).reshape(len(CLASSES[task]), 2, -1),
      cfg, batch_size) for task in CLASSES}
  results = {}
  for split, start in SPLIT_STARTS:
    ds = layout.LayoutCaptions(seed=seed, resolution=cfg.image_resolution, split=split)
    sample = ds.get(np.arange(start, start + n))
    full = ds.captions({**sample, 'template': np.zeros(n, np.int32)})
    text_NxD = np.asarray(clip.encode_text(params, tokenizer(full), cfg))
    for length in lengths:
      image_NxD = _image_features(params, cfg, sample['image'], length, batch_size)
      prefix = split if length is None else f'{split}/len{length}'
      results.update(_scores(image_NxD, text_NxD, weights, sample, prefix))
  results['num_examples'] = n
  return results


def _check_arguments(cfg, n, seq_lengths):
  if cfg.text is None:
    raise ValueError('the layout evaluation scores captions: it needs a model with a text tower')
  if isinstance(n, bool) or not isinstance(n, int) or n < len(layout.BUCKETS):
    raise ValueError(f'n must be an int >= {len(layout.BUCKETS)} (a scene per aspect-ratio '
                     f'bucket), got {n!r}')
  if seq_lengths is None:
    layout.check_resize_mode(cfg.preprocess)
    return (None,)
  if isinstance(seq_lengths, (int, str)) or not len(seq_lengths) or any(
      isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 1 for s in seq_lengths):
    raise ValueError(f'seq_lengths must be None (fixed resolution) or a non-empty sequence of '
                     f'positive patch counts, got {seq_lengths!r}')
  return tuple(int(s) for s in seq_lengths)


def _image_features(params, cfg, images, length, batch_size):
  """(N, embed_dim) fp32 features of the scenes, prepared and encoded one padded batch at a
  time (the last padded by repeating its first row, so one compile serves every batch)."""
  if length is None:
    prepare = lambda x: (clip.preprocess_images(x, cfg),)
    encode = lambda x: model.encode_image(params, x, cfg)
  else:
    prepare = lambda x: clip.naflex_preprocess(x, cfg.vision.patch_size, length, cfg)
    encode = lambda *x: clip.encode_image_naflex(params, *x, cfg)
  size = batching.check_batch(len(images), batch_size, 'images')
  out = []
  for start, stop in batching.batches(len(images), batch_size, f'image features ({length})'):
    inputs = [batching.padded(jnp.asarray(x), size) for x in prepare(images[start:stop])]
    out.append(np.asarray(encode(*inputs), np.float32)[:stop - start])
  return np.concatenate(out)


def _scores(image_NxD, text_NxD, weights, sample, prefix):
  """Zero-shot accuracies and retrieval recalls, overall and per bucket, keyed under `prefix`."""
  cosines = {task: np.asarray(model.l2_normalize(jnp.asarray(image_NxD))) @ w_DxC
             for task, w_DxC in weights.items()}
  rows = np.arange(len(image_NxD))
  # 'order': the two classes in class order, so that a tie ranks neither the true one first.
  true, swapped = labels(sample, 'layout'), labels(sample, 'layout', swapped=True)
  low, high = np.minimum(true, swapped), np.maximum(true, swapped)
  order_Nx2 = np.stack([cosines['layout'][rows, low], cosines['layout'][rows, high]], 1)
  order_N = (true == high).astype(np.int64)
  results = {}
  for bucket, key in [(None, prefix)] + [(b, f'{prefix}/{name}')
                                         for b, name in enumerate(layout.BUCKET_NAMES)]:
    keep = rows if bucket is None else rows[sample['bucket'] == bucket]
    for task in CLASSES:
      results[f'{key}/{task}_top1'] = metrics.classification_metrics(
          cosines[task][keep], labels(sample, task)[keep])['acc1']
      results[f'{key}/{task}_chance'] = 1 / len(CLASSES[task])
    results[f'{key}/order_top1'] = metrics.classification_metrics(
        order_Nx2[keep], order_N[keep])['acc1']
    results[f'{key}/order_chance'] = 0.5
    recall = retrieval.retrieval_metrics(image_NxD[keep], text_NxD[keep], ks=RECALL_KS)
    results.update({f'{key}/{k}': v for k, v in recall.items()})
  return results
