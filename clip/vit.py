"""OpenAI's VisionTransformer image tower: patch embed, class token, pre-LN blocks, projection;
with the VisionConfig options (gap / map pooling, sin-cos positions, registers, block options)."""
import einops
import jax
import jax.numpy as jnp

from clip import configs
from clip import layers
from clip import pooling
from clip import rope2d
from clip import transformer


def init(key, cfg, embed_dim, stacked=False):
  """`cfg` is a VisionConfig with arch 'vit'; keys and shapes are torch's `visual.*` (OpenAI's
  for the default options). `stacked` holds the blocks in the scan layout."""
  k = lambda i: jax.random.fold_in(key, i)
  w, p = cfg.width, cfg.patch_size
  scale = w ** -0.5
  params = {'conv1': layers.init_conv(k(0), 3, w, p)}
  if cfg.patch_bias:
    params['conv1']['bias'] = layers.uniform(k(7), (w,), (3 * p * p) ** -0.5)
  if cfg.has_class_token:
    params['class_embedding'] = layers.normal(k(1), (w,), scale)
  if cfg.pos_embedding == 'learned':
    rows = cfg.grid_size ** 2 + int(cfg.has_class_token)
    params['positional_embedding'] = layers.normal(k(2), (rows, w), scale)
  if cfg.registers:
    params['registers'] = layers.normal(k(5), (cfg.registers, w), scale)
  if cfg.ln_pre:
    params['ln_pre'] = layers.init_norm(w, cfg.norm, cfg.bias)
  params['transformer'] = transformer.init(k(3), cfg, stacked)
  params['ln_post'] = layers.init_norm(w, cfg.norm, cfg.bias)
  if cfg.pool == 'map':
    params['attn_pool'] = pooling.init(k(6), cfg)
  if cfg.projection_bias:  # nn.Linear (embed_dim, w), as timm's head
    params['proj'] = layers.init_linear(k(4), w, embed_dim)
  elif cfg.projection:
    params['proj'] = layers.normal(k(4), (w, embed_dim), scale)
  return params


def embed_patches(params, patches, spec, dtype):
  """The patch embedding: `conv1`'s OIHW kernel contracted with the patches by the einsum `spec`
  (which says how they are laid out), plus `conv1.bias` when the tower has one."""
  x = jnp.einsum(spec, patches, params['conv1']['weight'].astype(dtype))
  if 'bias' in params['conv1']:
    x = x + params['conv1']['bias'].astype(dtype)
  return x


def position_table(params, cfg, dtype):
  """(tokens before the registers, D) positions: learned, or the fixed sin-cos grid (with a zero
  row for the class token)."""
  if cfg.pos_embedding == 'learned':
    return params['positional_embedding'].astype(dtype)
  table = jnp.asarray(layers.sincos_2d(cfg.grid_size, cfg.width), dtype)
  if cfg.has_class_token:
    table = jnp.concatenate([jnp.zeros((1, cfg.width), dtype), table])
  return table


def with_class_token(params, x_NxPxD, cfg):
  """The patch tokens (N, P, D) with the class token before them when the tower has one."""
  if not cfg.has_class_token:
    return x_NxPxD
  n, _, d = x_NxPxD.shape
  cls_Nx1xD = jnp.broadcast_to(params['class_embedding'].astype(x_NxPxD.dtype), (n, 1, d))
  return jnp.concatenate([cls_Nx1xD, x_NxPxD], axis=1)


def with_registers(params, x_NxLxD, cfg):
  """The tokens with the registers (no positions) inserted after the class token, if any."""
  if not cfg.registers:
    return x_NxLxD
  n, _, d = x_NxLxD.shape
  c = int(cfg.has_class_token)
  regs_NxRxD = jnp.broadcast_to(params['registers'].astype(x_NxLxD.dtype), (n, cfg.registers, d))
  return jnp.concatenate([x_NxLxD[:, :c], regs_NxRxD, x_NxLxD[:, c:]], axis=1)


def prefix_length(cfg):
  """Tokens before the patches: the class token and the registers."""
  return int(cfg.has_class_token) + cfg.registers


def drop_patches(x_NxLxD, cfg, key):
  """FLIP's patch dropout: each row keeps `cfg.kept_patches` of its patch tokens (the first
  `prefix` tokens, the class token, always), a uniformly random subset per row from `key`, in
  their original order: (N, prefix + kept, D)."""
  prefix = int(cfg.has_class_token)
  n, length, _ = x_NxLxD.shape
  scores_NxP = jax.random.uniform(key, (n, length - prefix))
  keep_NxK = jnp.sort(jnp.argsort(scores_NxP, axis=1)[:, :cfg.kept_patches], axis=1) + prefix
  kept = jnp.take_along_axis(x_NxLxD, keep_NxK[..., None], axis=1)
  return jnp.concatenate([x_NxLxD[:, :prefix], kept], axis=1)


