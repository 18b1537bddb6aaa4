"""Zero-shot classification with a CLIP model (retrieval: `clip/eval/retrieval.py`).

Classifier weights come from prompt ensembling as in OpenAI's notebook
`Prompt_Engineering_for_ImageNet.ipynb`: every class name is put into each template, the text
features are L2-normalised, averaged over the templates and normalised again. Prompts are
tokenised by the model's own tokenizer (`clip.get_tokenizer(cfg)`) and images are expected
prepared by its own preprocessing (`clip.preprocess_images(images, cfg)`). Images are then
classified by the softmax of `exp(logit_scale) * cosine` against those weights (a SigLIP model's
sigmoid with its bias). All the model work runs jitted in fixed-size batches (the last one
padded, so nothing recompiles), with a progress bar when there is more than one batch.

  weights_DxC = classifier_weights(params, classnames, cfg, templates)
  indices_NxK, probs_NxK = classify(params, images_NxRxRx3, weights_DxC, cfg, k=5)
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from clip import batching
from clip import model
from clip import processing
from clip.eval.metrics import check_finite

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


def classifier_weights_from_tokens(params, tokens_CxTxL, cfg, batch_size=256):
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


def classifier_weights(params, classnames, cfg, templates=DEFAULT_TEMPLATES, batch_size=256,
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
  return classifier_weights_from_tokens(params, tokens_CxTxL, cfg, batch_size)


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


def classify(params, images, weights_DxC, cfg, k=5, batch_size=32):
  """Preprocessed images `(N, R, R, 3)` (`clip.preprocess_images`) and classifier weights
  `(embed_dim, C)` -> `(indices (N, k) int32, probabilities (N, k) float32)`, best first: the
  top-k of `softmax(exp(logit_scale) * cosine(image, class))`, as OpenAI's zero-shot evaluation;
  for a model with SigLIP's logit bias, `sigmoid(exp(logit_scale) * cosine + logit_bias)`, each
  class's own probability, as SigLIP's model cards and open_clip compute it (the ranking is the
  same). Each class's weight column is L2-normalised here, so the scores are cosines whatever its
  norm. ValueError for weights of another shape, zero or non-finite columns, images not of the
  model's resolution or not finite, or k outside [1, C]."""
  weights = np.asarray(weights_DxC, np.float32)
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
