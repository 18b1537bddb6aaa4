"""MetaCLIP 2 worldwide (open_clip's `*-worldwide` names): its XLM-V-style tokenizer
(clip/xlmr_tokenizer.py) against open_clip's `HFTokenizer` token for token, a small model saved as
open_clip's hub folders hold it (config, weights, tokenizer files) against open_clip's features,
and the same by Hub name, its tokenizer from the repository `hf_tokenizer_name` names."""
# pylint: disable=redefined-outer-name
import dataclasses
import json
import os
import pathlib
import shutil

import numpy as np
import pytest
import tokenizers
import torch

import clip
from clip import xlmr_tokenizer
from clip.formats import export
from clip.formats import files
from clip.formats import open_clip_names
from clip.formats import open_clip_pretrained
from clip.formats.open_clip import config_from_open_clip
from experiments.checkpoint_families_measure import save_image_processor
from experiments.checkpoint_families_recent import METACLIP2_CONTEXT as CONTEXT
from experiments.checkpoint_families_recent import hf_metaclip2_model
from experiments.checkpoint_families_recent import metaclip2_hub_folder
from experiments.checkpoint_families_recent import multilingual_texts
from experiments.checkpoint_families_recent import xlmr_tokenizer_folders
from tests.formats.test_checkpoint_families import RTOL
from tests.formats.test_checkpoint_families import _assert_open_clip_equal
from tests.formats.test_checkpoint_families import _rel_err
from tests.formats.test_hub import assert_same_model
from tests.formats.test_hub import fake_hub  # pylint: disable=unused-import
from tests.formats.test_hub import server  # pylint: disable=unused-import
from tests.test_processing import oc  # pylint: disable=unused-import

@pytest.fixture(scope='module')
def xlmr_folders(tmp_path_factory):
  """experiments.checkpoint_families_recent.xlmr_tokenizer_folders, as Paths."""
  folders = xlmr_tokenizer_folders(str(tmp_path_factory.mktemp('xlmr')))
  return {name: pathlib.Path(folder) for name, folder in folders.items()}


@pytest.mark.parametrize('layout', ['transformers5', 'old_converter'])
def test_tokenizer_equals_open_clips_hftokenizer(oc, xlmr_folders, layout):
  folder = xlmr_folders[layout]
  theirs = oc.tokenizer.HFTokenizer(str(folder), context_length=CONTEXT)
  ours = xlmr_tokenizer.XLMRTokenizer(folder / 'tokenizer.json', context_length=CONTEXT)
  texts = multilingual_texts()
  tokens = ours(texts, truncate=True)
  want = theirs(texts).numpy()
  assert tokens.dtype == np.int32
  np.testing.assert_array_equal(tokens, want)
  # the texts reach what they are meant to: cut rows, unknown pieces, empty rows, two end ids
  assert (tokens[:, -1] == ours.eos_id).sum() >= 20
  assert (tokens == 3).any() and [0, 2, 1] == tokens[0, :3].tolist()
  assert ((tokens == ours.eos_id).sum(axis=1) > 1).any()
  assert ours.decode(tokens[40:60]) == theirs.tokenizer.batch_decode(
      torch.from_numpy(want[40:60]), skip_special_tokens=True)


def test_tokenizer_errors(xlmr_folders, tmp_path):
  path = xlmr_folders['transformers5'] / 'tokenizer.json'
  ours = xlmr_tokenizer.XLMRTokenizer(path, context_length=CONTEXT)
  with pytest.raises(ValueError, match='longer than context_length=16; pass truncate=True'):
    ours(['a photo of a cat ' * 10])
  with pytest.raises(ValueError, match=r'>= 2 \(room for <s> and </s>\), got 1'):
    ours(['a'], context_length=1)
  with pytest.raises(ValueError, match='clean must be one of'):
    xlmr_tokenizer.XLMRTokenizer(path, clean='lower')
  with pytest.raises(FileNotFoundError, match='does not exist'):
    xlmr_tokenizer.XLMRTokenizer(tmp_path / 'tokenizer.json')
  # a tokenizer.json of another family: a word-level vocabulary, then one without <pad>
  words = tokenizers.Tokenizer(tokenizers.models.WordLevel(
      {'<s>': 0, '<pad>': 1, '</s>': 2, '<unk>': 3, 'a': 4}, unk_token='<unk>'))
  words.save(str(tmp_path / 'tokenizer.json'))
  with pytest.raises(ValueError, match='its model is WordLevel, not a SentencePiece Unigram'):
    xlmr_tokenizer.XLMRTokenizer(tmp_path / 'tokenizer.json')
  with open(path, encoding='utf-8') as f:
    data = json.load(f)
  data['model']['vocab'][1][0] = '<nopad>'
  data['added_tokens'] = [t for t in data['added_tokens'] if t['content'] != '<pad>']
  with open(tmp_path / 'tokenizer.json', 'w', encoding='utf-8') as f:
    json.dump(data, f)
  with pytest.raises(ValueError, match=r"XLM-RoBERTa-style tokenizer: it has no \['<pad>'\]"):
    xlmr_tokenizer.XLMRTokenizer(tmp_path / 'tokenizer.json')
  with pytest.raises(ValueError, match="clean must be one of .* for kind 'xlmr', got 'siglip'"):
    clip.TokenizerConfig('xlmr', str(path), 'siglip')


