"""open_clip's model configs <-> CLIPConfig, in both directions.

`config_from_open_clip` reads the schema of open_clip's `model_configs/*.json` (also what an
`open_clip_config.json` holds under "model_cfg"), key by key, as open-clip-torch 3.3.0's
`CLIP` / `CustomTextCLIP` and timm 1.0.31 build it. A key is either represented exactly, or
ignored by the tower open_clip builds (e.g. `mlp_ratio` for a ResNet, `pad_id` without a pad
mask), or free of any effect on the parameters and the forward (tokenizer keys, init values);
anything else raises a ValueError naming the key and its value. `open_clip_model_cfg` is its
inverse for the models open_clip runs exactly.

Its names and pretrained tags are `open_clip_names`', its folders (keys, tokenizer, preprocessing,
`save_open_clip`) `open_clip_folder`'s. Nothing here imports torch, open_clip or timm.
"""
import numpy as np

from clip import configs
from clip.formats import export
from clip.formats import timm_trunks
from clip.formats.export import require

# ------------------------------------------------------------------ what each key does

# open_clip's CLIPVisionCfg / CLIPTextCfg fields, and the keyword arguments `create_model` passes
# to the model class besides them.
_VISION_KEYS = frozenset((
    'layers', 'width', 'head_width', 'mlp_ratio', 'patch_size', 'image_size', 'ls_init_value',
    'patch_dropout', 'attentional_pool', 'attn_pooler_queries', 'attn_pooler_heads', 'no_ln_pre',
    'pos_embed_type', 'final_ln_after_pool', 'pool_type', 'output_tokens', 'act_kwargs',
    'norm_kwargs', 'block_type', 'qk_norm', 'scaled_cosine_attn', 'scale_heads',
    'scale_attn_inner', 'scale_attn', 'scale_fc', 'timm_model_name', 'timm_model_pretrained',
    'timm_pool', 'timm_proj', 'timm_proj_bias', 'timm_drop', 'timm_drop_path'))
_TEXT_KEYS = frozenset((
    'context_length', 'vocab_size', 'hf_tokenizer_name', 'tokenizer_mode', 'tokenizer_kwargs',
    'width', 'heads', 'layers', 'mlp_ratio', 'ls_init_value', 'embed_cls', 'pad_id', 'eos_id',
    'no_causal_mask', 'final_ln_after_pool', 'pool_type', 'proj_bias', 'proj_type',
    'output_tokens', 'act_kwargs', 'norm_kwargs', 'block_type', 'qk_norm', 'scaled_cosine_attn',
    'scale_heads', 'scale_attn_inner', 'scale_attn', 'scale_fc', 'hf_model_name',
    'hf_model_pretrained', 'hf_proj_type', 'hf_pooler_type'))
_TOP_KEYS = frozenset((
    'embed_dim', 'vision_cfg', 'text_cfg', 'quick_gelu', 'init_logit_scale', 'init_logit_bias',
    'nonscalar_logit_scale', 'output_dict', 'custom_text', 'multimodal_cfg'))

# open_clip's defaults for the keys read here.
_VISION_DEFAULTS = {'layers': 12, 'width': 768, 'head_width': 64, 'mlp_ratio': 4.0,
                    'patch_size': 16, 'image_size': 224, 'no_ln_pre': False, 'pool_type': 'tok',
                    'final_ln_after_pool': False, 'timm_pool': 'avg', 'timm_proj': 'linear',
                    'timm_proj_bias': False}
_TEXT_DEFAULTS = {'context_length': 77, 'vocab_size': 49408, 'width': 512, 'heads': 8,
                  'layers': 12, 'mlp_ratio': 4.0, 'no_causal_mask': False, 'pool_type': 'argmax',
                  'proj_bias': False, 'proj_type': 'linear', 'eos_id': 2}

