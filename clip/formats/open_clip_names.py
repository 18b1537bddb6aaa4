"""open_clip's model names and pretrained tags: a bundled table of its standard and SigLIP names
(`MODEL_CFGS`, equal to open-clip-torch 3.3.0's `model_configs/*.json`), their pretrained tags
and whether open_clip's `pretrained.py` marks them `quick_gelu=True` (`PRETRAINED_TAGS`), both
held against the installed open-clip-torch by tests/formats/test_open_clip_names.py; and which of
them a state dict's shapes match (the head counts the shapes cannot tell). Nothing here imports
torch, open_clip or timm.
"""
import dataclasses

from clip.formats.open_clip import config_from_open_clip

def _clip(embed_dim, vision, text_width, text_heads, text_layers):
  text = {'context_length': 77, 'vocab_size': 49408, 'width': text_width, 'heads': text_heads,
          'layers': text_layers}
  return {'embed_dim': embed_dim, 'vision_cfg': vision, 'text_cfg': text}


def _rn(image_size, layers, width):
  return {'image_size': image_size, 'layers': layers, 'width': width, 'patch_size': None}


def _vit(image_size, layers, width, patch_size, **options):
  return {'image_size': image_size, 'layers': layers, 'width': width, **options,
          'patch_size': patch_size}


def _siglip(embed_dim, image_size, trunk, text):
  vision = {'image_size': image_size, 'timm_model_name': trunk, 'timm_model_pretrained': False,
            'timm_pool': 'map', 'timm_proj': 'none'}
  return {'embed_dim': embed_dim, 'init_logit_bias': -10, 'custom_text': True,
          'vision_cfg': vision, 'text_cfg': text}


def _siglip_text(size, vocab_size, tokenizer, context_length=64, **options):
  """SigLIP's text tower in open_clip; `size` 'B', 'L' or 'SO400M'."""
  shape = {'B': {'width': 768, 'heads': 12, 'layers': 12},
           'L': {'width': 1024, 'heads': 16, 'layers': 24},
           'SO400M': {'width': 1152, 'heads': 16, 'layers': 27, 'mlp_ratio': 3.7362}}[size]
  return {'context_length': context_length, 'vocab_size': vocab_size,
          'hf_tokenizer_name': f'timm/{tokenizer}', 'tokenizer_kwargs': {'clean': 'canonicalize'},
          **shape, 'no_causal_mask': True, 'proj_bias': True, 'pool_type': 'last',
          'norm_kwargs': {'eps': 1e-06}, **options}


def _siglip2_text(size, tokenizer):
  return _siglip_text(size, 256000, tokenizer, act_kwargs={'approximate': 'tanh'})


_SIGLIP_B = _siglip_text('B', 32000, 'ViT-B-16-SigLIP')
_SIGLIP_L = _siglip_text('L', 32000, 'ViT-B-16-SigLIP')
_SIGLIP_SO400M = _siglip_text('SO400M', 32000, 'ViT-B-16-SigLIP')
_SO400M_I18N = {k: v for k, v in _siglip_text('SO400M', 250000, 'ViT-B-16-SigLIP-i18n-256',
                                              proj_type='none').items() if k != 'proj_bias'}

_OPENAI_NAMES = {
    'RN50': _clip(1024, _rn(224, [3, 4, 6, 3], 64), 512, 8, 12),
    'RN101': _clip(512, _rn(224, [3, 4, 23, 3], 64), 512, 8, 12),
    'RN50x4': _clip(640, _rn(288, [4, 6, 10, 6], 80), 640, 10, 12),
    'RN50x16': _clip(768, _rn(384, [6, 8, 18, 8], 96), 768, 12, 12),
    'RN50x64': _clip(1024, _rn(448, [3, 15, 36, 10], 128), 1024, 16, 12),
    'ViT-B-32': _clip(512, _vit(224, 12, 768, 32), 512, 8, 12),
    'ViT-B-16': _clip(512, _vit(224, 12, 768, 16), 512, 8, 12),
    'ViT-L-14': _clip(768, _vit(224, 24, 1024, 14), 768, 12, 12),
    'ViT-L-14-336': _clip(768, _vit(336, 24, 1024, 14), 768, 12, 12),
    'ViT-H-14': _clip(1024, _vit(224, 32, 1280, 14, head_width=80), 1024, 16, 24),
    'ViT-g-14': _clip(1024, _vit(224, 40, 1408, 14, head_width=88, mlp_ratio=4.3637),
                      1024, 16, 24),
    'ViT-bigG-14': _clip(1280, _vit(224, 48, 1664, 14, head_width=104, mlp_ratio=4.9231),
                         1280, 20, 32),
}
# open_clip ships a `-quickgelu` config for each of these (not for ViT-g-14; its factory makes
# no `-quickgelu` name of its own, so neither do we).
_QUICKGELU_NAMES = ('RN50', 'RN101', 'RN50x4', 'RN50x16', 'RN50x64', 'ViT-B-32', 'ViT-B-16',
                    'ViT-L-14', 'ViT-L-14-336', 'ViT-H-14', 'ViT-bigG-14')

