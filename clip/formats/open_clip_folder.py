"""open_clip's checkpoints and hub folders: the keys of its timm SigLIP trunks (`visual.trunk.*`,
timm's `VisionTransformer` with `AttentionPoolLatent`) and of `CustomTextCLIP` (`text.*`) read into
ours; the tokenizer and preprocessing an `open_clip_config.json` states, read and written; and
`save_open_clip`. Its towers otherwise have OpenAI's keys.
"""
import os

from clip import configs
from clip import xlmr_tokenizer
from clip.formats import export
from clip.formats import keys
from clip.formats import siglip
from clip.formats.keys import LEAD1
from clip.formats.keys import MAP_HEAD
from clip.formats.keys import Q_KV
from clip.formats.keys import SAME
from clip.formats.keys import rows
from clip.formats.open_clip import open_clip_model_cfg

# ---------------------------------------------------------------- keys

_TRUNK = 'visual.trunk'
_TIMM_BLOCK = 'visual.transformer.resblocks.{i}'
TIMM_VIT = tuple(
    rows('visual.conv1', [f'{_TRUNK}.patch_embed.proj'])
    + [('visual.positional_embedding', (f'{_TRUNK}.pos_embed',), LEAD1),
       (f'{_TIMM_BLOCK}.attn.in_proj_weight', (f'{_TRUNK}.blocks.{{i}}.attn.qkv.weight',), SAME),
       (f'{_TIMM_BLOCK}.attn.in_proj_bias', (f'{_TRUNK}.blocks.{{i}}.attn.qkv.bias',), SAME),
       (f'{MAP_HEAD}.probe', (f'{_TRUNK}.attn_pool.latent',), LEAD1)]
    + rows(f'{_TIMM_BLOCK}.ln_1', [f'{_TRUNK}.blocks.{{i}}.norm1'])
    + rows(f'{_TIMM_BLOCK}.attn.out_proj', [f'{_TRUNK}.blocks.{{i}}.attn.proj'])
    + rows(f'{_TIMM_BLOCK}.ln_2', [f'{_TRUNK}.blocks.{{i}}.norm2'])
    + rows(f'{_TIMM_BLOCK}.mlp.c_fc', [f'{_TRUNK}.blocks.{{i}}.mlp.fc1'])
    + rows(f'{_TIMM_BLOCK}.mlp.c_proj', [f'{_TRUNK}.blocks.{{i}}.mlp.fc2'])
    + rows('visual.ln_post', [f'{_TRUNK}.norm'])
    + [(f'{MAP_HEAD}.attn.in_proj_{leaf}',
        (f'{_TRUNK}.attn_pool.q.{leaf}', f'{_TRUNK}.attn_pool.kv.{leaf}'), Q_KV)
       for leaf in ('weight', 'bias')]
    + rows(f'{MAP_HEAD}.attn.out_proj', [f'{_TRUNK}.attn_pool.proj'])
    + rows(f'{MAP_HEAD}.ln_2', [f'{_TRUNK}.attn_pool.norm'])
    + rows(f'{MAP_HEAD}.mlp.c_fc', [f'{_TRUNK}.attn_pool.mlp.fc1'])
    + rows(f'{MAP_HEAD}.mlp.c_proj', [f'{_TRUNK}.attn_pool.mlp.fc2']))
# open_clip's CustomTextCLIP keeps the text tower under `text.`; ours is at the top level.
CUSTOM_TEXT = (('{text}', ('text.{text}',), SAME),)


def to_ours(flat, timm_trunk):
  """A flat open_clip state dict -> our keys: a timm SigLIP trunk's (`timm_trunk`) and the
  `text.` prefix of CustomTextCLIP translated, every other key (OpenAI's) kept."""
  if timm_trunk:
    flat = keys.to_ours(flat, TIMM_VIT, strict=False)
    leftover = sorted(k for k in flat if k.startswith('visual.trunk.'))
    if leftover:
      raise ValueError(f'timm trunk keys with no place in our ViT: {leftover[:10]}')
  return keys.to_ours(flat, CUSTOM_TEXT, strict=False)


