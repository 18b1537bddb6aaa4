"""Export to the formats the families came from: an open_clip checkpoint folder, and Hugging Face
`CLIPModel` / `SiglipModel` folders that the peer libraries load with strict semantics.

Only what the peer library runs exactly is written: a config with an option it lacks raises,
naming the option. Files are written to a temporary name and renamed (never half a file).
"""
import dataclasses
import json
import os
import tempfile

import jax
import numpy as np

from clip import convert
from clip import model
from clip import weights

_ACT_TO_HF = {'quick_gelu': 'quick_gelu', 'gelu': 'gelu', 'gelu_tanh': 'gelu_pytorch_tanh'}


class ExportError(ValueError):
  """A model the target library cannot run exactly."""


def _flat_numpy(params):
  return {k: np.array(jax.device_get(v), order="C")
          for k, v in weights.flatten(model.unstack_layers(params)).items()}


def _atomic_write(path, write):
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix='.part')
  os.close(fd)
  try:
    write(tmp)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def _write_json(path, obj):
  def write(tmp):
    with open(tmp, 'w') as f:
      json.dump(obj, f, indent=2)
  _atomic_write(path, write)


def _write_safetensors(path, flat):
  from safetensors import numpy as st_numpy  # pylint: disable=g-import-not-at-top
  _atomic_write(path, lambda tmp: st_numpy.save_file(flat, tmp))


def _require(ok, what, target):
  if not ok:
    raise ExportError(f'{target} cannot run this model exactly: {what}')


def _require_two_towers(cfg, target):
  _require(cfg.text is not None and cfg.decoder is None,
           'a captioning decoder or a model without a text tower (clip.to_torch_state_dict '
           'exports every weight, text_decoder.* included)', target)


def _default_block(tower, target, allowed_mlps):
  _require(tower.norm == 'layernorm' and tower.norm_placement == 'pre' and not tower.qk_norm
           and tower.bias, f'{tower.norm} / {tower.norm_placement} / qk_norm={tower.qk_norm} / '
           f'bias={tower.bias} blocks', target)
  _require(tower.mlp in allowed_mlps, f'mlp={tower.mlp!r} (supported: {allowed_mlps})', target)


def _mlp_ratio(width, hidden):
  """A float that open_clip's `int(width * mlp_ratio)` turns back into `hidden`."""
  ratio = hidden / width
  while int(width * ratio) < hidden:
    ratio = np.nextafter(ratio, np.inf)
  return float(ratio)


# ---------------------------------------------------------------- open_clip

def open_clip_model_cfg(cfg):
  """Our CLIPConfig -> open_clip's `model_cfg` dict (OpenAI-architecture towers, QuickGELU or
  exact GELU in both, any head width and MLP ratio)."""
  v, t = cfg.vision, cfg.text
  target = 'open_clip'
  _require_two_towers(cfg, target)
  _default_block(t, target, ('quick_gelu', 'gelu'))
  _require(t.pool == 'eot' and t.causal and t.pos_embedding == 'learned' and t.projection
           and not t.projection_bias and t.norm_eps is None, 'a non-OpenAI text tower', target)
  _require(not cfg.logit_bias, 'a logit bias on an OpenAI-architecture CLIP', target)
  _require(t.eot_id == t.vocab_size - 1, f'pooling at token {t.eot_id} (open_clip pools at the '
           f'largest id, {t.vocab_size - 1})', target)
  vision_cfg = {'image_size': v.image_resolution, 'layers': v.layers, 'width': v.width}
  if v.arch == 'vit':
    _default_block(v, target, (t.mlp,))
    _require(v.pool == 'cls' and v.pos_embedding == 'learned' and not v.registers and v.ln_pre
             and not v.patch_bias and v.projection and v.norm_eps is None,
             'ViT options outside OpenAI\'s architecture', target)
    vision_cfg.update(patch_size=v.patch_size, head_width=v.width // v.heads,
                      mlp_ratio=_mlp_ratio(v.width, v.hidden_dim))
  else:
    _require(v.heads == v.width * 32 // 64, f'{v.heads} attention-pool heads (open_clip '
             'derives width * 32 // 64)', target)
    vision_cfg.update(layers=list(v.layers), patch_size=None)
  text_cfg = {'context_length': t.context_length, 'vocab_size': t.vocab_size, 'width': t.width,
              'heads': t.heads, 'layers': t.layers, 'mlp_ratio': _mlp_ratio(t.width, t.hidden_dim)}
  out = {'embed_dim': cfg.embed_dim, 'vision_cfg': vision_cfg, 'text_cfg': text_cfg}
  if t.mlp == 'quick_gelu':
    out['quick_gelu'] = True
  return out


