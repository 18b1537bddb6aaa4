"""Export to the formats the families came from: an open_clip checkpoint folder, and Hugging Face
`CLIPModel` / `SiglipModel` folders that the peer libraries load with strict semantics.

A model is its weights, its tokenizer and its image preprocessing, so every export carries all
three (`cfg.tokenizer`, `cfg.preprocess`) in the peer's own files: a peer loading the folder
tokenises and prepares images as `clip.get_tokenizer(cfg)` and `clip.preprocess_images` do.

Only what the peer library runs exactly is written: a config with an option it lacks raises,
naming the option (a tokenizer or a resize mode the peer runs differently included). Files are
written to a temporary name and renamed (never half a file); nothing is written when the export
is refused.
"""
import dataclasses
import gzip
import json
import os
import shutil
import warnings

import jax
import numpy as np
import sentencepiece

from clip.formats import files
from clip.formats import convert
from clip import model
from clip import processing
from clip import tokenizer as openai_tokenizer
from clip.formats import weights

_ACT_TO_HF = {'quick_gelu': 'quick_gelu', 'gelu': 'gelu', 'gelu_tanh': 'gelu_pytorch_tanh'}


class ExportError(ValueError):
  """A model the target library cannot run exactly."""


class ExportWarning(UserWarning):
  """An export whose peer library prepares some images differently (the message says which)."""


def _warn_pixels(target, differences):
  if differences:  # stacklevel: the user's save_hf / save_open_clip call
    warnings.warn(f'{target} prepares some images differently from this model: '
                  + '; '.join(differences), ExportWarning, stacklevel=4)


def _flat_numpy(params):
  return {k: np.array(jax.device_get(v), order="C")
          for k, v in weights.flatten(model.unstack_layers(params)).items()}


def _write_json(path, obj):
  def write(tmp):
    with open(tmp, 'w', encoding='utf-8') as f:
      json.dump(obj, f, indent=2)
  files.atomic_write(path, write)


def _write_text(path, text):
  def write(tmp):
    with open(tmp, 'w', encoding='utf-8') as f:
      f.write(text)
  files.atomic_write(path, write)


def _copy(src, path):
  files.atomic_write(path, lambda tmp: shutil.copyfile(src, tmp))


# The files transformers' AutoTokenizer reads; an export writes its own and removes the others,
# left by an earlier export or model in the folder, so that the folder states one tokenizer.
_TOKENIZER_FILES = ('tokenizer_config.json', 'tokenizer.json', 'special_tokens_map.json',
                    'added_tokens.json', 'vocab.json', 'merges.txt', 'spiece.model',
                    'tokenizer.model')


def _write_processing_files(folder, files):
  """`files`: {name: dict (JSON), str (text) or ('copy', source path)}; stale tokenizer files
  are removed."""
  for name, content in files.items():
    path = os.path.join(folder, name)
    if isinstance(content, dict):
      _write_json(path, content)
    elif isinstance(content, tuple):
      _copy(content[1], path)
    else:
      _write_text(path, content)
  for name in set(_TOKENIZER_FILES) - set(files):
    if os.path.isfile(os.path.join(folder, name)):
      os.remove(os.path.join(folder, name))


def _write_safetensors(path, flat):
  from safetensors import numpy as st_numpy  # pylint: disable=g-import-not-at-top
  files.atomic_write(path, lambda tmp: st_numpy.save_file(flat, tmp))


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


# ---------------------------------------------------------------- tokenizer and preprocessing

def _tokenizer(cfg, target):
  """`clip.get_tokenizer(cfg)`, the tokenizer an export hands the peer; None for OpenAI's BPE,
  the default, on a model it does not fit (whose tokenizer is then not known: none is written).
  An unknown tokenizer, a SentencePiece kind without its file, or one whose ids are not the
  model's is an ExportError: a peer would tokenise differently."""
  try:
    return processing.get_tokenizer(cfg)
  except processing.TokenizerError as e:
    if cfg.tokenizer.kind == 'openai':
      return None
    error = e
  except (ValueError, OSError) as e:  # a model_file that is missing or not SentencePiece
    error = e
  raise ExportError(f'{target} export writes the model\'s tokenizer beside its weights, and '
                    f'this one cannot be written: {error}')