def tokens(params, images_NxHxWx3, cfg, execution=configs.Execution(), dropout_key=None):
  """Normalised NHWC images -> the last block's tokens (N, prefix + patches, D): the class token
  (with 'cls' pooling), then the registers, then the patches in raster order, in
  `execution.dtype`. With a `dropout_key` and `cfg.patch_dropout` > 0 (training), each image
  keeps `cfg.kept_patches` random patches (`drop_patches`); without a key, all of them."""
  images_NxHxWx3 = images_NxHxWx3.astype(execution.dtype)
  dtype = images_NxHxWx3.dtype
  p, covered = cfg.patch_size, cfg.grid_size * cfg.patch_size
  # The stride-p conv with an OIHW kernel, as one einsum over non-overlapping patches; like the
  # conv, the grid floors: pixels past the last whole patch (image_resolution % p) are unused.
  images_NxHxWx3 = images_NxHxWx3[:, :covered, :covered]
  patches = einops.rearrange(images_NxHxWx3, 'n (h p) (w q) c -> n (h w) c p q', p=p, q=p)
  x_NxLxD = embed_patches(params, patches, 'nlcpq,ocpq->nlo', dtype)
  x_NxLxD = with_class_token(params, x_NxLxD, cfg) + position_table(params, cfg, dtype)
  if dropout_key is not None and cfg.patch_dropout > 0:
    x_NxLxD = drop_patches(x_NxLxD, cfg, dropout_key)
  x_NxLxD = with_registers(params, x_NxLxD, cfg)
  angles = jnp.asarray(rope2d.angles(cfg)) if cfg.rope_2d else None
  return blocks(params, x_NxLxD, cfg, execution, rope_angles=angles)


def blocks(params, x_NxLxD, cfg, execution=configs.Execution(), mask=None, rope_angles=None):
  """The embedded tokens -> the last block's: `ln_pre` when the tower has it, then the blocks
  (`transformer.apply`; `mask` a `layers.Mask`, `rope_angles` EVA's 2-D RoPE angles)."""
  if 'ln_pre' in params:
    x_NxLxD = layers.norm(params['ln_pre'], x_NxLxD, cfg.norm, cfg.norm_eps)
  return transformer.apply(params['transformer'], x_NxLxD, cfg, mask, execution=execution,
                           rope_angles=rope_angles)


def pool(params, x_NxLxD, cfg, execution=configs.Execution(), mask_NxL=None):
  """The last block's tokens -> (N, embed_dim): ln_post per token, then the class token, the
  mean of the patches (and registers if pooled) or the MAP head (its attention as
  `execution.attention`); then the projection. `mask_NxL` (booleans over the L tokens, True = a
  real one: NaFlex's padding False) hides padding from the mean and from the MAP head."""
  if cfg.pool == 'cls':
    x_NxD = layers.norm(params['ln_post'], x_NxLxD[:, 0], cfg.norm, cfg.norm_eps)
  else:
    pooled = slice(None) if cfg.pool_registers else slice(cfg.registers, None)
    tokens_NxTxD = layers.norm(params['ln_post'], x_NxLxD[:, pooled], cfg.norm, cfg.norm_eps)
    mask_NxT = None if mask_NxL is None else mask_NxL[:, pooled]
    if cfg.pool == 'gap' and mask_NxT is None:
      x_NxD = tokens_NxTxD.mean(axis=1)
    elif cfg.pool == 'gap':
      x_NxD = tokens_NxTxD.mean(axis=1, where=mask_NxT[..., None])
    else:
      x_NxD = pooling.apply(params['attn_pool'], tokens_NxTxD, cfg, mask_NxT,
                            implementation=execution.attention)
  projection = params.get('proj')
  if isinstance(projection, dict):
    return layers.linear(projection, x_NxD)
  return x_NxD if projection is None else x_NxD @ projection.astype(x_NxD.dtype)


def decoder_tokens(params, x_NxLxD, cfg):
  """The last block's tokens as a captioning decoder reads them (N, T, D): ln_post per token, the
  registers dropped (scratch tokens, Darcet et al. 2024), so the class token (with 'cls'
  pooling) and then the patches in raster order."""
  c = int(cfg.has_class_token)
  if cfg.registers:
    x_NxLxD = jnp.concatenate([x_NxLxD[:, :c], x_NxLxD[:, c + cfg.registers:]], axis=1)
  return layers.norm(params['ln_post'], x_NxLxD, cfg.norm, cfg.norm_eps)


def apply(params, images_NxHxWx3, cfg, execution=configs.Execution(), dropout_key=None):
  """Normalised NHWC images -> (N, embed_dim) features, in `execution.dtype`; `dropout_key`
  turns on the training-time patch dropout of `cfg.patch_dropout` (see `tokens`)."""
  return pool(params, tokens(params, images_NxHxWx3, cfg, execution, dropout_key), cfg,
              execution)
