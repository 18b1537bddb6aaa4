"""open_clip's CoCa (Yu et al. 2022, "CoCa: Contrastive Captioners are Image-Text Foundation
Models"; open_clip's `coca_model.py`): contrastive features and greedy captions, exact.

CoCa is a two-tower CLIP whose towers also hand tokens to a multimodal decoder:

  image: the ViT trunk (`vit.tokens`), then with `attentional_pool` open_clip's
    AttentionalPooler (`n_queries` learned queries, `ln_q` on them, `ln_k` on the tokens,
    nn.MultiheadAttention with kdim = the ViT width) and `ln_post`; token 0 of the pooled set,
    times `proj`, is the contrastive feature and tokens 1.. are what the decoder reads. Without
    it, `ln_post` over the trunk's tokens: the class token (times `proj`) and the patches.
  text: token embedding, a learned class token `cls_emb` appended after the caption, positions,
    causal blocks that also mask padding keys (ids == `pad_id`; open_clip's legacy mask, which
    existing CoCa weights use: key j is hidden when token j - 1 is padding, key 0 never);
    `ln_final` of the last (class) position times `text_projection` is the contrastive feature,
    the raw block outputs of the caption positions (no `ln_final`) the decoder's input.
  decoder (MultimodalTransformer): per layer a causal self-attention block with its MLP, then a
    cross-attention block with its own MLP (`ln_1` on the text, `ln_1_kv` on the image tokens);
    `ln_final`, then `text_projection` (width, vocab) gives the next-token scores.

Params are open_clip's state-dict keys nested on '.', as a CoCa model's `state_dict()` holds
them (`visual.*`, `text.*`, `text_decoder.{resblocks, cross_attn}.<i>.*`, `logit_scale`).
Tested against open_clip 3.3 (tests/formats/test_coca.py): features and decoder scores within
1e-4 relative error, greedy captions token for token. KV-cached decoding and beam search:
`clip/coca_decoding.py` (open_clip's beam path needs transformers' `BeamSearchScorer`, which
transformers 5 removed: ours is tested against an exhaustive search instead).
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from clip import configs
from clip import layers
from clip import model
from clip import transformer
from clip import vit
from clip.formats import files
from clip.formats import open_clip as occ

_COCA_VISION_KEYS = ('attentional_pool', 'attn_pooler_queries', 'attn_pooler_heads',
                     'output_tokens')
_COCA_TEXT_KEYS = ('embed_cls', 'output_tokens', 'pad_id')
_MULTIMODAL_KEYS = frozenset(('context_length', 'vocab_size', 'width', 'heads', 'layers',
                              'mlp_ratio', 'dim_head', 'n_queries', 'attn_pooler_heads',
                              'ls_init_value'))


@dataclasses.dataclass(frozen=True)
class CoCaConfig:
  """A CoCa model. `vision` the ViT trunk, `text` the unimodal text tower's blocks (its pooling
  fields unused: CoCa pools the appended class token), `decoder` the multimodal decoder's blocks
  (a TextConfig: width, layers, heads, MLP, context length; its scores cover `text.vocab_size`
  ids). `attentional_pool`: the image tokens come from the `pool_queries`-query pooler with
  `pool_heads` heads (else the trunk's patches). `pad_id`: the text id masked as padding.
  `tokenizer` and `preprocess` as `CLIPConfig`'s (open_clip's CoCa: OpenAI's BPE and transform,
  unless its `open_clip_config.json` states others)."""
  embed_dim: int
  vision: configs.VisionConfig
  text: configs.TextConfig
  decoder: configs.TextConfig
  attentional_pool: bool = True
  pool_queries: int = 256
  pool_heads: int = 8
  pad_id: int = 0
  execution: configs.Execution = configs.Execution()
  tokenizer: configs.TokenizerConfig = configs.TokenizerConfig()
  preprocess: configs.PreprocessConfig = configs.PreprocessConfig()

  @property
  def image_token_width(self):
    return self.embed_dim if self.attentional_pool else self.vision.width

  @property
  def image_resolution(self):
    return self.vision.image_resolution

  @property
  def context_length(self):
    return self.text.context_length


def config_from_open_clip(model_cfg):
  """An open_clip CoCa model_cfg (`model_configs/coca_*.json`, or an `open_clip_config.json`
  dict) -> CoCaConfig. Raises ValueError naming the key of what is not represented exactly
  (HF text towers as coca_roberta's, 'parallel' / 'cascade' pooling, layer scale, ...; the
  towers' other options as `clip.formats.open_clip.config_from_open_clip` refuses them)."""
  if not isinstance(model_cfg, dict):
    raise TypeError(f'expected an open_clip model_cfg dict, got {type(model_cfg).__name__}')
  model_cfg = model_cfg.get('model_cfg', model_cfg)
  multimodal = model_cfg.get('multimodal_cfg')
  if not isinstance(multimodal, dict):
    raise ValueError(f'not a CoCa model_cfg: multimodal_cfg is {multimodal!r}, expected a dict')
  unknown = sorted(set(multimodal) - _MULTIMODAL_KEYS)
  if unknown:
    raise ValueError(f'multimodal_cfg has keys {unknown} that open_clip 3.3 does not define')
  if multimodal.get('ls_init_value') is not None:
    raise ValueError('multimodal_cfg: ls_init_value (layer scale) is not supported')
  top = {k: v for k, v in model_cfg.items() if k != 'multimodal_cfg'}
  vision_cfg, text_cfg = dict(top['vision_cfg']), dict(top['text_cfg'])
  pool = vision_cfg.get('attentional_pool', False)
  if pool not in (True, False):
    raise ValueError(f'vision_cfg: attentional_pool={pool!r} (open_clip\'s untested pooling '
                     'that "should match the paper") is not supported; True or False')
  embed_cls = text_cfg.get('embed_cls', False)
  queries = vision_cfg.get('attn_pooler_queries', 256)
  heads = vision_cfg.get('attn_pooler_heads', 8)
  if text_cfg.get('no_causal_mask', False):
    raise ValueError('text_cfg: no_causal_mask=True (a bidirectional CoCa text tower) is not '
                     'supported')
  pad_id = text_cfg.get('pad_id', 0)
  for key in _COCA_VISION_KEYS:
    vision_cfg.pop(key, None)
  for key in _COCA_TEXT_KEYS:
    text_cfg.pop(key, None)
  # CoCa ignores the text pool_type (it pools the class token): drop it from the check.
  text_cfg.pop('pool_type', None)
  clip_cfg = occ.config_from_open_clip(dict(top, vision_cfg=vision_cfg, text_cfg=text_cfg))
  if not embed_cls:
    raise ValueError('text_cfg: CoCa without embed_cls (its contrastive class token) is not '
                     'supported')
  dec = {k: multimodal[k] for k in ('width', 'heads', 'layers', 'context_length', 'mlp_ratio')
         if k in multimodal}
  dec.setdefault('context_length', 77)
  decoder = occ.config_from_open_clip(dict(
      top, vision_cfg=vision_cfg, text_cfg=dict(dec, vocab_size=clip_cfg.text.vocab_size))).text
  if decoder.width != clip_cfg.text.width:
    raise ValueError(f'multimodal_cfg width {decoder.width} differs from the text width '
                     f'{clip_cfg.text.width}: open_clip feeds the text tokens to the decoder as '
                     'they are, so such a model does not run there either')
  image_width = clip_cfg.embed_dim if pool else clip_cfg.vision.width
  if decoder.width != image_width:
    raise ValueError(f'the decoder (width {decoder.width}) cross-attends to image tokens of '
                     f'width {image_width}: open_clip\'s cross-attention needs them equal')
  return CoCaConfig(clip_cfg.embed_dim, clip_cfg.vision, clip_cfg.text, decoder, bool(pool),
                    queries, heads, pad_id)


# ---------------------------------------------------------------- parameters

def _block_shapes(prefix, d, hidden, cross=False):
  shapes = {'ln_1.weight': (d,), 'ln_1.bias': (d,), 'attn.in_proj_weight': (3 * d, d),
            'attn.in_proj_bias': (3 * d,), 'attn.out_proj.weight': (d, d),
            'attn.out_proj.bias': (d,), 'ln_2.weight': (d,), 'ln_2.bias': (d,),
            'mlp.c_fc.weight': (hidden, d), 'mlp.c_fc.bias': (hidden,),
            'mlp.c_proj.weight': (d, hidden), 'mlp.c_proj.bias': (d,)}
  if cross:
    shapes.update({'ln_1_kv.weight': (d,), 'ln_1_kv.bias': (d,)})
  return {f'{prefix}.{k}': v for k, v in shapes.items()}


def _norm(prefix, d):
  return {f'{prefix}.weight': (d,), f'{prefix}.bias': (d,)}


def expected_shapes(cfg):
  """{open_clip state-dict key: shape} of the CoCa model `cfg`."""
  v, t, dec, e = cfg.vision, cfg.text, cfg.decoder, cfg.embed_dim
  w = v.width
  shapes = {'logit_scale': (), 'visual.conv1.weight': (w, 3, v.patch_size, v.patch_size),
            'visual.class_embedding': (w,),
            'visual.positional_embedding': (v.grid_size ** 2 + 1, w),
            **_norm('visual.ln_pre', w)}
  for i in range(v.layers):
    shapes.update(_block_shapes(f'visual.transformer.resblocks.{i}', w, v.hidden_dim))
  if cfg.attentional_pool:
    a = 'visual.attn_pool'
    shapes.update({f'{a}.query': (cfg.pool_queries, e), f'{a}.attn.in_proj_bias': (3 * e,),
                   f'{a}.attn.out_proj.weight': (e, e), f'{a}.attn.out_proj.bias': (e,),
                   **_norm(f'{a}.ln_q', e), **_norm(f'{a}.ln_k', w)})
    if e == w:
      shapes[f'{a}.attn.in_proj_weight'] = (3 * e, e)
    else:
      shapes.update({f'{a}.attn.q_proj_weight': (e, e), f'{a}.attn.k_proj_weight': (e, w),
                     f'{a}.attn.v_proj_weight': (e, w)})
  pool_width = e if cfg.attentional_pool else w
  shapes.update({**_norm('visual.ln_post', pool_width), 'visual.proj': (pool_width, e)})
  d = t.width
  shapes.update({'text.token_embedding.weight': (t.vocab_size, d), 'text.cls_emb': (d,),
                 'text.positional_embedding': (t.context_length + 1, d),
                 **_norm('text.ln_final', d), 'text.text_projection': (d, e)})
  for i in range(t.layers):
    shapes.update(_block_shapes(f'text.transformer.resblocks.{i}', d, t.hidden_dim))
  for i in range(dec.layers):
    shapes.update(_block_shapes(f'text_decoder.resblocks.{i}', dec.width, dec.hidden_dim))
    shapes.update(_block_shapes(f'text_decoder.cross_attn.{i}', dec.width, dec.hidden_dim, True))
  shapes.update({**_norm('text_decoder.ln_final', dec.width),
                 'text_decoder.text_projection': (dec.width, t.vocab_size)})
  return shapes


def from_state_dict(flat, cfg, dtype=np.float32):
  """A CoCa model's flat state dict (numpy arrays) -> params, every key and shape checked
  against `expected_shapes(cfg)` (ValueError naming the first missing, extra or misshapen key;
  open_clip's `logit_bias`, present only with `init_logit_bias`, is kept when present)."""
  expected = expected_shapes(cfg)
  if 'logit_bias' in flat:
    expected['logit_bias'] = ()
  missing, extra = sorted(set(expected) - set(flat)), sorted(set(flat) - set(expected))
  if missing or extra:
    raise ValueError(f'CoCa state dict does not fit the config: missing {missing[:5]}, '
                     f'unexpected {extra[:5]}')
  for key, shape in expected.items():
    if tuple(np.shape(flat[key])) != shape:
      raise ValueError(f'{key} has shape {tuple(np.shape(flat[key]))}, the config says {shape}')
  return files.nest({k: np.asarray(v, dtype) for k, v in flat.items()})


# ---------------------------------------------------------------- image

def _attentional_pool(p, x_NxLxW, heads):
  """open_clip's AttentionalPooler: (N, L, W) tokens -> (N, Q, E)."""
  e = p['query'].shape[1]
  x_NxLxW = layers.layer_norm(p['ln_k'], x_NxLxW)
  q_QxE = layers.layer_norm(p['ln_q'], p['query'].astype(x_NxLxW.dtype))
  a = p['attn']
  if 'in_proj_weight' in a:
    w_q, w_k, w_v = jnp.split(a['in_proj_weight'], 3)
  else:
    w_q, w_k, w_v = a['q_proj_weight'], a['k_proj_weight'], a['v_proj_weight']
  b_q, b_k, b_v = jnp.split(a['in_proj_bias'], 3)
  q_NxQxE = jnp.broadcast_to(layers.linear({'weight': w_q, 'bias': b_q}, q_QxE),
                             (x_NxLxW.shape[0],) + q_QxE.shape[:1] + (e,))
  k_NxLxE = layers.linear({'weight': w_k, 'bias': b_k}, x_NxLxW)
  v_NxLxE = layers.linear({'weight': w_v, 'bias': b_v}, x_NxLxW)
  return layers.linear(a['out_proj'], layers.attention(q_NxQxE, k_NxLxE, v_NxLxE, heads))


@functools.partial(jax.jit, static_argnames='cfg')
def image_features_and_tokens(params, images_NxHxWx3, cfg):
  """Normalised NHWC images -> (unnormalised contrastive features (N, embed_dim), the image
  tokens the decoder reads (N, T, cfg.image_token_width)); fp32."""
  p = params['visual']
  x_NxLxW = vit.tokens(p, images_NxHxWx3, cfg.vision, cfg.execution)
  if cfg.attentional_pool:
    x_NxLxW = _attentional_pool(p['attn_pool'], x_NxLxW, cfg.pool_heads)
  x_NxLxW = layers.norm(p['ln_post'], x_NxLxW, 'layernorm', cfg.vision.norm_eps)
  return x_NxLxW[:, 0] @ p['proj'], x_NxLxW[:, 1:]


def encode_image(params, images_NxHxWx3, cfg):
  """(N, R, R, 3) normalised images -> (N, embed_dim) contrastive features, unnormalised
  (open_clip's `encode_image(normalize=False)`). Raises ValueError / TypeError for images not
  (N, R, R, 3) floats at the model's resolution R."""
  model.check_images(images_NxHxWx3, cfg)
  return image_features_and_tokens(params, images_NxHxWx3, cfg)[0]


# ---------------------------------------------------------------- text

def _text_mask(tokens_NxL, pad_id):
  """Causal over caption + class token, padding keys hidden with open_clip's legacy shift:
  booleans (N, 1, L + 1, L + 1), True = attend."""
  n, length = tokens_NxL.shape
  valid_NxK = jnp.concatenate([jnp.ones((n, 1), bool), tokens_NxL != pad_id], axis=1)
  causal = jnp.tril(jnp.ones((length + 1, length + 1), bool))
  return (causal & valid_NxK[:, None, :])[:, None]


@functools.partial(jax.jit, static_argnames='cfg')
def text_features_and_tokens(params, tokens_NxL, cfg):
  """int tokens (N, L <= context_length) -> (unnormalised contrastive features (N, embed_dim),
  the decoder's input (N, L, width): the blocks' outputs at the caption positions)."""
  p, t = params['text'], cfg.text
  length = tokens_NxL.shape[1]
  if length > t.context_length:
    raise ValueError(f'tokens of length {length} exceed the context length {t.context_length}')
  x_NxLxD = p['token_embedding']['weight'][tokens_NxL]
  cls_Nx1xD = jnp.broadcast_to(p['cls_emb'], (x_NxLxD.shape[0], 1, t.width))
  x_NxLxD = jnp.concatenate([x_NxLxD, cls_Nx1xD], axis=1) + p['positional_embedding'][:length + 1]
  x_NxLxD = transformer.apply(p['transformer'], x_NxLxD, t, _text_mask(tokens_NxL, cfg.pad_id),
                              execution=cfg.execution)
  pooled_NxD = layers.norm(p['ln_final'], x_NxLxD[:, -1], 'layernorm', t.norm_eps)
  return pooled_NxD @ p['text_projection'], x_NxLxD[:, :-1]


def check_tokens(tokens_NxL, cfg):
  """Raises unless `tokens_NxL` is an int (N, L <= context_length) batch whose ids (when
  concrete) are in the vocabulary. CoCa pools its appended class token, so rows need no
  end-of-text token and any length up to the context gives the padded row's features."""
  shape = getattr(tokens_NxL, 'shape', None)
  if shape is None or len(shape) != 2 or shape[1] > cfg.context_length:
    raise ValueError(f'tokens must have shape (N, L), L <= {cfg.context_length}; got {shape}')
  if not jnp.issubdtype(tokens_NxL.dtype, jnp.integer):
    raise TypeError(f'tokens must be integers, got dtype {tokens_NxL.dtype}')
  if not isinstance(tokens_NxL, jax.core.Tracer):
    model.check_ids(np.asarray(tokens_NxL), cfg.text.vocab_size)


def encode_text(params, tokens_NxL, cfg):
  """(N, L) int tokens -> (N, embed_dim) contrastive text features, unnormalised (open_clip's
  `encode_text(normalize=False)`). Raises as `check_tokens`."""
  check_tokens(tokens_NxL, cfg)
  return text_features_and_tokens(params, tokens_NxL, cfg)[0]


# ---------------------------------------------------------------- decoder

def decode(params, image_NxTxD, text_NxLxD, cfg):
  """The multimodal decoder: image tokens and the text tower's tokens -> next-token scores
  (N, L, vocab) fp32; position i predicts caption token i + 1."""
  p, dec = params['text_decoder'], cfg.decoder
  causal = layers.Mask(causal=True)
  x_NxLxD = text_NxLxD
  for i in range(dec.layers):
    x_NxLxD = transformer.block(p['resblocks'][str(i)], x_NxLxD, dec, causal)
    c = p['cross_attn'][str(i)]
    kv_NxTxD = layers.layer_norm(c['ln_1_kv'], image_NxTxD)
    h_NxLxD = layers.layer_norm(c['ln_1'], x_NxLxD)
    x_NxLxD = x_NxLxD + transformer.attention(c, h_NxLxD, dec, None, kv_NxKxD=kv_NxTxD)
    x_NxLxD = x_NxLxD + transformer.mlp(c, x_NxLxD, dec)
  x_NxLxD = layers.layer_norm(p['ln_final'], x_NxLxD)
  return (x_NxLxD @ p['text_projection']).astype(jnp.float32)


def apply(params, images_NxHxWx3, tokens_NxL, cfg):
  """open_clip's `model(image, text, output_labels=False)`: (image features (N, embed_dim), text
  features (N, embed_dim), both unnormalised, and the decoder's scores (N, L, vocab) fp32 of
  every next token of the given captions, by teacher forcing). Shapes checked as
  `encode_image` / `check_tokens` do (values too when the tokens are concrete)."""
  model.check_images(images_NxHxWx3, cfg)
  check_tokens(tokens_NxL, cfg)
  return _apply(params, images_NxHxWx3, tokens_NxL, cfg)


@functools.partial(jax.jit, static_argnames='cfg')
def _apply(params, images_NxHxWx3, tokens_NxL, cfg):
  image_NxE, image_NxTxD = image_features_and_tokens(params, images_NxHxWx3, cfg)
  text_NxE, text_NxLxD = text_features_and_tokens(params, tokens_NxL, cfg)
  return image_NxE, text_NxE, decode(params, image_NxTxD, text_NxLxD, cfg)


def caption(params, images_NxHxWx3, cfg, sot_id, eos_id, seq_len=30, min_seq_len=5,
            use_cache=True):
  """Greedy captions (N, seq_len) int32, token for token open_clip's
  `generate(image, generation_type='top_k', top_k=1, seq_len=seq_len, min_seq_len=min_seq_len,
  sot_token_id=sot_id, eos_token_id=eos_id, fixed_output_length=True)` (temperature 1, no
  repetition penalty): row = sot_id, then at each position the best-scoring token, `eos_id`
  forbidden before `min_seq_len` tokens and forced at the last position; a row ends at `eos_id`
  or at a generated `cfg.pad_id` (open_clip treats both as the end) and is padded with
  `cfg.pad_id` after. Decoded with a KV cache (`clip.coca_decoding`); `use_cache=False` re-runs
  both towers over the whole buffer every step (the reference). Beam search:
  `clip.coca_decoding.beam_caption`. Raises ValueError unless min_seq_len < seq_len <= decoder
  context + 1 and the ids are in the vocabulary."""
  from clip import coca_decoding  # pylint: disable=g-import-not-at-top  # cycle: it uses coca
  return coca_decoding.caption(params, images_NxHxWx3, cfg, sot_id, eos_id, seq_len, min_seq_len,
                               use_cache)


def beam_caption(params, images_NxHxWx3, cfg, sot_id, eos_id, seq_len=30, beam_size=4,
                 length_penalty=0.0, use_cache=True):
  """Beam-search captions `(tokens (N, seq_len) int32, scores (N,) fp32)`: the best beam per
  image by log-likelihood (GNMT's length normaliser); `clip.coca_decoding.beam_caption` says the
  rows, the score, the errors, and how it differs from open_clip's group beam search."""
  from clip import coca_decoding  # pylint: disable=g-import-not-at-top  # cycle: it uses coca
  return coca_decoding.beam_caption(params, images_NxHxWx3, cfg, sot_id, eos_id, seq_len,
                                    beam_size, length_penalty, use_cache)


# ---------------------------------------------------------------- files

def load(path, config=None, dtype=np.float32):
  """A CoCa checkpoint -> `(params, CoCaConfig)`: `path` a weights file (`.pt`, `.bin`,
  `.safetensors`, as `clip.formats.files.read_checkpoint` reads them) or its folder, the config
  from `config` (an open_clip model_cfg dict, or a CoCaConfig) or else the
  `open_clip_config.json` beside the weights. Raises ValueError without either, for a `config=`
  that differs from the file's, and as `from_state_dict` / `config_from_open_clip`."""
  return from_checkpoint(*files.read_checkpoint(path), config, dtype)


def from_checkpoint(flat, info, config=None, dtype=np.float32):
  """`load` of what `clip.formats.files.read_checkpoint` read: the flat state dict and its
  `info` (its `path`, the `open_clip_config` beside it)."""
  stated = info.get('open_clip_config')
  stated = None if stated is None else config_from_open_clip(stated)
  if isinstance(config, dict):
    config = config_from_open_clip(config)
  elif config is not None and not isinstance(config, CoCaConfig):
    raise TypeError(f'config must be an open_clip model_cfg dict or a CoCaConfig, got '
                    f'{type(config).__name__}')
  if config is None and stated is None:
    raise ValueError(f'{info["path"]}: a CoCa checkpoint needs its config: an '
                     f'{files.OPEN_CLIP_CONFIG} beside it, or config=')
  if config is not None and stated is not None and config != stated:
    raise ValueError(f'{info["path"]}: config= differs from its {files.OPEN_CLIP_CONFIG}: '
                     f'{config} vs {stated}')
  cfg = config or stated
  return from_state_dict(flat, cfg, dtype), cfg