# Options our towers lack: {key: (the values that keep open_clip's default model, why not)}.
_UNSUPPORTED_BLOCK = {
    'ls_init_value': ((None,), 'layer scale is not supported'),
    'block_type': ((None, 'default'), "only open_clip's default residual block is supported"),
    'qk_norm': ((False,), "open_clip's custom-block qk_norm is not supported"),
    'scaled_cosine_attn': ((False,), 'scaled cosine attention is not supported'),
    'scale_heads': ((False,), 'per-head attention scales are not supported'),
    'scale_attn_inner': ((False,), 'the norm inside attention is not supported'),
    'scale_attn': ((False,), 'the norm after attention is not supported'),
    'scale_fc': ((False,), 'the norm inside the MLP is not supported'),
}
_UNSUPPORTED_VIT = {
    **_UNSUPPORTED_BLOCK,
    'attentional_pool': ((False,), "CoCa's attentional pooler is not supported"),
    'pos_embed_type': (('learnable',), 'only learned position embeddings are supported'),
    'patch_dropout': ((0, 0.0), 'patch dropout (training only) is not supported; set it to 0'),
}
_UNSUPPORTED_TIMM = {
    'patch_dropout': _UNSUPPORTED_VIT['patch_dropout'],
    'timm_drop': ((0, 0.0), 'head dropout (training only) is not supported; set it to 0'),
    'timm_drop_path': ((None, 0, 0.0), 'stochastic depth (training only) is not supported'),
    'timm_proj_bias': ((False,), 'a biased vision projection is not supported'),
}
_UNSUPPORTED_TEXT = {
    **_UNSUPPORTED_BLOCK,
    'hf_model_name': ((None,), 'Hugging Face text towers are not supported'),
    'embed_cls': ((False,), "CoCa's appended class token is not supported"),
}
_UNSUPPORTED_TOP = {
    'multimodal_cfg': ((None,), 'CoCa models are not supported'),
    'nonscalar_logit_scale': ((False,), 'a logit scale of shape (1,) is not supported'),
}

_TEXT_POOLS = {'argmax': 'eot', 'eos': 'eot', 'last': 'last', 'first': 'first'}

# timm VisionTransformers that open_clip uses as SigLIP trunks, as timm 1.0.31 defines them
# (vision_transformer.py): width, depth, heads, mlp_ratio, patch, resolution (the input_size of
# their pretrained cfg), MLP activation (timm's default nn.GELU unless act_layer='gelu_tanh').
# All have a patch bias, no class token, no pre-norm, LayerNorm eps 1e-6 and a MAP head with
# the tower's heads, MLP ratio and activation. vit_so400m_patch14_siglip_384's 384 px is no
# multiple of 14: timm's conv floors to a 27 x 27 grid, dropping the last 6 pixel rows and
# columns, as VisionConfig's grid does.
_TIMM_TRUNKS = {
    'vit_base_patch32_siglip_256': (768, 12, 12, 4.0, 32, 256, 'gelu_tanh'),
    'vit_base_patch16_siglip_224': (768, 12, 12, 4.0, 16, 224, 'gelu'),
    'vit_base_patch16_siglip_256': (768, 12, 12, 4.0, 16, 256, 'gelu'),
    'vit_base_patch16_siglip_384': (768, 12, 12, 4.0, 16, 384, 'gelu'),
    'vit_base_patch16_siglip_512': (768, 12, 12, 4.0, 16, 512, 'gelu'),
    'vit_large_patch16_siglip_256': (1024, 24, 16, 4.0, 16, 256, 'gelu'),
    'vit_large_patch16_siglip_384': (1024, 24, 16, 4.0, 16, 384, 'gelu'),
    'vit_large_patch16_siglip_512': (1024, 24, 16, 4.0, 16, 512, 'gelu_tanh'),
    'vit_so400m_patch14_siglip_224': (1152, 27, 16, 3.7362, 14, 224, 'gelu'),
    'vit_so400m_patch14_siglip_378': (1152, 27, 16, 3.7362, 14, 378, 'gelu'),
    'vit_so400m_patch14_siglip_384': (1152, 27, 16, 3.7362, 14, 384, 'gelu'),
    'vit_so400m_patch16_siglip_256': (1152, 27, 16, 3.7362, 16, 256, 'gelu_tanh'),
    'vit_so400m_patch16_siglip_384': (1152, 27, 16, 3.7362, 16, 384, 'gelu_tanh'),
    'vit_so400m_patch16_siglip_512': (1152, 27, 16, 3.7362, 16, 512, 'gelu_tanh'),
    'vit_giantopt_patch16_siglip_256': (1536, 40, 16, 4.0, 16, 256, 'gelu_tanh'),
    'vit_giantopt_patch16_siglip_384': (1536, 40, 16, 4.0, 16, 384, 'gelu_tanh'),
}
_TIMM_EPS = 1e-6
_TORCH_EPS = 1e-5  # nn.LayerNorm's, our norm_eps=None