def save_open_clip(params, cfg, folder):
  """Writes `open_clip_config.json` and `open_clip_model.safetensors` into `folder`, the layout
  of open_clip's hub folders: `open_clip.create_model('local-dir:<folder>')` loads it (open_clip
  >= 2.23). Returns the two paths."""
  model_cfg = open_clip_model_cfg(cfg)
  flat = _flat_numpy(params)
  config_path = os.path.join(folder, 'open_clip_config.json')
  weights_path = os.path.join(folder, 'open_clip_model.safetensors')
  _write_safetensors(weights_path, flat)
  _write_json(config_path, {'model_cfg': model_cfg, 'preprocess_cfg': {}})
  return config_path, weights_path


# ---------------------------------------------------------------- Hugging Face

def _hf_tower(tower, eps_default):
  eps = tower.norm_eps or eps_default
  return {'hidden_size': tower.width, 'intermediate_size': tower.hidden_dim,
          'num_hidden_layers': tower.layers, 'num_attention_heads': tower.heads,
          'hidden_act': _ACT_TO_HF[tower.mlp], 'layer_norm_eps': eps}


def hf_config(cfg):
  """Our CLIPConfig -> a Hugging Face `config.json` dict (`CLIPModel` for OpenAI's ViT
  architecture, `SiglipModel` for SigLIP's)."""
  v, t = cfg.vision, cfg.text
  target = 'Hugging Face'
  _require_two_towers(cfg, target)
  _require(v.arch == 'vit', 'a ModifiedResNet image tower', target)
  for tower in (v, t):
    _default_block(tower, target, tuple(_ACT_TO_HF))
  if cfg.logit_bias:
    siglip = dataclasses.replace(
        v, pool='map', ln_pre=False, patch_bias=True, projection=False, pos_embedding='learned',
        registers=0, pool_heads=None)
    _require(v == siglip, 'a SigLIP image tower other than HF SiglipVisionModel\'s', target)
    _require(t.pool == 'last' and not t.causal and not t.mask_padding and t.projection_bias
             and t.pos_embedding == 'learned', 'a SigLIP text tower other than HF\'s', target)
    text = dict(_hf_tower(t, 1e-5), max_position_embeddings=t.context_length,
                vocab_size=t.vocab_size, projection_size=cfg.embed_dim)
    vision = dict(_hf_tower(v, 1e-5), image_size=v.image_resolution, patch_size=v.patch_size,
                  vision_use_head=True)
    return {'model_type': 'siglip', 'architectures': ['SiglipModel'], 'text_config': text,
            'vision_config': vision}
  _require(v.pool == 'cls' and v.ln_pre and not v.patch_bias and v.projection and not v.registers
           and v.pos_embedding == 'learned', 'ViT options outside OpenAI\'s architecture', target)
  _require(t.pool == 'eot' and t.causal and t.projection and not t.projection_bias
           and t.pos_embedding == 'learned', 'a non-OpenAI text tower', target)
  # Any eos_token_id but 2 (transformers' legacy argmax) pools at its first occurrence, as ours.
  _require(t.eot_id != 2, 'an end-of-text id of 2 (transformers reads it as its legacy argmax '
           'pooling)', target)
  text = dict(_hf_tower(t, 1e-5), max_position_embeddings=t.context_length,
              vocab_size=t.vocab_size, eos_token_id=t.eot_id)
  vision = dict(_hf_tower(v, 1e-5), image_size=v.image_resolution, patch_size=v.patch_size)
  return {'model_type': 'clip', 'architectures': ['CLIPModel'], 'text_config': text,
          'vision_config': vision, 'projection_dim': cfg.embed_dim}


def to_hf_state_dict(params, cfg):
  """Our params -> `{Hugging Face key: numpy array}` of the model `hf_config(cfg)` describes."""
  table = convert.HF_SIGLIP if hf_config(cfg)['model_type'] == 'siglip' else convert.HF_CLIP
  return convert.to_theirs(_flat_numpy(params), table)


def save_hf(params, cfg, folder):
  """Writes `config.json` and `model.safetensors` into `folder`; `transformers.CLIPModel` /
  `SiglipModel.from_pretrained(folder)` loads it with no missing or unexpected weights. Returns
  the two paths."""
  config = hf_config(cfg)
  flat = {k: np.array(v, order="C") for k, v in to_hf_state_dict(params, cfg).items()}
  config_path, weights_path = (os.path.join(folder, 'config.json'),
                               os.path.join(folder, 'model.safetensors'))
  _write_safetensors(weights_path, flat)
  _write_json(config_path, config)
  return config_path, weights_path
