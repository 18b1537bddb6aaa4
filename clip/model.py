"""The two-tower CLIP model: `init`, `encode_image`, `encode_text`, `apply` over torch-keyed dicts.

`params` nests OpenAI's state-dict keys: `visual.*` (ViT or ModifiedResNet), the text tower at the
top level (`token_embedding`, `positional_embedding`, `transformer`, `ln_final`,
`text_projection`) and `logit_scale`. The public functions are jitted with the config static;
shape and dtype checks run at trace time, so they cost nothing per call. Token ids are values:
`encode_text` and `apply` are thin wrappers that check them (`check_token_values`) when they are
concrete and then call the jitted `encode_text_jit` / `apply_jit`; inside another jit (a training
step) the tokens are tracers and go unchecked, so no step waits on the host. Check ids where they
are concrete: the public entry points, or the data pipeline.
"""
import functools
import typing

import jax
import jax.numpy as jnp
import numpy as np

from clip import decoder
from clip import resnet
from clip import text
from clip import transformer
from clip import vit
from clip import vit_naflex

BATCH_STAT_KEYS = ('running_mean', 'running_var', 'num_batches_tracked')


def init_params(key, cfg):
  """Random parameters with OpenAI's initialisation; same keys and shapes as the torch model.

  Not jitted, so that it composes: `jax.eval_shape(init_params, key, cfg)` for the tree, or
  `jax.jit(init_params, static_argnames='cfg', out_shardings=...)` to create it sharded.
  """
  params = {}
  if cfg.text is not None:
    params = text.init(jax.random.fold_in(key, 1), cfg.text, cfg.embed_dim, cfg.scan)
  if cfg.vision.arch == 'resnet':
    params['visual'] = resnet.init(jax.random.fold_in(key, 0), cfg.vision, cfg.embed_dim)
  else:
    params['visual'] = vit.init(jax.random.fold_in(key, 0), cfg.vision, cfg.embed_dim, cfg.scan)
  if cfg.decoder is not None:
    params['text_decoder'] = decoder.init(jax.random.fold_in(key, 2), cfg.decoder,
                                          cfg.vision.width, cfg.scan)
  if cfg.text is None:  # CapPa: no image-text logits, so no scale
    return params
  if cfg.logit_bias:
    params = add_logit_bias(params, -10.0 if cfg.init_logit_bias is None else cfg.init_logit_bias)
  else:
    params['logit_scale'] = jnp.asarray(np.log(1 / 0.07), jnp.float32)
  if cfg.init_logit_scale is not None:
    params['logit_scale'] = jnp.asarray(cfg.init_logit_scale, jnp.float32)
  return params


def add_logit_bias(params, init=-10.0):
  """SigLIP's learnable bias (init -10) and its logit scale's start (ln 10), for sigmoid losses."""
  return {**params, 'logit_bias': jnp.asarray(init, jnp.float32),
          'logit_scale': jnp.asarray(np.log(10.0), jnp.float32)}


def _map_resblocks(params, fn):
  """`params` with `fn` applied to each transformer's `resblocks` (text tower, ViT, decoder)."""
  def mapped(tower):
    stack = tower['transformer']
    return dict(tower, transformer=dict(stack, resblocks=fn(stack['resblocks'])))
  out = mapped(params) if 'transformer' in params else dict(params)
  for name in ('visual', 'text_decoder'):
    if 'transformer' in params.get(name, {}):
      out[name] = mapped(params[name])
  return out


def stack_layers(params):
  """Per-layer (torch-keyed) params -> the stacked layout of `CLIPConfig(scan=True)`: each
  transformer's blocks as one block dict with a leading layer axis. Stacked towers stay as they
  are."""
  def stack(blocks):
    if transformer.is_stacked(blocks):
      return blocks
    if set(blocks) != {str(i) for i in range(len(blocks))}:
      raise ValueError(f'resblocks must be numbered 0..{len(blocks) - 1} to be stacked; got '
                       f'{sorted(blocks, key=lambda k: (len(k), k))}')
    return transformer.stack_blocks([blocks[str(i)] for i in range(len(blocks))])
  return _map_resblocks(params, stack)


def unstack_layers(params):
  """The stacked layout -> per-layer torch keys (`resblocks.0.*`, ...); per-layer params stay as
  they are."""
  return _map_resblocks(params, lambda b: transformer.unstack_blocks(b)
                        if transformer.is_stacked(b) else b)