# ---------------------------------------------------------------- open_clip_config.json -> ours

def is_xlmr(text_cfg):
  """Whether an open_clip `text_cfg` reads XLM-RoBERTa-style tokens through its `HFTokenizer`
  (MetaCLIP 2 worldwide's XLM-V): a `hf_tokenizer_name` cleaned 'whitespace' (its default), no
  `tokenizer_mode`."""
  clean = (text_cfg.get('tokenizer_kwargs') or {}).get('clean', 'whitespace')
  return bool(text_cfg.get('hf_tokenizer_name')) and clean == 'whitespace' and not text_cfg.get(
      'tokenizer_mode')


def _open_clip_tokenizer(text_cfg, folder, vocab_size):
  """open_clip's `get_tokenizer` rule: `hf_tokenizer_name` -> its `HFTokenizer` over the files in
  the folder with `tokenizer_kwargs` (clean 'whitespace' by default), else OpenAI's BPE. Cleaned
  'whitespace', the folder's `tokenizer.json` (or, with none there, a name of XLM-V or XLM-R) is
  taken as XLM-RoBERTa-style (`clip.get_tokenizer` checks its `<s>` ... `</s>` template)."""
  name = text_cfg.get('hf_tokenizer_name')
  if not name:
    return configs.TokenizerConfig()
  clean = (text_cfg.get('tokenizer_kwargs') or {}).get('clean', 'whitespace')
  model_file = siglip.sentencepiece_in(folder) if folder else None
  if is_xlmr(text_cfg):
    tokenizer_file = xlmr_tokenizer.tokenizer_in(folder) if folder else None
    if tokenizer_file or 'xlm-v' in name.lower() or 'xlm-roberta' in name.lower():
      return configs.TokenizerConfig(
          'xlmr', tokenizer_file and os.path.abspath(tokenizer_file), clean)
  if clean != 'canonicalize' or text_cfg.get('tokenizer_mode'):
    return configs.TokenizerConfig('unknown', name=f'open_clip HFTokenizer({name!r}, '
                                   f'clean={clean!r}, mode={text_cfg.get("tokenizer_mode")!r})')
  if model_file:
    return siglip.tokenizer_from_file(model_file, 'canonicalize')
  return configs.TokenizerConfig(siglip.kind_from_vocab(vocab_size), None, 'canonicalize')


def _open_clip_preprocess(oc_config, default, image_size):
  pp = oc_config.get('preprocess_cfg') or {}
  size = pp.get('size', image_size)
  if size not in (image_size, [image_size, image_size], (image_size, image_size)):
    raise ValueError(f'open_clip_config.json preprocess_cfg.size {size} is not the model\'s '
                     f'image_size {image_size}')
  if pp.get('mode', 'RGB') != 'RGB':
    raise ValueError(f'preprocess_cfg.mode {pp["mode"]!r} is not RGB')
  fields = ('mean', 'std', 'resize_mode', 'interpolation', 'fill_color')
  return configs.PreprocessConfig(**{**{k: getattr(default, k) for k in fields},
                                     **{k: pp[k] for k in fields if k in pp}})


def processing(info, timm_trunk, image_size, vocab_size):
  """(TokenizerConfig, PreprocessConfig, assumptions) of an open_clip checkpoint (`timm_trunk`:
  a SigLIP one) described by `info` (`files.read_checkpoint`'s): what its
  `open_clip_config.json` states, else OpenAI's or SigLIP's settings. A setting this package
  cannot run is a ValueError."""
  default = siglip.SIGLIP_PREPROCESS if timm_trunk else configs.PreprocessConfig()
  oc = info.get('open_clip_config')
  if oc is None:
    if not timm_trunk:
      return configs.TokenizerConfig(), default, []
    return (configs.TokenizerConfig(siglip.kind_from_vocab(vocab_size), None, 'canonicalize'),
            default, [('preprocess', 'open_clip\'s SigLIP preprocessing (squash, bicubic, mean '
                       'and std 0.5)')])
  model_cfg = oc.get('model_cfg', oc)
  return (_open_clip_tokenizer(model_cfg.get('text_cfg', {}), info.get('folder'), vocab_size),
          _open_clip_preprocess(oc, default, image_size), [])


