"""Hugging Face transformers' `CLIPModel`, `SiglipModel` and `Siglip2Model` (NaFlex: at any
shape through `clip.naflex`, at its position table's own grid through `clip.encode_image`): their
keys (transformers' `modeling_clip.py` / `modeling_siglip.py` /
`modeling_siglip2.py` names, one table per model read in both directions), their `config.json` in
both directions (one activation table, its inverse computed) and `save_hf`. Their tokenizer and
image-processor files are `hf_processing`'s.
"""
import os
import re

import numpy as np

from clip import configs
from clip import processing
from clip.formats import export
from clip.formats import hf_processing
from clip.formats import keys
from clip.formats.export import require
from clip.formats.keys import LEAD1
from clip.formats.keys import MAP_HEAD
from clip.formats.keys import QKV
from clip.formats.keys import SAME
from clip.formats.keys import TRANSPOSE
from clip.formats.keys import Transform
from clip.formats.keys import rows

# Hugging Face `hidden_act` -> ours (transformers' ACT2FN: 'gelu' is exact, 'gelu_pytorch_tanh'
# and 'gelu_new' are the tanh approximation).
ACTIVATIONS = {'quick_gelu': 'quick_gelu', 'gelu': 'gelu', 'gelu_pytorch_tanh': 'gelu_tanh',
               'gelu_new': 'gelu_tanh'}
# Ours -> Hugging Face's: the first of its names for each ('gelu_tanh' -> 'gelu_pytorch_tanh').
_ACT_TO_HF = {ours: theirs for theirs, ours in reversed(ACTIVATIONS.items())}
_OUR_ACTIVATIONS = tuple(dict.fromkeys(ACTIVATIONS.values()))


# ---------------------------------------------------------------- keys