def _assert_equal_to_open_clip(m, params, cfg, theirs_tokenizer):
  texts = multilingual_texts(24, seed=2) + ['a cat </s> a dog']
  tokens = clip.get_tokenizer(cfg)(texts, truncate=True)
  np.testing.assert_array_equal(tokens, theirs_tokenizer(texts).numpy())
  _assert_open_clip_equal(m, params, cfg, tokens)


def test_open_clip_folder_loads_equal_to_open_clip(oc, xlmr_folders, tmp_path):
  m, model_cfg = metaclip2_hub_folder(oc, xlmr_folders['transformers5'], tmp_path)
  params, cfg = clip.load(tmp_path)
  assert cfg.tokenizer == clip.TokenizerConfig('xlmr', str(tmp_path / 'tokenizer.json'),
                                               'whitespace')
  assert dataclasses.replace(cfg, tokenizer=clip.TokenizerConfig(),
                             preprocess=clip.PreprocessConfig()) == config_from_open_clip(model_cfg)
  assert (cfg.text.pool, cfg.text.eot_id, cfg.text.causal) == ('eot', 2, True)
  theirs = oc.create_model(f'local-dir:{tmp_path}').eval()
  _assert_equal_to_open_clip(theirs, params, cfg, oc.get_tokenizer(f'local-dir:{tmp_path}'))
  _assert_equal_to_open_clip(m, params, cfg, oc.get_tokenizer(f'local-dir:{tmp_path}'))
  # exported as open_clip's folders hold it: open_clip loads it equal, and so do we
  out = tmp_path / 'export'
  clip.save_open_clip(params, cfg, out)
  _assert_equal_to_open_clip(oc.create_model(f'local-dir:{out}').eval(), params, cfg,
                             oc.get_tokenizer(f'local-dir:{out}'))
  again, again_cfg = clip.load(out)
  assert again_cfg.tokenizer == dataclasses.replace(cfg.tokenizer,
                                                    model_file=str(out / 'tokenizer.json'))
  assert_same_model((again, again_cfg), (params, dataclasses.replace(
      cfg, tokenizer=again_cfg.tokenizer)))
  with pytest.raises(export.ExportError, match='cleans nothing'):
    clip.save_open_clip(params, dataclasses.replace(cfg, tokenizer=dataclasses.replace(
        cfg.tokenizer, clean='none')), tmp_path / 'none')
  # without its tokenizer.json the weights load; the tokenizer says what is missing
  os.remove(tmp_path / 'tokenizer.json')
  model_cfg['text_cfg']['hf_tokenizer_name'] = 'facebook/xlm-v-base'
  config_path = str(tmp_path / 'open_clip_config.json')
  export.write_json(config_path, {**files.read_json(config_path), 'model_cfg': model_cfg})
  _, bare = clip.load(tmp_path)
  assert bare.tokenizer == clip.TokenizerConfig('xlmr', None, 'whitespace')
  with pytest.raises(clip.TokenizerError, match='tokenizer.json is not known'):
    clip.get_tokenizer(bare)


