"""Where open_clip's pretrained weights live: per model name and tag of our table
(`open_clip_names.PRETRAINED_TAGS`), the Hub repository (and file) open-clip-torch 3.3.0's
`pretrained.py` downloads them from, and the image preprocessing it pairs with them; held equal to
open_clip's `get_pretrained_cfg` by tests/formats/test_open_clip_names.py. `clip.load(name,
pretrained=tag)` reads it (clip/formats/hub.py). Nothing here imports torch or open_clip.
"""
import dataclasses

from clip import configs
from clip.formats import open_clip_names

# open_clip's `_pcfg` (OpenAI's normalisation, shortest side + centre crop) and `_slpcfg` (SigLIP).
_OPENAI_PP = {'mean': configs.IMAGE_MEAN, 'std': configs.IMAGE_STD, 'interpolation': 'bicubic',
              'resize_mode': 'shortest'}
_SIGLIP_PP = {'mean': (0.5, 0.5, 0.5), 'std': (0.5, 0.5, 0.5), 'interpolation': 'bicubic',
              'resize_mode': 'squash'}
# open_clip's `_pecfg` (Perception Encoder).
_PE_PP = {**_SIGLIP_PP, 'interpolation': 'bilinear'}
# The tags whose preprocessing differs from their family's.
_PP_OVERRIDES = {
    ('ViT-L-14', 'laion2b_s32b_b82k'): {'mean': (0.5, 0.5, 0.5), 'std': (0.5, 0.5, 0.5)},
    ('ViT-H-14', 'dfn5b'): {'resize_mode': 'squash'},
    ('ViT-H-14-worldwide-378', 'metaclip2_worldwide'): {'resize_mode': 'squash'},
    ('ViT-bigG-14-worldwide-378', 'metaclip2_worldwide'): {'resize_mode': 'squash'},
}


def _timm(arch, *tags, **renamed):
  """{tag: 'timm/<arch>.<tag>/'}; `renamed` maps a tag to the repository suffix it uses."""
  return {**{t: f'timm/{arch}.{t}/' for t in tags},
          **{t: f'timm/{arch}.{suffix}/' for t, suffix in renamed.items()}}


def _laion(model, **tags):
  """{tag: 'laion/CLIP-<model>-<suffix>/'}."""
  return {t: f'laion/CLIP-{model}-{suffix}/' for t, suffix in tags.items()}


def _pools(model, size, samples, batch, kinds):
  """DataComp's CommonPool filters: {commonpool_<size>_<kind>_...: 'laion/CLIP-<model>-...'}."""
  out = {}
  for kind in kinds:
    dotted = f'.{kind}' if kind else ''
    tag = f'commonpool_{size.lower()}{"_" + kind if kind else ""}_s{samples.lower()}_b{batch}k'
    out[tag] = f'laion/CLIP-{model}-CommonPool.{size}{dotted}-s{samples}-b{batch}K/'
  return out


