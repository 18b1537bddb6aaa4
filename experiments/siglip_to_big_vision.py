"""A Hugging Face SigLIP written as big_vision writes its checkpoints: big_vision's names and flax
layouts in an `.npz`, the inverse of transformers' `convert_siglip_to_hf.py`. The checkpoint
families table (`experiments/checkpoint_families.py`) and its tests load it back."""
import numpy as np


def _big_vision_block(out, sd, hf_prefix, bv_prefix, heads):
  attn = f'{bv_prefix}/MultiHeadDotProductAttention_0'
  for i in (0, 1):
    out[f'{bv_prefix}/LayerNorm_{i}/scale'] = sd[f'{hf_prefix}.layer_norm{i + 1}.weight']
    out[f'{bv_prefix}/LayerNorm_{i}/bias'] = sd[f'{hf_prefix}.layer_norm{i + 1}.bias']
    out[f'{bv_prefix}/MlpBlock_0/Dense_{i}/kernel'] = sd[f'{hf_prefix}.mlp.fc{i + 1}.weight'].T
    out[f'{bv_prefix}/MlpBlock_0/Dense_{i}/bias'] = sd[f'{hf_prefix}.mlp.fc{i + 1}.bias']
  for c, name in zip('qkv', ('query', 'key', 'value')):
    w_HDxD = sd[f'{hf_prefix}.self_attn.{c}_proj.weight']
    out[f'{attn}/{name}/kernel'] = w_HDxD.T.reshape(w_HDxD.shape[1], heads, -1)
    out[f'{attn}/{name}/bias'] = sd[f'{hf_prefix}.self_attn.{c}_proj.bias'].reshape(heads, -1)
  w_DxHD = sd[f'{hf_prefix}.self_attn.out_proj.weight']
  out[f'{attn}/out/kernel'] = w_DxHD.T.reshape(heads, -1, w_DxHD.shape[0])
  out[f'{attn}/out/bias'] = sd[f'{hf_prefix}.self_attn.out_proj.bias']


def _big_vision_map_head(out, sd, heads):
  head, bv = 'vision_model.head', 'img/MAPHead_0'
  out[f'{bv}/probe'] = sd[f'{head}.probe']
  out[f'{bv}/LayerNorm_0/scale'] = sd[f'{head}.layernorm.weight']
  out[f'{bv}/LayerNorm_0/bias'] = sd[f'{head}.layernorm.bias']
  for i in (0, 1):
    out[f'{bv}/MlpBlock_0/Dense_{i}/kernel'] = sd[f'{head}.mlp.fc{i + 1}.weight'].T
    out[f'{bv}/MlpBlock_0/Dense_{i}/bias'] = sd[f'{head}.mlp.fc{i + 1}.bias']
  ws = np.split(sd[f'{head}.attention.in_proj_weight'], 3)
  bs = np.split(sd[f'{head}.attention.in_proj_bias'], 3)
  for w, b, name in zip(ws, bs, ('query', 'key', 'value')):
    out[f'{bv}/MultiHeadDotProductAttention_0/{name}/kernel'] = w.T.reshape(w.shape[1], heads, -1)
    out[f'{bv}/MultiHeadDotProductAttention_0/{name}/bias'] = b.reshape(heads, -1)
  w = sd[f'{head}.attention.out_proj.weight']
  out[f'{bv}/MultiHeadDotProductAttention_0/out/kernel'] = w.T.reshape(heads, -1, w.shape[0])
  out[f'{bv}/MultiHeadDotProductAttention_0/out/bias'] = sd[f'{head}.attention.out_proj.bias']


def big_vision_npz(hf, path):
  """big_vision's names and flax layouts for `hf`'s weights: the inverse of transformers'
  convert_siglip_to_hf.py (kernels (in, out), attention (D, heads, head_dim) and
  (heads, head_dim, D), patch kernel HWIO, `t`/`b` of shape (1,))."""
  sd = {k: v.numpy() for k, v in hf.state_dict().items()}
  v, t = hf.config.vision_config, hf.config.text_config
  emb, txt = 'vision_model.embeddings', 'text_model'
  out = {'img/embedding/kernel': sd[f'{emb}.patch_embedding.weight'].transpose(2, 3, 1, 0),
         'img/embedding/bias': sd[f'{emb}.patch_embedding.bias'],
         'img/pos_embedding': sd[f'{emb}.position_embedding.weight'][None],
         'img/Transformer/encoder_norm/scale': sd['vision_model.post_layernorm.weight'],
         'img/Transformer/encoder_norm/bias': sd['vision_model.post_layernorm.bias'],
         'txt/Embed_0/embedding': sd[f'{txt}.embeddings.token_embedding.weight'],
         'txt/pos_embedding': sd[f'{txt}.embeddings.position_embedding.weight'][None],
         'txt/Encoder_0/encoder_norm/scale': sd[f'{txt}.final_layer_norm.weight'],
         'txt/Encoder_0/encoder_norm/bias': sd[f'{txt}.final_layer_norm.bias'],
         'txt/head/kernel': sd[f'{txt}.head.weight'].T, 'txt/head/bias': sd[f'{txt}.head.bias'],
         't': sd['logit_scale'], 'b': sd['logit_bias']}
  for i in range(v.num_hidden_layers):
    _big_vision_block(out, sd, f'vision_model.encoder.layers.{i}',
                      f'img/Transformer/encoderblock_{i}', v.num_attention_heads)
  for i in range(t.num_hidden_layers):
    _big_vision_block(out, sd, f'{txt}.encoder.layers.{i}', f'txt/Encoder_0/encoderblock_{i}',
                      t.num_attention_heads)
  _big_vision_map_head(out, sd, v.num_attention_heads)
  np.savez(path, **{f'params/{k}': a for k, a in out.items()})