# ------------------------------------------------------------------ the converter

def _refuse(where, key, value, why):
  raise ValueError(f'open_clip {where}[{key!r}]={value!r}: {why}')


def _check_known(where, cfg, known):
  unknown = sorted(set(cfg) - known)
  if unknown:
    raise ValueError(f'open_clip {where} has unknown keys {unknown}; known keys: {sorted(known)}')


def _check_unsupported(where, cfg, table):
  for key, (allowed, why) in table.items():
    if key in cfg and cfg[key] not in allowed:
      _refuse(where, key, cfg[key], why)


def _valid(where, config_class, *args, **options):
  """`config_class(*args, **options)`, its ValueError said to come from the open_clip section."""
  try:
    return config_class(*args, **options)
  except ValueError as e:
    raise ValueError(f'open_clip {where} gives no valid {config_class.__name__}: {e}') from None


def _hidden_dim(where, width, mlp_ratio):
  """`mlp_dim` for torch's `int(width * mlp_ratio)` hidden units (None: our 4 x width)."""
  if not isinstance(mlp_ratio, (int, float)) or mlp_ratio <= 0:
    _refuse(where, 'mlp_ratio', mlp_ratio, 'expected a number > 0')
  return configs.mlp_dim_field(width, int(width * mlp_ratio))


def _norm_eps(where, norm_kwargs):
  """norm_eps from the LayerNorm keyword arguments (None: torch's 1e-5)."""
  extra = sorted(set(norm_kwargs or {}) - {'eps'})
  if extra:
    _refuse(where, 'norm_kwargs', norm_kwargs, f'only eps is supported, not {extra}')
  eps = (norm_kwargs or {}).get('eps', _TORCH_EPS)
  return None if eps == _TORCH_EPS else eps


def _activation(where, quick_gelu, act_kwargs):
  """The MLP activation of open_clip's own towers: QuickGELU, or nn.GELU(**act_kwargs)."""
  if quick_gelu:
    if act_kwargs:
      _refuse(where, 'act_kwargs', act_kwargs, 'QuickGELU takes no arguments')
    return 'quick_gelu'
  kwargs = dict(act_kwargs or {})
  approximate = kwargs.pop('approximate', 'none')
  if kwargs or approximate not in ('none', 'tanh'):
    _refuse(where, 'act_kwargs', act_kwargs, "nn.GELU takes approximate='none' or 'tanh' only")
  return 'gelu' if approximate == 'none' else 'gelu_tanh'


def _resolution(where, image_size):
  if isinstance(image_size, (list, tuple)):
    if len(image_size) != 2 or image_size[0] != image_size[1]:
      _refuse(where, 'image_size', image_size, 'only square images are supported')
    image_size = image_size[0]
  return image_size