def _require_clean(tok, clean, peer, target):
  if tok.config.clean != clean:
    raise ExportError(
        f'{target} cannot tokenise as this model does: its tokenizer cleans text with '
        f'clean={tok.config.clean!r}, and {peer} cleans it as clean={clean!r}. Export with that '
        f'cleaning: cfg = dataclasses.replace(cfg, tokenizer=dataclasses.replace(cfg.tokenizer, '
        f'clean={clean!r})), if the model was trained with it')


def _special_pieces(tok):
  """The strings of a SentencePiece tokenizer's end, padding and unknown ids, as transformers'
  tokenizer_config.json names them."""
  sp = sentencepiece.SentencePieceProcessor(model_file=tok.config.model_file)
  return {'eos_token': sp.id_to_piece(tok.eot_id), 'pad_token': sp.id_to_piece(tok.pad_id),
          'unk_token': sp.id_to_piece(sp.unk_id())}


def _sentencepiece_files(tok, file_name, tokenizer_config):
  return {file_name: ('copy', tok.config.model_file),
          'tokenizer_config.json': {**tokenizer_config, **_special_pieces(tok),
                                    'model_max_length': tok.context_length}}


# How open_clip's `SigLipTokenizer` builds the transformers tokenizer it saves into its SigLIP
# (T5: no sentinel ids, '</s>' pads) and SigLIP 2 (Gemma: no BOS, EOS appended, right padding) hub
# folders; its `HFTokenizer` loads them with AutoTokenizer after its own cleaning.
_OPEN_CLIP_SENTENCEPIECE = {
    'siglip': ('spiece.model', {'tokenizer_class': 'T5Tokenizer', 'extra_ids': 0,
                                'legacy': False}),
    'siglip2': ('tokenizer.model', {'tokenizer_class': 'GemmaTokenizer', 'add_bos_token': False,
                                    'add_eos_token': True, 'padding_side': 'right',
                                    'legacy': False}),
}
# transformers' own SigLIP tokenizers, their cleaning built in: `SiglipTokenizer` ('siglip': lower
# case, punctuation removed) and `Siglip2Tokenizer` (Gemma behind a Lowercase normalizer, set up
# as SigLIP 2 was trained: no BOS, EOS appended, right padding).
# `model_input_names=['input_ids']` as the released hub folders have it: with an attention mask
# transformers' SiglipModel would mask the padding, which SigLIP attends to (and was trained so).
_HF_SENTENCEPIECE = {
    'siglip': ('siglip', 'spiece.model', {'tokenizer_class': 'SiglipTokenizer',
                                          'model_input_names': ['input_ids']}),
    'siglip2': ('lower', 'tokenizer.model', {'tokenizer_class': 'Siglip2Tokenizer',
                                             'add_bos_token': False, 'add_eos_token': True,
                                             'padding_side': 'right',
                                             'model_input_names': ['input_ids']}),
}


def _openai_bpe_files(context_length):
  """vocab.json, merges.txt and tokenizer_config.json of transformers' CLIPTokenizer, from the
  bundled vocabulary. Special tokens as OpenAI's Hugging Face repositories have them: its
  rows are padded with '<|endoftext|>' (49407) where ours (OpenAI's `clip.tokenize`) are padded
  with 0, which changes nothing the model computes (both pool at the first end-of-text token,
  and the causal text tower's earlier positions never see the padding). Padding with '!' (id 0)
  instead would make it a special token, which transformers then cuts out of the text ('!!!' is
  one BPE token, not three)."""
  symbols = openai_tokenizer.default_tokenizer().symbols
  with gzip.open(openai_tokenizer.VOCAB_PATH, 'rt', encoding='utf-8') as f:
    merges = f.read().split('\n')[1:openai_tokenizer.NUM_MERGES + 1]
  eot, sot = symbols[openai_tokenizer.EOT], symbols[openai_tokenizer.SOT]
  return {'vocab.json': {symbol: i for i, symbol in enumerate(symbols)},
          'merges.txt': '#version: 0.2\n' + '\n'.join(merges) + '\n',
          'tokenizer_config.json': {'tokenizer_class': 'CLIPTokenizer',
                                    'model_max_length': context_length, 'bos_token': sot,
                                    'eos_token': eot, 'unk_token': eot, 'pad_token': eot,
                                    'do_lower_case': True, 'errors': 'replace',
                                    'add_prefix_space': False}}