# Init runs once and is cheap to execute, but hundreds of random leaves take XLA's CPU backend
# ~30 s to optimise; unoptimised code generation compiles it about 5x faster.
init = jax.jit(init_params, static_argnames=('cfg',),
               compiler_options={'xla_backend_optimization_level': 0})


def check_images(images, cfg):
  """Raises unless `images` is a float NHWC batch at the config's resolution with 3 channels."""
  r = cfg.image_resolution
  shape = getattr(images, 'shape', None)
  if shape is None or len(shape) != 4:
    raise ValueError(f'images must be NHWC of rank 4, (N, {r}, {r}, 3); got shape {shape}')
  if tuple(shape[1:]) != (r, r, 3):
    raise ValueError(f'images must be (N, {r}, {r}, 3) for this model, got {tuple(shape)}; '
                     'resize and crop with the preprocessing first (nothing is resized here)')
  if not jnp.issubdtype(images.dtype, jnp.floating):
    raise TypeError(f'images must be floating point (normalised), got dtype {images.dtype}')


def check_tokens(tokens, cfg):
  """Raises unless `tokens` is an integer (N, L) batch with L <= context_length, and L equal to
  it for a text tower that reads the padding (`clip.text.reads_padding`: pool 'last', or no
  padding mask; a shorter row would get another feature than the tokenizer's padded row). A shape
  check, so it holds under jit too; when the tokens are concrete (not traced inside a jit) their
  values are checked too (`check_token_values`)."""
  shape = getattr(tokens, 'shape', None)
  if shape is None or len(shape) != 2:
    raise ValueError(f'tokens must have shape (N, L), L <= {cfg.context_length}; got {shape}')
  if cfg.text is not None:
    text.check_length(shape[1], cfg.text)
  elif shape[1] > cfg.context_length:
    raise ValueError(f'tokens have length {shape[1]}, longer than the context length '
                     f'{cfg.context_length} of this model')
  if not jnp.issubdtype(tokens.dtype, jnp.integer):
    raise TypeError(f'tokens must be integers (int32), got dtype {tokens.dtype}')
  if not isinstance(tokens, jax.core.Tracer):
    check_token_values(tokens, cfg)


def _host_blocks(tokens):
  """`(first row, numpy block)` pairs covering the rows this process holds."""
  if isinstance(tokens, jax.Array) and not tokens.is_fully_addressable:
    return [(s.index[0].start or 0, np.asarray(s.data)) for s in tokens.addressable_shards]
  return [(0, np.asarray(tokens))]


def check_token_values(tokens, cfg):
  """Raises unless every id of the concrete int tokens `(..., L)` is in [0, vocab_size) and, where
  the text tower pools or masks at the end-of-text token, or a captioning decoder ends its
  caption there, every row holds that id. Rows are named by their index over the leading axes.
  Needs concrete arrays: under jit, call it where the tokens are made (the public entry points
  do)."""
  t = cfg.text or cfg.decoder
  eot_use = None
  if cfg.text is not None and cfg.text.uses_eot:
    eot_use = ('this text tower pools at' if cfg.text.pool == 'eot' else
               'this text tower masks the padding after')
  elif cfg.decoder is not None:
    eot_use = 'the captioning decoder ends the caption at'
  for start, block in _host_blocks(tokens):
    check_ids(block, t.vocab_size, t.eot_id, eot_use, start)


def check_ids(tokens, vocab_size, eot_id=None, eot_use=None, start=0):
  """Raises ValueError naming the first id of the numpy tokens `(..., L)` outside [0, vocab_size)
  and, with `eot_use` (what the end-of-text token is for, in words), the first row without
  `eot_id`; rows are numbered from `start`."""
  bad = (tokens < 0) | (tokens >= vocab_size)
  if bad.any():
    index = tuple(np.argwhere(bad)[0])
    raise ValueError(f'token id {tokens[index]} at row {_row(index[:-1], start)}, position '
                     f'{index[-1]} is outside the vocabulary: ids must be in [0, {vocab_size}), '
                     f'{int(bad.sum())} of the ids are outside it{_leading_axes_note(tokens)}')
  if eot_use:
    missing = ~(tokens == eot_id).any(axis=-1)
    if missing.any():
      raise ValueError(f'row {_row(np.argwhere(missing)[0], start)} has no end-of-text token '
                       f'{eot_id} ({int(missing.sum())} rows lack it); {eot_use} '
                       'its first occurrence (the model\'s own tokenizer, '
                       'clip.get_tokenizer(cfg), ends every row with it)'
                       f'{_leading_axes_note(tokens)}')


