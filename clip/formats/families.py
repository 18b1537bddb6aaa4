"""Which CLIP family a checkpoint belongs to, its translation into our keys, and the config that
its own files state (Hugging Face `config.json`, big_vision's shapes).

A family is recognised by its keys; keys of a family we cannot run exactly (ConvNeXt or other
timm trunks, EVA's towers, CoCa's decoder, Hugging Face text encoders in open_clip) are refused
by name, never dropped.
"""
import dataclasses
import json
import os
import re

import numpy as np

from clip import configs
from clip.formats import convert
from clip import siglip_tokenizer

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
  if eot is None and vocab != configs.OPENAI_VOCAB_SIZE:
    eot = vocab - 1  # the same rule, stated for a vocabulary other than OpenAI's
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


# ---------------------------------------------------------------- tokenizer and preprocessing

# open_clip's SigLIP preprocessing (`pretrained._slpcfg`), Hugging Face's `SiglipImageProcessor`
# defaults: squash to the resolution, bicubic, pixels to [-1, 1].
SIGLIP_PREPROCESS = configs.PreprocessConfig(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
                                             resize_mode='squash', interpolation='bicubic')
# SentencePiece files a folder may hold: transformers' `SiglipTokenizer` (spiece.model) and
# Gemma's (tokenizer.model); open_clip's hub folders hold what transformers saved.
SENTENCEPIECE_FILES = ('spiece.model', 'tokenizer.model')
# Gemma's vocabulary size (SigLIP 2); T5's are 32000 (c4_en) and 250000 (mc4).
_GEMMA_VOCAB = 256000
_HF_RESAMPLE = {2: 'bilinear', 3: 'bicubic'}  # PIL's enum values in preprocessor_config.json


def _sentencepiece_in(folder):
  for name in SENTENCEPIECE_FILES:
    path = os.path.join(folder, name)
    if os.path.isfile(path):
      return path
  return None


def _kind_from_vocab(vocab_size):
  return 'siglip2' if vocab_size == _GEMMA_VOCAB else 'siglip'


def tokenizer_from_file(model_file, clean=None):
  """A TokenizerConfig for a SentencePiece `.model` path, its kind read from the file."""
  kind = siglip_tokenizer.kind_of(model_file)
  return configs.TokenizerConfig(kind, os.path.abspath(model_file), clean)


_HF_TOKENIZER_KINDS = {'SiglipTokenizer': 'siglip', 'GemmaTokenizer': 'siglip2',
                       'GemmaTokenizerFast': 'siglip2', 'Siglip2Tokenizer': 'siglip2'}


def given_tokenizer(model_file, family, info):
  """The TokenizerConfig of a SentencePiece file given for a checkpoint (`clip.load(...,
  tokenizer=path)`): its kind read from the file, the family's cleaning (open_clip's
  'canonicalize' for its folders, transformers' rule otherwise). A file that contradicts what the
  checkpoint's files state (the tokenizer class of `tokenizer_config.json`, the text
  `eos_token_id` of `config.json`) is a ValueError naming both."""
  kind = siglip_tokenizer.kind_of(model_file)
  stated = _HF_TOKENIZER_KINDS.get((info.get('tokenizer_config') or {}).get('tokenizer_class'))
  if stated and stated != kind:
    raise ValueError(f'tokenizer={os.fspath(model_file)!r} is a {kind} vocabulary, but the '
                     f'folder\'s tokenizer_config.json states a {stated} one')
  text_config = (info.get('hf_config') or {}).get('text_config') or {}
  eos, vocab = text_config.get('eos_token_id'), text_config.get('vocab_size', 0)
  sp = siglip_tokenizer.cached_tokenizer(model_file, kind)
  # transformers writes SiglipTextConfig's default eos (49407, OpenAI's) into every config.json:
  # an id outside the vocabulary states nothing.
  stated_eos = eos is not None and 0 <= eos < vocab
  if family in (HF_SIGLIP, HF_SIGLIP2) and stated_eos and eos != sp.eos_id:
    raise ValueError(f'tokenizer={os.fspath(model_file)!r} ends sequences with id {sp.eos_id}, '
                     f'but config.json states eos_token_id={eos}: not this model\'s tokenizer')
  clean = 'canonicalize' if family in (OPENAI, OPEN_CLIP_TIMM) else None
  return configs.TokenizerConfig(kind, os.path.abspath(model_file), clean)


def _open_clip_tokenizer(text_cfg, folder, vocab_size):
  """open_clip's `get_tokenizer` rule: `hf_tokenizer_name` -> its `HFTokenizer` over the files in
  the folder with `tokenizer_kwargs` (clean 'whitespace' by default), else OpenAI's BPE."""
  name = text_cfg.get('hf_tokenizer_name')
  if not name:
    return configs.TokenizerConfig()
  clean = (text_cfg.get('tokenizer_kwargs') or {}).get('clean', 'whitespace')
  model_file = _sentencepiece_in(folder) if folder else None
  if clean != 'canonicalize' or text_cfg.get('tokenizer_mode'):
    return configs.TokenizerConfig('unknown', name=f'open_clip HFTokenizer({name!r}, '
                                   f'clean={clean!r}, mode={text_cfg.get("tokenizer_mode")!r})')
  if model_file:
    return tokenizer_from_file(model_file, 'canonicalize')
  return configs.TokenizerConfig(_kind_from_vocab(vocab_size), None, 'canonicalize')


