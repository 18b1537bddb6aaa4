"""Which CLIP family a checkpoint belongs to, and each family's own module for its keys and its
processing files (`hf`, `open_clip_folder`, `big_vision`; OpenAI's keys are ours).

A family is recognised by its keys; keys of a family we cannot run exactly (ConvNeXt, MCi or other
non-ViT timm trunks, EVA's own towers, CoCa's decoder, Hugging Face text encoders in open_clip)
are refused by name, never dropped. open_clip's timm EVA and PE-Core trunks (`timm_trunks`)
load.
"""
import os
import re

import numpy as np

from clip import configs
from clip import siglip_tokenizer
from clip.formats import big_vision
from clip.formats import hf
from clip.formats import hf_processing
from clip.formats import open_clip_folder
from clip.formats import timm_trunks

OPENAI = 'OpenAI / open_clip (OpenAI keys)'
HF_CLIP = 'Hugging Face CLIPModel'
HF_SIGLIP = 'Hugging Face SiglipModel'
HF_SIGLIP2 = 'Hugging Face Siglip2Model (NaFlex)'
HUGGING_FACE = (HF_CLIP, HF_SIGLIP, HF_SIGLIP2)
OPEN_CLIP_TIMM = 'open_clip with a timm ViT, EVA or PE-Core trunk'
BIG_VISION = 'big_vision SigLIP (.npz)'

_UNSUPPORTED = (  # (pattern on a key, what it is[, a test on the keys that exempts them])
    (r'text_decoder\..*|visual\.attn_pool\.(query|ln_q\..*|ln_k\..*)',
     "CoCa's captioning decoder outside open_clip's CoCa layout (which clip.load reads: "
     'clip.coca)'),
    (r'visual\.(blocks|patch_embed|rope)\..*', "an EVA / timm-style image tower outside `trunk`"),
    (r'visual\.trunk\.(stem\.\d+\.conv_kxk|final_conv)\..*', "MobileCLIP's MCi trunk (FastViT: "
     'reparameterisable convolutional stages)'),
    (r'visual\.trunk\.stages\.\d+\.blocks\.\d+\.conv_dw\..*', 'a timm ConvNeXt trunk'),
    (r'visual\.trunk\.(stem|stages|head\.fc|final_conv)\..*', 'a timm convolutional or hybrid '
     "trunk (ConvNeXt, MobileCLIP's MCi / FastViT, ViTamin, ...)"),
    (r'visual\.trunk\.norm_pre\..*', 'a timm ViT trunk with a pre-norm but no class token and '
     'attention pool (PE-Core G, ...; supported: PE-Core T/S/B/L)', timm_trunks.is_pe),
    (r'visual\.trunk\.(cls_token|reg_token|fc_norm\.weight|head\.weight)', 'a timm ViT trunk '
     'with a class or register token or a classifier head (supported: SigLIP-style MAP trunks, '
     'EVA and PE-Core trunks)', lambda flat: timm_trunks.is_eva(flat) or timm_trunks.is_pe(flat)),
    (r'visual\.head\..*', "an open_clip timm trunk projection head"),
    (r'text\.transformer\.(embeddings|encoder)\..*|text\.proj\..*',
     'a Hugging Face text encoder inside open_clip (hf_model_name)'),
    (r'.*\.ls_\d\.gamma', 'layer scale (ls_init_value)'),
)


def detect(flat):
  """The family of a flat state dict (wrappers already stripped); a ValueError naming the keys
  when it is a family we refuse or no CLIP at all."""
  keys = list(flat)
  for pattern, what, *exempt in _UNSUPPORTED:
    hits = [k for k in keys if re.fullmatch(pattern, k)]
    if hits and not (exempt and exempt[0](flat)):
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


# Hugging Face's families -> its model_type.
HF_MODEL_TYPES = {HF_CLIP: 'clip', HF_SIGLIP: 'siglip', HF_SIGLIP2: 'siglip2'}


def to_ours(flat, family):
  """A flat foreign state dict of `family` -> our keys (arrays transformed as the table says)."""
  if family == BIG_VISION:
    return big_vision.to_ours(flat)
  if family in HUGGING_FACE:
    return hf.to_ours(flat, HF_MODEL_TYPES[family])
  if family == OPEN_CLIP_TIMM:  # an EVA trunk all placed, a PE trunk's extra keys
    return open_clip_folder.to_ours(timm_trunks.to_ours(flat),
                                    timm_trunk=not timm_trunks.is_eva(flat))
  return open_clip_folder.to_ours(flat, timm_trunk=False)


def processing(family, info, cfg):
  """(TokenizerConfig, PreprocessConfig, assumptions) of a checkpoint of `family` whose files are
  described by `info` (`files.read_checkpoint`'s), for its model config `cfg`: what the files
  beside the weights state, else the family's known settings (each family's module says which);
  `assumptions` lists what the files did not say, as ('tokenizer' | 'preprocess', text). A setting
  this package cannot run is a ValueError naming it."""
  vocab = (cfg.text or cfg.decoder).vocab_size
  if family in (OPENAI, OPEN_CLIP_TIMM):
    # Its timm SigLIP trunks are MAP-pooled without a class token; its EVA and PE-Core trunks
    # have one and take OpenAI's tokenizer, as its own towers.
    siglip = family == OPEN_CLIP_TIMM and not cfg.vision.has_class_token
    if family == OPEN_CLIP_TIMM and cfg.vision.class_token and 'open_clip_config' not in info:
      return configs.TokenizerConfig(), timm_trunks.PE_PREPROCESS, [
          ('preprocess', "open_clip's PE-Core preprocessing (squash, bilinear, mean and std 0.5)")]
    return open_clip_folder.processing(info, siglip, cfg.image_resolution, vocab)
  if family in HUGGING_FACE:
    return hf_processing.processing(info, HF_MODEL_TYPES[family], cfg.image_resolution, vocab)
  return big_vision.processing(vocab)


def given_tokenizer(model_file, family, info):
  """The TokenizerConfig of a SentencePiece file given for a checkpoint (`clip.load(...,
  tokenizer=path)`): its kind read from the file, the family's cleaning (open_clip's
  'canonicalize' for its folders, transformers' rule otherwise). A file that contradicts what the
  checkpoint's files state (the tokenizer class of `tokenizer_config.json`, the text
  `eos_token_id` of `config.json`) is a ValueError naming both."""
  kind = siglip_tokenizer.kind_of(model_file)
  stated_class = (info.get('tokenizer_config') or {}).get('tokenizer_class')
  stated = hf_processing.TOKENIZER_KINDS.get(stated_class)
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
