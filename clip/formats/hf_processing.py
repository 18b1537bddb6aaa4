"""Hugging Face transformers' tokenizer and image-processor files, in both directions: read from a
model folder (`tokenizer_config.json`, `preprocessor_config.json` or transformers 5's
`processor_config.json`, the SentencePiece or BPE vocabulary files) into our TokenizerConfig and
PreprocessConfig, and written for `AutoTokenizer` / `AutoImageProcessor` by `save_hf`.
"""
import gzip
import json
import os

from clip import configs
from clip import naflex
from clip import tokenizer as openai_tokenizer
from clip import xlmr_tokenizer
from clip.formats import export
from clip.formats import siglip

# PIL's filter numbers, as transformers stores them in preprocessor_config.json, and ours.
_RESAMPLE = {2: 'bilinear', 3: 'bicubic'}
_RESAMPLE_TO_HF = {ours: theirs for theirs, ours in _RESAMPLE.items()}
# transformers' tokenizer classes of SigLIP's SentencePiece vocabularies -> our kinds.
TOKENIZER_KINDS = {'SiglipTokenizer': 'siglip', 'GemmaTokenizer': 'siglip2',
                   'GemmaTokenizerFast': 'siglip2', 'Siglip2Tokenizer': 'siglip2'}


# ---------------------------------------------------------------- a folder's files -> ours

def _hf_tokenizer(info, model_type, vocab_size):
  """transformers' tokenizer of the folder: `tokenizer_config.json`'s class, else the files."""
  folder = info.get('folder')
  tok_cfg = info.get('tokenizer_config') or {}
  cls = tok_cfg.get('tokenizer_class')
  if cls and cls.startswith('XLMRobertaTokenizer'):  # MetaClip2Model's, uncleaned
    tokenizer_file = xlmr_tokenizer.tokenizer_in(folder) if folder else None
    return configs.TokenizerConfig('xlmr', tokenizer_file and os.path.abspath(tokenizer_file),
                                   'none')
  if model_type == 'clip':
    if cls and not cls.startswith('CLIPTokenizer'):
      return configs.TokenizerConfig('unknown', name=f'transformers {cls}')
    path, vocab = _clip_vocab(folder) if folder else (None, None)
    if path and not _is_openai_vocab(vocab):
      return configs.TokenizerConfig('unknown', name=f'a BPE vocabulary other than OpenAI\'s '
                                     f'({path})')
    return configs.TokenizerConfig()
  model_file = siglip.sentencepiece_in(folder) if folder else None
  if cls:
    if cls not in TOKENIZER_KINDS:
      return configs.TokenizerConfig('unknown', name=f'transformers {cls}')
    return configs.TokenizerConfig(TOKENIZER_KINDS[cls],
                                   model_file and os.path.abspath(model_file))
  if model_file:
    return siglip.tokenizer_from_file(model_file)
  return configs.TokenizerConfig(siglip.kind_from_vocab(vocab_size))


def _clip_vocab(folder):
  """(path, {token: id}) of a CLIP tokenizer folder's vocabulary: `vocab.json` (transformers 4
  saves it, and hub folders hold it) or `tokenizer.json`'s (all transformers 5 saves); or
  (None, None)."""
  for name in ('vocab.json', 'tokenizer.json'):
    path = os.path.join(folder, name)
    if os.path.isfile(path):
      with open(path, encoding='utf-8') as f:
        vocab = json.load(f)
      return path, vocab if name == 'vocab.json' else vocab.get('model', {}).get('vocab')
  return None, None


def _is_openai_vocab(vocab):
  ours = openai_tokenizer.default_tokenizer().symbols
  return (isinstance(vocab, dict) and len(vocab) == len(ours)
          and all(vocab.get(s) == i for i, s in enumerate(ours)))


def _hf_image_processor(info):
  """(the image processor's settings, the file they are in), or (None, None): transformers 4
  saves them as `preprocessor_config.json`, transformers 5 a processor (`SiglipProcessor`,
  `CLIPProcessor`) as the `image_processor` entry of `processor_config.json`."""
  if 'preprocessor_config' in info:
    return info['preprocessor_config'], 'preprocessor_config.json'
  path = os.path.join(info.get('folder') or '', 'processor_config.json')
  if info.get('folder') and os.path.isfile(path):
    with open(path, encoding='utf-8') as f:
      settings = json.load(f).get('image_processor')
    if settings is not None:
      return settings, 'processor_config.json image_processor'
  return None, None