_SIGLIP_NAMES = {
    'ViT-B-16-SigLIP': _siglip(768, 224, 'vit_base_patch16_siglip_224', _SIGLIP_B),
    'ViT-B-16-SigLIP-256': _siglip(768, 256, 'vit_base_patch16_siglip_256', _SIGLIP_B),
    'ViT-B-16-SigLIP-i18n-256': _siglip(
        768, 256, 'vit_base_patch16_siglip_256',
        _siglip_text('B', 250000, 'ViT-B-16-SigLIP-i18n-256')),
    'ViT-B-16-SigLIP-384': _siglip(768, 384, 'vit_base_patch16_siglip_384', _SIGLIP_B),
    'ViT-B-16-SigLIP-512': _siglip(768, 512, 'vit_base_patch16_siglip_512', _SIGLIP_B),
    'ViT-L-16-SigLIP-256': _siglip(1024, 256, 'vit_large_patch16_siglip_256', _SIGLIP_L),
    'ViT-L-16-SigLIP-384': _siglip(1024, 384, 'vit_large_patch16_siglip_384', _SIGLIP_L),
    'ViT-SO400M-14-SigLIP': _siglip(
        1152, 224, 'vit_so400m_patch14_siglip_224',
        _siglip_text('SO400M', 32000, 'ViT-B-16-SigLIP', context_length=16)),
    'ViT-SO400M-14-SigLIP-378': _siglip(1152, 378, 'vit_so400m_patch14_siglip_378',
                                        _SIGLIP_SO400M),
    'ViT-SO400M-14-SigLIP-384': _siglip(1152, 384, 'vit_so400m_patch14_siglip_384',
                                        _SIGLIP_SO400M),
    'ViT-SO400M-16-SigLIP-i18n-256': _siglip(1152, 256, 'vit_so400m_patch16_siglip_256',
                                             _SO400M_I18N),
    'ViT-B-32-SigLIP2-256': _siglip(768, 256, 'vit_base_patch32_siglip_256',
                                    _siglip2_text('B', 'ViT-B-32-SigLIP2-256')),
    'ViT-B-16-SigLIP2': _siglip(768, 224, 'vit_base_patch16_siglip_224',
                                _siglip2_text('B', 'ViT-B-16-SigLIP2')),
    **{f'ViT-B-16-SigLIP2-{r}': _siglip(768, r, f'vit_base_patch16_siglip_{r}',
                                        _siglip2_text('B', f'ViT-B-16-SigLIP2-{r}'))
       for r in (256, 384, 512)},
    **{f'ViT-L-16-SigLIP2-{r}': _siglip(1024, r, f'vit_large_patch16_siglip_{r}',
                                        _siglip2_text('L', f'ViT-L-16-SigLIP2-{r}'))
       for r in (256, 384, 512)},
    'ViT-SO400M-14-SigLIP2': _siglip(1152, 224, 'vit_so400m_patch14_siglip_224',
                                     _siglip2_text('SO400M', 'ViT-SO400M-14-SigLIP2')),
    'ViT-SO400M-14-SigLIP2-378': _siglip(1152, 378, 'vit_so400m_patch14_siglip_378',
                                         _siglip2_text('SO400M', 'ViT-SO400M-14-SigLIP2-378')),
    **{f'ViT-SO400M-16-SigLIP2-{r}': _siglip(1152, r, f'vit_so400m_patch16_siglip_{r}',
                                             _siglip2_text('SO400M', f'ViT-SO400M-16-SigLIP2-{r}'))
       for r in (256, 384, 512)},
    **{f'ViT-gopt-16-SigLIP2-{r}': _siglip(1536, r, f'vit_giantopt_patch16_siglip_{r}',
                                           _siglip2_text('SO400M', f'ViT-gopt-16-SigLIP2-{r}'))
       for r in (256, 384)},
}