def _leading_axes_note(tokens):
  return ('; rows are indexed over the leading axes, e.g. (class, template) for classifier '
          'prompts' if tokens.ndim > 2 else '')


def _row(index, start):
  """A row's index over the leading axes, the first one offset by the block's `start`."""
  index = (int(index[0]) + start,) + tuple(int(i) for i in index[1:])
  return index[0] if len(index) == 1 else index


@functools.partial(jax.jit, static_argnames=('cfg',))
def encode_image(params, images, cfg):
  """(N, R, R, 3) normalised images -> (N, embed_dim) fp32 features, not L2-normalised; a ResNet's
  BatchNorm uses its running statistics (`training_image_features` trains them). A CoCa
  config (`clip.coca.CoCaConfig`) runs `clip.coca.encode_image`."""
  if _is_coca(cfg):
    return _coca().encode_image(params, images, cfg)
  check_images(images, cfg)
  tower = resnet.apply if cfg.vision.arch == 'resnet' else vit.apply
  return tower(params['visual'], images, cfg.vision, cfg.execution).astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=('cfg',))
def image_features_and_tokens(params, images, cfg, dropout_key=None):
  """A ViT run once for both heads: `(features (N, embed_dim) fp32, or None without a text
  tower; the tokens a captioning decoder reads (N, T, width) in the compute dtype)`
  (`vit.decoder_tokens`). `dropout_key`: training-time patch dropout (`vit.tokens`)."""
  check_images(images, cfg)
  if cfg.vision.arch != 'vit':
    raise ValueError(f'image tokens for a decoder come from a ViT, got a {cfg.vision.arch}')
  x = vit.tokens(params['visual'], images, cfg.vision, cfg.execution, dropout_key)
  features = None
  if cfg.text is not None:
    features = vit.pool(params['visual'], x, cfg.vision, cfg.execution).astype(jnp.float32)
  return features, vit.decoder_tokens(params['visual'], x, cfg.vision)


def _require_text(cfg):
  if cfg.text is None:
    raise ValueError('this model has no text tower (text=None, a captioner): use its decoder '
                     '(clip.generation) for text')


@functools.partial(jax.jit, static_argnames=('cfg',))
def encode_text_jit(params, tokens, cfg):
  """`encode_text` without the value checks (shapes are checked at trace time): for callers that
  checked their tokens already."""
  _require_text(cfg)
  check_tokens(tokens, cfg)
  return text.apply(params, tokens, cfg.text, cfg.execution).astype(jnp.float32)


def encode_text(params, tokens, cfg):
  """(N, L) int tokens -> (N, embed_dim) fp32 features pooled at the first end-of-text token
  (`cfg.text.eot_id`). Concrete tokens are checked first (ids in the vocabulary, an end-of-text
  token in every row); traced ones, inside another jit, are not. A CoCa config
  (`clip.coca.CoCaConfig`) runs `clip.coca.encode_text`."""
  if _is_coca(cfg):
    return _coca().encode_text(params, tokens, cfg)
  check_tokens(tokens, cfg)
  return encode_text_jit(params, tokens, cfg)


def _coca():
  from clip import coca  # pylint: disable=g-import-not-at-top  # cycle: coca uses this module
  return coca


def _is_coca(cfg):
  return isinstance(cfg, _coca().CoCaConfig)


def l2_normalize(x):
  """L2-normalised along the last axis (features before a cosine similarity)."""
  return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def training_image_features(params, batch_stats, images, cfg, update_bn=True, dropout_key=None):
  """Image features for a training objective, always `(features (N, embed_dim) fp32,
  batch_stats)`. A ResNet with `update_bn` normalises with batch statistics and returns its
  updated running buffers (`resnet.apply_train`); otherwise (a ViT, or a locked tower) the tower
  runs as `encode_image` and `batch_stats` come back as given. A ViT with `patch_dropout` drops
  patches when given a `dropout_key` (FLIP). `images` may be `NaFlexImages` (a ViT's
  `clip.vit_naflex` runs them, patch dropout over the real patches only)."""
  full = update_batch_stats(params, batch_stats)
  if isinstance(images, NaFlexImages):
    return _naflex_training_features(full, images, cfg, dropout_key), batch_stats
  if cfg.vision.arch == 'vit' and dropout_key is not None and cfg.vision.patch_dropout > 0:
    check_images(images, cfg)
    features = vit.apply(full['visual'], images, cfg.vision, cfg.execution, dropout_key)
    return features.astype(jnp.float32), batch_stats
  if not (update_bn and cfg.vision.arch == 'resnet'):
    return encode_image(full, images, cfg), batch_stats
  check_images(images, cfg)
  features, stats = resnet.apply_train(full['visual'], images, cfg.vision, cfg.execution)
  return features.astype(jnp.float32), {'visual': stats}


