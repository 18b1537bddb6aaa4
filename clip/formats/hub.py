"""`clip.load` by name: an open_clip Hub repository (`'hf-hub:ORG/NAME'`), a transformers one
(`'ORG/NAME'`), or an open_clip model name and pretrained tag (`'ViT-B-32'`,
`pretrained='laion2b_s34b_b79k'`), downloaded through huggingface_hub (its cache, `HF_HUB_OFFLINE`,
`revision=`), only the files the loader reads, all from one commit; then loaded from the cache by
`clip.formats.load.load` as a local file, with the tokenizer and preprocessing its files state.
"""
import os
import re

from clip import configs
from clip import xlmr_tokenizer
from clip.formats import load as loader
from clip.formats import open_clip_folder
from clip.formats import open_clip_names
from clip.formats import open_clip_pretrained
from clip.formats import siglip
from clip.formats.files import read_json

HF_HUB_PREFIX = 'hf-hub:'
# A Hub repository id: 'org/name' (letters, digits, '-', '_', '.').
_REPO_ID = re.compile(r'[A-Za-z0-9][\w.-]*/[\w.-]+')
# What `clip.load` reads as a file (clip/formats/files.py): a missing one is not a Hub name.
_WEIGHT_FILE_EXTENSIONS = ('.pt', '.pth', '.bin', '.safetensors', '.npz', '.npy', '.json')
# What each kind of repository's loader reads: its config, its weights (the first present, as
# `files.FOLDER_FILES` orders them), and its processing files where present.
OPEN_CLIP_CONFIG = 'open_clip_config.json'
OPEN_CLIP_WEIGHTS = ('open_clip_model.safetensors', 'open_clip_pytorch_model.bin')
HF_CONFIG = 'config.json'
HF_WEIGHTS = ('model.safetensors', 'model.safetensors.index.json', 'pytorch_model.bin')
HF_PROCESSING = ('preprocessor_config.json', 'processor_config.json', 'tokenizer_config.json')
HF_CLIP_VOCABULARY = ('vocab.json', 'tokenizer.json')  # the first present (hf_processing reads it)


class HubError(FileNotFoundError):
  """A name that the Hub (or, offline, its cache) cannot give: a missing repository, revision or
  file, files not cached while offline, or weights released only at a URL. The message names what
  was asked; the huggingface_hub error is chained as its cause."""


def is_hub_name(path, pretrained=None):
  """Whether `clip.load(path)` downloads: an open_clip name with `pretrained=`, 'hf-hub:ORG/NAME',
  or an 'ORG/NAME' repository id that is not a local path (a local path wins, as in
  transformers' `from_pretrained`)."""
  if pretrained is not None:
    return True
  if not isinstance(path, str):
    return False
  if path.startswith(HF_HUB_PREFIX):
    return True
  if os.path.splitext(path)[1].lower() in _WEIGHT_FILE_EXTENSIONS:
    return False  # 'dir/model.pt' names a missing file, not a repository
  return not os.path.exists(path) and _REPO_ID.fullmatch(path) is not None


def load(name, pretrained=None, revision=None, config=None, tokenizer=None, preprocess=None,
         **load_kwargs):
  """`clip.load` of a Hub name (see `is_hub_name`) -> `(params, cfg)`; `load_kwargs` go to the
  loader. Raises HubError (a FileNotFoundError) for a missing repository, revision or file, or one
  not cached while offline; ValueError for `pretrained=` with anything but an open_clip model
  name; KeyError for an unknown open_clip tag."""
  if pretrained is not None:
    return _load_named(name, pretrained, revision, config, tokenizer, preprocess, load_kwargs)
  if name.startswith(HF_HUB_PREFIX):
    repo = name[len(HF_HUB_PREFIX):]
    if not _REPO_ID.fullmatch(repo):
      raise ValueError(f'{name!r}: expected hf-hub:ORG/NAME, a Hub repository id')
    weights, tokenizer_file = _open_clip_repo(repo, revision, name)
  elif name.split('/')[0] in open_clip_names.MODEL_CFGS:
    base, tag = name.split('/')
    raise ValueError(f'{name!r} is an open_clip model name and tag, not a Hub repository: '
                     f'clip.load({base!r}, pretrained={tag!r})')
  else:
    weights, tokenizer_file = _transformers_repo(name, revision), None
  return loader.load(weights, config=config, tokenizer=tokenizer or tokenizer_file,
                     preprocess=preprocess, **load_kwargs)