def _naflex_patch_to_conv(a):
  """Siglip2's patch embedding, nn.Linear over patches flattened as (row, col, channel), ->
  the OIHW kernel of the equivalent stride-p convolution."""
  w = a[0]
  p = round((w.shape[1] // 3) ** 0.5)
  return w.reshape(w.shape[0], p, p, 3).transpose(0, 3, 1, 2)


NAFLEX_PATCH = Transform(_naflex_patch_to_conv,
                         lambda x: [x.transpose(0, 2, 3, 1).reshape(x.shape[0], -1)])


def _hf_block(ours, theirs):
  return (rows(f'{ours}.ln_1', [f'{theirs}.layer_norm1'])
          + rows(f'{ours}.ln_2', [f'{theirs}.layer_norm2'])
          + [(f'{ours}.attn.in_proj_{leaf}',
              tuple(f'{theirs}.self_attn.{c}_proj.{leaf}' for c in 'qkv'), QKV)
             for leaf in ('weight', 'bias')]
          + rows(f'{ours}.attn.out_proj', [f'{theirs}.self_attn.out_proj'])
          + rows(f'{ours}.mlp.c_fc', [f'{theirs}.mlp.fc1'])
          + rows(f'{ours}.mlp.c_proj', [f'{theirs}.mlp.fc2']))


_HF_TEXT = ([('token_embedding.weight', ('text_model.embeddings.token_embedding.weight',), SAME),
             ('positional_embedding', ('text_model.embeddings.position_embedding.weight',), SAME)]
            + _hf_block('transformer.resblocks.{i}', 'text_model.encoder.layers.{i}')
            + rows('ln_final', ['text_model.final_layer_norm']))
_HF_VISION_BLOCKS = (
    _hf_block('visual.transformer.resblocks.{i}', 'vision_model.encoder.layers.{i}')
    + rows('visual.ln_post', ['vision_model.post_layernorm']))

CLIP_TABLE = tuple(
    _HF_TEXT + _HF_VISION_BLOCKS
    + [('text_projection', ('text_projection.weight',), TRANSPOSE),
       ('visual.class_embedding', ('vision_model.embeddings.class_embedding',), SAME),
       ('visual.conv1.weight', ('vision_model.embeddings.patch_embedding.weight',), SAME),
       ('visual.positional_embedding', ('vision_model.embeddings.position_embedding.weight',),
        SAME),
       ('visual.proj', ('visual_projection.weight',), TRANSPOSE),
       ('logit_scale', ('logit_scale',), SAME)]
    + rows('visual.ln_pre', ['vision_model.pre_layrnorm']))  # sic: transformers' spelling

SIGLIP_TABLE = tuple(
    _HF_TEXT + _HF_VISION_BLOCKS
    + rows('text_projection', ['text_model.head'])
    + rows('visual.conv1', ['vision_model.embeddings.patch_embedding'])
    + [('visual.positional_embedding', ('vision_model.embeddings.position_embedding.weight',),
        SAME),
       (f'{MAP_HEAD}.probe', ('vision_model.head.probe',), LEAD1),
       (f'{MAP_HEAD}.attn.in_proj_weight', ('vision_model.head.attention.in_proj_weight',), SAME),
       (f'{MAP_HEAD}.attn.in_proj_bias', ('vision_model.head.attention.in_proj_bias',), SAME),
       ('logit_scale', ('logit_scale',), LEAD1), ('logit_bias', ('logit_bias',), LEAD1)]
    + rows(f'{MAP_HEAD}.attn.out_proj', ['vision_model.head.attention.out_proj'])
    + rows(f'{MAP_HEAD}.ln_2', ['vision_model.head.layernorm'])
    + rows(f'{MAP_HEAD}.mlp.c_fc', ['vision_model.head.mlp.fc1'])
    + rows(f'{MAP_HEAD}.mlp.c_proj', ['vision_model.head.mlp.fc2']))
# Siglip2Model (NaFlex): SigLIP's keys, the patch embedding a Linear over flattened patches. Its
# position table is resized to each image's patch grid (`clip.naflex.encode_image_naflex`); at
# the table's own grid that is the identity, the one resolution `clip.encode_image` runs it at.
SIGLIP2_TABLE = tuple(
    (ours, theirs, NAFLEX_PATCH if ours == 'visual.conv1.weight' else transform)
    for ours, theirs, transform in SIGLIP_TABLE)
_IGNORED = re.compile(r'(text|vision)_model\.embeddings\.position_ids')  # a constant buffer
TABLES = {'clip': CLIP_TABLE, 'siglip': SIGLIP_TABLE, 'siglip2': SIGLIP2_TABLE}


def to_ours(flat, model_type):
  """A flat Hugging Face state dict of `model_type` ('clip', 'siglip', 'siglip2') -> our keys."""
  return keys.to_ours(flat, TABLES[model_type], ignored=_IGNORED)


def to_hf_state_dict(params, cfg):
  """Our params -> `{Hugging Face key: numpy array}` of the model `hf_config(cfg)` describes."""
  table = SIGLIP_TABLE if hf_config(cfg)['model_type'] == 'siglip' else CLIP_TABLE
  return keys.to_theirs(export.flat_numpy(params), table)


# ---------------------------------------------------------------- config.json -> ours

def _hf_act(tower, cfg):
  act = cfg.get('hidden_act', 'quick_gelu')
  if act not in ACTIVATIONS:
    raise ValueError(f'{tower}.hidden_act {act!r} is not one we run exactly; known: '
                     f'{sorted(ACTIVATIONS)}')
  return ACTIVATIONS[act]


def _hf_block_options(tower, cfg, default_eps):
  width = cfg['hidden_size']
  eps = cfg.get('layer_norm_eps', default_eps)
  return dict(mlp=_hf_act(tower, cfg), norm_eps=None if eps == 1e-5 else eps,
              mlp_dim=configs.mlp_dim_field(width, cfg['intermediate_size']))


def config_from_hf(hf):
  """A Hugging Face `CLIPConfig` / `MetaClip2Config` / `SiglipConfig` dict (`config.json`) ->
  our CLIPConfig."""
  model_type = hf.get('model_type', 'clip')
  if model_type not in ('clip', 'metaclip_2', 'siglip', 'siglip2'):
    raise ValueError(f'config.json is a {model_type!r} model; supported: clip, metaclip_2, siglip '
                     '(SigLIP 2 fixed-resolution releases are siglip models), siglip2 (NaFlex)')
  t, v = hf['text_config'], hf['vision_config']
  if model_type == 'metaclip_2':  # CLIP's towers, pooled at the first eos_token_id (no legacy)
    return _clip_from_hf(hf, t, v, eot=t.get('eos_token_id', configs.OPENAI_VOCAB_SIZE - 1))
  if model_type == 'clip':
    return _clip_from_hf(hf, t, v)
  if model_type == 'siglip2':  # NaFlex: run at the position table's own square grid
    grid = round(v.get('num_patches', 256) ** 0.5)
    if grid * grid != v.get('num_patches', 256):
      raise ValueError(f'vision_config.num_patches {v.get("num_patches")} is not a square grid')
    v = dict(v, image_size=grid * v.get('patch_size', 16))
  return _siglip_from_hf(t, v)


def _clip_from_hf(hf, t, v, eot=None):
  vocab = t.get('vocab_size', 49408)
  eos = t.get('eos_token_id', 2)
  # eos 2 is transformers' legacy rule: pool at the largest id of each row. That is our default
  # (the first vocab - 1) only when a row holds vocab - 1, as OpenAI's tokenizer's rows do; a
  # legacy model fed added tokens (ids > its EOT) pooled at them, which we do not copy. Any other
  # eos pools at its first occurrence, as ours does. (`eot`: stated by the caller.)
  if eot is None:
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


# ---------------------------------------------------------------- ours -> config.json

def _hf_tower(tower, eps_default):
  eps = tower.norm_eps or eps_default
  return {'hidden_size': tower.width, 'intermediate_size': tower.hidden_dim,
          'num_hidden_layers': tower.layers, 'num_attention_heads': tower.heads,
          'hidden_act': _ACT_TO_HF[tower.mlp], 'layer_norm_eps': eps}


def _siglip_text_ids(cfg):
  """A SigLIP text config's end and padding ids, its tokenizer's (transformers' defaults,
  OpenAI's 49407 / 49406, lie outside a SentencePiece vocabulary); none where it is not known."""
  try:
    tok = processing.get_tokenizer(cfg)
  except (ValueError, OSError):
    return {}
  if tok.config.kind == 'openai':
    return {}
  return {'eos_token_id': tok.eot_id, 'pad_token_id': tok.pad_id, 'bos_token_id': None}


def hf_config(cfg):
  """Our CLIPConfig -> a Hugging Face `config.json` dict (`CLIPModel` for OpenAI's ViT
  architecture, `SiglipModel` for SigLIP's)."""
  v, t = cfg.vision, cfg.text
  target = 'Hugging Face'
  export.require_two_towers(cfg, target)
  require(v.arch == 'vit', 'a ModifiedResNet image tower', target)
  for tower in (v, t):
    export.default_block(tower, target, _OUR_ACTIVATIONS)
  if cfg.logit_bias:
    siglip = dict(pool='map', ln_pre=False, patch_bias=True, projection=False,
                  pos_embedding='learned', registers=0, pool_heads=None)
    other = {k: getattr(v, k) for k, want in siglip.items() if getattr(v, k) != want}
    require(not other, f'a SigLIP image tower other than HF SiglipVisionModel\'s ({other}; it '
            f'has {siglip})', target)
    require(t.pool == 'last' and not t.causal and not t.mask_padding and t.projection_bias
            and t.pos_embedding == 'learned', 'a SigLIP text tower other than HF\'s', target)
    text = dict(_hf_tower(t, 1e-5), max_position_embeddings=t.context_length,
                vocab_size=t.vocab_size, projection_size=cfg.embed_dim, **_siglip_text_ids(cfg))
    vision = dict(_hf_tower(v, 1e-5), image_size=v.image_resolution, patch_size=v.patch_size,
                  vision_use_head=True)
    return {'model_type': 'siglip', 'architectures': ['SiglipModel'], 'text_config': text,
            'vision_config': vision}
  require(v.pool == 'cls' and v.ln_pre and not v.patch_bias and v.projection and not v.registers
          and v.pos_embedding == 'learned', 'ViT options outside OpenAI\'s architecture', target)
  require(t.pool == 'eot' and t.causal and t.projection and not t.projection_bias
          and t.pos_embedding == 'learned', 'a non-OpenAI text tower', target)
  # Any eos_token_id but 2 (transformers' legacy argmax) pools at its first occurrence, as ours.
  require(t.eot_id != 2, 'an end-of-text id of 2 (transformers reads it as its legacy argmax '
          'pooling)', target)
  text = dict(_hf_tower(t, 1e-5), max_position_embeddings=t.context_length,
              vocab_size=t.vocab_size, eos_token_id=t.eot_id)
  vision = dict(_hf_tower(v, 1e-5), image_size=v.image_resolution, patch_size=v.patch_size)
  return {'model_type': 'clip', 'architectures': ['CLIPModel'], 'text_config': text,
          'vision_config': vision, 'projection_dim': cfg.embed_dim}


def save_hf(params, cfg, folder):
  """Writes `config.json` and `model.safetensors` into `folder`; `transformers.CLIPModel` /
  `SiglipModel.from_pretrained(folder)` loads it with no missing or unexpected weights. Returns
  the two paths.

  Processing, for `AutoProcessor` / `AutoImageProcessor` / `AutoTokenizer.from_pretrained(folder)`:
  `preprocessor_config.json` (`hf_processing.hf_preprocessor_config`) and the tokenizer's files
  (`hf_processing.hf_tokenizer_files`; those another tokenizer left in the folder are removed),
  called with `padding='max_length', max_length=<context length>, truncation=True` as SigLIP's
  model cards do. Differences that are transformers' own: its CLIP tokenizer pads rows with the
  end-of-text id where ours pad with 0 (the model's outputs are the same) and runs no ftfy or HTML
  unescaping; its image processors convert to RGB on white first and its CLIPImageProcessor
  centre-crops at the floor of half the overhang, which a model loaded from a Hugging Face folder
  does too (`PreprocessConfig.convert_first`, `crop_rounding='floor'`) and OpenAI's and
  open_clip's transforms do not (an `ExportWarning` says so: transparent images differ, and the
  crop by one pixel when the overhang is 3 modulo 4); its default torchvision backend resizes
  tensors, not PIL images (`backend='pil'` resizes as we do)."""
  config = hf_config(cfg)
  contents = {
      'preprocessor_config.json': hf_processing.hf_preprocessor_config(cfg, config['model_type']),
      **hf_processing.hf_tokenizer_files(cfg)}
  flat = {k: np.array(v, order="C") for k, v in to_hf_state_dict(params, cfg).items()}
  config_path, weights_path = (os.path.join(folder, 'config.json'),
                               os.path.join(folder, 'model.safetensors'))
  export.write_safetensors(weights_path, flat)
  export.write_processing_files(folder, contents)
  export.write_json(config_path, config)
  return config_path, weights_path
