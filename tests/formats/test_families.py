"""clip/formats/families.py: a state dict of a family this package refuses is refused naming its
keys (`families.detect`), and a tokenizer file given for a folder is held against what the folder
states (`families.given_tokenizer`)."""
# pylint: disable=redefined-outer-name
import pytest
import sentencepiece
import torch

import clip
from tests.test_processing import PROMPTS
# Fixtures: transformers' SiglipModel folders and the tiny SentencePiece models they read.
from tests.test_processing import hf_siglip_folders  # pylint: disable=unused-import
from tests.test_siglip_tokenizer import model_files  # pylint: disable=unused-import
from tests.test_siglip_tokenizer import siglip2_folder  # pylint: disable=unused-import


def test_unsupported_family_is_refused_naming_its_keys(tmp_path):
  state = {'visual.trunk.stem.0.weight': torch.zeros(8, 3, 4, 4),
           'visual.trunk.stages.0.blocks.0.conv_dw.weight': torch.zeros(8, 1, 7, 7),
           'visual.head.proj.weight': torch.zeros(4, 8), 'logit_scale': torch.zeros(())}
  torch.save(state, tmp_path / 'convnext.pt')
  with pytest.raises(clip.CheckpointError,
                     match=r'ConvNeXt.*visual\.trunk\.stages\.0\.blocks\.0\.conv_dw'):
    clip.load(tmp_path / 'convnext.pt')


def test_a_given_tokenizer_file_that_contradicts_the_folder_is_refused(
    hf_siglip_folders, model_files, tmp_path):
  """`tokenizer=<path>` is held against what the folder states: its tokenizer class's kind, and
  config.json's text eos_token_id."""
  folder, _ = hf_siglip_folders['siglip']
  with pytest.raises(clip.CheckpointError, match='is a siglip2 vocabulary, but the folder.s '
                     'tokenizer_config.json states a siglip one'):
    clip.load(folder, tokenizer=model_files['siglip2'])
  corpus = tmp_path / 'corpus.txt'
  corpus.write_text('\n'.join(PROMPTS))
  sentencepiece.SentencePieceTrainer.train(
      input=str(corpus), model_prefix=str(tmp_path / 'eos2'), model_type='unigram',
      vocab_size=90, pad_id=0, eos_id=2, unk_id=1, bos_id=-1, minloglevel=2,
      character_coverage=0.99)
  with pytest.raises(clip.CheckpointError, match='ends sequences with id 2, but config.json '
                     'states eos_token_id=1'):
    clip.load(folder, tokenizer=str(tmp_path / 'eos2.model'))
