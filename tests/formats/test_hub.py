"""clip.load by Hub name (clip/formats/hub.py) against a Hub this test serves on 127.0.0.1: open_clip
repositories ('hf-hub:ORG/NAME'), transformers ones ('ORG/NAME', sharded), open_clip's name and tag
table; the cache, offline mode, revisions, and the errors naming what is missing."""
import dataclasses
import hashlib
import http.server
import importlib
import os
import shutil
import threading
import urllib.parse

import numpy as np
import pytest
from huggingface_hub import constants as hub_constants

import clip
from clip.formats import export
from clip.formats import files
from clip.formats import hf_processing
from clip.formats import hub
from clip.formats import open_clip_names
from clip.formats import open_clip_pretrained
from experiments import checkpoint_families
from tests.formats.test_open_clip import oc  # pylint: disable=unused-import


# ---------------------------------------------------------------- a Hub on 127.0.0.1

class FakeHub:
  """Repositories {repo: {'refs': {name: commit}, 'commits': {commit: {filename: bytes}}}} served
  as the Hub's `resolve` endpoint serves them (HEAD and GET, X-Repo-Commit, ETag, X-Error-Code);
  `requests` logs each (method, repo, revision, filename)."""

  def __init__(self):
    self.repos, self.requests = {}, []

  def add(self, repo, folder, refs=('main',)):
    """Serves `folder`'s files as a new commit of `repo` that each of `refs` points to."""
    contents = {}
    for name in sorted(os.listdir(folder)):
      with open(os.path.join(folder, name), 'rb') as f:
        contents[name] = f.read()
    commit = hashlib.sha1(repr(sorted((k, hashlib.sha1(v).hexdigest())
                                      for k, v in contents.items())).encode()).hexdigest()
    entry = self.repos.setdefault(repo, {'refs': {}, 'commits': {}})
    entry['commits'][commit] = contents
    entry['refs'].update({ref: commit for ref in refs})
    return commit

  def downloads(self, repo):
    return sorted({f for method, r, _, f in self.requests if method == 'GET' and r == repo})

  def respond(self, method, path):
    """(status, headers, body) of a `/{org}/{name}/resolve/{revision}/{filename}` request."""
    parts = [urllib.parse.unquote(p) for p in path.split('?')[0].strip('/').split('/')]
    if len(parts) != 5 or parts[2] != 'resolve':
      return 404, {}, b''
    repo, revision, filename = f'{parts[0]}/{parts[1]}', parts[3], parts[4]
    self.requests.append((method, repo, revision, filename))
    if repo not in self.repos:
      return 404, {'X-Error-Code': 'RepoNotFound'}, b''
    entry = self.repos[repo]
    commit = entry['refs'].get(revision, revision if revision in entry['commits'] else None)
    if commit is None:
      return 404, {'X-Error-Code': 'RevisionNotFound'}, b''
    if filename not in entry['commits'][commit]:
      return 404, {'X-Error-Code': 'EntryNotFound', 'X-Repo-Commit': commit}, b''
    body = entry['commits'][commit][filename]
    return 200, {'X-Repo-Commit': commit, 'ETag': f'"{hashlib.sha256(body).hexdigest()}"',
                 'Content-Length': str(len(body))}, body


def _handler(fake):
  class Handler(http.server.BaseHTTPRequestHandler):
    def _serve(self, with_body):
      status, headers, body = fake.respond(self.command, self.path)
      self.send_response(status)
      for k, v in {'Content-Length': str(len(body)), **headers}.items():
        self.send_header(k, v)
      self.end_headers()
      if with_body:
        self.wfile.write(body)

    def do_HEAD(self):  # pylint: disable=invalid-name
      self._serve(False)

    def do_GET(self):  # pylint: disable=invalid-name
      self._serve(True)

    def log_message(self, *args):
      pass
  return Handler


@pytest.fixture(scope='module')
def server():
  fake = FakeHub()
  httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), _handler(fake))
  thread = threading.Thread(target=httpd.serve_forever, daemon=True)
  thread.start()
  fake.endpoint = f'http://127.0.0.1:{httpd.server_address[1]}'
  yield fake
  httpd.shutdown()
  httpd.server_close()


@pytest.fixture
def fake_hub(server, tmp_path, monkeypatch):
  """The served Hub as huggingface_hub's endpoint, an empty cache in `tmp_path`, online."""
  set_cache(monkeypatch, tmp_path / 'cache')
  monkeypatch.setenv('HF_ENDPOINT', server.endpoint)
  monkeypatch.setattr(hub_constants, 'ENDPOINT', server.endpoint)
  monkeypatch.setattr(hub_constants, 'HUGGINGFACE_CO_URL_TEMPLATE',
                      server.endpoint + '/{repo_id}/resolve/{revision}/{filename}')
  set_offline(monkeypatch, False)
  server.requests.clear()
  return server