def _timm_vision(cfg, embed_dim):
  """A timm SigLIP, EVA or PE-Core trunk: `TimmModel(timm_model_name, pool=timm_pool,
  proj=timm_proj)`."""
  where = 'vision_cfg'
  name = cfg['timm_model_name']
  if name not in _TIMM_TRUNKS and name not in timm_trunks.TRUNKS:
    _refuse(where, 'timm_model_name', name, f'{timm_trunks.refusal(name)}; supported: '
            f'{sorted(_TIMM_TRUNKS) + sorted(timm_trunks.TRUNKS)}')
  _check_unsupported(where, cfg, _UNSUPPORTED_TIMM)
  get = lambda key: cfg.get(key, _VISION_DEFAULTS[key])
  # TimmModel does not pass image_size to timm: the trunk keeps its own resolution.
  resolution = (_TIMM_TRUNKS.get(name) or timm_trunks.TRUNKS[name])[5]
  if _resolution(where, get('image_size')) != resolution:
    _refuse(where, 'image_size', get('image_size'), f'{name} takes {resolution}px images')
  if name in timm_trunks.TRUNKS:
    return timm_trunks.vision(name, get, embed_dim, lambda *a: _refuse(where, *a))
  width, depth, heads, mlp_ratio, patch, _, act = _TIMM_TRUNKS[name]
  if get('timm_pool') != 'map':
    _refuse(where, 'timm_pool', get('timm_pool'),
            f"{name} is supported with its MAP head only ('map')")
  if get('timm_proj') not in ('none', 'linear'):
    _refuse(where, 'timm_proj', get('timm_proj'), "expected 'none' or 'linear'")
  projection = get('timm_proj') == 'linear'
  if not projection and embed_dim != width:
    _refuse(where, 'timm_proj', 'none', f'embed_dim {embed_dim} must equal the width {width} '
            f'of {name} when the trunk is not projected')
  return configs.VisionConfig(
      'vit', width, depth, heads, resolution, patch, pool='map', ln_pre=False, patch_bias=True,
      mlp=act, mlp_dim=_hidden_dim(where, width, mlp_ratio), norm_eps=_TIMM_EPS,
      projection=projection)


