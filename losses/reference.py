"""Single-device image-text losses: the specification every sharded version must equal.

`img` and `txt` are L2-normalised embeddings `(batch, dim)`, row i of one paired with row i of the
other; `logit_scale` and `logit_bias` are scalars in log space as trained (`exp(logit_scale)`
multiplies the cosine similarities). Similarities are accumulated in fp32 whatever the embedding
dtype (bf16 products are exact in fp32) and the loss is computed in fp32.
"""
import jax
import jax.numpy as jnp
import numpy as np


def check_embeddings(img, txt):
  """Raises TypeError/ValueError unless img and txt are float `(batch, dim)` of equal shape."""
  for name, x in (('img', img), ('txt', txt)):
    if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
      raise TypeError(f'{name} must be a float array, got dtype {jnp.result_type(x)}')
    if np.ndim(x) != 2:
      raise ValueError(f'{name} must be (batch, dim), got shape {np.shape(x)}')
  if np.shape(img) != np.shape(txt):
    raise ValueError(f'img and txt must have the same (batch, dim) shape, got {np.shape(img)} '
                     f'and {np.shape(txt)}')


def check_scalar(name, x):
  """Raises ValueError/TypeError unless x is a real scalar (a Python number or a 0-d array)."""
  if np.ndim(x) != 0:
    raise ValueError(f'{name} must be a scalar, got shape {np.shape(x)}')
  if not jnp.issubdtype(jnp.result_type(x), jnp.floating) and not jnp.issubdtype(
      jnp.result_type(x), jnp.integer):
    raise TypeError(f'{name} must be a real number, got dtype {jnp.result_type(x)}')


def similarity_logits(x_BxD, y_CxD, scale):
  """`scale * x . y` for every pair, accumulated and returned in fp32."""
  return scale * jnp.einsum('id,jd->ij', x_BxD, y_CxD, preferred_element_type=jnp.float32)


@jax.jit
def contrastive_loss(img, txt, logit_scale):
  """Symmetric InfoNCE: mean of image->text and text->image cross-entropy, mean over the batch."""
  check_embeddings(img, txt)
  check_scalar('logit_scale', logit_scale)
  logits_BxB = similarity_logits(img, txt, jnp.exp(jnp.asarray(logit_scale, jnp.float32)))
  positives_B = jnp.diagonal(logits_BxB)
  img_to_txt = jax.nn.logsumexp(logits_BxB, axis=1) - positives_B
  txt_to_img = jax.nn.logsumexp(logits_BxB, axis=0) - positives_B
  return (img_to_txt.mean() + txt_to_img.mean()) / 2


@jax.jit
def sigmoid_loss(img, txt, logit_scale, logit_bias):
  """SigLIP: `-sum_ij log_sigmoid(z_ij * (exp(t) x_i.y_j + b)) / batch`, z = 1 on the diagonal."""
  check_embeddings(img, txt)
  check_scalar('logit_scale', logit_scale)
  check_scalar('logit_bias', logit_bias)
  scale = jnp.exp(jnp.asarray(logit_scale, jnp.float32))
  logits_BxB = similarity_logits(img, txt, scale) + jnp.asarray(logit_bias, jnp.float32)
  z_BxB = 2 * jnp.eye(img.shape[0], dtype=jnp.float32) - 1
  return -jnp.sum(jax.nn.log_sigmoid(z_BxB * logits_BxB)) / img.shape[0]
