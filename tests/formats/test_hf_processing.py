"""clip/formats/hf_processing.py: `clip.load` of a Hugging Face folder records the tokenizer and
image preprocessing its files state (transformers 5's processor_config.json, transformers 4's
preprocessor_config.json, a SigLIP / Gemma / CLIP tokenizer), each against transformers' own
processor and tokenizer saved in the folder."""
# pylint: disable=redefined-outer-name
import dataclasses
import json
import os
import re
import shutil
import warnings

import numpy as np
import pytest
import torch
import transformers
from transformers import AutoImageProcessor
from transformers import CLIPImageProcessorPil
from transformers import CLIPTokenizer
from transformers import SiglipImageProcessorPil

import clip
from clip.formats import siglip
from experiments.references import openai as reference
from tests.test_processing import HF
from tests.test_processing import PROMPTS
from tests.test_processing import R
from tests.test_processing import SENTENCEPIECE_FILE
from tests.test_processing import _assert_hf_equal
from tests.test_processing import _hf_nhwc
from tests.test_processing import _read
# Fixtures: image files of every size and mode, transformers' SiglipModel folders and the tiny
# SentencePiece models they read.
from tests.test_processing import hf_siglip_folders  # pylint: disable=unused-import
from tests.test_processing import image_files  # pylint: disable=unused-import
from tests.test_siglip_tokenizer import model_files  # pylint: disable=unused-import
from tests.test_siglip_tokenizer import siglip2_folder  # pylint: disable=unused-import

# PIL's note when a palette image with an alpha per entry is converted to RGB.
pytestmark = pytest.mark.filterwarnings('ignore:Palette images with Transparency:UserWarning')


@pytest.mark.parametrize('kind', ['siglip', 'siglip2'])
def test_load_hugging_face_siglip_folder_records_its_processing(kind, hf_siglip_folders,
                                                                image_files, tmp_path):
  """The tokenizer, and transformers' conventions with SigLIP's settings: the folder's own
  processor (transformers 5's processor_config.json, PIL backend) gives our pixels on every
  file."""
  folder, _ = hf_siglip_folders[kind]
  if kind == 'siglip2':  # a Gemma tokenizer does not lower-case: said, and done as SigLIP 2's
    with pytest.warns(clip.CheckpointWarning, match='lower-cased text for its GemmaTokenizer'):
      _, cfg = clip.load(folder)
  else:
    with warnings.catch_warnings():
      warnings.simplefilter('error')
      _, cfg = clip.load(folder)
  assert cfg.tokenizer == clip.TokenizerConfig(kind, str(folder / SENTENCEPIECE_FILE[kind]),
                                               {'siglip': 'siglip', 'siglip2': 'lower'}[kind])
  assert cfg.preprocess == dataclasses.replace(siglip.SIGLIP_PREPROCESS, **HF)
  processor = transformers.AutoImageProcessor.from_pretrained(folder, backend='pil')
  _assert_hf_equal(clip.preprocess_images([f.path for f in image_files], cfg),
                   _hf_nhwc(processor, [_read(f.path) for f in image_files]))
  if kind == 'siglip2':  # hub folders saved by transformers 4 name the fast class
    shutil.copytree(folder, tmp_path, dirs_exist_ok=True)
    tokenizer_config = json.loads((tmp_path / 'tokenizer_config.json').read_text())
    assert tokenizer_config['tokenizer_class'] == 'GemmaTokenizer'
    tokenizer_config['tokenizer_class'] = 'GemmaTokenizerFast'
    (tmp_path / 'tokenizer_config.json').write_text(json.dumps(tokenizer_config))
    with pytest.warns(clip.CheckpointWarning, match='GemmaTokenizerFast'):
      loaded = clip.load(tmp_path)[1]
    assert loaded.tokenizer == dataclasses.replace(
        cfg.tokenizer, model_file=str(tmp_path / 'tokenizer.model'))


def test_load_reads_transformers_4_preprocessor_config(hf_siglip_folders, image_files, tmp_path):
  """A hub folder saved by transformers 4 holds the image processor's settings in
  `preprocessor_config.json`; other settings than SigLIP's are read, and the pixels are that
  processor's on every file. `do_convert_rgb: false` is read as `convert_first=False` (transformers
  then takes RGB images only, and those are the same either way)."""
  folder, _ = hf_siglip_folders['siglip']
  for name in ('config.json', 'model.safetensors', 'spiece.model', 'tokenizer_config.json'):
    shutil.copy(folder / name, tmp_path)
  processor = SiglipImageProcessorPil(size={'height': R, 'width': R}, resample=2,
                                      image_mean=[0.4, 0.5, 0.6], image_std=[0.2, 0.3, 0.4])
  processor.save_pretrained(tmp_path)
  assert (tmp_path / 'preprocessor_config.json').exists()
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    _, cfg = clip.load(tmp_path)
  assert cfg.preprocess == clip.PreprocessConfig((0.4, 0.5, 0.6), (0.2, 0.3, 0.4), 'squash',
                                                 'bilinear', **HF)
  _assert_hf_equal(clip.preprocess_images([f.path for f in image_files], cfg),
                   _hf_nhwc(processor, [_read(f.path) for f in image_files]))
  settings = json.loads((tmp_path / 'preprocessor_config.json').read_text())
  (tmp_path / 'preprocessor_config.json').write_text(json.dumps({**settings,
                                                                 'do_convert_rgb': False}))
  _, cfg = clip.load(tmp_path)
  assert cfg.preprocess == clip.PreprocessConfig((0.4, 0.5, 0.6), (0.2, 0.3, 0.4), 'squash',
                                                 'bilinear', convert_first=False,
                                                 crop_rounding='floor')
  rgb = [f.path for f in image_files if f.mode == 'RGB' and not f.transparent]
  processor = SiglipImageProcessorPil.from_pretrained(tmp_path)
  assert processor.do_convert_rgb is False
  _assert_hf_equal(clip.preprocess_images(rgb, cfg), _hf_nhwc(processor, map(_read, rgb)))