def test_hub_repo_and_name_read_the_tokenizer_repo_the_config_names(oc, xlmr_folders, fake_hub,
                                                                     tmp_path, monkeypatch):
  """As open_clip's MetaCLIP 2 repositories: `hf_tokenizer_name` names the tokenizer's own
  repository (`facebook/xlm-v-base`); `clip.load` by repository and by name and tag."""
  folder = tmp_path / 'mc2'
  m, model_cfg = metaclip2_hub_folder(oc, xlmr_folders['old_converter'], folder, seed=1)
  model_cfg['text_cfg']['hf_tokenizer_name'] = 'org/xlm-tiny'
  config_path = str(folder / 'open_clip_config.json')
  export.write_json(config_path, {**files.read_json(config_path), 'model_cfg': model_cfg})
  for name in os.listdir(folder):
    if name.startswith(('tokenizer', 'special_tokens', 'sentencepiece')):
      os.remove(folder / name)
  fake_hub.add('org/mc2-tiny', folder)
  fake_hub.add('org/xlm-tiny', xlmr_folders['old_converter'])
  params, cfg = clip.load('hf-hub:org/mc2-tiny')
  assert cfg.tokenizer.kind == 'xlmr' and 'models--org--xlm-tiny' in cfg.tokenizer.model_file
  theirs_tok = oc.tokenizer.HFTokenizer(str(xlmr_folders['old_converter']),
                                        context_length=CONTEXT)
  _assert_equal_to_open_clip(m, params, cfg, theirs_tok)
  assert fake_hub.downloads('org/xlm-tiny') == ['tokenizer.json']
  # by name and tag, registered as open_clip registers its worldwide names
  monkeypatch.setitem(open_clip_names.MODEL_CFGS, 'ViT-tiny-worldwide',
                      {**model_cfg, 'quick_gelu': False})
  monkeypatch.setitem(open_clip_names.PRETRAINED_TAGS, 'ViT-tiny-worldwide',
                      {'metaclip2_worldwide': True})
  monkeypatch.setitem(open_clip_pretrained.HF_HUB, 'ViT-tiny-worldwide',
                      {'metaclip2_worldwide': 'org/mc2-tiny/'})
  named = clip.load('ViT-tiny-worldwide', pretrained='metaclip2_worldwide')
  assert_same_model(named, (params, cfg))


def test_worldwide_names_state_metaclip2s_tokenizer_and_pooling():
  cfg = clip.open_clip_config('ViT-H-14-worldwide', 'metaclip2_worldwide')
  assert cfg == clip.open_clip_config('ViT-H-14-worldwide-quickgelu')
  assert (cfg.text.pool, cfg.text.eot_id, cfg.text.causal, cfg.vision.mlp) == (
      'eot', 2, True, 'quick_gelu')
  big = clip.open_clip_config('ViT-bigG-14-worldwide-378', 'metaclip2_worldwide')
  assert (big.vision.mlp, big.vision.image_resolution) == ('gelu', 378)
  assert open_clip_pretrained.preprocess_config(
      'ViT-H-14-worldwide-378', 'metaclip2_worldwide').resize_mode == 'squash'


def test_transformers_metaclip2_folder_equals_transformers(xlmr_folders, fake_hub, tmp_path):
  """transformers' `MetaClip2Model` (model_type 'metaclip_2': CLIP's towers pooled at the first
  `eos_token_id`) with its `XLMRobertaTokenizer`, which cleans nothing."""
  import transformers  # pylint: disable=g-import-not-at-top
  # the older converter's tokenizer.json, which transformers 5 runs in its own pipeline
  for name in ('tokenizer.json', 'tokenizer_config.json'):
    shutil.copy(xlmr_folders['old_converter'] / name, tmp_path / name)
  hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
  hf = hf_metaclip2_model(len(hf_tok))
  hf.save_pretrained(tmp_path)
  save_image_processor(tmp_path, False, 28)
  params, cfg = clip.load(tmp_path)
  fake_hub.add('org/metaclip2-hf', tmp_path)  # by repository id: its tokenizer.json comes along
  by_id = clip.load('org/metaclip2-hf')
  assert 'tokenizer.json' in fake_hub.downloads('org/metaclip2-hf')
  assert_same_model(by_id, (params, dataclasses.replace(cfg, tokenizer=by_id[1].tokenizer)))
  assert dataclasses.replace(by_id[1].tokenizer, model_file=None) == dataclasses.replace(
      cfg.tokenizer, model_file=None)
  assert (cfg.tokenizer.kind, cfg.tokenizer.clean) == ('xlmr', 'none')
  assert (cfg.text.pool, cfg.text.eot_id, cfg.text.causal) == ('eot', 2, True)
  texts = multilingual_texts(24, seed=3) + ['a cat </s> a dog', ' trailing space ', 'a  b\t']
  tokens = clip.get_tokenizer(cfg)(texts, truncate=True)
  want = hf_tok(texts, padding='max_length', max_length=CONTEXT, truncation=True,
                return_tensors='np').input_ids
  np.testing.assert_array_equal(tokens, want)
  images = np.random.default_rng(0).normal(size=(3, 28, 28, 3)).astype(np.float32)
  with torch.no_grad():
    img = hf.get_image_features(pixel_values=torch.from_numpy(images).permute(0, 3, 1, 2))
    txt = hf.get_text_features(input_ids=torch.from_numpy(tokens).long())
  img, txt = (getattr(x, 'pooler_output', x).numpy() for x in (img, txt))
  assert _rel_err(clip.encode_image(params, images, cfg), img) < RTOL
  assert _rel_err(clip.encode_text(params, tokens, cfg), txt) < RTOL
