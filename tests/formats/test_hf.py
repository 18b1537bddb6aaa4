"""Hugging Face CLIPModel (clip/formats/hf.py): parity with transformers, its activations read,
unknown keys refused."""

import numpy as np
import pytest
import torch
import transformers

import clip
from experiments.references import openai as reference

from tests.formats.test_openai import RTOL
from tests.formats.test_openai import inputs  # pylint: disable=unused-import
from tests.formats.test_openai import state_dict  # pylint: disable=unused-import
from tests.formats.test_openai import torch_model  # pylint: disable=unused-import

def hf_model(seed=0):
  """A random Hugging Face CLIPModel with OpenAI's architecture (QuickGELU), biases perturbed."""
  config = transformers.CLIPConfig(
      text_config=dict(hidden_size=48, intermediate_size=192, num_hidden_layers=2,
                       num_attention_heads=4, vocab_size=100, max_position_embeddings=16,
                       hidden_act='quick_gelu', eos_token_id=99, bos_token_id=98),
      vision_config=dict(hidden_size=40, intermediate_size=160, num_hidden_layers=2,
                         num_attention_heads=5, image_size=32, patch_size=8,
                         hidden_act='quick_gelu'),
      projection_dim=24)
  torch.manual_seed(seed)
  return reference.perturb(transformers.CLIPModel(config).eval())


def test_hugging_face_parity(tmp_path, inputs):
  hf = hf_model()
  hf.save_pretrained(tmp_path)
  params, cfg = clip.load(tmp_path)
  assert (cfg.vision.heads, cfg.text.heads, cfg.vision.width, cfg.text.width) == (5, 4, 40, 48)
  images, _ = inputs
  tokens = reference.random_tokens(np.random.default_rng(1), 3, cfg)
  with torch.no_grad():
    out = hf(input_ids=torch.from_numpy(tokens).long(),
             pixel_values=torch.from_numpy(images).permute(0, 3, 1, 2))
  ours = clip.apply(params, images, tokens, cfg)
  for name, expected in (('image', out.image_embeds), ('text', out.text_embeds)):
    features = (clip.encode_image(params, images, cfg) if name == 'image'
                else clip.encode_text(params, tokens, cfg))
    features = features / np.linalg.norm(features, axis=-1, keepdims=True)
    np.testing.assert_allclose(features, expected.numpy(), rtol=RTOL, atol=1e-5)
  np.testing.assert_allclose(ours[0], out.logits_per_image.numpy(), rtol=RTOL, atol=1e-4)
  np.testing.assert_allclose(ours[1], out.logits_per_text.numpy(), rtol=RTOL, atol=1e-4)


def test_hugging_face_unsupported_activation_is_refused(tmp_path):
  hf = hf_model()
  hf.config.text_config.hidden_act = 'relu'
  hf.save_pretrained(tmp_path)
  with pytest.raises(clip.CheckpointError, match="'relu' is not one we run exactly"):
    clip.load(tmp_path)


def test_hugging_face_unknown_key(tmp_path, state_dict):
  hf = {f'text_model.{k}': torch.from_numpy(v) for k, v in state_dict.items()}
  hf['text_model.encoder.layers.0.self_attn.rotary.weight'] = torch.zeros(2)
  torch.save(hf, tmp_path / 'hf.bin')
  with pytest.raises(clip.CheckpointError, match='no place in this layout'):
    clip.load(tmp_path / 'hf.bin')
