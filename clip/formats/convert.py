"""Foreign checkpoint layouts <-> ours: one key table per family, read in both directions.

Our parameters are OpenAI's torch state dict (SigLIP's extra parts under torch-style names:
`visual.conv1.bias`, `visual.attn_pool.*`, `text_projection.{weight, bias}`, `logit_bias`). Each
table row is `(ours, theirs, transform)`: key templates in which `{i}` stands for a layer index
and `{rest}` for any key tail, and a transform that turns the foreign array(s) into ours and
back. A row with several foreign keys packs them (q, k, v -> `in_proj_weight`).

Families and their public references:
- Hugging Face `CLIPModel` (transformers' `modeling_clip.py` names);
- Hugging Face `SiglipModel` (transformers' `modeling_siglip.py`) and `Siglip2Model` at its
  position table's own grid (`modeling_siglip2.py`);
- open_clip's timm-trunk image towers (`visual.trunk.*`, timm's `VisionTransformer` with
  `AttentionPoolLatent`) and `CustomTextCLIP`'s `text.*` prefix;
- big_vision's `.npz` parameters (flax names, `(in, out)` kernels, `(D, heads, head_dim)`
  attention kernels, HWIO patch kernels), read as transformers' `convert_siglip_to_hf.py` maps
  them (import only).
"""
import dataclasses
import re

import numpy as np


class ConversionError(ValueError):
  """Foreign keys that the family's table cannot place, or a pack with a part missing."""


@dataclasses.dataclass(frozen=True)
class Transform:
  """`load(list of foreign arrays) -> ours`, `save(ours) -> list of foreign arrays`."""
  load: object
  save: object = None