def _eva(embed_dim, image_size, trunk, pool, text_width, text_heads, text_layers, context=77):
  """open_clip's EVA and PE-Core configs: a timm Eva trunk with its own biased head, open_clip's
  own text tower (OpenAI's vocabulary)."""
  return {'embed_dim': embed_dim,
          'vision_cfg': {'image_size': image_size, 'timm_model_name': trunk,
                         'timm_model_pretrained': False, 'timm_pool': pool, 'timm_proj': None},
          'text_cfg': {'context_length': context, 'vocab_size': 49408, 'width': text_width,
                       'heads': text_heads, 'layers': text_layers},
          'custom_text': True}


# EVA-CLIP and Perception Encoder (clip/formats/timm_trunks.py runs their trunks).
_EVA_NAMES = {
    'EVA01-g-14': _eva(1024, 224, 'eva_giant_patch14_224', 'token', 768, 12, 12),
    'EVA01-g-14-plus': _eva(1024, 224, 'eva_giant_patch14_224', 'token', 1024, 16, 24),
    'EVA02-B-16': _eva(512, 224, 'eva02_base_patch16_clip_224', 'token', 512, 8, 12),
    'EVA02-L-14': _eva(768, 224, 'eva02_large_patch14_clip_224', 'token', 768, 12, 12),
    'EVA02-L-14-336': _eva(768, 336, 'eva02_large_patch14_clip_336', 'token', 768, 12, 12),
    'EVA02-E-14': _eva(1024, 224, 'eva02_enormous_patch14_clip_224', 'token', 1024, 16, 24),
    'EVA02-E-14-plus': _eva(1024, 224, 'eva02_enormous_patch14_clip_224', 'token', 1280, 20, 32),
}
_PE_NAMES = {
    'PE-Core-T-16-384': _eva(512, 384, 'vit_pe_core_tiny_patch16_384', 'map', 512, 8, 12, 32),
    'PE-Core-S-16-384': _eva(512, 384, 'vit_pe_core_small_patch16_384', 'map', 512, 8, 12, 32),
    'PE-Core-B-16': _eva(1024, 224, 'vit_pe_core_base_patch16_224', 'map', 1024, 16, 24, 32),
    'PE-Core-L-14-336': _eva(1024, 336, 'vit_pe_core_large_patch14_336', 'map', 1024, 16, 24, 32),
}


def _worldwide_text(width, heads, layers):
  """MetaCLIP 2 worldwide's text tower: XLM-V's vocabulary, pooled at the first `</s>` (2)."""
  return {'hf_tokenizer_name': 'facebook/xlm-v-base', 'pool_type': 'eos', 'eos_id': 2,
          'context_length': 77, 'vocab_size': 901629, 'width': width, 'heads': heads,
          'layers': layers}


_H14 = {'layers': 32, 'width': 1280, 'head_width': 80, 'patch_size': 14}
_BIGG14 = {'layers': 48, 'width': 1664, 'head_width': 104, 'mlp_ratio': 4.9231, 'patch_size': 14}
# MetaCLIP 2 worldwide (its ViT-L-14 reads mT5's SentencePiece tokens, pooled at `</s>`, 1).
_WORLDWIDE_NAMES = {
    **{f'ViT-H-14-worldwide{suffix}': {
        'embed_dim': 1024, 'vision_cfg': {'image_size': size, **_H14},
        'text_cfg': _worldwide_text(1024, 16, 24)} for suffix, size in (('', 224), ('-378', 378))},
    **{f'ViT-bigG-14-worldwide{suffix}': {
        'embed_dim': 1280, 'vision_cfg': {'image_size': size, **_BIGG14},
        'text_cfg': _worldwide_text(1280, 20, 32)} for suffix, size in (('', 224), ('-378', 378))},
    'ViT-L-14-worldwide': {
        'embed_dim': 768, 'vision_cfg': _vit(224, 24, 1024, 14),
        'text_cfg': {'hf_tokenizer_name': 'google/mt5-base', 'pool_type': 'eos', 'eos_id': 1,
                     'tokenizer_kwargs': {'clean': 'canonicalize'}, 'context_length': 77,
                     'vocab_size': 250100, 'width': 768, 'heads': 12, 'layers': 12}},
}
_WORLDWIDE_QUICKGELU_NAMES = ('ViT-H-14-worldwide', 'ViT-L-14-worldwide')

