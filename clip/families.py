"""Which CLIP family a checkpoint belongs to, its translation into our keys, and the config that
its own files state (Hugging Face `config.json`, big_vision's shapes).

A family is recognised by its keys; keys of a family we cannot run exactly (ConvNeXt or other
timm trunks, EVA's towers, CoCa's decoder, Hugging Face text encoders in open_clip) are refused
by name, never dropped.
"""
import re

import numpy as np

from clip import configs
from clip import convert

OPENAI = 'OpenAI / open_clip (OpenAI keys)'
HF_CLIP = 'Hugging Face CLIPModel'
HF_SIGLIP = 'Hugging Face SiglipModel'
HF_SIGLIP2 = 'Hugging Face Siglip2Model (NaFlex)'
HUGGING_FACE = (HF_CLIP, HF_SIGLIP, HF_SIGLIP2)
OPEN_CLIP_TIMM = 'open_clip with a timm ViT trunk'
BIG_VISION = 'big_vision SigLIP (.npz)'

# Hugging Face `hidden_act` -> ours (transformers' ACT2FN: 'gelu' is exact, 'gelu_pytorch_tanh'
# and 'gelu_new' are the tanh approximation).
HF_ACTIVATIONS = {'quick_gelu': 'quick_gelu', 'gelu': 'gelu', 'gelu_pytorch_tanh': 'gelu_tanh',
                  'gelu_new': 'gelu_tanh'}

_UNSUPPORTED = (  # (pattern on a key, what it is)
    (r'text_decoder\..*|visual\.attn_pool\.(query|ln_q\..*|ln_k\..*)',
     "CoCa's captioning decoder"),
    (r'visual\.(blocks|patch_embed|rope)\..*', "an EVA / timm-style image tower outside `trunk`"),
    (r'visual\.trunk\.(stem|stages|head)\..*', 'a timm ConvNeXt (or other non-ViT) trunk'),
    (r'visual\.trunk\.(cls_token|reg_token|fc_norm\.weight|head\.weight)', 'a timm ViT trunk '
     'with a class or register token or a classifier head (only SigLIP-style MAP trunks are '
     'supported)'),
    (r'visual\.head\..*', "an open_clip timm trunk projection head"),
    (r'text\.transformer\.(embeddings|encoder)\..*|text\.proj\..*',
     'a Hugging Face text encoder inside open_clip (hf_model_name)'),
    (r'.*\.ls_\d\.gamma', 'layer scale (ls_init_value)'),
)


def detect(flat):
  """The family of a flat state dict (wrappers already stripped); a ValueError naming the keys
  when it is a family we refuse or no CLIP at all."""
  keys = list(flat)
  for pattern, what in _UNSUPPORTED:
    hits = [k for k in keys if re.fullmatch(pattern, k)]
    if hits:
      raise ValueError(f'unsupported checkpoint family: {what} (keys such as {hits[:5]})')
  if any(k.startswith(('img/', 'txt/')) for k in keys):
    return BIG_VISION
  if any(k.startswith(('text_model.', 'vision_model.')) for k in keys):
    is_siglip = any(k.startswith(('vision_model.head.', 'text_model.head.')) or k == 'logit_bias'
                    for k in keys)
    if flat.get('vision_model.embeddings.patch_embedding.weight', np.zeros((1,) * 4)).ndim == 2:
      return HF_SIGLIP2
    return HF_SIGLIP if is_siglip else HF_CLIP
  if any(k.startswith('visual.trunk.') for k in keys):
    return OPEN_CLIP_TIMM
  if any(k.startswith(('visual.', 'token_embedding.', 'text.token_embedding.')) for k in keys):
    return OPENAI
  raise ValueError(f'not a CLIP checkpoint of a known family: keys start with {sorted(keys)[:8]}')


def to_ours(flat, family):
  """A flat foreign state dict of `family` -> our keys (arrays transformed as the table says)."""
  if family == BIG_VISION:
    flat = convert.unstack_big_vision(flat)
    return convert.to_ours(flat, convert.BIG_VISION_SIGLIP)
  if family == HF_CLIP:
    return convert.to_ours(flat, convert.HF_CLIP, ignored=convert.HF_IGNORED)
  if family in (HF_SIGLIP, HF_SIGLIP2):
    table = convert.HF_SIGLIP if family == HF_SIGLIP else convert.HF_SIGLIP2
    return convert.to_ours(flat, table, ignored=convert.HF_IGNORED)
  if family == OPEN_CLIP_TIMM:
    flat = convert.to_ours(flat, convert.OPEN_CLIP_TIMM_VIT, strict=False)
    leftover = sorted(k for k in flat if k.startswith('visual.trunk.'))
    if leftover:
      raise ValueError(f'timm trunk keys with no place in our ViT: {leftover[:10]}')
  return convert.to_ours(flat, convert.OPEN_CLIP_CUSTOM_TEXT, strict=False)


# ---------------------------------------------------------------- Hugging Face config.json

def _hf_act(tower, cfg):
  act = cfg.get('hidden_act', 'quick_gelu')
  if act not in HF_ACTIVATIONS:
    raise ValueError(f'{tower}.hidden_act {act!r} is not one we run exactly; known: '
                     f'{sorted(HF_ACTIVATIONS)}')
  return HF_ACTIVATIONS[act]


def _hf_block_options(tower, cfg, default_eps):
  width = cfg['hidden_size']
  eps = cfg.get('layer_norm_eps', default_eps)
  return dict(mlp=_hf_act(tower, cfg), norm_eps=None if eps == 1e-5 else eps,
              mlp_dim=None if cfg['intermediate_size'] == 4 * width else cfg['intermediate_size'])


