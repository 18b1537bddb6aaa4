"""open_clip's timm `Eva` image trunks (timm 1.0.31: EVA01-g, EVA02-B/L/E, Perception Encoder
PE-Core T/S/B/L): their architecture as our ViT options, their `visual.trunk.*` keys as ours,
and why the other timm trunks open_clip builds are refused. Nothing here imports torch, open_clip
or timm.

`TimmModel(name, pool, proj=None)` builds the trunk with `num_classes=embed_dim`: the pooled
features (EVA: the class token after the trunk's final norm; PE: its attention pool over the
class and patch tokens) go through the trunk's own biased `head`, our `projection_bias`.
"""
import re

from clip import configs
from clip.formats import keys
from clip.formats.keys import LEAD1
from clip.formats.keys import QKV
from clip.formats.keys import SAME
from clip.formats.keys import rows

# EVA02's CLIP trunks: SwiGLU with the sub-LN norms (`swiglu_mlp`, `scale_mlp`,
# `scale_attn_inner`), 2-D RoPE rescaled to a 16 x 16 reference grid (`ref_feat_shape`),
# separate q / k / v projections, the keys unbiased. EVA01-g: fused qkv with q and v biases, a
# GELU MLP. EVA02-E: EVA01's block with residual post-norm (`use_post_norm`).
_EVA02 = dict(mlp='swiglu', norm_placement='subln', k_bias=False, rope_2d=True, rope_ref_grid=16)
_EVA01 = dict(mlp='gelu', k_bias=False)
_EVA02_E = dict(mlp='gelu', k_bias=False, norm_placement='res_post')

_EVA = dict(ln_pre=False, patch_bias=True, norm_eps=1e-6)
# Perception Encoder: pre-norm, no patch bias, torch's eps, a GELU MLP, 2-D RoPE over a grid
# shifted by one and xy-indexed (`rope_grid_offset=1`, `rope_grid_indexing='xy'`), an 8-head
# attention pool (the tower's MLP ratio) over the class token and the patches.
_PE = dict(pool='map', class_token=True, mlp='gelu', rope_2d=True, rope_grid_offset=1.0,
           rope_xy=True, pool_heads=8)

# name: width, depth, heads, MLP hidden units (timm's int(width * mlp_ratio)), patch, resolution
# (the trunk's img_size: TimmModel does not pass open_clip's image_size), the pool timm_pool
# must name, options. Each has a class token with a learned position.
TRUNKS = {
    'eva_giant_patch14_224': (1408, 40, 16, 6144, 14, 224, 'token', {**_EVA, **_EVA01}),
    'eva02_base_patch16_clip_224': (768, 12, 12, 2048, 16, 224, 'token', {**_EVA, **_EVA02}),
    'eva02_large_patch14_clip_224': (1024, 24, 16, 2730, 14, 224, 'token', {**_EVA, **_EVA02}),
    'eva02_large_patch14_clip_336': (1024, 24, 16, 2730, 14, 336, 'token', {**_EVA, **_EVA02}),
    'eva02_enormous_patch14_clip_224': (1792, 64, 16, 15360, 14, 224, 'token',
                                        {**_EVA, **_EVA02_E}),
    'vit_pe_core_tiny_patch16_384': (192, 12, 3, 768, 16, 384, 'map', {**_PE, 'rope_ref_grid': 24}),
    'vit_pe_core_small_patch16_384': (384, 12, 6, 1536, 16, 384, 'map',
                                      {**_PE, 'rope_ref_grid': 24}),
    'vit_pe_core_base_patch16_224': (768, 12, 12, 3072, 16, 224, 'map',
                                     {**_PE, 'rope_ref_grid': 14}),
    'vit_pe_core_large_patch14_336': (1024, 24, 16, 4096, 14, 336, 'map',
                                      {**_PE, 'rope_ref_grid': 24}),
}

# open_clip's `_pecfg`: PE-Core's preprocessing (its tokenizer is OpenAI's BPE).
PE_PREPROCESS = configs.PreprocessConfig(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
                                         resize_mode='squash', interpolation='bilinear')

# timm trunks open_clip ships configs for that we do not run: (name pattern, why).
_REFUSED = (
    (r'vit_pe_core_gigantic_.*', 'Perception Encoder PE-Core G (no class token; its attention '
     "pool's MLP, 6144 wide, is not its blocks', 8960)"),
    (r'vit_pe_.*', 'a Perception Encoder trunk other than PE-Core T/S/B/L'),
    (r'fastvit_mci\d+|vit_\w+_mci_\d+', "MobileCLIP's MCi trunk (FastViT's reparameterisable "
     'convolutional stages or stem)'),
    (r'convnext_.*', 'a timm ConvNeXt trunk'),
    (r'vitamin_.*', 'a timm ViTamin trunk (MBConv stages before its ViT)'),
    (r'swin_.*', 'a timm Swin trunk (shifted-window attention)'),
    (r'vit_relpos_.*', 'a timm ViT trunk with relative position biases'),
    (r'vit_\w+_gap_\d+', 'a timm ViT trunk pooled by the average of its tokens'),
    (r'vit_\w+_clip_\d+', 'a timm CLIP-style ViT trunk (class token, pre-norm; MobileCLIP2-L-14)'),
)