def _hf_preprocess(info, image_size, default):
  """The image processor's settings (`_hf_image_processor`) -> PreprocessConfig:
  `CLIPImageProcessor` (shortest edge, centre crop) or `SiglipImageProcessor` (height x width,
  squash); a setting outside these is an error naming it."""
  pp, where = _hf_image_processor(info)
  if pp is None:
    return default
  interpolation = _check_transforms(pp, where, 3)
  size = pp.get('size', {})
  size = size if isinstance(size, dict) else {'shortest_edge': size}
  if 'shortest_edge' in size:
    crop = pp.get('crop_size', size['shortest_edge'])
    crop = crop if isinstance(crop, dict) else {'height': crop, 'width': crop}
    if not pp.get('do_center_crop', True) or (
        size['shortest_edge'], crop.get('height'), crop.get('width')) != (image_size,) * 3:
      raise ValueError(f'{where}: resizing the shortest edge to {size["shortest_edge"]} and '
                       f'cropping {crop} is not the model\'s {image_size} x {image_size} '
                       'resize-and-crop')
    mode = 'shortest'
  elif (size.get('height'), size.get('width')) == (image_size, image_size):
    mode = 'squash'
  else:
    raise ValueError(f'{where}: size {size} is not the model\'s {image_size} x {image_size}')
  # transformers' processors convert to RGB first (transparency on white; `do_convert_rgb`,
  # True by default in transformers 5's CLIP and SigLIP processors; a stored null converts
  # nothing) and crop at the floor of the overhang.
  return configs.PreprocessConfig(
      mean=tuple(pp.get('image_mean', default.mean)), std=tuple(pp.get('image_std', default.std)),
      resize_mode=mode, interpolation=interpolation,
      convert_first=pp.get('do_convert_rgb', True) is True, crop_rounding='floor')


def _check_transforms(pp, where, default_resample):
  """An image processor's resize filter as ours, after checking that its rescale and
  normalisation are the ones this package runs (ValueError naming the setting otherwise)."""
  for key, ok in (('do_resize', True), ('do_rescale', True), ('do_normalize', True)):
    if pp.get(key, ok) is not ok:
      raise ValueError(f'{where}: {key}={pp[key]} is not a transform this package runs')
  if abs(pp.get('rescale_factor', 1 / 255) - 1 / 255) > 1e-12:
    raise ValueError(f'{where}: rescale_factor {pp["rescale_factor"]} is not 1/255')
  resample = pp.get('resample', default_resample)
  if resample not in _RESAMPLE:
    raise ValueError(f'{where}: resample {resample} is not bilinear (2) or bicubic (3)')
  return _RESAMPLE[resample]


def _hf_naflex(info, image_size):
  """`Siglip2ImageProcessor`'s settings -> (PreprocessConfig, assumptions): its mean, std, filter
  and RGB conversion (none unless `do_convert_rgb`), which `clip.naflex_preprocess(images, P, S,
  cfg)` uses to cut each image into patches at its own aspect ratio, and `clip.preprocess_images`
  to squash it to the position table's square grid. Its `patch_size` must be the model's
  (`vision_config.patch_size`): ValueError otherwise."""
  default = naflex.NAFLEX_PREPROCESS
  assumed = [('preprocess', f'the NaFlex model\'s images squashed to its square grid '
              f'({image_size} px, bilinear as Siglip2ImageProcessor resizes) by '
              'clip.preprocess_images; clip.naflex_preprocess keeps their aspect ratio')]
  pp, where = _hf_image_processor(info)
  if pp is None:
    return default, assumed
  interpolation = _check_transforms(pp, where, 2)
  patch = ((info.get('hf_config') or {}).get('vision_config') or {}).get('patch_size', 16)
  if pp.get('patch_size', 16) != patch:
    raise ValueError(f'{where}: patch_size {pp.get("patch_size", 16)} is not the model\'s '
                     f'{patch} (config.json vision_config.patch_size)')
  return configs.PreprocessConfig(
      mean=tuple(pp.get('image_mean', default.mean)), std=tuple(pp.get('image_std', default.std)),
      resize_mode='squash', interpolation=interpolation,
      convert_first=pp.get('do_convert_rgb') is True,
      max_num_patches=pp.get('max_num_patches', default.max_num_patches)), assumed