def _hf_clip(vocab_size, seed=0):
  config = transformers.CLIPConfig(
      text_config=dict(hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                       num_attention_heads=4, vocab_size=vocab_size, max_position_embeddings=77,
                       bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=0),
      vision_config=dict(hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                         num_attention_heads=2, image_size=R, patch_size=8),
      projection_dim=32)
  torch.manual_seed(seed)
  return reference.perturb(transformers.CLIPModel(config).eval(), seed)


def _save_clip_tokenizer(folder, vocab, merges):
  """vocab.json and merges.txt, as hub folders hold them, and `CLIPTokenizer`'s own files (all
  that transformers 5 saves: tokenizer.json, tokenizer_config.json)."""
  (folder / 'vocab.json').write_text(json.dumps(vocab), encoding='utf-8')
  (folder / 'merges.txt').write_text('#version: 0.2\n' + ''.join(f'{m}\n' for m in merges),
                                     encoding='utf-8')
  CLIPTokenizer.from_pretrained(folder).save_pretrained(folder)


@pytest.mark.parametrize('files', ['vocab.json', 'tokenizer.json'])
def test_load_hugging_face_clip_folder_with_openai_tokenizer(files, image_files, tmp_path):
  """OpenAI's vocabulary and merges (from OpenAI's own tokenizer; in vocab.json, or only in
  tokenizer.json as transformers 5 saves it) and a `CLIPImageProcessor`: OpenAI's tokenizer,
  whose tokens are `clip.tokenize`'s, and OpenAI's settings with transformers' conventions, whose
  pixels are the folder's own processor's on every file."""
  _hf_clip(49408).save_pretrained(tmp_path)
  CLIPImageProcessorPil(size={'shortest_edge': R},
                        crop_size={'height': R, 'width': R}).save_pretrained(tmp_path)
  openai = reference.load_module('simple_tokenizer').SimpleTokenizer()
  merges = sorted(openai.bpe_ranks, key=openai.bpe_ranks.get)
  _save_clip_tokenizer(tmp_path, openai.encoder, [' '.join(pair) for pair in merges])
  if files == 'tokenizer.json':
    os.remove(tmp_path / 'vocab.json')
    os.remove(tmp_path / 'merges.txt')
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    _, cfg = clip.load(tmp_path)
  assert (cfg.tokenizer, cfg.preprocess) == (clip.TokenizerConfig(), clip.PreprocessConfig(**HF))
  np.testing.assert_array_equal(clip.get_tokenizer(cfg)(PROMPTS, truncate=True),
                                clip.tokenize(PROMPTS, truncate=True))
  processor = AutoImageProcessor.from_pretrained(tmp_path, backend='pil')
  _assert_hf_equal(clip.preprocess_images([f.path for f in image_files], cfg),
                   _hf_nhwc(processor, [_read(f.path) for f in image_files]))


@pytest.mark.parametrize('files', ['vocab.json', 'tokenizer.json'])
def test_load_hugging_face_clip_folder_with_another_vocabulary(files, tmp_path):
  """A CLIP folder whose BPE vocabulary is not OpenAI's (in vocab.json, or only in
  tokenizer.json as transformers 5 saves it): kind 'unknown', and tokenising raises naming it;
  OpenAI's BPE stated instead raises because its ids do not fit."""
  words = [f'{w}</w>' for w in ('a', 'photo', 'of', 'cat', 'dog')] + list('abcdefghijklmnop')
  _save_clip_tokenizer(tmp_path, {w: i for i, w in enumerate(words)}, [])
  if files == 'tokenizer.json':
    os.remove(tmp_path / 'vocab.json')
    os.remove(tmp_path / 'merges.txt')
  _hf_clip(100).save_pretrained(tmp_path)
  no_processor = 'assumed OpenAI.s image preprocessing'
  with pytest.warns(clip.CheckpointWarning, match=no_processor):
    _, cfg = clip.load(tmp_path)
  path = str(tmp_path / files)
  assert cfg.tokenizer == clip.TokenizerConfig(
      'unknown', name=f'a BPE vocabulary other than OpenAI\'s ({path})')
  with pytest.raises(clip.TokenizerError, match=re.escape(path)):
    clip.get_tokenizer(cfg)
  with pytest.warns(clip.CheckpointWarning, match=no_processor):
    _, cfg = clip.load(tmp_path, tokenizer=clip.TokenizerConfig())
  with pytest.raises(clip.TokenizerError, match="49408 ids, but the model's vocabulary holds 100"):
    clip.get_tokenizer(cfg)


def test_a_folder_whose_tokenizer_returns_a_mask_warns(hf_siglip_folders, tmp_path):
  """transformers' SiglipModel masks the padding when the folder's tokenizer returns an attention
  mask; SigLIP (and we) attend to it: said on load."""
  folder, _ = hf_siglip_folders['siglip']
  shutil.copytree(folder, tmp_path, dirs_exist_ok=True)
  tokenizer_config = json.loads((tmp_path / 'tokenizer_config.json').read_text())
  tokenizer_config.pop('model_input_names', None)
  (tmp_path / 'tokenizer_config.json').write_text(json.dumps(tokenizer_config))
  with pytest.warns(clip.CheckpointWarning, match='no padding mask, as SigLIP was trained'):
    clip.load(tmp_path)