def _split(parts):
  def save(x):
    edges = np.cumsum([x.shape[0] * p // sum(parts) for p in parts])[:-1]
    return np.split(x, edges, axis=0)
  return save


SAME = Transform(lambda a: a[0], lambda x: [x])
TRANSPOSE = Transform(lambda a: a[0].T, lambda x: [x.T])
QKV = Transform(lambda a: np.concatenate(a, axis=0), _split((1, 1, 1)))  # q, k, v
Q_KV = Transform(lambda a: np.concatenate(a, axis=0), _split((1, 2)))  # q, packed k|v


def _squeeze_lead(a):
  if a[0].shape[:1] != (1,):
    raise ConversionError(f'expected a leading axis of 1, got shape {a[0].shape}')
  return a[0].reshape(a[0].shape[1:])


LEAD1 = Transform(_squeeze_lead, lambda x: [x[None]])  # (1, ...) theirs -> (...) ours
# big_vision (flax): conv kernels HWIO; attention kernels (D, heads, head_dim), out (heads, hd, D).
BV_CONV = Transform(lambda a: a[0].transpose(3, 2, 0, 1))
BV_QKV = Transform(lambda a: np.concatenate([k.reshape(k.shape[0], -1).T for k in a], axis=0))
BV_QKV_BIAS = Transform(lambda a: np.concatenate([b.reshape(-1) for b in a], axis=0))
BV_OUT = Transform(lambda a: a[0].reshape(-1, a[0].shape[-1]).T)


def _naflex_patch_to_conv(a):
  """Siglip2's patch embedding, nn.Linear over patches flattened as (row, col, channel), ->
  the OIHW kernel of the equivalent stride-p convolution."""
  w = a[0]
  p = round((w.shape[1] // 3) ** 0.5)
  return w.reshape(w.shape[0], p, p, 3).transpose(0, 3, 1, 2)


NAFLEX_PATCH = Transform(_naflex_patch_to_conv,
                         lambda x: [x.transpose(0, 2, 3, 1).reshape(x.shape[0], -1)])


def _rows(ours, theirs, transform=SAME, leaves=('weight', 'bias')):
  """One row per leaf name: `ours.leaf <- theirs.leaf` (norm and linear weights and biases)."""
  return [(f'{ours}.{leaf}', tuple(f'{t}.{leaf}' for t in theirs), transform) for leaf in leaves]


def _hf_block(ours, theirs):
  return (_rows(f'{ours}.ln_1', [f'{theirs}.layer_norm1'])
          + _rows(f'{ours}.ln_2', [f'{theirs}.layer_norm2'])
          + [(f'{ours}.attn.in_proj_{leaf}',
              tuple(f'{theirs}.self_attn.{c}_proj.{leaf}' for c in 'qkv'), QKV)
             for leaf in ('weight', 'bias')]
          + _rows(f'{ours}.attn.out_proj', [f'{theirs}.self_attn.out_proj'])
          + _rows(f'{ours}.mlp.c_fc', [f'{theirs}.mlp.fc1'])
          + _rows(f'{ours}.mlp.c_proj', [f'{theirs}.mlp.fc2']))


_HF_TEXT = ([('token_embedding.weight', ('text_model.embeddings.token_embedding.weight',), SAME),
             ('positional_embedding', ('text_model.embeddings.position_embedding.weight',), SAME)]
            + _hf_block('transformer.resblocks.{i}', 'text_model.encoder.layers.{i}')
            + _rows('ln_final', ['text_model.final_layer_norm']))
_HF_VISION_BLOCKS = (
    _hf_block('visual.transformer.resblocks.{i}', 'vision_model.encoder.layers.{i}')
    + _rows('visual.ln_post', ['vision_model.post_layernorm']))

HF_CLIP = tuple(
    _HF_TEXT + _HF_VISION_BLOCKS
    + [('text_projection', ('text_projection.weight',), TRANSPOSE),
       ('visual.class_embedding', ('vision_model.embeddings.class_embedding',), SAME),
       ('visual.conv1.weight', ('vision_model.embeddings.patch_embedding.weight',), SAME),
       ('visual.positional_embedding', ('vision_model.embeddings.position_embedding.weight',),
        SAME),
       ('visual.proj', ('visual_projection.weight',), TRANSPOSE),
       ('logit_scale', ('logit_scale',), SAME)]
    + _rows('visual.ln_pre', ['vision_model.pre_layrnorm']))  # sic: transformers' spelling

_MAP_HEAD = 'visual.attn_pool'
HF_SIGLIP = tuple(
    _HF_TEXT + _HF_VISION_BLOCKS
    + _rows('text_projection', ['text_model.head'])
    + _rows('visual.conv1', ['vision_model.embeddings.patch_embedding'])
    + [('visual.positional_embedding', ('vision_model.embeddings.position_embedding.weight',),
        SAME),
       (f'{_MAP_HEAD}.probe', ('vision_model.head.probe',), LEAD1),
       (f'{_MAP_HEAD}.attn.in_proj_weight', ('vision_model.head.attention.in_proj_weight',), SAME),
       (f'{_MAP_HEAD}.attn.in_proj_bias', ('vision_model.head.attention.in_proj_bias',), SAME),
       ('logit_scale', ('logit_scale',), LEAD1), ('logit_bias', ('logit_bias',), LEAD1)]
    + _rows(f'{_MAP_HEAD}.attn.out_proj', ['vision_model.head.attention.out_proj'])
    + _rows(f'{_MAP_HEAD}.ln_2', ['vision_model.head.layernorm'])
    + _rows(f'{_MAP_HEAD}.mlp.c_fc', ['vision_model.head.mlp.fc1'])
    + _rows(f'{_MAP_HEAD}.mlp.c_proj', ['vision_model.head.mlp.fc2']))
# Siglip2Model (NaFlex): SigLIP's keys, the patch embedding a Linear over flattened patches. Its
# position table is resized to each image's patch grid; at the table's own grid that is the
# identity, and that grid is the one resolution our model runs it at.
HF_SIGLIP2 = tuple(
    (ours, theirs, NAFLEX_PATCH if ours == 'visual.conv1.weight' else transform)
    for ours, theirs, transform in HF_SIGLIP)
HF_IGNORED = re.compile(r'(text|vision)_model\.embeddings\.position_ids')  # a constant buffer

_TRUNK = 'visual.trunk'
_TIMM_BLOCK = 'visual.transformer.resblocks.{i}'
OPEN_CLIP_TIMM_VIT = tuple(
    _rows('visual.conv1', [f'{_TRUNK}.patch_embed.proj'])
    + [('visual.positional_embedding', (f'{_TRUNK}.pos_embed',), LEAD1),
       (f'{_TIMM_BLOCK}.attn.in_proj_weight', (f'{_TRUNK}.blocks.{{i}}.attn.qkv.weight',), SAME),
       (f'{_TIMM_BLOCK}.attn.in_proj_bias', (f'{_TRUNK}.blocks.{{i}}.attn.qkv.bias',), SAME),
       (f'{_MAP_HEAD}.probe', (f'{_TRUNK}.attn_pool.latent',), LEAD1)]
    + _rows(f'{_TIMM_BLOCK}.ln_1', [f'{_TRUNK}.blocks.{{i}}.norm1'])
    + _rows(f'{_TIMM_BLOCK}.attn.out_proj', [f'{_TRUNK}.blocks.{{i}}.attn.proj'])
    + _rows(f'{_TIMM_BLOCK}.ln_2', [f'{_TRUNK}.blocks.{{i}}.norm2'])
    + _rows(f'{_TIMM_BLOCK}.mlp.c_fc', [f'{_TRUNK}.blocks.{{i}}.mlp.fc1'])
    + _rows(f'{_TIMM_BLOCK}.mlp.c_proj', [f'{_TRUNK}.blocks.{{i}}.mlp.fc2'])
    + _rows('visual.ln_post', [f'{_TRUNK}.norm'])
    + [(f'{_MAP_HEAD}.attn.in_proj_{leaf}',
        (f'{_TRUNK}.attn_pool.q.{leaf}', f'{_TRUNK}.attn_pool.kv.{leaf}'), Q_KV)
       for leaf in ('weight', 'bias')]
    + _rows(f'{_MAP_HEAD}.attn.out_proj', [f'{_TRUNK}.attn_pool.proj'])
    + _rows(f'{_MAP_HEAD}.ln_2', [f'{_TRUNK}.attn_pool.norm'])
    + _rows(f'{_MAP_HEAD}.mlp.c_fc', [f'{_TRUNK}.attn_pool.mlp.fc1'])
    + _rows(f'{_MAP_HEAD}.mlp.c_proj', [f'{_TRUNK}.attn_pool.mlp.fc2']))
# open_clip's CustomTextCLIP keeps the text tower under `text.`; ours is at the top level.
_TEXT_KEYS = r'(token_embedding|positional_embedding|transformer|ln_final|text_projection)'
OPEN_CLIP_CUSTOM_TEXT = (('{text}', ('text.{text}',), SAME),)


def _bv_block(ours, theirs):
  attn = f'{theirs}/MultiHeadDotProductAttention_0'
  return [(f'{ours}.ln_1.weight', (f'{theirs}/LayerNorm_0/scale',), SAME),
          (f'{ours}.ln_1.bias', (f'{theirs}/LayerNorm_0/bias',), SAME),
          (f'{ours}.ln_2.weight', (f'{theirs}/LayerNorm_1/scale',), SAME),
          (f'{ours}.ln_2.bias', (f'{theirs}/LayerNorm_1/bias',), SAME),
          *_bv_mlp(f'{ours}.mlp', f'{theirs}/MlpBlock_0'), *_bv_attention(f'{ours}.attn', attn)]


def _bv_mlp(ours, theirs):
  return [(f'{ours}.c_fc.weight', (f'{theirs}/Dense_0/kernel',), TRANSPOSE),
          (f'{ours}.c_fc.bias', (f'{theirs}/Dense_0/bias',), SAME),
          (f'{ours}.c_proj.weight', (f'{theirs}/Dense_1/kernel',), TRANSPOSE),
          (f'{ours}.c_proj.bias', (f'{theirs}/Dense_1/bias',), SAME)]


def _bv_attention(ours, theirs):
  qkv = ('query', 'key', 'value')
  return [(f'{ours}.in_proj_weight', tuple(f'{theirs}/{c}/kernel' for c in qkv), BV_QKV),
          (f'{ours}.in_proj_bias', tuple(f'{theirs}/{c}/bias' for c in qkv), BV_QKV_BIAS),
          (f'{ours}.out_proj.weight', (f'{theirs}/out/kernel',), BV_OUT),
          (f'{ours}.out_proj.bias', (f'{theirs}/out/bias',), SAME)]


BIG_VISION_SIGLIP = tuple(
    [('visual.conv1.weight', ('img/embedding/kernel',), BV_CONV),
     ('visual.conv1.bias', ('img/embedding/bias',), SAME),
     ('visual.positional_embedding', ('img/pos_embedding',), LEAD1),
     ('visual.ln_post.weight', ('img/Transformer/encoder_norm/scale',), SAME),
     ('visual.ln_post.bias', ('img/Transformer/encoder_norm/bias',), SAME),
     (f'{_MAP_HEAD}.probe', ('img/MAPHead_0/probe',), LEAD1),
     (f'{_MAP_HEAD}.ln_2.weight', ('img/MAPHead_0/LayerNorm_0/scale',), SAME),
     (f'{_MAP_HEAD}.ln_2.bias', ('img/MAPHead_0/LayerNorm_0/bias',), SAME),
     *_bv_mlp(f'{_MAP_HEAD}.mlp', 'img/MAPHead_0/MlpBlock_0'),
     *_bv_attention(f'{_MAP_HEAD}.attn', 'img/MAPHead_0/MultiHeadDotProductAttention_0'),
     *_bv_block('visual.transformer.resblocks.{i}', 'img/Transformer/encoderblock_{i}'),
     ('token_embedding.weight', ('txt/Embed_0/embedding',), SAME),
     ('positional_embedding', ('txt/pos_embedding',), LEAD1),
     *_bv_block('transformer.resblocks.{i}', 'txt/Encoder_0/encoderblock_{i}'),
     ('ln_final.weight', ('txt/Encoder_0/encoder_norm/scale',), SAME),
     ('ln_final.bias', ('txt/Encoder_0/encoder_norm/bias',), SAME),
     ('text_projection.weight', ('txt/head/kernel',), TRANSPOSE),
     ('text_projection.bias', ('txt/head/bias',), SAME),
     ('logit_scale', ('t',), LEAD1), ('logit_bias', ('b',), LEAD1)])

_PLACEHOLDERS = {'i': r'\d+', 'rest': r'.+', 'text': _TEXT_KEYS + r'(\..+)?'}


def _pattern(template):
  out, pos = '', 0
  for m in re.finditer(r'\{(\w+)\}', template):
    out += re.escape(template[pos:m.start()]) + f'(?P<{m.group(1)}>{_PLACEHOLDERS[m.group(1)]})'
    pos = m.end()
  return re.compile(out + re.escape(template[pos:]))


def _fill(template, groups):
  return template.format(**groups)


def _apply(table, source, forward, strict, ignored=None):
  """Every key of `source` matched by a row goes through its transform; with `strict`, a key
  no row matches is an error, otherwise it is passed through unchanged."""
  out, used = {}, set()
  for ours, theirs, transform in table:
    pattern = _pattern(theirs[0] if forward else ours)
    for key in sorted(source):
      m = pattern.fullmatch(key)
      if not m:
        continue
      groups = m.groupdict()
      if forward:
        names = [_fill(t, groups) for t in theirs]
        absent = [n for n in names if n not in source]
        if absent:
          raise ConversionError(f'{key} needs {absent} as well, which the file lacks')
        out[_fill(ours, groups)] = transform.load([np.asarray(source[n]) for n in names])
        used.update(names)
      else:
        if transform.save is None:
          raise ConversionError(f'this layout can be read but not written ({key})')
        names = [_fill(t, groups) for t in theirs]
        out.update(zip(names, transform.save(np.asarray(source[key]))))
        used.add(key)
  rest = {k: v for k, v in source.items()
          if k not in used and not (ignored and ignored.fullmatch(k))}
  if strict and rest:
    raise ConversionError(f'{len(rest)} keys with no place in this layout: {sorted(rest)[:20]}')
  out.update(rest)
  return out


def to_ours(foreign, table, strict=True, ignored=None):
  """`{foreign key: array}` -> `{our key: array}` through `table`."""
  return _apply(table, foreign, True, strict, ignored)


def to_theirs(ours, table, strict=True):
  """`{our key: array}` -> the foreign layout of `table` (the inverse of `to_ours`)."""
  return _apply(table, ours, False, strict)


def unstack_big_vision(flat):
  """big_vision's scanned encoders (`encoderblock/...` with a leading layer axis) -> one key
  per layer (`encoderblock_{i}/...`), the layout its unscanned checkpoints have."""
  out = {}
  for key, value in flat.items():
    m = re.fullmatch(r'(.*/)encoderblock/(.*)', key)
    if m:
      for i, layer in enumerate(np.asarray(value)):
        out[f'{m.group(1)}encoderblock_{i}/{m.group(2)}'] = layer
    else:
      out[key] = value
  return out
