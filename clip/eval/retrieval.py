"""Image-text retrieval recall@k by cosine similarity, as LAION's clip_benchmark scores it.

  retrieval_metrics(image_features_NxD, text_features_MxD, text_to_image_M, ks=(1, 5, 10))
      -> {'image_to_text_R@1': ..., 'text_to_image_R@1': ..., ...}

The tie rule: a query's top k keys are `jax.lax.top_k`'s, equal scores ranked by the lower index
(`metrics.top_k`'s order), a hit when any positive key is among them (clip_benchmark's
`torch.topk`). Queries run jitted in fixed-size batches (the last one padded, so nothing
recompiles) against all keys.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from clip import batching
from clip import model
from clip.eval.metrics import check_finite


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
  lower index (`metrics.top_k`): 50 identical images with 5 captions each give text->image R@1
  0.02. ValueError for non-finite or zero features, mismatched shapes, or a `text_to_image` that
  leaves an image without a text.
  """
  img_NxD = model.l2_normalize(
      jnp.asarray(check_finite(image_features, 'image features'), jnp.float32))
  txt_MxD = model.l2_normalize(
      jnp.asarray(check_finite(text_features, 'text features'), jnp.float32))
  if img_NxD.ndim != 2 or txt_MxD.ndim != 2 or img_NxD.shape[1] != txt_MxD.shape[1]:
    raise ValueError('image and text features must be (N, D) and (M, D) with the same D, got '
                     f'{img_NxD.shape} and {txt_MxD.shape}')
  n, m = img_NxD.shape[0], txt_MxD.shape[0]
  batching.check_batch(n, batch_size, 'images')
  batching.check_batch(m, batch_size, 'texts')
  text_to_image = _checked_text_to_image(text_to_image, n, m)
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


def _checked_text_to_image(text_to_image, n, m):
  """`text_to_image` (default: text i describes image i) as m indices of n images, each
  image described at least once."""
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
  return text_to_image