def set_cache(monkeypatch, folder):
  monkeypatch.setenv('HF_HOME', str(folder))
  monkeypatch.setenv('HF_HUB_CACHE', str(folder / 'hub'))
  monkeypatch.setattr(hub_constants, 'HF_HUB_CACHE', str(folder / 'hub'))


def set_offline(monkeypatch, offline):
  monkeypatch.setenv('HF_HUB_OFFLINE', '1' if offline else '0')
  monkeypatch.setattr(hub_constants, 'HF_HUB_OFFLINE', offline)


# ---------------------------------------------------------------- repositories, as shipped

class _BpeStub:
  """open_clip's save_for_hf saves the tokenizer it is given; OpenAI's BPE (open_clip's default,
  bundled here) needs no files."""

  def save_pretrained(self, folder):
    del folder


def open_clip_repo(oc, folder, seed, safe='both'):  # pylint: disable=redefined-outer-name
  """A small open_clip model (every parameter perturbed) saved by open_clip's own `save_for_hf`
  (open_clip_config.json; open_clip_model.safetensors and/or open_clip_pytorch_model.bin)."""
  m, model_cfg = checkpoint_families._open_clip_vit(oc, quick_gelu=True, seed=seed)  # pylint: disable=protected-access
  m.visual.image_mean, m.visual.image_std = clip.IMAGE_MEAN, clip.IMAGE_STD
  save_for_hf = importlib.import_module('open_clip.push_to_hf_hub').save_for_hf
  save_for_hf(m, _BpeStub(), model_cfg, str(folder), safe_serialization=safe)
  with open(os.path.join(folder, 'README.md'), 'w') as f:
    f.write('not read by the loader\n')
  return model_cfg


def transformers_repo(folder):
  """A small transformers CLIPModel `save_pretrained` in shards, its image processor and
  OpenAI's BPE tokenizer files as CLIP's Hub repositories hold them."""
  hf = checkpoint_families._hf_clip(seed=3)  # pylint: disable=protected-access
  hf.save_pretrained(folder, max_shard_size='100KB')
  checkpoint_families.save_image_processor(folder, False, hf.config.vision_config.image_size)
  export.write_processing_files(str(folder), hf_processing._openai_bpe_files(16))  # pylint: disable=protected-access


def assert_same_model(a, b):
  (params_a, cfg_a), (params_b, cfg_b) = a, b
  assert cfg_a == cfg_b
  flat_a, flat_b = files.flatten(params_a), files.flatten(params_b)
  assert flat_a.keys() == flat_b.keys()
  for k in flat_a:
    np.testing.assert_array_equal(np.asarray(flat_a[k]), np.asarray(flat_b[k]), err_msg=k)


def assert_differs(a, b):
  flat_a, flat_b = files.flatten(a[0]), files.flatten(b[0])
  assert any(not np.array_equal(np.asarray(flat_a[k]), np.asarray(flat_b[k])) for k in flat_a)


# ---------------------------------------------------------------- tests

def test_open_clip_repo_equals_its_folder_and_downloads_only_what_it_reads(oc, fake_hub,  # pylint: disable=redefined-outer-name
                                                                          tmp_path):
  folder = tmp_path / 'oc'
  open_clip_repo(oc, folder, seed=1)
  fake_hub.add('org/oc-tiny', folder)
  assert_same_model(clip.load('hf-hub:org/oc-tiny'), clip.load(str(folder)))
  # one weights file (the safetensors, as open_clip prefers), no README, no .bin
  assert fake_hub.downloads('org/oc-tiny') == ['open_clip_config.json',
                                               'open_clip_model.safetensors']


def test_transformers_repo_sharded_with_processing_equals_its_folder(fake_hub, tmp_path):
  folder = tmp_path / 'hf'
  transformers_repo(folder)
  assert 'model.safetensors.index.json' in os.listdir(folder)
  fake_hub.add('org/hf-clip', folder)
  params, cfg = clip.load('org/hf-clip')
  assert_same_model((params, cfg), clip.load(str(folder)))
  assert cfg.preprocess.crop_rounding == 'floor'  # transformers' CLIPImageProcessor, from its file
  shards = sorted(n for n in os.listdir(folder) if n.startswith('model-'))
  assert len(shards) > 1
  assert fake_hub.downloads('org/hf-clip') == sorted(
      ['config.json', 'model.safetensors.index.json', *shards, 'preprocessor_config.json',
       'tokenizer_config.json', 'vocab.json'])  # no merges.txt: the loader does not read it


