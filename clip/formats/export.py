"""What every export shares: its errors, its file writers (each through `files.atomic_write`:
never half a file) and its checks of what a peer library runs exactly. The writers themselves are
their families' (`open_clip_folder.save_open_clip`, `hf.save_hf`, `openai.to_torch_state_dict`).

A model is its weights, its tokenizer and its image preprocessing, so every export carries all
three (`cfg.tokenizer`, `cfg.preprocess`) in the peer's own files: a peer loading the folder
tokenises and prepares images as `clip.get_tokenizer(cfg)` and `clip.preprocess_images` do.

Only what the peer library runs exactly is written: a config with an option it lacks raises,
naming the option (a tokenizer or a resize mode the peer runs differently included); nothing is
written when the export is refused.
"""
import json
import os
import shutil
import warnings

import jax
import numpy as np
import sentencepiece
from safetensors import numpy as st_numpy

from clip import model
from clip import processing
from clip.formats import files


class ExportError(ValueError):
  """A model the target library cannot run exactly."""


class ExportWarning(UserWarning):
  """An export whose peer library prepares some images differently (the message says which)."""


def warn_pixels(target, differences):
  if differences:  # stacklevel: the user's save_hf / save_open_clip call
    warnings.warn(f'{target} prepares some images differently from this model: '
                  + '; '.join(differences), ExportWarning, stacklevel=4)


def flat_numpy(params):
  return {k: np.array(jax.device_get(v), order="C")
          for k, v in files.flatten(model.unstack_layers(params)).items()}


def write_json(path, obj):
  def write(tmp):
    with open(tmp, 'w', encoding='utf-8') as f:
      json.dump(obj, f, indent=2)
  files.atomic_write(path, write)


def write_text(path, text):
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


def write_processing_files(folder, contents):
  """`contents`: {name: dict (JSON), str (text) or ('copy', source path)}; stale tokenizer files
  are removed."""
  for name, content in contents.items():
    path = os.path.join(folder, name)
    if isinstance(content, dict):
      write_json(path, content)
    elif isinstance(content, tuple):
      _copy(content[1], path)
    else:
      write_text(path, content)
  for name in set(_TOKENIZER_FILES) - set(contents):
    if os.path.isfile(os.path.join(folder, name)):
      os.remove(os.path.join(folder, name))


def write_safetensors(path, flat):
  files.atomic_write(path, lambda tmp: st_numpy.save_file(flat, tmp))


def require(ok, what, target):
  if not ok:
    raise ExportError(f'{target} cannot run this model exactly: {what}')


def require_two_towers(cfg, target):
  require(cfg.text is not None and cfg.decoder is None,
          'a captioning decoder or a model without a text tower (clip.to_torch_state_dict '
          'exports every weight, text_decoder.* included)', target)


def default_block(tower, target, allowed_mlps):
  require(tower.norm == 'layernorm' and tower.norm_placement == 'pre' and not tower.qk_norm
          and tower.bias, f'{tower.norm} / {tower.norm_placement} / qk_norm={tower.qk_norm} / '
          f'bias={tower.bias} blocks', target)
  require(tower.mlp in allowed_mlps, f'mlp={tower.mlp!r} (supported: {allowed_mlps})', target)


# ---------------------------------------------------------------- tokenizer and preprocessing

def model_tokenizer(cfg, target):
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


def require_clean(tok, clean, peer, target):
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


def sentencepiece_files(tok, file_name, tokenizer_config):
  return {file_name: ('copy', tok.config.model_file),
          'tokenizer_config.json': {**tokenizer_config, **_special_pieces(tok),
                                    'model_max_length': tok.context_length}}