def _resnet_vision(cfg):
  """open_clip's ModifiedResNet: reads layers, width, head_width and image_size only."""
  get = lambda key: cfg.get(key, _VISION_DEFAULTS[key])
  width = get('width')
  return _valid('vision_cfg', configs.VisionConfig, 'resnet', width, tuple(get('layers')),
                width * 32 // get('head_width'), _resolution('vision_cfg', get('image_size')))


def _vit_vision(cfg, quick_gelu):
  """open_clip's VisionTransformer (OpenAI's, with its options)."""
  where = 'vision_cfg'
  _check_unsupported(where, cfg, _UNSUPPORTED_VIT)
  get = lambda key: cfg.get(key, _VISION_DEFAULTS[key])
  if get('pool_type') != 'tok':
    # 'avg' keeps the class token in the attention but pools the patches: we have no such pool.
    _refuse(where, 'pool_type', get('pool_type'), "only class-token pooling ('tok') is supported")
  # final_ln_after_pool needs no check: LayerNorm acts per token, so with 'tok' pooling the
  # norm after the pool equals the norm before it.
  width = get('width')
  options = dict(ln_pre=not get('no_ln_pre'),
                 mlp=_activation(where, quick_gelu, cfg.get('act_kwargs')),
                 mlp_dim=_hidden_dim(where, width, get('mlp_ratio')),
                 norm_eps=_norm_eps(where, cfg.get('norm_kwargs')))
  return _valid(where, configs.VisionConfig, 'vit', width, get('layers'),
                width // get('head_width'), _resolution(where, get('image_size')),
                get('patch_size'), **options)


def _vision(cfg, embed_dim, quick_gelu):
  _check_known('vision_cfg', cfg, _VISION_KEYS)
  if cfg.get('timm_model_name'):
    return _timm_vision(cfg, embed_dim)  # timm trunks ignore quick_gelu
  if isinstance(cfg.get('layers'), (list, tuple)):
    return _resnet_vision(cfg)
  return _vit_vision(cfg, quick_gelu)


def _text(cfg, embed_dim, quick_gelu):
  """open_clip's TextTransformer (pad_id, eos_id and final_ln_after_pool do not act in it with
  the pools supported here; tokenizer keys do not touch the model)."""
  where = 'text_cfg'
  _check_known(where, cfg, _TEXT_KEYS)
  _check_unsupported(where, cfg, _UNSUPPORTED_TEXT)
  get = lambda key: cfg.get(key, _TEXT_DEFAULTS[key])
  if get('pool_type') not in _TEXT_POOLS:
    _refuse(where, 'pool_type', get('pool_type'), f'supported: {sorted(_TEXT_POOLS)}')
  if get('proj_type') not in ('linear', 'none'):
    _refuse(where, 'proj_type', get('proj_type'), "expected 'linear' or 'none'")
  width, projection = get('width'), get('proj_type') == 'linear'
  if not projection and embed_dim != width:
    _refuse(where, 'proj_type', 'none', f'embed_dim {embed_dim} must equal the text width {width}')
  bidirectional = bool(get('no_causal_mask'))
  if bidirectional and get('pool_type') in ('argmax', 'eos'):
    _refuse(where, 'no_causal_mask', True, f"with pool_type {get('pool_type')!r} open_clip's "
            'pooled token attends to the padding after it, which our bidirectional eot pooling '
            'masks')
  if not bidirectional and get('pool_type') == 'first':
    _refuse(where, 'pool_type', 'first', 'the first token of causal attention sees only itself; '
            'supported with no_causal_mask=True')
  options = dict(
      pool=_TEXT_POOLS[get('pool_type')], causal=not bidirectional,
      # open_clip's bidirectional text attends to every position, padding included.
      mask_padding=not bidirectional, projection=projection,
      projection_bias=projection and bool(get('proj_bias')),
      mlp=_activation(where, quick_gelu, cfg.get('act_kwargs')),
      mlp_dim=_hidden_dim(where, width, get('mlp_ratio')),
      norm_eps=_norm_eps(where, cfg.get('norm_kwargs')))
  vocab = get('vocab_size')
  if get('pool_type') == 'eos':  # the first `eos_id` of each row, as ours
    options['eot_token_id'] = get('eos_id')
  elif options['pool'] == 'eot' and vocab != configs.OPENAI_VOCAB_SIZE:
    # open_clip's 'argmax' pools at each row's largest id: its vocabulary's last, stated so.
    options['eot_token_id'] = vocab - 1
  return _valid(where, configs.TextConfig, width, get('layers'), get('heads'),
                get('context_length'), vocab, **options)


def config_from_open_clip(model_cfg):
  """An open_clip model config dict -> the CLIPConfig of the same model.

  `model_cfg` follows open_clip's `model_configs/*.json` (an `open_clip_config.json` dict is
  read under its "model_cfg"). Supported: open_clip's own ViT and ModifiedResNet towers and text
  transformer (head_width, mlp_ratio, quick_gelu, act_kwargs approximate, norm_kwargs eps,
  no_ln_pre, no_causal_mask, pool_type argmax / last / first, proj_bias, proj_type),
  `init_logit_scale` and `init_logit_bias` (-> logit_bias=True; without `init_logit_scale` the
  scale then starts at ln 10, as open_clip's training script sets it for a sigmoid loss; the
  model class alone would start it at ln(1/0.07)), and timm's SigLIP ViTs that open_clip uses
  (vit_{base,large,so400m,giantopt}_patch{14,16,32}_siglip_<resolution>, not the patch-14
  384px one) with timm_pool 'map' and timm_proj 'none' (no vision projection) or 'linear', and
  timm's Eva trunks (EVA01-g, EVA02-B/L/E with timm_pool 'token', Perception Encoder PE-Core
  T/S/B/L with 'map': `timm_trunks.TRUNKS`) with timm_proj null (the trunk's biased head) or
  'none'. Like open_clip,
  `quick_gelu` does not reach a timm trunk and a ResNet reads only layers, width, head_width
  and image_size. `custom_text` only moves the text keys under `text.`: the forward is the same.

  Raises TypeError for a non-dict, ValueError naming the key and value of anything not
  represented exactly (layer scale, custom blocks, attentional / average pooling, CoCa, HF text
  towers, other timm trunks, named by what they are, training-only dropout, unknown keys, ...).
  """
  if isinstance(model_cfg, dict):
    model_cfg = model_cfg.get('model_cfg', model_cfg)
  if not isinstance(model_cfg, dict):
    raise TypeError(f'config_from_open_clip expects a dict, got {type(model_cfg).__name__}')
  missing = [k for k in ('embed_dim', 'vision_cfg', 'text_cfg') if k not in model_cfg]
  if missing:
    raise ValueError(f'open_clip model_cfg lacks {missing}; it has {sorted(model_cfg)}')
  _check_known('model_cfg', model_cfg, _TOP_KEYS)
  _check_unsupported('model_cfg', model_cfg, _UNSUPPORTED_TOP)
  for key in ('vision_cfg', 'text_cfg'):
    if not isinstance(model_cfg[key], dict):
      _refuse('model_cfg', key, model_cfg[key], 'expected a dict')
  embed_dim, quick_gelu = model_cfg['embed_dim'], bool(model_cfg.get('quick_gelu', False))
  return configs.CLIPConfig(
      embed_dim, _vision(model_cfg['vision_cfg'], embed_dim, quick_gelu),
      _text(model_cfg['text_cfg'], embed_dim, quick_gelu),
      logit_bias=model_cfg.get('init_logit_bias') is not None,
      init_logit_scale=model_cfg.get('init_logit_scale'),
      init_logit_bias=model_cfg.get('init_logit_bias'))


# ------------------------------------------------------------------ ours -> open_clip

def _mlp_ratio(width, hidden):
  """A float that open_clip's `int(width * mlp_ratio)` turns back into `hidden`."""
  ratio = hidden / width
  while int(width * ratio) < hidden:
    ratio = np.nextafter(ratio, np.inf)
  return float(ratio)


def open_clip_model_cfg(cfg):
  """Our CLIPConfig -> open_clip's `model_cfg` dict (OpenAI-architecture towers, QuickGELU or
  exact GELU in both, any head width and MLP ratio; pooled at the end-of-text id, open_clip's
  `pool_type='eos'` where that is not the vocabulary's last id). The tokenizer keys are
  `save_open_clip`'s."""
  v, t = cfg.vision, cfg.text
  target = 'open_clip'
  export.require_two_towers(cfg, target)
  export.default_block(t, target, ('quick_gelu', 'gelu'))
  require(t.pool == 'eot' and t.causal and t.pos_embedding == 'learned' and t.projection
          and not t.projection_bias and t.norm_eps is None, 'a non-OpenAI text tower', target)
  require(not cfg.logit_bias, 'a logit bias on an OpenAI-architecture CLIP', target)
  vision_cfg = {'image_size': v.image_resolution, 'layers': v.layers, 'width': v.width}
  if v.arch == 'vit':
    export.default_block(v, target, (t.mlp,))
    require(v.pool == 'cls' and v.pos_embedding == 'learned' and not v.registers and v.ln_pre
            and not v.patch_bias and v.projection and v.norm_eps is None and not v.rope_2d
            and v.k_bias and not v.projection_bias,
            'ViT options outside OpenAI\'s architecture', target)
    vision_cfg.update(patch_size=v.patch_size, head_width=v.width // v.heads,
                      mlp_ratio=_mlp_ratio(v.width, v.hidden_dim))
  else:
    require(v.heads == v.width * 32 // 64, f'{v.heads} attention-pool heads (open_clip '
            'derives width * 32 // 64)', target)
    vision_cfg.update(layers=list(v.layers), patch_size=None)
  text_cfg = {'context_length': t.context_length, 'vocab_size': t.vocab_size, 'width': t.width,
              'heads': t.heads, 'layers': t.layers, 'mlp_ratio': _mlp_ratio(t.width, t.hidden_dim)}
  if t.eot_id != t.vocab_size - 1:
    # open_clip's default 'argmax' pools at each row's largest id; 'eos' at the first `eos_id`,
    # as ours (a SentencePiece vocabulary ends rows with id 1).
    text_cfg.update(pool_type='eos', eos_id=t.eot_id)
  out = {'embed_dim': cfg.embed_dim, 'vision_cfg': vision_cfg, 'text_cfg': text_cfg}
  if t.mlp == 'quick_gelu':
    out['quick_gelu'] = True
  return out