def open_clip_preprocess_cfg(cfg):
  """`cfg.preprocess` -> open_clip's `preprocess_cfg` dict (its `PreprocessCfg` fields), which
  `create_model_and_transforms` builds its eval transform from."""
  pp = cfg.preprocess
  _warn_pixels('open_clip', [what for what in (
      pp.convert_first and 'it resizes in the image\'s own mode and drops transparency after, '
      'where this model converts to RGB on white first (transformers\' do_convert_rgb)',
      pp.crop_rounding == 'floor' and 'its centre crop rounds half the overhang where this '
      'model\'s floors it (one pixel apart when the overhang is 3 modulo 4)') if what])
  return {'size': cfg.image_resolution, 'mode': 'RGB', 'mean': list(pp.mean), 'std': list(pp.std),
          'interpolation': pp.interpolation, 'resize_mode': pp.resize_mode,
          'fill_color': pp.fill_color}


_HF_RESAMPLE = {'bilinear': 2, 'bicubic': 3}  # PIL's filter numbers, as transformers stores them


def hf_preprocessor_config(cfg, model_type):
  """`cfg.preprocess` -> transformers' `preprocessor_config.json` dict: `CLIPImageProcessor` for
  OpenAI's resize (short side to the resolution, centre crop) and, on a `CLIPModel`, for a squash;
  `SiglipImageProcessor` for a squash on a `SiglipModel`. transformers has no resize that keeps
  the aspect ratio and pads ('longest'): ExportError."""
  pp, r = cfg.preprocess, cfg.image_resolution
  if pp.resize_mode == 'longest':
    raise ExportError('Hugging Face cannot prepare images as this model does: resize_mode='
                      '\'longest\' (long side to the resolution, then padding), which neither '
                      'CLIPImageProcessor nor SiglipImageProcessor does')
  _warn_pixels('Hugging Face', [what for what in (
      not pp.convert_first and 'it converts to RGB on white before resizing, where this model '
      'resizes in the image\'s own mode and converts after (images with transparency, palette, '
      '1-bit and 16-bit images differ; CMYK by a level or two)',
      pp.crop_rounding == 'round' and pp.resize_mode == 'shortest' and 'its CLIPImageProcessor '
      'centre-crops at the floor of half the overhang where this model rounds it (one pixel '
      'apart when the overhang is 3 modulo 4)') if what])
  # do_convert_rgb=False would not run this model's conversion either (transformers then refuses
  # images that are not RGB): converting first is the nearest transformers does.
  out = {'do_resize': True, 'resample': _HF_RESAMPLE[pp.interpolation], 'do_rescale': True,
         'rescale_factor': 1 / 255, 'do_normalize': True, 'image_mean': list(pp.mean),
         'image_std': list(pp.std), 'do_convert_rgb': True}
  if pp.resize_mode == 'shortest':
    return {'image_processor_type': 'CLIPImageProcessor', **out, 'size': {'shortest_edge': r},
            'do_center_crop': True, 'crop_size': {'height': r, 'width': r}}
  square = {'size': {'height': r, 'width': r}}
  if model_type == 'siglip':
    return {'image_processor_type': 'SiglipImageProcessor', **out, **square}
  return {'image_processor_type': 'CLIPImageProcessor', **out, **square, 'do_center_crop': False}


# ---------------------------------------------------------------- open_clip

