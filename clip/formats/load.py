"""`clip.load`: a checkpoint file or model folder -> `(params, cfg)`, with outputs equal to the
library that defines its family, or an error.

Every format is first read into a flat `{key: numpy array}` dict (`files`), its family recognised
and translated into our (OpenAI) naming (`families`), its config resolved (`config=`, checked
against what the files state; else what they state; else the shapes and the family's defaults,
with a `CheckpointWarning` naming each assumption), every key and shape checked against it
(`openai.from_state_dict`), and the tokenizer and preprocessing its files state attached.
"""
import dataclasses
import os
import warnings

import numpy as np

from clip import configs
from clip.formats import big_vision
from clip.formats import families
from clip.formats import hf
from clip.formats import open_clip
from clip.formats import open_clip_folder
from clip.formats import open_clip_names
from clip.formats import openai
from clip.formats import siglip
from clip.formats.files import CheckpointError
from clip.formats.files import read_checkpoint
from clip.formats.resize import interpolate_pos_embed


class CheckpointWarning(UserWarning):
  """A checkpoint loaded under an assumption its files cannot confirm (the message says which,
  and how to state it with `config=`)."""


def load(path, config=None, dtype=np.float32, image_resolution=None, tokenizer=None,
         preprocess=None, pretrained=None, revision=None):
  """A checkpoint file or model folder -> `(params, cfg)`, with outputs equal to the library
  that defines the family, or an error.

  Families: OpenAI's and open_clip's (OpenAI keys, `text.` of CustomTextCLIP, timm ViT trunks of
  the SigLIP models), Hugging Face `CLIPModel` and `SiglipModel`, big_vision's SigLIP `.npz`.
  Formats: torch state dicts (`weights_only=True`), OpenAI's TorchScript archives,
  `.safetensors` (also sharded), `.npz`, scenic's `.npy`; open_clip's `state_dict` wrapper and
  the `module.` / `_orig_mod.` prefixes are stripped. The config is, in order: `config=` (a
  CLIPConfig, an OpenAI name such as 'ViT-B/32', or an open_clip name such as 'ViT-H-14' or
  'ViT-B-32/laion2b_s34b_b79k'),
  checked against what the files state; the `open_clip_config.json` or Hugging Face
  `config.json` beside the weights; else inferred from the shapes, with a `CheckpointWarning`
  naming what was assumed (the activation, head counts) unless the file is one of OpenAI's
  releases. Floating weights are cast to `dtype` (fp16 files load as fp32 by default).
  `image_resolution` interpolates the position embedding to another input size.

  The returned config carries the model's tokenizer and image preprocessing (`cfg.tokenizer`,
  `cfg.preprocess`, for `clip.get_tokenizer` and `clip.preprocess_images`): what the files beside
  the weights state (open_clip's `open_clip_config.json` `preprocess_cfg` and
  `hf_tokenizer_name` / `tokenizer_kwargs`; transformers' `preprocessor_config.json`,
  `tokenizer_config.json` and its `spiece.model` / `tokenizer.model` / `vocab.json`), else the
  family's known settings with a `CheckpointWarning` naming them. `tokenizer=` (a
  `clip.TokenizerConfig`, or the path of a SentencePiece `.model` file, its kind read from the
  file) and `preprocess=` (a `clip.PreprocessConfig`) state them instead, e.g. for a big_vision
  `.npz`, which ships no tokenizer.

  A training workdir (a folder holding `checkpoints/`, as `experiments/train.py` writes it) loads
  its newest checkpoint's weights with the architecture, tokenizer and preprocessing of its
  `model_config.json` (`clip.formats.workdirs.load_model`); `config=` may only restate that
  architecture (its dtype, remat and scan are taken), and `tokenizer=`, `preprocess=` and
  `image_resolution` are refused there (the workdir states its own).

  An OpenAI name ('ViT-B/32', `clip.MODELS`) that is no local path is `load_model_vars(name)`, as
  OpenAI's own `clip.load` takes it. By name, through huggingface_hub (its cache, `HF_HUB_OFFLINE=1`
  to use only the cache, `revision=` a branch, tag or commit to pin; `clip.formats.hub`):
  `'hf-hub:ORG/NAME'` an open_clip Hub repository (`open_clip_config.json` and its weights),
  `'ORG/NAME'` a transformers one (`config.json`, `model.safetensors` or its shards, processor and
  tokenizer files) unless a local path of that name exists (a local path wins, as in
  `from_pretrained`), and an open_clip model name with `pretrained=` one of its tags
  (`clip.load('ViT-B-32', pretrained='laion2b_s34b_b79k')`: open_clip's config, weights repository
  and preprocessing for that tag, `clip.formats.open_clip_pretrained`). Only the files the loader
  reads are downloaded, all at one commit; then they load as a local folder, tokenizer and
  preprocessing included.

  Raises CheckpointError for an unsupported family (naming its keys), missing, unexpected or
  misshapen keys, a `config=` that contradicts the files, or processing files this package
  cannot run exactly; `clip.HubError` (a FileNotFoundError) for a Hub repository, revision or
  file that does not exist, or is not cached while offline, naming it.
  """
  if (isinstance(path, str) and path in configs.MODELS and pretrained is None
      and not os.path.exists(path)):  # OpenAI's names, as OpenAI's own clip.load takes them
    if config is not None or revision is not None:
      raise ValueError(f'{path!r} is an OpenAI model name, which states its config and has no '
                       'revisions: pass neither config= nor revision=')
    return load_model_vars(path, dtype=dtype, image_resolution=image_resolution,
                           tokenizer=tokenizer, preprocess=preprocess)
  from clip.formats import hub  # pylint: disable=g-import-not-at-top  # cycle: it calls load
  if hub.is_hub_name(path, pretrained):
    return hub.load(path, pretrained=pretrained, revision=revision, config=config, dtype=dtype,
                    image_resolution=image_resolution, tokenizer=tokenizer, preprocess=preprocess)
  if revision is not None:
    raise ValueError(f'revision= pins a Hub name; {path} is a local path')
  from clip.formats import workdirs  # pylint: disable=g-import-not-at-top  # cycle: it loads files
  if workdirs.is_workdir(path):
    if tokenizer is not None or preprocess is not None or image_resolution is not None:
      raise ValueError(f'{path} is a training workdir, whose model_config.json states its '
                       'tokenizer, preprocessing and resolution: leave out tokenizer=, '
                       'preprocess= and image_resolution=')
    return workdirs.load_model(path, config=_named_config(config) if isinstance(config, str)
                               else config, dtype=dtype)
  raw, info = read_checkpoint(path)
  if any(k.startswith('text_decoder.cross_attn.') for k in raw):  # open_clip's CoCa
    return _load_coca(raw, info, config, dtype, tokenizer, preprocess, image_resolution)
  try:
    family = families.detect(raw)
    if family == families.BIG_VISION:
      info['big_vision_heads'] = big_vision.heads(raw)
    flat = families.to_ours(raw, family)
  except ValueError as e:
    raise CheckpointError(f'{info["path"]}: {e}') from None
  config = resolve_config(flat, family, info, config)
  params, config = openai.from_state_dict(flat, config, dtype)
  if image_resolution is not None and image_resolution != config.image_resolution:
    params, config = interpolate_pos_embed(params, config, image_resolution)
  return params, with_processing(config, family, info, tokenizer, preprocess)