class NaFlexImages(typing.NamedTuple):
  """A NaFlex image batch (SigLIP 2's native aspect ratio, `clip.naflex_preprocess`): `patches`
  float (N, S, P*P*3) normalised, each image's h*w real patches first in raster order, flattened
  (row, column, channel), then padding; `spatial_shapes` int (N, 2) each image's (h, w) grid."""
  patches: jax.Array
  spatial_shapes: jax.Array


def check_naflex_model(cfg):
  """Raises ValueError unless the image tower runs NaFlex patches (a ViT)."""
  if cfg.vision.arch != 'vit':
    raise ValueError(f'NaFlex images need a ViT image tower, this model has a {cfg.vision.arch}')


def check_naflex_images(images, cfg):
  """Raises unless `images` (NaFlexImages) has the shapes the model's patch size says."""
  check_naflex_model(cfg)
  p = cfg.vision.patch_size
  shape, grids = getattr(images.patches, 'shape', None), getattr(images.spatial_shapes, 'shape',
                                                                 None)
  if shape is None or len(shape) != 3 or shape[2] != p * p * 3:
    raise ValueError(f'NaFlex patches must be (N, S, {p * p * 3}) ({p} x {p} x 3 pixels, the '
                     f'model\'s patch_size {p}), got shape {shape}')
  if not jnp.issubdtype(images.patches.dtype, jnp.floating):
    raise TypeError(f'NaFlex patches must be floating point (normalised), got dtype '
                    f'{images.patches.dtype}')
  if grids != (shape[0], 2) or not jnp.issubdtype(images.spatial_shapes.dtype, jnp.integer):
    raise ValueError(f'spatial_shapes must be int ({shape[0]}, 2) for patches {tuple(shape)}, '
                     f'got {getattr(images.spatial_shapes, "dtype", None)} {grids}')


def _naflex_training_features(params, images, cfg, dropout_key):
  check_naflex_images(images, cfg)
  features = vit_naflex.features(params['visual'], images.patches, images.spatial_shapes,
                                 cfg.vision, cfg.execution, dropout_key)
  return features.astype(jnp.float32)


def logits(params, image_features, text_features):
  """Scaled cosine similarities (logits_per_image, logits_per_text), as OpenAI's forward; a model
  with SigLIP's `logit_bias` adds it: `exp(t) * cos + b`, the logits of its sigmoid loss (as HF
  `SiglipModel` and open_clip return them)."""
  img, txt = l2_normalize(image_features), l2_normalize(text_features)
  logits_per_image = jnp.exp(params['logit_scale']) * img @ txt.T
  if 'logit_bias' in params:
    logits_per_image = logits_per_image + params['logit_bias']
  return logits_per_image, logits_per_image.T


@functools.partial(jax.jit, static_argnames=('cfg',))
def apply_jit(params, images, tokens, cfg):
  """`apply` without the token value checks."""
  return logits(params, encode_image(params, images, cfg), encode_text_jit(params, tokens, cfg))


def apply(params, images, tokens, cfg):
  """Images and tokens -> (logits_per_image (Ni, Nt), logits_per_text (Nt, Ni)); concrete tokens
  are checked as by `encode_text`."""
  check_tokens(tokens, cfg)
  return apply_jit(params, images, tokens, cfg)


def split_batch_stats(params):
  """`(trainable, batch_stats)`: two pruned trees; BatchNorm buffers are not trained by gradients.
  `update_batch_stats(trainable, batch_stats)` puts them back together."""
  trainable, stats = {}, {}
  for k, v in params.items():
    if isinstance(v, dict):
      t, s = split_batch_stats(v)
      if t:
        trainable[k] = t
      if s:
        stats[k] = s
    elif k in BATCH_STAT_KEYS:
      stats[k] = v
    else:
      trainable[k] = v
  return trainable, stats


def update_batch_stats(params, batch_stats):
  """A copy of `params` with the BN buffers of `batch_stats` (from train mode, or split off)."""
  out = dict(params)
  for k, v in batch_stats.items():
    if isinstance(v, dict):
      if k not in params:
        raise KeyError(f'batch statistics for {k!r}, which params do not have')
      out[k] = update_batch_stats(params[k], v)
    else:
      out[k] = v
  return out