# {name: open_clip model_cfg}, equal to open-clip-torch 3.3.0's model_configs/<name>.json.
MODEL_CFGS = {
    **_OPENAI_NAMES,
    **{f'{n}-quickgelu': {**_OPENAI_NAMES[n], 'quick_gelu': True} for n in _QUICKGELU_NAMES},
    **_SIGLIP_NAMES,
    **_EVA_NAMES,
    **_PE_NAMES,
    **_WORLDWIDE_NAMES,
    **{f'{n}-quickgelu': {**_WORLDWIDE_NAMES[n], 'quick_gelu': True}
       for n in _WORLDWIDE_QUICKGELU_NAMES},
}

# The pretrained tags open_clip lists for the names above, split by the activation their weights
# were trained with (pretrained.py's quick_gelu=True: QuickGELU).
_QUICKGELU_TAGS = {
    'RN50': ('openai', 'yfcc15m', 'cc12m'),
    'RN101': ('openai', 'yfcc15m'),
    'RN50x4': ('openai',), 'RN50x16': ('openai',), 'RN50x64': ('openai',),
    'ViT-B-32': ('openai', 'laion400m_e31', 'laion400m_e32', 'metaclip_400m', 'metaclip_fullcc'),
    'ViT-B-16': ('openai', 'dfn2b', 'metaclip_400m', 'metaclip_fullcc'),
    'ViT-L-14': ('openai', 'metaclip_400m', 'metaclip_fullcc', 'dfn2b'),
    'ViT-L-14-336': ('openai',),
    'ViT-H-14': ('metaclip_fullcc', 'dfn5b'),
    'ViT-bigG-14': ('metaclip_fullcc',),
    'ViT-H-14-worldwide': ('metaclip2_worldwide',),
}
_GELU_TAGS = {
    'ViT-B-32': ('laion2b_e16', 'laion2b_s34b_b79k', 'datacomp_xl_s13b_b90k',
                 'datacomp_m_s128m_b4k', 'commonpool_m_clip_s128m_b4k',
                 'commonpool_m_laion_s128m_b4k', 'commonpool_m_image_s128m_b4k',
                 'commonpool_m_text_s128m_b4k', 'commonpool_m_basic_s128m_b4k',
                 'commonpool_m_s128m_b4k', 'datacomp_s_s13m_b4k', 'commonpool_s_clip_s13m_b4k',
                 'commonpool_s_laion_s13m_b4k', 'commonpool_s_image_s13m_b4k',
                 'commonpool_s_text_s13m_b4k', 'commonpool_s_basic_s13m_b4k',
                 'commonpool_s_s13m_b4k'),
    'ViT-B-16': ('laion400m_e31', 'laion400m_e32', 'laion2b_s34b_b88k', 'datacomp_xl_s13b_b90k',
                 'datacomp_l_s1b_b8k', 'commonpool_l_clip_s1b_b8k', 'commonpool_l_laion_s1b_b8k',
                 'commonpool_l_image_s1b_b8k', 'commonpool_l_text_s1b_b8k',
                 'commonpool_l_basic_s1b_b8k', 'commonpool_l_s1b_b8k'),
    'ViT-L-14': ('laion400m_e31', 'laion400m_e32', 'laion2b_s32b_b82k', 'datacomp_xl_s13b_b90k',
                 'commonpool_xl_clip_s13b_b90k', 'commonpool_xl_laion_s13b_b90k',
                 'commonpool_xl_s13b_b90k', 'dfn2b_s39b'),
    'ViT-H-14': ('laion2b_s32b_b79k', 'metaclip_altogether'),
    'ViT-g-14': ('laion2b_s12b_b42k', 'laion2b_s34b_b88k'),
    'ViT-bigG-14': ('laion2b_s39b_b160k',),
    **{name: ('webli',) for name in _SIGLIP_NAMES},
    'EVA01-g-14': ('laion400m_s11b_b41k',), 'EVA01-g-14-plus': ('merged2b_s11b_b114k',),
    'EVA02-B-16': ('merged2b_s8b_b131k',), 'EVA02-L-14': ('merged2b_s4b_b131k',),
    'EVA02-L-14-336': ('merged2b_s6b_b61k',), 'EVA02-E-14': ('laion2b_s4b_b115k',),
    'EVA02-E-14-plus': ('laion2b_s9b_b144k',),
    **{name: ('meta',) for name in _PE_NAMES},
    **{f'ViT-{size}-14-worldwide{suffix}': ('metaclip2_worldwide',)
       for size, suffix in (('H', '-378'), ('bigG', ''), ('bigG', '-378'))},
}

