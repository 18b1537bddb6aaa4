"""big_vision's SigLIP `.npz`: its parameters (flax names, `(in, out)` kernels, `(D, heads,
head_dim)` attention kernels, HWIO patch kernels; scanned encoders unstacked) read into our keys
as transformers' `convert_siglip_to_hf.py` maps them (import only), its head counts read from its
attention kernels, and its processing (no files beside the weights: SigLIP's known settings).
"""
import re

import numpy as np

from clip import configs
from clip.formats import keys
from clip.formats import siglip
from clip.formats.keys import LEAD1
from clip.formats.keys import MAP_HEAD
from clip.formats.keys import SAME
from clip.formats.keys import TRANSPOSE
from clip.formats.keys import Transform

# big_vision (flax): conv kernels HWIO; attention kernels (D, heads, head_dim), out (heads, hd, D).
BV_CONV = Transform(lambda a: a[0].transpose(3, 2, 0, 1))
BV_QKV = Transform(lambda a: np.concatenate([k.reshape(k.shape[0], -1).T for k in a], axis=0))
BV_QKV_BIAS = Transform(lambda a: np.concatenate([b.reshape(-1) for b in a], axis=0))
BV_OUT = Transform(lambda a: a[0].reshape(-1, a[0].shape[-1]).T)


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


TABLE = tuple(
    [('visual.conv1.weight', ('img/embedding/kernel',), BV_CONV),
     ('visual.conv1.bias', ('img/embedding/bias',), SAME),
     ('visual.positional_embedding', ('img/pos_embedding',), LEAD1),
     ('visual.ln_post.weight', ('img/Transformer/encoder_norm/scale',), SAME),
     ('visual.ln_post.bias', ('img/Transformer/encoder_norm/bias',), SAME),
     (f'{MAP_HEAD}.probe', ('img/MAPHead_0/probe',), LEAD1),
     (f'{MAP_HEAD}.ln_2.weight', ('img/MAPHead_0/LayerNorm_0/scale',), SAME),
     (f'{MAP_HEAD}.ln_2.bias', ('img/MAPHead_0/LayerNorm_0/bias',), SAME),
     *_bv_mlp(f'{MAP_HEAD}.mlp', 'img/MAPHead_0/MlpBlock_0'),
     *_bv_attention(f'{MAP_HEAD}.attn', 'img/MAPHead_0/MultiHeadDotProductAttention_0'),
     *_bv_block('visual.transformer.resblocks.{i}', 'img/Transformer/encoderblock_{i}'),
     ('token_embedding.weight', ('txt/Embed_0/embedding',), SAME),
     ('positional_embedding', ('txt/pos_embedding',), LEAD1),
     *_bv_block('transformer.resblocks.{i}', 'txt/Encoder_0/encoderblock_{i}'),
     ('ln_final.weight', ('txt/Encoder_0/encoder_norm/scale',), SAME),
     ('ln_final.bias', ('txt/Encoder_0/encoder_norm/bias',), SAME),
     ('text_projection.weight', ('txt/head/kernel',), TRANSPOSE),
     ('text_projection.bias', ('txt/head/bias',), SAME),
     ('logit_scale', ('t',), LEAD1), ('logit_bias', ('b',), LEAD1)])


def heads(raw):
  """(vision heads, text heads) from big_vision's (D, heads, head_dim) query kernels."""
  def heads_under(prefix):
    for k, v in raw.items():
      query = r'encoderblock(_0)?/MultiHeadDotProductAttention_0/query/kernel'
      if re.fullmatch(prefix + query, k):
        return v.shape[-2]
    raise ValueError(f'no attention kernel under {prefix}')
  return heads_under(r'img/Transformer/'), heads_under(r'txt/Encoder_0/')


def unstack(flat):
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


def to_ours(raw):
  """big_vision's flat `.npz` parameters (`params/` dropped) -> our keys."""
  return keys.to_ours(unstack(raw), TABLE)


def processing(vocab_size):
  """(TokenizerConfig, PreprocessConfig, assumptions) of a `.npz`, which ships no files beside
  it: SigLIP's tokenizer kind for its vocabulary (`vocab_size`) and open_clip's SigLIP
  preprocessing (big_vision itself resizes with TensorFlow's bilinear)."""
  return (configs.TokenizerConfig(siglip.kind_from_vocab(vocab_size)),
          siglip.SIGLIP_PREPROCESS,
          [('preprocess', 'SigLIP\'s preprocessing as open_clip runs it (squash, PIL bicubic, '
            'mean and std 0.5; big_vision itself resizes with TensorFlow\'s bilinear)')])
