"""Zero-shot classification and image-text retrieval with a CLIP model.

Classifier weights come from prompt ensembling as in OpenAI's notebook
`Prompt_Engineering_for_ImageNet.ipynb`: every class name is put into each template, the text
features are L2-normalised, averaged over the templates and normalised again. Prompts are
tokenised by the model's own tokenizer (`clip.get_tokenizer(cfg)`) and images are expected
prepared by its own preprocessing (`clip.preprocess_images(images, cfg)`). Images are then
classified by the softmax of `exp(logit_scale) * cosine` against those weights (a SigLIP model's
sigmoid with its bias). All the model
work runs jitted in fixed-size batches (the last one padded, so nothing recompiles), with a
progress bar when there is more than one batch.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from clip import batching
from clip import model
from clip import processing

# OpenAI's 80 ImageNet prompt templates, in the notebook's order.
IMAGENET_TEMPLATES = (
    'a bad photo of a {}.', 'a photo of many {}.', 'a sculpture of a {}.',
    'a photo of the hard to see {}.', 'a low resolution photo of the {}.', 'a rendering of a {}.',
    'graffiti of a {}.', 'a bad photo of the {}.', 'a cropped photo of the {}.',
    'a tattoo of a {}.', 'the embroidered {}.', 'a photo of a hard to see {}.',
    'a bright photo of a {}.', 'a photo of a clean {}.', 'a photo of a dirty {}.',
    'a dark photo of the {}.', 'a drawing of a {}.', 'a photo of my {}.', 'the plastic {}.',
    'a photo of the cool {}.', 'a close-up photo of a {}.', 'a black and white photo of the {}.',
    'a painting of the {}.', 'a painting of a {}.', 'a pixelated photo of the {}.',
    'a sculpture of the {}.', 'a bright photo of the {}.', 'a cropped photo of a {}.',
    'a plastic {}.', 'a photo of the dirty {}.', 'a jpeg corrupted photo of a {}.',
    'a blurry photo of the {}.', 'a photo of the {}.', 'a good photo of the {}.',
    'a rendering of the {}.', 'a {} in a video game.', 'a photo of one {}.', 'a doodle of a {}.',
    'a close-up photo of the {}.', 'a photo of a {}.', 'the origami {}.',
    'the {} in a video game.', 'a sketch of a {}.', 'a doodle of the {}.', 'a origami {}.',
    'a low resolution photo of a {}.', 'the toy {}.', 'a rendition of the {}.',
    'a photo of the clean {}.', 'a photo of a large {}.', 'a rendition of a {}.',
    'a photo of a nice {}.', 'a photo of a weird {}.', 'a blurry photo of a {}.',
    'a cartoon {}.', 'art of a {}.', 'a sketch of the {}.', 'a embroidered {}.',
    'a pixelated photo of a {}.', 'itap of the {}.', 'a jpeg corrupted photo of the {}.',
    'a good photo of a {}.', 'a plushie {}.', 'a photo of the nice {}.',
    'a photo of the small {}.', 'a photo of the weird {}.', 'the cartoon {}.', 'art of the {}.',
    'a drawing of the {}.', 'a photo of the large {}.', 'a black and white photo of a {}.',
    'the plushie {}.', 'a dark photo of a {}.', 'itap of a {}.', 'graffiti of the {}.',
    'a toy {}.', 'itap of my {}.', 'a photo of a cool {}.', 'a photo of a small {}.',
    'a tattoo of the {}.',
)
# The 7-template subset the notebook found by sequential selection on ImageNet.
DEFAULT_TEMPLATES = (
    'itap of a {}.', 'a bad photo of the {}.', 'a origami {}.', 'a photo of the large {}.',
    'a {} in a video game.', 'art of the {}.', 'a photo of the small {}.',
)
TEMPLATES = {'default': DEFAULT_TEMPLATES, 'imagenet': IMAGENET_TEMPLATES}


def check_finite(x, what):
  """`x` as a numpy array, or a ValueError naming `what` when any value is NaN or infinite."""
  x = np.asarray(x)
  bad = ~np.isfinite(x)
  if bad.any():
    first = tuple(int(i) for i in np.argwhere(bad)[0])
    raise ValueError(f'{what} must be finite, got {int(bad.sum())} non-finite values of '
                     f'{x.size} (first at index {first}: {x[first]})')
  return x


def top_k(scores_NxC, k):
  """Indices `(N, k)` of the k highest scores per row, best first, the lower index first among
  equal scores: the one ranking rule of this module (`jax.lax.top_k`'s order), which is also
  clip_benchmark's `torch.topk` wherever no tie straddles the k-th place."""
  return np.argsort(-np.asarray(scores_NxC), axis=1, kind='stable')[:, :k]


# ---------------------------------------------------------------- classifier weights

def prompts(classnames, templates):
  """`len(classnames) * len(templates)` strings, class-major (all templates of class 0 first).
  A template holds the class name's place with `{}` (OpenAI's notebook) or `{c}`
  (clip_benchmark's template files)."""
  _check_templates(templates)
  return [t.replace('{c}', '{}').format(c) for c in classnames for t in templates]


def _check_templates(templates):
  if isinstance(templates, str) or not templates:
    raise ValueError(f'templates must be a non-empty sequence of strings, got {templates!r}')
  bad = [t for t in templates
         if not isinstance(t, str) or t.count('{}') + t.count('{c}') != 1]
  if bad:
    raise ValueError('every template needs exactly one "{}" or "{c}" for the class name; got '
                     f'{bad}')


@functools.partial(jax.jit, static_argnames=('cfg',))
def _class_embeddings(params, tokens_BxTxL, cfg):
  b, t, length = tokens_BxTxL.shape
  txt_BxTxD = model.encode_text(params, tokens_BxTxL.reshape(b * t, length), cfg).reshape(b, t, -1)
  return model.l2_normalize(model.l2_normalize(txt_BxTxD).mean(axis=1))


def classifier_weights_from_tokens(params, cfg, tokens_CxTxL, batch_size=256):
  """Tokenised prompts, `(classes, templates, L)` -> `(embed_dim, classes)` zero-shot weights:
  per class the mean of the L2-normalised text features, normalised again. `batch_size` is the
  number of prompts per pass through the text tower, rounded down to whole classes (at least
  one)."""
  tokens_CxTxL = np.asarray(tokens_CxTxL)
  if tokens_CxTxL.ndim != 3:
    raise ValueError(f'tokens must be (classes, templates, L), got shape {tokens_CxTxL.shape}')
  model.check_token_values(tokens_CxTxL, cfg)  # rows named (class, template)
  n, t, _ = tokens_CxTxL.shape
  batching.check_batch(n * t, batch_size, 'prompts')
  classes_per_batch = max(1, batch_size // t)
  size = min(classes_per_batch, n)
  out = []
  for start, stop in batching.batches(n, classes_per_batch, 'classifier weights'):
    tokens_BxTxL = batching.padded(jnp.asarray(tokens_CxTxL[start:stop]), size)
    emb_BxD = _class_embeddings(params, tokens_BxTxL, cfg)
    out.append(np.asarray(emb_BxD[:stop - start]))
  return np.concatenate(out).T


def classifier_weights(params, cfg, classnames, templates=DEFAULT_TEMPLATES, batch_size=256,
                       truncate=False):
  """Class names -> `(embed_dim, len(classnames))` zero-shot classifier weights by prompt
  ensembling over `templates` (strings with one `{}`; `IMAGENET_TEMPLATES` for OpenAI's 80).
  Prompts are tokenised with the model's own tokenizer (`clip.get_tokenizer(cfg)`: OpenAI's BPE,
  SigLIP's SentencePiece, ...) at its context length; a prompt too long for it raises unless
  `truncate=True` (open_clip and transformers truncate without a word); a model whose tokenizer
  is unknown raises `clip.TokenizerError`."""
  if isinstance(classnames, str) or not classnames:
    raise ValueError(f'classnames must be a non-empty list of strings, got {classnames!r}')
  texts = prompts(classnames, templates)
  tokens = processing.get_tokenizer(cfg)(texts, truncate=truncate)
  tokens_CxTxL = np.asarray(tokens).reshape(len(classnames), len(templates), -1)
  return classifier_weights_from_tokens(params, cfg, tokens_CxTxL, batch_size)


# ---------------------------------------------------------------- classification

@functools.partial(jax.jit, static_argnames=('cfg', 'k'))
def _classify_batch(params, images_BxHxWx3, weights_DxC, cfg, k):
  img_BxD = model.l2_normalize(model.encode_image(params, images_BxHxWx3, cfg))
  logits_BxC = jnp.exp(params['logit_scale']) * jnp.einsum('bd,dc->bc', img_BxD, weights_DxC)
  if cfg.logit_bias:  # SigLIP: each class on its own, as its model cards and open_clip's
    probs_BxC = jax.nn.sigmoid(logits_BxC + params['logit_bias'])
  else:
    probs_BxC = jax.nn.softmax(logits_BxC, axis=-1)
  probs_BxK, idx_BxK = jax.lax.top_k(probs_BxC, k)
  return idx_BxK, probs_BxK


def classify(params, cfg, images, weights, k=5, batch_size=32):
  """Preprocessed images `(N, R, R, 3)` (`clip.preprocess_images`) and classifier `weights
  (embed_dim, C)` -> `(indices (N, k) int32, probabilities (N, k) float32)`, best first: the
  top-k of `softmax(exp(logit_scale) * cosine(image, class))`, as OpenAI's zero-shot evaluation;
  for a model with SigLIP's logit bias, `sigmoid(exp(logit_scale) * cosine + logit_bias)`, each
  class's own probability, as SigLIP's model cards and open_clip compute it (the ranking is the
  same). Each class's weight column is L2-normalised here, so the scores are cosines whatever its
  norm."""
  weights = np.asarray(weights, np.float32)
  if weights.ndim != 2 or weights.shape[0] != cfg.embed_dim:
    raise ValueError(f'weights must be (embed_dim={cfg.embed_dim}, classes), got {weights.shape}')
  weights = jnp.asarray(_unit_columns(check_finite(weights, 'classifier weights')))
  if not isinstance(k, int) or not 1 <= k <= weights.shape[1]:
    raise ValueError(f'k must be an int in [1, {weights.shape[1]}] (the number of classes), '
                     f'got {k!r}')
  model.check_images(images, cfg)
  check_finite(images, 'images')
  n = images.shape[0]
  size = batching.check_batch(n, batch_size, 'images')
  indices, probs = [], []
  for start, stop in batching.batches(n, batch_size, 'classify'):
    batch = batching.padded(jnp.asarray(images[start:stop]), size)
    idx_BxK, p_BxK = _classify_batch(params, batch, weights, cfg, k)
    indices.append(np.asarray(idx_BxK[:stop - start]))
    probs.append(np.asarray(p_BxK[:stop - start]))
  probs = check_finite(np.concatenate(probs), 'class probabilities (from the image features)')
  return np.concatenate(indices).astype(np.int32), probs


def _unit_columns(weights_DxC):
  norms_C = np.linalg.norm(weights_DxC, axis=0)
  if not np.all(norms_C > 0):
    raise ValueError(f'every class weight column needs a non-zero norm; columns '
                     f'{np.flatnonzero(norms_C == 0).tolist()} are zero')
  return weights_DxC / norms_C


# ---------------------------------------------------------------- retrieval

@functools.partial(jax.jit, static_argnames=('k',))
def _first_hit(queries_BxD, query_ids_B, keys_NxD, key_ids_N, k):
  """Per query, the place (0..k-1) of its first positive key among its `jax.lax.top_k` k best
  keys by cosine (the lower index first among equal scores), or k when none is there."""
  sim_BxN = jnp.einsum('bd,nd->bn', queries_BxD, keys_NxD)
  _, top_BxK = jax.lax.top_k(sim_BxN, k)
  hit_BxK = key_ids_N[top_BxK] == query_ids_B[:, None]
  return jnp.where(hit_BxK.any(axis=1), jnp.argmax(hit_BxK, axis=1), k)


def _first_hits(queries_NxD, query_ids_N, keys_MxD, key_ids_M, k, batch_size, desc):
  n = queries_NxD.shape[0]
  size = min(batch_size, n)  # checked by the caller
  out = []
  for start, stop in batching.batches(n, batch_size, desc):
    q = batching.padded(queries_NxD[start:stop], size)
    ids = batching.padded(query_ids_N[start:stop], size)
    out.append(np.asarray(_first_hit(q, ids, keys_MxD, key_ids_M, k)[:stop - start]))
  return np.concatenate(out)


def retrieval_metrics(image_features, text_features, text_to_image=None, ks=(1, 5, 10),
                      batch_size=1024):
  """Recall@k of image->text and text->image retrieval by cosine similarity.

  `text_to_image[j]` is the image that text `j` describes (default: text i describes image i), so
  an image may have several captions: image->text counts a hit when any of its captions is in
  the top k, text->image when its image is. Features need not be normalised. Returns
  `{'image_to_text_R@1': ..., 'text_to_image_R@1': ..., ...}`. The top k are clip_benchmark's
  (`torch.topk` of the scores, a hit when any positive is among them), equal scores ranked by
  lower index (`top_k`): 50 identical images with 5 captions each give text->image R@1 0.02.
  """
  img_NxD = model.l2_normalize(jnp.asarray(check_finite(image_features, 'image features'),
                                        jnp.float32))
  txt_MxD = model.l2_normalize(jnp.asarray(check_finite(text_features, 'text features'),
                                        jnp.float32))
  if img_NxD.ndim != 2 or txt_MxD.ndim != 2 or img_NxD.shape[1] != txt_MxD.shape[1]:
    raise ValueError('image and text features must be (N, D) and (M, D) with the same D, got '
                     f'{img_NxD.shape} and {txt_MxD.shape}')
  n, m = img_NxD.shape[0], txt_MxD.shape[0]
  batching.check_batch(n, batch_size, 'images')
  batching.check_batch(m, batch_size, 'texts')
  if text_to_image is None:
    if n != m:
      raise ValueError(f'{n} images and {m} texts: give text_to_image (the image of each text) '
                       'unless text i describes image i')
    text_to_image = np.arange(m)
  text_to_image = np.asarray(text_to_image)
  if text_to_image.shape != (m,) or not np.issubdtype(text_to_image.dtype, np.integer):
    raise ValueError(f'text_to_image must be {m} integer image indices (one per text), got '
                     f'shape {text_to_image.shape} dtype {text_to_image.dtype}')
  if text_to_image.min() < 0 or text_to_image.max() >= n:
    raise ValueError(f'text_to_image holds indices outside [0, {n}): '
                     f'{text_to_image.min()}..{text_to_image.max()}')
  uncaptioned = np.setdiff1d(np.arange(n), text_to_image)
  if uncaptioned.size:
    raise ValueError(f'{uncaptioned.size} images have no text (first: {uncaptioned[:5]}); every '
                     'image needs at least one caption for image->text recall')
  ks = tuple(ks)
  if not ks or any(not isinstance(k, int) or k < 1 for k in ks):
    raise ValueError(f'ks must be positive ints, got {ks}')
  check_finite(img_NxD, 'normalised image features (a zero feature?)')
  check_finite(txt_MxD, 'normalised text features (a zero feature?)')
  t2i, ids = jnp.asarray(text_to_image, jnp.int32), jnp.arange(n, dtype=jnp.int32)
  i2t = _first_hits(img_NxD, ids, txt_MxD, t2i, min(max(ks), m), batch_size, 'image->text')
  t2i = _first_hits(txt_MxD, t2i, img_NxD, ids, min(max(ks), n), batch_size, 'text->image')
  metrics = {}
  for name, first in (('image_to_text', i2t), ('text_to_image', t2i)):
    for k in ks:
      metrics[f'{name}_R@{k}'] = float(np.mean(first < k))
  return metrics