# ---------------------------------------------------------------- the three kinds of names

def _open_clip_repo(repo, revision, asked):
  """(weights path, SentencePiece file or None) of an open_clip Hub repository."""
  config_path = _download(repo, OPEN_CLIP_CONFIG, revision, asked,
                          f'an open_clip repository holds {OPEN_CLIP_CONFIG}; a transformers '
                          f'one loads as clip.load({repo!r})')
  commit = _commit_of(config_path)
  weights = _first(repo, OPEN_CLIP_WEIGHTS, commit, asked)
  text_cfg = read_json(config_path).get('model_cfg', {}).get('text_cfg', {})
  tokenizer_file, own = _open_clip_tokenizer(repo, commit, text_cfg)
  return weights, None if own else tokenizer_file  # its own: the loader reads it beside


def _transformers_repo(repo, revision):
  """The weights path of a transformers Hub repository, its processing files beside it."""
  config_path = _download(repo, HF_CONFIG, revision, repo,
                          f'a transformers repository holds {HF_CONFIG}; an open_clip one '
                          f'loads as clip.load("hf-hub:{repo}")', local_hint=True)
  model_type = read_json(config_path).get('model_type')
  if model_type is None:
    raise HubError(f'{repo!r}: its {HF_CONFIG} has no model_type: not a transformers model '
                   f'(an open_clip repository loads as clip.load("hf-hub:{repo}"))')
  commit = _commit_of(config_path)
  weights = _first(repo, HF_WEIGHTS, commit, repo)
  if weights.endswith('.index.json'):  # sharded: every shard its weight_map names
    for shard in sorted(set(read_json(weights).get('weight_map', {}).values())):
      _download(repo, shard, commit, repo, f'{os.path.basename(weights)} names it')
  for filename in HF_PROCESSING:
    _optional(repo, (filename,), commit)
  _optional(repo, {'clip': HF_CLIP_VOCABULARY, 'metaclip_2': (xlmr_tokenizer.TOKENIZER_FILE,)}.get(
      model_type, siglip.SENTENCEPIECE_FILES), commit)
  return weights


def _load_named(name, tag, revision, config, tokenizer, preprocess, load_kwargs):
  """open_clip's `create_model(name, pretrained=tag)`: our config of the name (QuickGELU where the
  tag's weights need it), the weights file of the tag's Hub repository, the tag's preprocessing,
  and the name's tokenizer (a SentencePiece one from its `hf_tokenizer_name` repository)."""
  if config is not None:
    raise ValueError(f'clip.load({name!r}, pretrained={tag!r}): the name states the config; '
                     'leave out config=')
  if not isinstance(name, str) or name not in open_clip_names.MODEL_CFGS:
    raise ValueError(f'pretrained= goes with an open_clip model name (e.g. clip.load("ViT-B-32", '
                     f'pretrained="laion2b_s34b_b79k")), got {name!r}; known names: '
                     f'{sorted(open_clip_names.MODEL_CFGS)}')
  cfg = open_clip_names.open_clip_config(name, tag)
  where = open_clip_pretrained.pretrained_cfg(name, tag)
  if where['url']:
    raise HubError(f'open_clip\'s {name} {tag!r} weights are released at {where["url"]}, not on '
                   f'the Hub: download that file and pass its path, clip.load(path, '
                   f'config="{name}/{tag}")')
  repo, filename = where['hf_hub'].rstrip('/'), None
  if not where['hf_hub'].endswith('/'):
    repo, filename = where['hf_hub'].rsplit('/', 1)
  weights = _first(repo, _weight_candidates(filename), revision, f'{name} / {tag}')
  tokenizer_file, _ = _open_clip_tokenizer(repo, _commit_of(weights),
                                           open_clip_names.MODEL_CFGS[name].get('text_cfg', {}))
  return loader.load(weights, config=cfg, tokenizer=tokenizer or tokenizer_file,
                     preprocess=preprocess or open_clip_pretrained.preprocess_config(name, tag),
                     **load_kwargs)


def _weight_candidates(filename):
  """open_clip's order: a `.safetensors` twin of a `.bin` / `.pth` file first, then the file."""
  filename = filename or OPEN_CLIP_WEIGHTS[1]
  if filename == OPEN_CLIP_WEIGHTS[1]:
    return OPEN_CLIP_WEIGHTS
  if filename.endswith(('.bin', '.pth')):
    return (filename[:-4] + '.safetensors', filename)
  return (filename,)