def _open_clip_preprocess(oc_config, default, image_size):
  pp = oc_config.get('preprocess_cfg') or {}
  size = pp.get('size', image_size)
  if size not in (image_size, [image_size, image_size], (image_size, image_size)):
    raise ValueError(f'open_clip_config.json preprocess_cfg.size {size} is not the model\'s '
                     f'image_size {image_size}')
  if pp.get('mode', 'RGB') != 'RGB':
    raise ValueError(f'preprocess_cfg.mode {pp["mode"]!r} is not RGB')
  keys = ('mean', 'std', 'resize_mode', 'interpolation', 'fill_color')
  return configs.PreprocessConfig(**{**{k: getattr(default, k) for k in keys},
                                     **{k: pp[k] for k in keys if k in pp}})


def _hf_tokenizer(info, family, vocab_size):
  """transformers' tokenizer of the folder: `tokenizer_config.json`'s class, else the files."""
  folder = info.get('folder')
  tok_cfg = info.get('tokenizer_config') or {}
  cls = tok_cfg.get('tokenizer_class')
  if family == HF_CLIP:
    if cls and not cls.startswith('CLIPTokenizer'):
      return configs.TokenizerConfig('unknown', name=f'transformers {cls}')
    path, vocab = _clip_vocab(folder) if folder else (None, None)
    if path and not _is_openai_vocab(vocab):
      return configs.TokenizerConfig('unknown', name=f'a BPE vocabulary other than OpenAI\'s '
                                     f'({path})')
    return configs.TokenizerConfig()
  model_file = _sentencepiece_in(folder) if folder else None
  if cls:
    if cls not in _HF_TOKENIZER_KINDS:
      return configs.TokenizerConfig('unknown', name=f'transformers {cls}')
    return configs.TokenizerConfig(_HF_TOKENIZER_KINDS[cls],
                                   model_file and os.path.abspath(model_file))
  if model_file:
    return tokenizer_from_file(model_file)
  return configs.TokenizerConfig(_kind_from_vocab(vocab_size))


def _clip_vocab(folder):
  """(path, {token: id}) of a CLIP tokenizer folder's vocabulary: `vocab.json` (transformers 4
  saves it, and hub folders hold it) or `tokenizer.json`'s (all transformers 5 saves); or
  (None, None)."""
  for name in ('vocab.json', 'tokenizer.json'):
    path = os.path.join(folder, name)
    if os.path.isfile(path):
      with open(path, encoding='utf-8') as f:
        vocab = json.load(f)
      return path, vocab if name == 'vocab.json' else vocab.get('model', {}).get('vocab')
  return None, None


def _is_openai_vocab(vocab):
  from clip import tokenizer  # pylint: disable=g-import-not-at-top
  ours = tokenizer.default_tokenizer().symbols
  return (isinstance(vocab, dict) and len(vocab) == len(ours)
          and all(vocab.get(s) == i for i, s in enumerate(ours)))


def _hf_image_processor(info):
  """(the image processor's settings, the file they are in), or (None, None): transformers 4
  saves them as `preprocessor_config.json`, transformers 5 a processor (`SiglipProcessor`,
  `CLIPProcessor`) as the `image_processor` entry of `processor_config.json`."""
  if 'preprocessor_config' in info:
    return info['preprocessor_config'], 'preprocessor_config.json'
  path = os.path.join(info.get('folder') or '', 'processor_config.json')
  if info.get('folder') and os.path.isfile(path):
    with open(path, encoding='utf-8') as f:
      settings = json.load(f).get('image_processor')
    if settings is not None:
      return settings, 'processor_config.json image_processor'
  return None, None