def refusal(name):
  """Why the timm trunk `name` is not supported (a sentence naming what it is)."""
  for pattern, what in _REFUSED:
    if re.fullmatch(pattern, name):
      return f'{what} is not supported'
  return 'unknown timm trunk'


def vision(name, get, embed_dim, refuse):
  """The VisionConfig of timm trunk `name` (of `TRUNKS`) in open_clip's TimmModel. `get(key)`
  reads the vision_cfg with open_clip's defaults; `refuse(key, value, why)` raises."""
  width, depth, heads, hidden, patch, resolution, pool, options = TRUNKS[name]
  if get('timm_pool') != pool:
    refuse('timm_pool', get('timm_pool'), f'{name} is supported with its own pool ({pool!r})')
  proj = get('timm_proj')
  if proj not in (None, 'none'):
    refuse('timm_proj', proj, f"{name} is supported with its own biased head (null) or none")
  if proj == 'none' and embed_dim != width:
    refuse('timm_proj', proj, f'embed_dim {embed_dim} must equal the width {width} of {name} '
           'when the trunk is not projected')
  return configs.VisionConfig(
      'vit', width, depth, heads, resolution, patch, mlp_dim=configs.mlp_dim_field(width, hidden),
      projection=proj is None, projection_bias=proj is None, **options)


# ---------------------------------------------------------------- keys

_T = 'visual.trunk'
_TB = f'{_T}.blocks.{{i}}'
_B = 'visual.transformer.resblocks.{i}'
_CLS = keys.Transform(lambda a: a[0].reshape(a[0].shape[-1:]), lambda x: [x.reshape(1, 1, -1)])
# What an Eva trunk adds to a SigLIP-style timm ViT's keys (open_clip_folder.TIMM_VIT): the class
# token, the pre-norm, the biased head.
EVA_EXTRA_KEYS = tuple(
    [('visual.class_embedding', (f'{_T}.cls_token',), _CLS)]
    + rows('visual.ln_pre', [f'{_T}.norm_pre']) + rows('visual.proj', [f'{_T}.head']))
EVA_KEYS = EVA_EXTRA_KEYS + tuple(
    rows('visual.conv1', [f'{_T}.patch_embed.proj'])
    + [('visual.positional_embedding', (f'{_T}.pos_embed',), LEAD1),
       (f'{_B}.attn.in_proj_weight', tuple(f'{_TB}.attn.{x}_proj.weight' for x in 'qkv'), QKV),
       (f'{_B}.attn.in_proj_weight', (f'{_TB}.attn.qkv.weight',), SAME)]
    + [(f'{_B}.attn.{x}_bias', (f'{_TB}.attn.{name}',), SAME)
       for x in 'qv' for name in (f'{x}_proj.bias', f'{x}_bias')]
    + rows(f'{_B}.ln_1', [f'{_TB}.norm1'])
    + rows(f'{_B}.attn.ln_inner', [f'{_TB}.attn.norm'])
    + rows(f'{_B}.attn.out_proj', [f'{_TB}.attn.proj'])
    + rows(f'{_B}.ln_2', [f'{_TB}.norm2'])
    + rows(f'{_B}.mlp.c_gate', [f'{_TB}.mlp.fc1_g'])
    + rows(f'{_B}.mlp.c_fc', [f'{_TB}.mlp.fc1_x'])
    + rows(f'{_B}.mlp.c_fc', [f'{_TB}.mlp.fc1'])
    + rows(f'{_B}.mlp.ln', [f'{_TB}.mlp.norm'])
    + rows(f'{_B}.mlp.c_proj', [f'{_TB}.mlp.fc2'])
    + rows('visual.ln_post', [f'{_T}.norm']))

_EVA_ATTENTION = re.compile(r'visual\.trunk\.blocks\.\d+\.attn\.(q_proj\.weight|q_bias)')


def is_eva(flat):
  """Whether a flat open_clip state dict holds a timm EVA trunk (q biased apart from k)."""
  return any(_EVA_ATTENTION.fullmatch(k) for k in flat)


def is_pe(flat):
  """Whether it holds a Perception Encoder trunk (a pre-norm, a class token, an attention pool;
  its RoPE leaves no keys)."""
  return all(f'{_T}.{k}' in flat for k in ('norm_pre.weight', 'cls_token', 'attn_pool.latent'))


def to_ours(flat):
  """The `visual.trunk.*` keys of an EVA trunk -> ours, or of a PE trunk those beyond a SigLIP
  trunk's (`open_clip_folder.TIMM_VIT` places the rest); the other keys kept. A key left of an EVA
  trunk (layer scale, registers, an fc-norm or attention-pool head) is a ValueError naming it."""
  if not is_eva(flat):
    return keys.to_ours(flat, EVA_EXTRA_KEYS, strict=False)
  flat = keys.to_ours(flat, EVA_KEYS, strict=False)
  leftover = sorted(k for k in flat if k.startswith(f'{_T}.'))
  if leftover:
    raise ValueError(f'timm EVA trunk keys with no place in our ViT: {leftover[:10]}')
  return flat
