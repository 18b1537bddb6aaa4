"""OpenAI's VisionTransformer image tower: patch embed, class token, pre-LN blocks, projection."""
import einops
import jax
import jax.numpy as jnp

from clip import layers
from clip import transformer


def init(key, cfg, embed_dim):
  """`cfg` is a VisionConfig with arch 'vit'; keys and shapes are torch's `visual.*`."""
  k = lambda i: jax.random.fold_in(key, i)
  w, p = cfg.width, cfg.patch_size
  scale = w ** -0.5
  return {
      'conv1': layers.init_conv(k(0), 3, w, p),
      'class_embedding': layers.normal(k(1), (w,), scale),
      'positional_embedding': layers.normal(k(2), (cfg.grid_size ** 2 + 1, w), scale),
      'ln_pre': layers.init_layer_norm(w),
      'transformer': transformer.init(k(3), w, cfg.layers),
      'ln_post': layers.init_layer_norm(w),
      'proj': layers.normal(k(4), (w, embed_dim), scale),
  }


def apply(params, images_NxHxWx3, cfg, remat=False):
  """Normalised NHWC images -> (N, embed_dim) features, in the dtype of the images."""
  dtype = images_NxHxWx3.dtype
  p = cfg.patch_size
  # The stride-p conv with an OIHW kernel, as one einsum over non-overlapping patches.
  patches = einops.rearrange(images_NxHxWx3, 'n (h p) (w q) c -> n (h w) c p q', p=p, q=p)
  x_NxLxD = jnp.einsum('nlcpq,ocpq->nlo', patches, params['conv1']['weight'].astype(dtype))
  cls_Nx1xD = jnp.broadcast_to(params['class_embedding'].astype(dtype),
                               (x_NxLxD.shape[0], 1, x_NxLxD.shape[-1]))
  x_NxLxD = jnp.concatenate([cls_Nx1xD, x_NxLxD], axis=1)
  x_NxLxD = x_NxLxD + params['positional_embedding'].astype(dtype)
  x_NxLxD = layers.layer_norm(params['ln_pre'], x_NxLxD)
  x_NxLxD = transformer.apply(params['transformer'], x_NxLxD, cfg.heads, remat=remat)
  x_NxD = layers.layer_norm(params['ln_post'], x_NxLxD[:, 0])
  return x_NxD @ params['proj'].astype(dtype)