# {name: {tag: trained with QuickGELU}}; as open_clip, a `-quickgelu` name lists the QuickGELU
# tags of its base name only.
PRETRAINED_TAGS = {
    **{name: {**{t: False for t in _GELU_TAGS.get(name, ())},
              **{t: True for t in _QUICKGELU_TAGS.get(name, ())}}
       for name in (*_OPENAI_NAMES, *_SIGLIP_NAMES, *_EVA_NAMES, *_PE_NAMES, *_WORLDWIDE_NAMES)},
    **{f'{n}-quickgelu': {t: True for t in _QUICKGELU_TAGS.get(n, ())}
       for n in (*_QUICKGELU_NAMES, *_WORLDWIDE_QUICKGELU_NAMES)},
}


def _clean_tag(tag):
  """open_clip's tag normalisation (pretrained.py's `_clean_tag`)."""
  return tag.lower().replace('-', '_')


def _split_name(name, pretrained):
  if not isinstance(name, str):
    raise TypeError(f'open_clip_config expects a model name str, got {type(name).__name__}')
  if '/' in name:
    if pretrained is not None:
      raise ValueError(f'give the pretrained tag once: in the name {name!r} or as '
                       f'pretrained={pretrained!r}, not both')
    name, pretrained = name.split('/', 1)
  return name, pretrained


def open_clip_config(name, pretrained=None):
  """The CLIPConfig of an open_clip model name, e.g. 'ViT-B-32', 'ViT-H-14/dfn5b'.

  `pretrained` (or a `/tag` suffix of `name`) is one of the name's open_clip tags; a tag whose
  weights were trained with QuickGELU switches it on (for ViT-B-32 'openai' as for
  ViT-B-32-quickgelu 'openai'). open_clip's own `create_model` keeps nn.GELU there and only
  warns; we return the activation the weights need. Raises KeyError for an unknown name or tag,
  listing the known ones.
  """
  name, pretrained = _split_name(name, pretrained)
  if name not in MODEL_CFGS:
    raise KeyError(f'unknown open_clip model {name!r} (open_clip names use "-": ViT-B-32, not '
                   f'ViT-B/32; a tag follows a "/"); known models: {sorted(MODEL_CFGS)}')
  model_cfg = MODEL_CFGS[name]
  if pretrained is not None:
    tags = PRETRAINED_TAGS[name]
    tag = _clean_tag(pretrained)
    if tag not in tags:
      raise KeyError(f'unknown pretrained tag {pretrained!r} for open_clip model {name!r}; '
                     f'known tags: {sorted(tags)}')
    if tags[tag]:
      model_cfg = {**model_cfg, 'quick_gelu': True}
  return config_from_open_clip(model_cfg)


# ------------------------------------------------------------------ names from shapes

def _signature(cfg):
  """What the shapes of a ViT CLIP say: everything but head counts and activations."""
  v, t = cfg.vision, cfg.text
  return (cfg.embed_dim, v.arch, v.width, v.layers, v.patch_size, v.image_resolution,
          v.hidden_dim, v.pool, t.width, t.layers, t.context_length, t.vocab_size, t.hidden_dim)


def shape_matches(cfg):
  """`[(name, config)]` of open_clip's models (our table) whose shapes are those of `cfg`."""
  out = []
  for name, model_cfg in sorted(MODEL_CFGS.items()):
    try:
      candidate = config_from_open_clip(model_cfg)
    except ValueError:
      continue
    if _signature(candidate) == _signature(cfg):
      out.append((name, candidate))
  return out


def with_heads(cfg, source):
  """`cfg` with the vision and text head counts of `source`."""
  vision = dataclasses.replace(cfg.vision, heads=source.vision.heads)
  text = dataclasses.replace(cfg.text, heads=source.text.heads)
  return dataclasses.replace(cfg, vision=vision, text=text)