_BASE_HUB = {
    'RN50': _timm('resnet50_clip', 'openai', 'yfcc15m', 'cc12m'),
    'RN101': _timm('resnet101_clip', 'openai', 'yfcc15m'),
    'RN50x4': _timm('resnet50x4_clip', 'openai'),
    'RN50x16': _timm('resnet50x16_clip', 'openai'),
    'RN50x64': _timm('resnet50x64_clip', 'openai'),
    'ViT-B-32': {
        **_timm('vit_base_patch32_clip_224', 'openai', 'laion400m_e31', 'laion400m_e32',
                'laion2b_e16', 'metaclip_400m', metaclip_fullcc='metaclip_2pt5b'),
        **_laion('ViT-B-32', laion2b_s34b_b79k='laion2B-s34B-b79K',
                 datacomp_xl_s13b_b90k='DataComp.XL-s13B-b90K',
                 datacomp_m_s128m_b4k='DataComp.M-s128M-b4K',
                 datacomp_s_s13m_b4k='DataComp.S-s13M-b4K'),
        **_pools('ViT-B-32', 'M', '128M', 4, ('clip', 'laion', 'image', 'text', 'basic', '')),
        **_pools('ViT-B-32', 'S', '13M', 4, ('clip', 'laion', 'image', 'text', 'basic', '')),
    },
    'ViT-B-16': {
        **_timm('vit_base_patch16_clip_224', 'openai', 'laion400m_e31', 'laion400m_e32',
                'metaclip_400m', metaclip_fullcc='metaclip_2pt5b'),
        **_laion('ViT-B-16', laion2b_s34b_b88k='laion2B-s34B-b88K',
                 datacomp_xl_s13b_b90k='DataComp.XL-s13B-b90K',
                 datacomp_l_s1b_b8k='DataComp.L-s1B-b8K'),
        **_pools('ViT-B-16', 'L', '1B', 8, ('clip', 'laion', 'image', 'text', 'basic', '')),
        'dfn2b': 'apple/DFN2B-CLIP-ViT-B-16/',
    },
    'ViT-L-14': {
        **_timm('vit_large_patch14_clip_224', 'openai', 'laion400m_e31', 'laion400m_e32',
                'metaclip_400m', metaclip_fullcc='metaclip_2pt5b'),
        **_laion('ViT-L-14', laion2b_s32b_b82k='laion2B-s32B-b82K',
                 datacomp_xl_s13b_b90k='DataComp.XL-s13B-b90K'),
        **_pools('ViT-L-14', 'XL', '13B', 90, ('clip', 'laion', '')),
        'dfn2b': 'apple/DFN2B-CLIP-ViT-L-14/',
        'dfn2b_s39b': 'apple/DFN2B-CLIP-ViT-L-14-39B/',
    },
    'ViT-L-14-336': _timm('vit_large_patch14_clip_336', 'openai'),
    'ViT-H-14': {
        **_timm('vit_huge_patch14_clip_224', 'metaclip_altogether',
                metaclip_fullcc='metaclip_2pt5b'),
        **_laion('ViT-H-14', laion2b_s32b_b79k='laion2B-s32B-b79K'),
        'dfn5b': 'apple/DFN5B-CLIP-ViT-H-14/',
    },
    'ViT-g-14': _laion('ViT-g-14', laion2b_s12b_b42k='laion2B-s12B-b42K',
                       laion2b_s34b_b88k='laion2B-s34B-b88K'),
    'ViT-bigG-14': {
        **_timm('vit_gigantic_patch14_clip_224', metaclip_fullcc='metaclip_2pt5b'),
        **_laion('ViT-bigG-14', laion2b_s39b_b160k='laion2B-39B-b160k'),
    },
    # open_clip's SigLIP repositories carry the model's own name, except that the 378 px So400m
    # is the 384 px repository's weights.
    **{name: {'webli': f'timm/{name}/'} for name in open_clip_names.PRETRAINED_TAGS
       if 'SigLIP' in name},
    'ViT-SO400M-14-SigLIP-378': {'webli': 'timm/ViT-SO400M-14-SigLIP-384/'},
    'EVA01-g-14': _timm('eva_giant_patch14_clip_224', 'laion400m_s11b_b41k'),
    'EVA01-g-14-plus': _timm('eva_giant_patch14_plus_clip_224', 'merged2b_s11b_b114k'),
    'EVA02-B-16': _timm('eva02_base_patch16_clip_224', 'merged2b_s8b_b131k'),
    'EVA02-L-14': _timm('eva02_large_patch14_clip_224', 'merged2b_s4b_b131k'),
    'EVA02-L-14-336': _timm('eva02_large_patch14_clip_336', 'merged2b_s6b_b61k'),
    'EVA02-E-14': _timm('eva02_enormous_patch14_clip_224', 'laion2b_s4b_b115k'),
    'EVA02-E-14-plus': _timm('eva02_enormous_patch14_plus_clip_224', 'laion2b_s9b_b144k'),
    **{name: {'meta': f'timm/{name}/'} for name in open_clip_names.PRETRAINED_TAGS
       if name.startswith('PE-Core-')},
    # MetaCLIP 2 worldwide (its ViT-L-14 has no released weights in open_clip).
    'ViT-H-14-worldwide': _timm('vit_huge_patch14_clip_224', 'metaclip2_worldwide'),
    'ViT-H-14-worldwide-378': _timm('vit_huge_patch14_clip_378', 'metaclip2_worldwide'),
    'ViT-bigG-14-worldwide': _timm('vit_gigantic_patch14_clip_224', 'metaclip2_worldwide'),
    'ViT-bigG-14-worldwide-378': _timm('vit_gigantic_patch14_clip_378', 'metaclip2_worldwide'),
    'ViT-L-14-worldwide': {},
}

# {name: {tag: where its weights are}}: 'org/repo/' (open_clip's default file in it),
# 'org/repo/file', or, for weights only released at a URL, the URL ('https://...'). A
# `-quickgelu` name shares its base name's QuickGELU tags, as in open_clip.
HF_HUB = {
    **_BASE_HUB,
    **{name: {t: _BASE_HUB[name.removesuffix('-quickgelu')][t] for t in tags}
       for name, tags in open_clip_names.PRETRAINED_TAGS.items() if name.endswith('-quickgelu')},
}


def _family_pp(name):
  """The preprocessing open_clip pairs with a family's weights (`_slpcfg`, `_pecfg`, `_pcfg`)."""
  if 'SigLIP' in name:
    return _SIGLIP_PP
  return _PE_PP if name.startswith('PE-Core-') else _OPENAI_PP


def pretrained_cfg(name, tag):
  """open_clip's `get_pretrained_cfg(name, tag)` for a name and tag of our table: `hf_hub` (or
  `url` for weights released only there), `mean`, `std`, `interpolation`, `resize_mode`, and
  `quick_gelu=True` where its weights were trained with QuickGELU. KeyError for an unknown name
  or tag, listing the known ones."""
  if name not in HF_HUB:
    raise KeyError(f'no pretrained weights known for open_clip model {name!r}; models with '
                   f'tags: {sorted(HF_HUB)}')
  cleaned = tag.lower().replace('-', '_')  # open_clip's `_clean_tag`
  if cleaned not in HF_HUB[name]:
    raise KeyError(f'unknown pretrained tag {tag!r} for open_clip model {name!r}; known tags: '
                   f'{sorted(HF_HUB[name])}')
  where = HF_HUB[name][cleaned]
  is_url = where.startswith(('https://', 'http://'))
  out = {'url': where if is_url else '', 'hf_hub': '' if is_url else where,
         **_family_pp(name),
         **_PP_OVERRIDES.get((name.removesuffix('-quickgelu'), cleaned), {})}
  if open_clip_names.PRETRAINED_TAGS.get(name, {}).get(cleaned):
    out['quick_gelu'] = True
  return out


def preprocess_config(name, tag):
  """The `clip.PreprocessConfig` open_clip pairs with the weights of `name` / `tag`."""
  pp = pretrained_cfg(name, tag)
  return dataclasses.replace(configs.PreprocessConfig(), mean=pp['mean'], std=pp['std'],
                             interpolation=pp['interpolation'], resize_mode=pp['resize_mode'])