def open_clip_model_cfg(cfg):
  """Our CLIPConfig -> open_clip's `model_cfg` dict (OpenAI-architecture towers, QuickGELU or
  exact GELU in both, any head width and MLP ratio; pooled at the end-of-text id, open_clip's
  `pool_type='eos'` where that is not the vocabulary's last id). The tokenizer keys are
  `save_open_clip`'s."""
  v, t = cfg.vision, cfg.text
  target = 'open_clip'
  _require_two_towers(cfg, target)
  _default_block(t, target, ('quick_gelu', 'gelu'))
  _require(t.pool == 'eot' and t.causal and t.pos_embedding == 'learned' and t.projection
           and not t.projection_bias and t.norm_eps is None, 'a non-OpenAI text tower', target)
  _require(not cfg.logit_bias, 'a logit bias on an OpenAI-architecture CLIP', target)
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
  if t.eot_id != t.vocab_size - 1:
    # open_clip's default 'argmax' pools at each row's largest id; 'eos' at the first `eos_id`,
    # as ours (a SentencePiece vocabulary ends rows with id 1).
    text_cfg.update(pool_type='eos', eos_id=t.eot_id)
  out = {'embed_dim': cfg.embed_dim, 'vision_cfg': vision_cfg, 'text_cfg': text_cfg}
  if t.mlp == 'quick_gelu':
    out['quick_gelu'] = True
  return out


def save_open_clip(params, cfg, folder, hf_tokenizer_name=None):
  """Writes `open_clip_config.json` and `open_clip_model.safetensors` into `folder`, the layout
  of open_clip's hub folders: `open_clip.create_model_and_transforms('local-dir:<folder>')` loads
  the model and its image transform, `open_clip.get_tokenizer('local-dir:<folder>')` its tokenizer
  (open_clip >= 2.23; a SentencePiece tokenizer needs transformers there, and a model pooling at an
  end-of-text id other than its vocabulary's last is written with `pool_type='eos'`, which recent
  open_clip reads, 3.3.0 as tested). Returns the config's and the weights' paths.

  Processing: `preprocess_cfg` holds `cfg.preprocess` (size, mode, mean, std, interpolation,
  resize_mode, fill_color). OpenAI's BPE is open_clip's default tokenizer: nothing more is written.
  A SigLIP / SigLIP 2 SentencePiece tokenizer is written as open_clip's SigLIP folders hold it:
  `text_cfg.hf_tokenizer_name` (`hf_tokenizer_name`: where `hf-hub:` loads read the tokenizer, the
  Hub repository the folder is uploaded to; default the folder's absolute path; `local-dir:` loads
  read the folder itself), `tokenizer_kwargs={'clean': 'canonicalize'}`, the `.model` file
  (`spiece.model` / `tokenizer.model`) and transformers' `tokenizer_config.json` (T5 / Gemma, set
  up as open_clip's `SigLipTokenizer`). open_clip cleans SentencePiece text only its own way, so a
  tokenizer with another `clean` raises ExportError, as does one that is unknown or has no file.
  Tokenizer files another tokenizer left in the folder are removed.
  """
  model_cfg = open_clip_model_cfg(cfg)
  tok = _tokenizer(cfg, 'open_clip')
  files = {}
  if tok is not None and tok.config.kind != 'openai':
    _require_clean(tok, 'canonicalize', 'open_clip\'s HFTokenizer', 'open_clip')
    name, tokenizer_config = _OPEN_CLIP_SENTENCEPIECE[tok.config.kind]
    files = _sentencepiece_files(tok, name, tokenizer_config)
    model_cfg['text_cfg'].update(
        hf_tokenizer_name=hf_tokenizer_name or os.path.abspath(os.fspath(folder)),
        tokenizer_kwargs={'clean': 'canonicalize'})
  config = {'model_cfg': model_cfg, 'preprocess_cfg': open_clip_preprocess_cfg(cfg)}
  flat = _flat_numpy(params)
  config_path = os.path.join(folder, 'open_clip_config.json')
  weights_path = os.path.join(folder, 'open_clip_model.safetensors')
  _write_safetensors(weights_path, flat)
  _write_processing_files(folder, files)
  _write_json(config_path, config)
  return config_path, weights_path