def with_processing(config, family, info, tokenizer=None, preprocess=None):
  """`config` with the tokenizer and preprocessing of its checkpoint (see `load`)."""
  try:
    stated_tok, stated_pp, assumed = families.processing(family, info, config)
  except (ValueError, OSError) as e:
    raise CheckpointError(f'{info["path"]}: {e}') from None
  if tokenizer is None:
    tokenizer = stated_tok
  elif isinstance(tokenizer, (str, os.PathLike)):
    try:
      tokenizer = families.given_tokenizer(tokenizer, family, info)
    except (ValueError, OSError) as e:
      raise CheckpointError(f'{info["path"]}: {e}') from None
  elif not isinstance(tokenizer, configs.TokenizerConfig):
    raise TypeError(f'tokenizer must be a clip.TokenizerConfig or the path of a SentencePiece '
                    f'.model file, got {type(tokenizer).__name__}')
  if preprocess is None:
    preprocess = stated_pp
  elif not isinstance(preprocess, configs.PreprocessConfig):
    raise TypeError(f'preprocess must be a clip.PreprocessConfig, got '
                    f'{type(preprocess).__name__}')
  given = {'tokenizer': tokenizer is not stated_tok, 'preprocess': preprocess is not stated_pp}
  assumed = [(what, text) for what, text in assumed if not given[what]]
  if assumed:
    how = ' or '.join(sorted({f'{what}=' for what, _ in assumed}))
    warnings.warn(f'{info["path"]}: assumed ' + '; '.join(text for _, text in assumed) +
                  f'. Pass {how} to clip.load to state it.', CheckpointWarning, stacklevel=3)
  return dataclasses.replace(config, tokenizer=tokenizer, preprocess=preprocess)