def _hf_preprocess(info, image_size, default):
  """The image processor's settings (`_hf_image_processor`) -> PreprocessConfig:
  `CLIPImageProcessor` (shortest edge, centre crop) or `SiglipImageProcessor` (height x width,
  squash); a setting outside these is an error naming it."""
  pp, where = _hf_image_processor(info)
  if pp is None:
    return default
  for key, ok in (('do_resize', True), ('do_rescale', True), ('do_normalize', True)):
    if pp.get(key, ok) is not ok:
      raise ValueError(f'{where}: {key}={pp[key]} is not a transform this package runs')
  if abs(pp.get('rescale_factor', 1 / 255) - 1 / 255) > 1e-12:
    raise ValueError(f'{where}: rescale_factor {pp["rescale_factor"]} is not 1/255')
  size = pp.get('size', {})
  size = size if isinstance(size, dict) else {'shortest_edge': size}
  if 'shortest_edge' in size:
    crop = pp.get('crop_size', size['shortest_edge'])
    crop = crop if isinstance(crop, dict) else {'height': crop, 'width': crop}
    if not pp.get('do_center_crop', True) or (
        size['shortest_edge'], crop.get('height'), crop.get('width')) != (image_size,) * 3:
      raise ValueError(f'{where}: resizing the shortest edge to {size["shortest_edge"]} and '
                       f'cropping {crop} is not the model\'s {image_size} x {image_size} '
                       'resize-and-crop')
    mode = 'shortest'
  elif (size.get('height'), size.get('width')) == (image_size, image_size):
    mode = 'squash'
  else:
    raise ValueError(f'{where}: size {size} is not the model\'s {image_size} x {image_size}')
  resample = pp.get('resample', 3)
  if resample not in _HF_RESAMPLE:
    raise ValueError(f'{where}: resample {resample} is not bilinear (2) or bicubic (3)')
  # transformers' processors convert to RGB first (transparency on white; `do_convert_rgb`,
  # True by default in transformers 5's CLIP and SigLIP processors; a stored null converts
  # nothing) and crop at the floor of the overhang.
  return configs.PreprocessConfig(
      mean=tuple(pp.get('image_mean', default.mean)), std=tuple(pp.get('image_std', default.std)),
      resize_mode=mode, interpolation=_HF_RESAMPLE[resample],
      convert_first=pp.get('do_convert_rgb', True) is True, crop_rounding='floor')


def processing(family, info, cfg):
  """(TokenizerConfig, PreprocessConfig, assumptions) of a checkpoint of `family` whose files are
  described by `info` (`read_checkpoint`'s), for its model config `cfg`: what the files beside the
  weights state (open_clip's `open_clip_config.json`, transformers' `tokenizer_config.json`,
  `preprocessor_config.json` and tokenizer files), else the family's known settings;
  `assumptions` lists what the files did not say, as ('tokenizer' | 'preprocess', text). A setting this package cannot run is a
  ValueError naming it."""
  vocab = (cfg.text or cfg.decoder).vocab_size
  folder, image_size = info.get('folder'), cfg.image_resolution
  if family in (OPENAI, OPEN_CLIP_TIMM):
    siglip = family == OPEN_CLIP_TIMM
    default = SIGLIP_PREPROCESS if siglip else configs.PreprocessConfig()
    oc = info.get('open_clip_config')
    if oc is None:
      if not siglip:
        return configs.TokenizerConfig(), default, []
      return (configs.TokenizerConfig(_kind_from_vocab(vocab), None, 'canonicalize'), default,
              [('preprocess', 'open_clip\'s SigLIP preprocessing (squash, bicubic, mean and std '
                '0.5)')])
    model_cfg = oc.get('model_cfg', oc)
    return (_open_clip_tokenizer(model_cfg.get('text_cfg', {}), folder, vocab),
            _open_clip_preprocess(oc, default, image_size), [])
  if family == HF_SIGLIP2:  # NaFlex, run at its position table's square grid
    return (_hf_tokenizer(info, family, vocab),
            dataclasses.replace(SIGLIP_PREPROCESS, interpolation='bilinear'),
            [('preprocess', f'the NaFlex model\'s images squashed to its square grid '
              f'({image_size} px, bilinear as Siglip2ImageProcessor resizes)')])
  if family in HUGGING_FACE:
    default = configs.PreprocessConfig() if family == HF_CLIP else SIGLIP_PREPROCESS
    assumed = [] if _hf_image_processor(info)[0] is not None else [
        ('preprocess', f'{"OpenAI" if family == HF_CLIP else "SigLIP"}\'s image preprocessing '
         '(no preprocessor_config.json or processor_config.json beside the weights)')]
    tok_cfg = info.get('tokenizer_config') or {}
    cls = tok_cfg.get('tokenizer_class') or ''
    if family == HF_SIGLIP and cls and tok_cfg.get('model_input_names') != ['input_ids']:
      assumed.append(('tokenizer', f'no padding mask, as SigLIP was trained (its {cls} returns '
                      'an attention_mask, with which transformers\' SiglipModel masks the '
                      'padding; released folders state model_input_names=["input_ids"])'))
    if cls.startswith('GemmaTokenizer'):
      assumed.append(('tokenizer', f'lower-cased text for its {cls}, which does not lower-case '
                      '(SigLIP 2 was trained on lower-cased text: big_vision, and transformers\' '
                      'Siglip2Tokenizer, lower-case it)'))
    return _hf_tokenizer(info, family, vocab), _hf_preprocess(info, image_size, default), assumed
  # big_vision's .npz: no files beside it; its own resize is TensorFlow's bilinear.
  return (configs.TokenizerConfig(_kind_from_vocab(vocab)), SIGLIP_PREPROCESS,
          [('preprocess', 'SigLIP\'s preprocessing as open_clip runs it (squash, PIL bicubic, '
            'mean and std 0.5; big_vision itself resizes with TensorFlow\'s bilinear)')])