def test_offline_loads_from_the_cache_and_without_it_raises(fake_hub, tmp_path, monkeypatch):
  folder = tmp_path / 'hf'
  transformers_repo(folder)
  fake_hub.add('org/hf-offline', folder)
  online = clip.load('org/hf-offline')
  set_offline(monkeypatch, True)
  fake_hub.requests.clear()
  assert_same_model(clip.load('org/hf-offline'), online)
  assert not fake_hub.requests  # nothing asked of the Hub
  set_cache(monkeypatch, tmp_path / 'empty_cache')
  with pytest.raises(clip.HubError, match=r"config.json of Hub repository 'org/hf-offline'.*"
                     r'not in the Hugging Face cache'):
    clip.load('org/hf-offline')


def test_revision_pins_the_revisions_files(oc, fake_hub, tmp_path):  # pylint: disable=redefined-outer-name
  old, new = tmp_path / 'v1', tmp_path / 'v2'
  open_clip_repo(oc, old, seed=2, safe=True)
  open_clip_repo(oc, new, seed=3, safe=True)
  old_commit = fake_hub.add('org/oc-revs', old, refs=('main', 'v1'))
  fake_hub.add('org/oc-revs', new, refs=('main',))
  want_old, want_new = clip.load(str(old)), clip.load(str(new))
  assert_differs(want_old, want_new)
  assert_same_model(clip.load('hf-hub:org/oc-revs'), want_new)
  assert_same_model(clip.load('hf-hub:org/oc-revs', revision='v1'), want_old)
  assert_same_model(clip.load('hf-hub:org/oc-revs', revision=old_commit), want_old)
  with pytest.raises(clip.HubError, match="'org/oc-revs' has no revision 'v9'"):
    clip.load('hf-hub:org/oc-revs', revision='v9')


def test_a_missing_repo_or_file_is_an_error_naming_it(oc, fake_hub, tmp_path):  # pylint: disable=redefined-outer-name
  with pytest.raises(clip.HubError, match="no Hub repository 'org/nothing-here'"):
    clip.load('hf-hub:org/nothing-here')
  with pytest.raises(clip.HubError, match="no Hub repository 'org/nothing-here'.*no local file"):
    clip.load('org/nothing-here')
  folder = tmp_path / 'oc'
  open_clip_repo(oc, folder, seed=4, safe=True)
  fake_hub.add('org/oc-only', folder)
  with pytest.raises(clip.HubError, match="'org/oc-only' .* has no config.json.*hf-hub:org/oc-only"):
    clip.load('org/oc-only')  # an open_clip repository asked for as a transformers one
  os.remove(folder / 'open_clip_model.safetensors')
  fake_hub.add('org/no-weights', folder)
  with pytest.raises(clip.HubError, match=r"'org/no-weights' .* has none of "
                     r"\['open_clip_model.safetensors', 'open_clip_pytorch_model.bin'\]"):
    clip.load('hf-hub:org/no-weights')


def test_a_local_path_wins_over_a_repo_id(oc, fake_hub, tmp_path, monkeypatch):  # pylint: disable=redefined-outer-name
  hub_folder, local = tmp_path / 'hub_side', tmp_path / 'cwd' / 'org' / 'same-name'
  open_clip_repo(oc, hub_folder, seed=5, safe=True)
  open_clip_repo(oc, local, seed=6, safe=True)
  fake_hub.add('org/same-name', hub_folder)
  monkeypatch.chdir(tmp_path / 'cwd')
  assert hub.is_hub_name('org/same-name') is False
  assert hub.is_hub_name('org/other-name') is True
  # A missing weights file is a missing file, not a repository: no Hub request.
  assert hub.is_hub_name('org/missing.pt') is False
  with pytest.raises(FileNotFoundError):
    clip.load('org/missing.pt')
  assert_same_model(clip.load('org/same-name'), clip.load(str(local)))
  assert_same_model(clip.load('hf-hub:org/same-name'), clip.load(str(hub_folder)))
  with pytest.raises(ValueError, match='revision= pins a Hub name'):
    clip.load('org/same-name', revision='v1')