# ---------------------------------------------------------------- what a checkpoint states

def config_differences(given, stated, given_name='config=', stated_name='the file',
                       skip=configs.NON_ARCHITECTURE_FIELDS, prefix=''):
  """`['<field>: <given_name> says <given>, <stated_name> says <stated>', ...]` for every field in
  which two configs differ, nested fields named with their path (`vision.width`), the top-level
  fields in `skip` left out (by default the runtime fields, the tokenizer and preprocessing: what
  does not change what the weights compute). A tower one side lacks (None) is one difference."""
  out = []
  for field in dataclasses.fields(given):
    a, b = getattr(given, field.name), getattr(stated, field.name)
    if not prefix and field.name in skip:
      continue
    if dataclasses.is_dataclass(a) and dataclasses.is_dataclass(b):
      out += config_differences(a, b, given_name, stated_name, (), f'{prefix}{field.name}.')
    elif a != b:
      out.append(f'{prefix}{field.name}: {given_name} says {a!r}, {stated_name} says {b!r}')
  return out


def stated_config(family, info):
  """The config the files beside the weights state (open_clip_config.json for open_clip's
  families, config.json for Hugging Face's), or None."""
  try:
    if family in (families.OPENAI, families.OPEN_CLIP_TIMM) and 'open_clip_config' in info:
      model_cfg = info['open_clip_config'].get('model_cfg', info['open_clip_config'])
      return open_clip.config_from_open_clip(model_cfg)
    if family in families.HUGGING_FACE and 'hf_config' in info:
      return hf.config_from_hf(info['hf_config'])
  except (KeyError, ValueError) as e:
    raise CheckpointError(f'{info["path"]}: the config file beside it cannot be run exactly: '
                          f'{e!r}') from None
  return None


def _named_config(name):
  """An OpenAI name ('ViT-B/32') or an open_clip one ('ViT-B-32/laion2b_s34b_b79k') -> config;
  a name both libraries use for different models (open_clip's 'RN50' has exact GELU) is an
  error."""
  if name in configs.MODELS and name in open_clip_names.MODEL_CFGS:
    raise ValueError(f'{name!r} names both OpenAI\'s {name} (QuickGELU) and open_clip\'s (exact '
                     f'GELU): pass config=clip.MODELS[{name!r}] or {name!r} with an open_clip tag '
                     f'("{name}/openai", "{name}-quickgelu", ...)')
  if name in configs.MODELS:
    return configs.MODELS[name]
  return open_clip_names.open_clip_config(name)


def resolve_config(flat, family, info, config=None):
  """The config to load `flat` (our keys) with: `config=` if given (an error if the files state
  otherwise), else what the files state, else shapes plus the family's defaults with a warning
  naming the assumptions."""
  if isinstance(config, str):
    config = _named_config(config)
  stated = stated_config(family, info)
  if config is not None:
    if not isinstance(config, configs.CLIPConfig):
      raise TypeError(f'config must be a CLIPConfig or an open_clip model name, got '
                      f'{type(config).__name__}')
    contradictions = config_differences(config, stated) if stated is not None else []
    if contradictions:
      raise CheckpointError(f'{info["path"]}: config= contradicts the config file beside it: '
                            + '; '.join(contradictions))
    return config
  if stated is not None:
    return stated
  config, assumed = _infer(flat, family, info)
  if assumed:
    warnings.warn(f'{info["path"]}: its files do not state the architecture; assumed '
                  + '; '.join(assumed) + '. Pass config= (a CLIPConfig or an open_clip name, '
                  'e.g. config="ViT-B-32/laion2b_s34b_b79k" for that release) to state it.',
                  CheckpointWarning, stacklevel=3)
  return config