def _open_clip_tokenizer(repo, commit, text_cfg):
  """(tokenizer, whether it is `repo`'s own) of an open_clip `text_cfg` that names
  `hf_tokenizer_name`, from `repo`, else from the repository it names (where open_clip's
  `HFTokenizer` reads it): the path of a SentencePiece file (SigLIP's, cleaned 'canonicalize'), or
  the TokenizerConfig of an XLM-RoBERTa-style `tokenizer.json` (MetaCLIP 2's XLM-V, cleaned
  'whitespace'). (None, False) for OpenAI's BPE (bundled), for a cleaning it cannot run (the
  loader names that tokenizer), or where neither repository holds one."""
  name = text_cfg.get('hf_tokenizer_name')
  clean = (text_cfg.get('tokenizer_kwargs') or {}).get('clean', 'whitespace')
  xlmr = open_clip_folder.is_xlmr(text_cfg)
  if not name or (clean != 'canonicalize' and not xlmr) or text_cfg.get('tokenizer_mode'):
    return None, False
  filenames = (xlmr_tokenizer.TOKENIZER_FILE,) if xlmr else siglip.SENTENCEPIECE_FILES
  found, own = _optional(repo, filenames, commit), True
  if found is None and name != repo and _REPO_ID.fullmatch(name):
    found, own = _optional(name, filenames, None), False
  if found is None:
    return None, False
  return (configs.TokenizerConfig('xlmr', found, clean) if xlmr else found), own


# ---------------------------------------------------------------- downloads

def _commit_of(path):
  """The commit a cached file was downloaded at: its snapshot folder's name."""
  return os.path.basename(os.path.dirname(path))


def _revision_text(revision):
  return f'revision {revision!r}' if revision else 'the default branch'


def _download(repo, filename, revision, asked, why='', local_hint=False, missing_ok=False):
  """`hf_hub_download` of one file the loader reads; HubError naming what was asked (and, for a
  bare repository id, that no local path has that name either). `missing_ok`: None for a file
  the repository does not hold, also offline where an earlier download found it missing
  (huggingface_hub's `.no_exist` marker); one never looked up offline is an error, not taken as
  absent."""
  import huggingface_hub  # pylint: disable=g-import-not-at-top  # not at `import clip` (httpx)
  from huggingface_hub import errors as hub_errors  # pylint: disable=g-import-not-at-top
  local = f'; there is no local file or folder {asked!r} either' if local_hint else ''
  try:
    return huggingface_hub.hf_hub_download(repo, filename, revision=revision)
  except hub_errors.LocalEntryNotFoundError as e:
    cached = huggingface_hub.try_to_load_from_cache(repo, filename, revision=revision)
    if missing_ok and cached is huggingface_hub._CACHED_NO_EXIST:  # pylint: disable=protected-access
      return None
    raise HubError(f'{asked}: {filename} of Hub repository {repo!r} ({_revision_text(revision)}) '
                   f'is not in the Hugging Face cache ({huggingface_hub.constants.HF_HUB_CACHE}) '
                   'and the Hub cannot be reached (HF_HUB_OFFLINE is set, no connection, or a Hub '
                   f'error: see the cause): load it once online, or pass a local path{local}'
                   ) from e
  except hub_errors.RepositoryNotFoundError as e:
    raise HubError(f'{asked}: no Hub repository {repo!r} at {huggingface_hub.constants.ENDPOINT} '
                   f'(or it is private or gated and no token with access was given){local}'
                   ) from e
  except hub_errors.RevisionNotFoundError as e:
    raise HubError(f'{asked}: Hub repository {repo!r} has no revision {revision!r}') from e
  except hub_errors.EntryNotFoundError as e:
    if missing_ok:
      return None
    raise HubError(f'{asked}: Hub repository {repo!r} ({_revision_text(revision)}) has no '
                   f'{filename}' + (f' ({why})' if why else '') + local) from e


def _first(repo, filenames, revision, asked):
  """The first of `filenames` the repository holds, downloaded; HubError naming them all if none
  is there."""
  found = _optional(repo, filenames, revision, asked)
  if found is None:
    raise HubError(f'{asked}: Hub repository {repo!r} ({_revision_text(revision)}) has none of '
                   f'{list(filenames)}')
  return found


def _optional(repo, filenames, revision, asked=None):
  """The first of `filenames` the repository holds, downloaded, or None if it holds none."""
  for filename in filenames:
    found = _download(repo, filename, revision, asked or repo, missing_ok=True)
    if found is not None:
      return found
  return None