def test_name_and_tag_resolve_through_the_table(oc, fake_hub, tmp_path, monkeypatch):  # pylint: disable=redefined-outer-name
  folder = tmp_path / 'named'
  model_cfg = open_clip_repo(oc, folder, seed=7, safe=False)  # a .bin only, as older repositories
  # A small model registered as open_clip would register a name, its QuickGELU tag and its repo.
  monkeypatch.setitem(open_clip_names.MODEL_CFGS, 'ViT-tiny', {**model_cfg, 'quick_gelu': False})
  monkeypatch.setitem(open_clip_names.PRETRAINED_TAGS, 'ViT-tiny', {'tiny_tag': True})
  monkeypatch.setitem(open_clip_pretrained.HF_HUB, 'ViT-tiny', {'tiny_tag': 'org/tiny-tag/'})
  fake_hub.add('org/tiny-tag', folder)
  params, cfg = clip.load('ViT-tiny', pretrained='TINY-TAG')
  assert cfg.vision.mlp == 'quick_gelu'  # the tag's activation, not the name's
  want = clip.load(str(folder / 'open_clip_pytorch_model.bin'),
                   config=open_clip_names.open_clip_config('ViT-tiny', 'tiny_tag'),
                   preprocess=open_clip_pretrained.preprocess_config('ViT-tiny', 'tiny_tag'))
  assert_same_model((params, cfg), want)
  assert fake_hub.downloads('org/tiny-tag') == ['open_clip_pytorch_model.bin']
  # a real name and tag goes to the repository open_clip names for it
  with pytest.raises(clip.HubError, match="'laion/CLIP-ViT-B-32-laion2B-s34B-b79K'"):
    clip.load('ViT-B-32', pretrained='laion2b_s34b_b79k')
  with pytest.raises(ValueError, match=r"clip.load\('ViT-B-32', pretrained='laion2b_s34b_b79k'\)"):
    clip.load('ViT-B-32/laion2b_s34b_b79k')
  with pytest.raises(KeyError, match="unknown pretrained tag 'no_such_tag'"):
    clip.load('ViT-B-32', pretrained='no_such_tag')
  url = 'https://example.org/weights/tiny.pt'
  monkeypatch.setitem(open_clip_pretrained.HF_HUB, 'ViT-tiny', {'tiny_tag': url})
  with pytest.raises(clip.HubError, match=f'released at {url}.*download that file'):
    clip.load('ViT-tiny', pretrained='tiny_tag')


def test_a_sentencepiece_tokenizer_comes_from_the_repo_the_config_names(oc, fake_hub, tmp_path):  # pylint: disable=redefined-outer-name
  """open_clip's HFTokenizer reads `text_cfg.hf_tokenizer_name`'s repository when the model's own
  holds no tokenizer (its SigLIP names share timm/ViT-B-16-SigLIP's)."""
  folder, tok_folder = tmp_path / 'oc', tmp_path / 'tok'
  model_cfg = open_clip_repo(oc, folder, seed=8, safe=True)
  model_cfg['text_cfg'].update(hf_tokenizer_name='org/shared-tok', pool_type='eos', eos_id=1,
                               tokenizer_kwargs={'clean': 'canonicalize'})  # T5's '</s>' is 1
  config_path = str(folder / 'open_clip_config.json')
  export.write_json(config_path, {**files.read_json(config_path), 'model_cfg': model_cfg})
  os.makedirs(tok_folder)
  spm = checkpoint_families.tiny_sentencepiece(str(tmp_path))
  os.replace(spm, tok_folder / 'spiece.model')
  fake_hub.add('org/oc-tok', folder)
  fake_hub.add('org/shared-tok', tok_folder)
  params, cfg = clip.load('hf-hub:org/oc-tok')
  assert os.path.realpath(cfg.tokenizer.model_file).startswith(hub_constants.HF_HUB_CACHE)
  assert 'models--org--shared-tok' in cfg.tokenizer.model_file
  want = clip.load(str(folder), tokenizer=str(tok_folder / 'spiece.model'))
  assert (cfg.tokenizer.kind, cfg.tokenizer.clean) == ('siglip', 'canonicalize')
  assert_same_model((params, dataclasses.replace(cfg, tokenizer=want[1].tokenizer)), want)
  texts = ['red', 'a star']
  np.testing.assert_array_equal(clip.get_tokenizer(cfg)(texts), clip.get_tokenizer(want[1])(texts))
  # a repository holding its own tokenizer: read beside the weights, the named one not asked
  shutil.copy(tok_folder / 'spiece.model', folder / 'spiece.model')
  fake_hub.add('org/oc-tok-own', folder)
  fake_hub.requests.clear()
  _, own_cfg = clip.load('hf-hub:org/oc-tok-own')
  assert 'models--org--oc-tok-own' in own_cfg.tokenizer.model_file
  assert dataclasses.replace(own_cfg.tokenizer, model_file=None) == dataclasses.replace(
      cfg.tokenizer, model_file=None)
  assert not fake_hub.downloads('org/shared-tok')