def _infer(flat, family, info):
  """(config, assumptions) from the shapes and the family's defaults."""
  if family == families.BIG_VISION:
    cfg = siglip.siglip_from_shapes(flat, *info['big_vision_heads'], 'gelu_tanh', 'gelu_tanh')
    return cfg, ['text pooled at the last position (big_vision\'s pool_type="last", as every '
                 'SigLIP release)']
  if family in (families.HF_SIGLIP, families.HF_SIGLIP2, families.OPEN_CLIP_TIMM):
    return _infer_siglip(flat, family)
  cfg = openai.infer_config(flat)
  matches = open_clip_names.shape_matches(cfg)
  if matches:  # the head count is open_clip's for these shapes
    cfg = open_clip_names.with_heads(cfg, matches[0][1])
  elif cfg.vision.arch == 'vit' and cfg.vision.width % 64 or cfg.text.width % 64:
    raise CheckpointError(
        f'{info["path"]}: cannot infer head counts: text width {cfg.text.width} / vision width '
        f'{cfg.vision.width} are not multiples of 64 (OpenAI\'s head size) and match no open_clip '
        'architecture; pass config=')
  if family == families.OPENAI and openai.is_official(info['path']):
    return cfg, []
  names = sorted({name for name, _ in matches})
  kinds = sorted({c.vision.mlp for _, c in matches} | {'quick_gelu'})
  assumed = [f'OpenAI\'s QuickGELU activation (same keys and shapes: {names[:8]}, whose '
             f'activations are {kinds})' if names else 'OpenAI\'s QuickGELU activation',
             f'{cfg.vision.heads} vision and {cfg.text.heads} text heads',
             'OpenAI\'s causal text tower pooled at the end-of-text token']
  return cfg, assumed


def _infer_siglip(flat, family):
  heads = lambda w: max(w // 64, 1)
  text_width = flat['ln_final.weight'].shape[0]
  width = flat['visual.conv1.weight'].shape[0]
  vision_act = 'gelu' if family == families.OPEN_CLIP_TIMM else 'gelu_tanh'
  cfg = siglip.siglip_from_shapes(flat, heads(width), heads(text_width), vision_act,
                                  'gelu_tanh')
  matches = open_clip_names.shape_matches(cfg)
  if matches:
    cfg = open_clip_names.with_heads(cfg, matches[0][1])
    if family == families.OPEN_CLIP_TIMM and len({c.text.mlp for _, c in matches}) == 1:
      cfg = dataclasses.replace(cfg, text=dataclasses.replace(
          cfg.text, mlp=matches[0][1].text.mlp))  # open_clip's own text activation
  elif width % 64 or text_width % 64:
    raise CheckpointError(f'cannot infer head counts: text width {text_width} / vision width '
                          f'{width} are not multiples of 64 and match no open_clip SigLIP '
                          'architecture; pass config=')
  names = sorted({name for name, _ in matches})
  kinds = sorted({c.text.mlp for _, c in matches} | {cfg.text.mlp})
  return cfg, [f'{cfg.vision.heads} vision and {cfg.text.heads} text heads',
               f'{vision_act} in the image tower and {cfg.text.mlp} in the text tower '
               f'(open_clip\'s models with these shapes: {names[:8]}, text activations {kinds})']


def _load_coca(raw, info, config, dtype, tokenizer, preprocess, image_resolution):
  """open_clip's CoCa (`clip.coca`): `config` None (its `open_clip_config.json`), an open_clip
  model_cfg dict or a CoCaConfig."""
  from clip import coca  # pylint: disable=g-import-not-at-top  # cycle: coca uses the model
  if tokenizer is not None or preprocess is not None or image_resolution is not None:
    raise ValueError(f'{info["path"]} is an open_clip CoCa checkpoint: tokenizer=, preprocess= '
                     'and image_resolution= are not supported for it')
  if isinstance(config, str):
    raise ValueError(f'{info["path"]} is an open_clip CoCa checkpoint: config= must be its '
                     f'open_clip model_cfg dict or a clip.coca.CoCaConfig, got {config!r}')
  try:
    params, cfg = coca.from_checkpoint(raw, info, config, dtype)
    tokenizer, preprocess, _ = open_clip_folder.processing(
        info, False, cfg.image_resolution, cfg.text.vocab_size)
  except ValueError as e:
    raise CheckpointError(f'{info["path"]}: {e}') from None
  return params, dataclasses.replace(cfg, tokenizer=tokenizer, preprocess=preprocess)


def load_model_vars(name, cache=None, download=True, **load_kwargs):
  """An official OpenAI model by name -> `(params, cfg)`, from `cache` (default $CLIP_CACHE_DIR
  or ~/.cache/clip, where OpenAI's package keeps them too), downloaded if absent and the network
  allows; the file's SHA256 must be the one in OpenAI's URL (`openai.official_path`)."""
  path = openai.official_path(name, cache, download)
  return load(path, config=configs.MODELS[name], **load_kwargs)
