"""clip.load's config resolution (clip/formats/load.py): a given config is checked against the
files, names resolve to OpenAI's or open_clip's configs."""

import dataclasses

import pytest
import safetensors.numpy

import clip
from clip.formats import load

from tests.formats.test_openai import state_dict  # pylint: disable=unused-import
from tests.formats.test_openai import torch_model  # pylint: disable=unused-import

def test_config_that_does_not_fit(tmp_path, state_dict):
  safetensors.numpy.save_file(state_dict, str(tmp_path / 'm.safetensors'))
  with pytest.raises(clip.CheckpointError, match='missing'):
    clip.load(tmp_path / 'm.safetensors', config=clip.MODELS['ViT-B/32'])
  with pytest.raises(clip.CheckpointError, match='missing'):  # OpenAI's names work too
    clip.load(tmp_path / 'm.safetensors', config='ViT-B/32')
  with pytest.raises(KeyError, match='ViT-B-32, not ViT-B/32'):
    clip.load(tmp_path / 'm.safetensors', config='ViT-B/31')
  with pytest.raises(TypeError, match='CLIPConfig'):
    clip.load(tmp_path / 'm.safetensors', config=512)
  with pytest.raises(ValueError, match="names both OpenAI's RN50"):
    clip.load(tmp_path / 'm.safetensors', config='RN50')


def test_config_differences_names_each_architecture_field():
  """The walk behind 'config= contradicts the config file beside it': architecture fields only
  (runtime fields, tokenizer and preprocessing aside), nested ones by their path."""
  given = clip.MODELS['ViT-B/32']
  stated = dataclasses.replace(given, embed_dim=256, scan=True,
                               tokenizer=clip.TokenizerConfig('siglip'),
                               vision=dataclasses.replace(given.vision, layers=6))
  assert load.config_differences(given, stated) == [
      'embed_dim: config= says 512, the file says 256',
      'vision.layers: config= says 12, the file says 6']
  assert not load.config_differences(given, dataclasses.replace(given, dtype='bfloat16'))


def test_config_differences_name_a_tower_one_side_lacks():
  """A captioning decoder (or text tower) on one side only is a difference, not an AttributeError."""
  given = clip.MODELS['ViT-B/32']
  stated = dataclasses.replace(given, decoder=clip.DecoderConfig(width=64, layers=1, heads=1))
  assert load.config_differences(given, stated) == [
      f'decoder: config= says None, the file says {stated.decoder!r}']