# ---------------------------------------------------------------- Hugging Face

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
  _require_two_towers(cfg, target)
  _require(v.arch == 'vit', 'a ModifiedResNet image tower', target)
  for tower in (v, t):
    _default_block(tower, target, tuple(_ACT_TO_HF))
  if cfg.logit_bias:
    siglip = dict(pool='map', ln_pre=False, patch_bias=True, projection=False,
                  pos_embedding='learned', registers=0, pool_heads=None)
    other = {k: getattr(v, k) for k, want in siglip.items() if getattr(v, k) != want}
    _require(not other, f'a SigLIP image tower other than HF SiglipVisionModel\'s ({other}; it '
             f'has {siglip})', target)
    _require(t.pool == 'last' and not t.causal and not t.mask_padding and t.projection_bias
             and t.pos_embedding == 'learned', 'a SigLIP text tower other than HF\'s', target)
    text = dict(_hf_tower(t, 1e-5), max_position_embeddings=t.context_length,
                vocab_size=t.vocab_size, projection_size=cfg.embed_dim, **_siglip_text_ids(cfg))
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


def hf_tokenizer_files(cfg):
  """{file name: content} of the model's tokenizer for transformers' AutoTokenizer: OpenAI's BPE
  as `CLIPTokenizer` (vocab.json, merges.txt, tokenizer_config.json; none for a model it does not
  fit), SigLIP's as `SiglipTokenizer` (spiece.model), SigLIP 2's as `Siglip2Tokenizer`
  (tokenizer.model), each with its tokenizer_config.json. A cleaning transformers' tokenizer does
  not do (open_clip's 'canonicalize'), an unknown tokenizer or one without its file: ExportError."""
  tok = _tokenizer(cfg, 'Hugging Face')
  if tok is None:
    return {}
  if tok.config.kind == 'openai':
    return _openai_bpe_files(tok.context_length)
  clean, name, tokenizer_config = _HF_SENTENCEPIECE[tok.config.kind]
  _require_clean(tok, clean, f'transformers\' {tokenizer_config["tokenizer_class"]}',
                 'Hugging Face')
  return _sentencepiece_files(tok, name, tokenizer_config)


def save_hf(params, cfg, folder):
  """Writes `config.json` and `model.safetensors` into `folder`; `transformers.CLIPModel` /
  `SiglipModel.from_pretrained(folder)` loads it with no missing or unexpected weights. Returns
  the two paths.

  Processing, for `AutoProcessor` / `AutoImageProcessor` / `AutoTokenizer.from_pretrained(folder)`:
  `preprocessor_config.json` (`hf_preprocessor_config`) and the tokenizer's files
  (`hf_tokenizer_files`; those another tokenizer left in the folder are removed), called with
  `padding='max_length', max_length=<context length>, truncation=True` as SigLIP's model cards
  do. Differences that are transformers' own: its CLIP tokenizer pads rows with the end-of-text
  id where ours pad with 0 (the model's outputs are the same) and runs no ftfy or HTML
  unescaping; its image processors convert to RGB on white first and its CLIPImageProcessor
  centre-crops at the floor of half the overhang, which a model loaded from a Hugging Face folder
  does too (`PreprocessConfig.convert_first`, `crop_rounding='floor'`) and OpenAI's and
  open_clip's transforms do not (an `ExportWarning` says so: transparent images differ, and the
  crop by one pixel when the overhang is 3 modulo 4); its default torchvision backend resizes
  tensors, not PIL images (`backend='pil'` resizes as we do)."""
  config = hf_config(cfg)
  files = {'preprocessor_config.json': hf_preprocessor_config(cfg, config['model_type']),
           **hf_tokenizer_files(cfg)}
  flat = {k: np.array(v, order="C") for k, v in to_hf_state_dict(params, cfg).items()}
  config_path, weights_path = (os.path.join(folder, 'config.json'),
                               os.path.join(folder, 'model.safetensors'))
  _write_safetensors(weights_path, flat)
  _write_processing_files(folder, files)
  _write_json(config_path, config)
  return config_path, weights_path