def config_from_hf(hf):
  """A Hugging Face `CLIPConfig` / `SiglipConfig` dict (`config.json`) -> our CLIPConfig."""
  model_type = hf.get('model_type', 'clip')
  if model_type not in ('clip', 'siglip', 'siglip2'):
    raise ValueError(f'config.json is a {model_type!r} model; supported: clip, siglip (SigLIP 2 '
                     'fixed-resolution releases are siglip models), siglip2 (NaFlex)')
  t, v = hf['text_config'], hf['vision_config']
  if model_type == 'clip':
    return _clip_from_hf(hf, t, v)
  if model_type == 'siglip2':  # NaFlex: run at the position table's own square grid
    grid = round(v.get('num_patches', 256) ** 0.5)
    if grid * grid != v.get('num_patches', 256):
      raise ValueError(f'vision_config.num_patches {v.get("num_patches")} is not a square grid')
    v = dict(v, image_size=grid * v.get('patch_size', 16))
  return _siglip_from_hf(t, v)


def _clip_from_hf(hf, t, v):
  vocab = t.get('vocab_size', 49408)
  eos = t.get('eos_token_id', 2)
  # eos 2 is transformers' legacy rule: pool at the largest id of each row. That is our default
  # (the first vocab - 1) only when a row holds vocab - 1, as OpenAI's tokenizer's rows do; a
  # legacy model fed added tokens (ids > its EOT) pooled at them, which we do not copy. Any other
  # eos pools at its first occurrence, as ours does.
  eot = None if eos in (2, vocab - 1) else eos
  vision = configs.VisionConfig(
      'vit', v['hidden_size'], v['num_hidden_layers'], v['num_attention_heads'],
      v.get('image_size', 224), v.get('patch_size', 32),
      **_hf_block_options('vision_config', v, 1e-5))
  text = configs.TextConfig(t['hidden_size'], t['num_hidden_layers'], t['num_attention_heads'],
                            t.get('max_position_embeddings', 77), vocab, eot_token_id=eot,
                            **_hf_block_options('text_config', t, 1e-5))
  return configs.CLIPConfig(hf.get('projection_dim', 512), vision, text)


def _siglip_from_hf(t, v):
  if not v.get('vision_use_head', True):
    raise ValueError('vision_config.vision_use_head is False: a SigLIP tower without its MAP '
                     'head has no pooled feature to load')
  width = v['hidden_size']
  vision = configs.VisionConfig(
      'vit', width, v['num_hidden_layers'], v['num_attention_heads'], v.get('image_size', 224),
      v.get('patch_size', 16), pool='map', ln_pre=False, patch_bias=True, projection=False,
      **_hf_block_options('vision_config', v, 1e-6))
  text = configs.TextConfig(
      t['hidden_size'], t['num_hidden_layers'], t['num_attention_heads'],
      t.get('max_position_embeddings', 64), t.get('vocab_size', 32000), pool='last',
      causal=False, mask_padding=False, projection_bias=True,
      **_hf_block_options('text_config', t, 1e-6))
  embed_dim = t.get('projection_size', t['hidden_size'])
  if embed_dim != width:
    raise ValueError(f'text projection_size {embed_dim} differs from the vision width {width}: '
                     'SigLIP compares the two directly')
  return configs.CLIPConfig(width, vision, text, logit_bias=True)


# ---------------------------------------------------------------- SigLIP from shapes

def siglip_from_shapes(flat, vision_heads, text_heads, vision_mlp, text_mlp, norm_eps=1e-6):
  """A SigLIP config from our-keyed shapes: MAP head, no ln_pre, patch bias, bidirectional text
  pooled at the last position with a biased projection. Head counts and activations are not in
  the shapes: the caller says them."""
  shape = lambda k: tuple(flat[k].shape)
  width, _, patch, _ = shape('visual.conv1.weight')
  grid = round(shape('visual.positional_embedding')[0] ** 0.5)
  count = lambda p: len({m.group(1) for k in flat for m in [re.match(p, k)] if m})
  v_mlp = shape('visual.transformer.resblocks.0.mlp.c_fc.weight')[0]
  vision = configs.VisionConfig(
      'vit', width, count(r'visual\.transformer\.resblocks\.(\d+)\.'), vision_heads,
      patch * grid, patch, pool='map', ln_pre=False, patch_bias=True, projection=False,
      mlp=vision_mlp, norm_eps=norm_eps, mlp_dim=None if v_mlp == 4 * width else v_mlp)
  t_width = shape('ln_final.weight')[0]
  t_mlp = shape('transformer.resblocks.0.mlp.c_fc.weight')[0]
  text = configs.TextConfig(
      t_width, count(r'transformer\.resblocks\.(\d+)\.'), text_heads,
      shape('positional_embedding')[0], shape('token_embedding.weight')[0], pool='last',
      causal=False, mask_padding=False, projection_bias=True, mlp=text_mlp, norm_eps=norm_eps,
      mlp_dim=None if t_mlp == 4 * t_width else t_mlp)
  return configs.CLIPConfig(shape('text_projection.weight')[0], vision, text, logit_bias=True)


def big_vision_heads(raw):
  """(vision heads, text heads) from big_vision's (D, heads, head_dim) query kernels."""
  def heads(prefix):
    for k, v in raw.items():
      if re.fullmatch(prefix + r'encoderblock(_0)?/MultiHeadDotProductAttention_0/query/kernel', k):
        return v.shape[-2]
    raise ValueError(f'no attention kernel under {prefix}')
  return heads(r'img/Transformer/'), heads(r'txt/Encoder_0/')