def processing(info, model_type, image_size, vocab_size):
  """(TokenizerConfig, PreprocessConfig, assumptions) of a Hugging Face folder of `model_type`
  ('clip', 'siglip', 'siglip2') described by `info` (`files.read_checkpoint`'s): what its files
  state, else the model's known settings; `assumptions` lists what the files did not say, as
  ('tokenizer' | 'preprocess', text). A setting this package cannot run is a ValueError."""
  if model_type == 'siglip2':  # NaFlex: clip.naflex, or its position table's square grid
    return (_hf_tokenizer(info, model_type, vocab_size), *_hf_naflex(info, image_size))
  clip_like = model_type == 'clip'
  default = configs.PreprocessConfig() if clip_like else siglip.SIGLIP_PREPROCESS
  assumed = [] if _hf_image_processor(info)[0] is not None else [
      ('preprocess', f'{"OpenAI" if clip_like else "SigLIP"}\'s image preprocessing '
       '(no preprocessor_config.json or processor_config.json beside the weights)')]
  tok_cfg = info.get('tokenizer_config') or {}
  cls = tok_cfg.get('tokenizer_class') or ''
  if model_type == 'siglip' and cls and tok_cfg.get('model_input_names') != ['input_ids']:
    assumed.append(('tokenizer', f'no padding mask, as SigLIP was trained (its {cls} returns '
                    'an attention_mask, with which transformers\' SiglipModel masks the '
                    'padding; released folders state model_input_names=["input_ids"])'))
  if cls.startswith('GemmaTokenizer'):
    assumed.append(('tokenizer', f'lower-cased text for its {cls}, which does not lower-case '
                    '(SigLIP 2 was trained on lower-cased text: big_vision, and transformers\' '
                    'Siglip2Tokenizer, lower-case it)'))
  return (_hf_tokenizer(info, model_type, vocab_size), _hf_preprocess(info, image_size, default),
          assumed)


# ---------------------------------------------------------------- ours -> files for transformers

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


def hf_preprocessor_config(cfg, model_type):
  """`cfg.preprocess` -> transformers' `preprocessor_config.json` dict: `CLIPImageProcessor` for
  OpenAI's resize (short side to the resolution, centre crop) and, on a `CLIPModel`, for a squash;
  `SiglipImageProcessor` for a squash on a `SiglipModel`. transformers has no resize that keeps
  the aspect ratio and pads ('longest'): ExportError."""
  pp, r = cfg.preprocess, cfg.image_resolution
  if pp.resize_mode == 'longest':
    raise export.ExportError(
        'Hugging Face cannot prepare images as this model does: resize_mode=\'longest\' (long '
        'side to the resolution, then padding), which neither CLIPImageProcessor nor '
        'SiglipImageProcessor does')
  export.warn_pixels('Hugging Face', [what for what in (
      not pp.convert_first and 'it converts to RGB on white before resizing, where this model '
      'resizes in the image\'s own mode and converts after (images with transparency, palette, '
      '1-bit and 16-bit images differ; CMYK by a level or two)',
      pp.crop_rounding == 'round' and pp.resize_mode == 'shortest' and 'its CLIPImageProcessor '
      'centre-crops at the floor of half the overhang where this model rounds it (one pixel '
      'apart when the overhang is 3 modulo 4)') if what])
  # do_convert_rgb=False would not run this model's conversion either (transformers then refuses
  # images that are not RGB): converting first is the nearest transformers does.
  out = {'do_resize': True, 'resample': _RESAMPLE_TO_HF[pp.interpolation], 'do_rescale': True,
         'rescale_factor': 1 / 255, 'do_normalize': True, 'image_mean': list(pp.mean),
         'image_std': list(pp.std), 'do_convert_rgb': True}
  if pp.resize_mode == 'shortest':
    return {'image_processor_type': 'CLIPImageProcessor', **out, 'size': {'shortest_edge': r},
            'do_center_crop': True, 'crop_size': {'height': r, 'width': r}}
  square = {'size': {'height': r, 'width': r}}
  if model_type == 'siglip':
    return {'image_processor_type': 'SiglipImageProcessor', **out, **square}
  return {'image_processor_type': 'CLIPImageProcessor', **out, **square, 'do_center_crop': False}


def hf_tokenizer_files(cfg):
  """{file name: content} of the model's tokenizer for transformers' AutoTokenizer: OpenAI's BPE
  as `CLIPTokenizer` (vocab.json, merges.txt, tokenizer_config.json; none for a model it does not
  fit), SigLIP's as `SiglipTokenizer` (spiece.model), SigLIP 2's as `Siglip2Tokenizer`
  (tokenizer.model), each with its tokenizer_config.json. A cleaning transformers' tokenizer does
  not do (open_clip's 'canonicalize'), an unknown tokenizer or one without its file: ExportError."""
  tok = export.model_tokenizer(cfg, 'Hugging Face')
  if tok is None:
    return {}
  if tok.config.kind == 'openai':
    return _openai_bpe_files(tok.context_length)
  clean, name, tokenizer_config = _HF_SENTENCEPIECE[tok.config.kind]
  export.require_clean(tok, clean, f'transformers\' {tokenizer_config["tokenizer_class"]}',
                       'Hugging Face')
  return export.sentencepiece_files(tok, name, tokenizer_config)