# ---------------------------------------------------------------- ours -> an open_clip folder

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


def open_clip_preprocess_cfg(cfg):
  """`cfg.preprocess` -> open_clip's `preprocess_cfg` dict (its `PreprocessCfg` fields), which
  `create_model_and_transforms` builds its eval transform from."""
  pp = cfg.preprocess
  export.warn_pixels('open_clip', [what for what in (
      pp.convert_first and 'it resizes in the image\'s own mode and drops transparency after, '
      'where this model converts to RGB on white first (transformers\' do_convert_rgb)',
      pp.crop_rounding == 'floor' and 'its centre crop rounds half the overhang where this '
      'model\'s floors it (one pixel apart when the overhang is 3 modulo 4)') if what])
  return {'size': cfg.image_resolution, 'mode': 'RGB', 'mean': list(pp.mean), 'std': list(pp.std),
          'interpolation': pp.interpolation, 'resize_mode': pp.resize_mode,
          'fill_color': pp.fill_color}


def _xlmr_files(tok, text_cfg, hf_tokenizer_name):
  """MetaCLIP 2's XLM-R-style tokenizer as its open_clip folders hold it: `tokenizer.json` and
  transformers' `tokenizer_config.json`, named by `text_cfg.hf_tokenizer_name` (updated), cleaned
  as open_clip cleans ('whitespace', its default, or 'canonicalize'; not 'none')."""
  if tok.config.clean == 'none':
    raise export.ExportError(
        'open_clip cannot tokenise as this model does: its tokenizer cleans nothing '
        '(transformers\' XLMRobertaTokenizer), and open_clip\'s HFTokenizer cleans text '
        '(clean=\'whitespace\' or \'canonicalize\'). Export with that cleaning: cfg = '
        'dataclasses.replace(cfg, tokenizer=dataclasses.replace(cfg.tokenizer, '
        'clean=\'whitespace\')), if the model was trained with it')
  text_cfg.update(hf_tokenizer_name=hf_tokenizer_name)
  if tok.config.clean != 'whitespace':
    text_cfg['tokenizer_kwargs'] = {'clean': tok.config.clean}
  return {xlmr_tokenizer.TOKENIZER_FILE: ('copy', tok.config.model_file),
          'tokenizer_config.json': {'tokenizer_class': 'XLMRobertaTokenizer',
                                    'model_max_length': tok.context_length}}


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
  MetaCLIP 2's XLM-R-style tokenizer is written as its folders hold it: `hf_tokenizer_name`,
  `tokenizer.json` and a `tokenizer_config.json` naming `XLMRobertaTokenizer`.
  Tokenizer files another tokenizer left in the folder are removed.
  """
  model_cfg = open_clip_model_cfg(cfg)
  tok = export.model_tokenizer(cfg, 'open_clip')
  contents = {}
  if tok is not None and tok.config.kind == 'xlmr':
    contents = _xlmr_files(tok, model_cfg['text_cfg'], hf_tokenizer_name or os.path.abspath(
        os.fspath(folder)))
  elif tok is not None and tok.config.kind != 'openai':
    export.require_clean(tok, 'canonicalize', 'open_clip\'s HFTokenizer', 'open_clip')
    name, tokenizer_config = _OPEN_CLIP_SENTENCEPIECE[tok.config.kind]
    contents = export.sentencepiece_files(tok, name, tokenizer_config)
    model_cfg['text_cfg'].update(
        hf_tokenizer_name=hf_tokenizer_name or os.path.abspath(os.fspath(folder)),
        tokenizer_kwargs={'clean': 'canonicalize'})
  config = {'model_cfg': model_cfg, 'preprocess_cfg': open_clip_preprocess_cfg(cfg)}
  flat = export.flat_numpy(params)
  config_path = os.path.join(folder, 'open_clip_config.json')
  weights_path = os.path.join(folder, 'open_clip_model.safetensors')
  export.write_safetensors(weights_path, flat)
  export.write_processing_files(folder, contents)
  export.write_json(config_path, config)
  return config_path, weights_path
