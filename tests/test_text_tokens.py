"""Token ids at the public entry points: ids outside the vocabulary and rows without the
end-of-text token raise, naming the row; pooling (and the bidirectional padding mask) sits at the
first end-of-text token `TextConfig.eot_id`, not at the largest id (transformers' CLIPTextModel
with a non-legacy eos_token_id is the reference); inside another jit nothing is checked."""
import dataclasses

import jax
import numpy as np
import pytest
import torch
import transformers

import clip
from clip.formats import export
from clip.formats.hf import config_from_hf
from clip.formats.hf import hf_config
from clip.formats.hf import save_hf
from clip import model
from clip.eval import zero_shot
from experiments.references import openai as reference

RTOL = 1e-4  # fp32 against transformers, relative to the largest feature
SOT, EOT, ADDED = 49406, 49407, 49408
OPENAI_TEXT = clip.TextConfig(32, 1, 2, 8, 49408)
CFG = clip.CLIPConfig(16, clip.VisionConfig('vit', 32, 1, 2, 16, 8), OPENAI_TEXT)


def _row(*ids, length=8):
  return list(ids) + [0] * (length - len(ids))


@pytest.fixture(scope='module')
def params():
  return clip.init(jax.random.PRNGKey(0), CFG)


def _rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.abs(a - b).max() / np.abs(b).max()


# ---------------------------------------------------------------- ids outside the vocabulary

GOOD = _row(SOT, 320, EOT)


@pytest.mark.parametrize('bad_id', [60000, 49408, -1])
def test_encode_text_and_apply_name_the_row_and_the_id(params, bad_id):
  tokens = np.array([GOOD, _row(SOT, bad_id, 320, EOT)], np.int32)
  message = rf'token id {bad_id} at row 1, position 1 is outside the vocabulary.*\[0, 49408\)'
  with pytest.raises(ValueError, match=message):
    clip.encode_text(params, tokens, CFG)
  with pytest.raises(ValueError, match=message):
    clip.apply(params, np.zeros((1, 16, 16, 3), np.float32), tokens, CFG)
  with pytest.raises(ValueError, match=message):  # device arrays too
    clip.encode_text(params, jax.numpy.asarray(tokens), CFG)


@pytest.mark.parametrize('bad_id', [60000, -5])
def test_classifier_weights_from_tokens_names_class_and_template(params, bad_id):
  tokens = np.array([[GOOD, GOOD], [GOOD, _row(SOT, 320, bad_id, EOT)]], np.int32)
  with pytest.raises(ValueError, match=rf'token id {bad_id} at row \(1, 1\), position 2'):
    zero_shot.classifier_weights_from_tokens(params, tokens, CFG)


def test_rows_without_the_end_of_text_token_raise(params):
  tokens = np.array([GOOD, GOOD, _row(SOT, 320, 321)], np.int32)
  with pytest.raises(ValueError, match='row 2 has no end-of-text token 49407'):
    clip.encode_text(params, tokens, CFG)
  with pytest.raises(ValueError, match=r'row \(0, 1\) has no end-of-text token'):
    zero_shot.classifier_weights_from_tokens(params, tokens[None, 1:], CFG)


def test_towers_that_never_read_the_end_of_text_token_do_not_need_it():
  text = clip.TextConfig(32, 1, 2, 8, 100, pool='last', causal=False, mask_padding=False)
  cfg = dataclasses.replace(CFG, text=text)
  p = clip.init(jax.random.PRNGKey(1), cfg)
  assert np.isfinite(clip.encode_text(p, np.full((2, 8), 5, np.int32), cfg)).all()
  with pytest.raises(ValueError, match='token id 100 at row 0'):
    clip.encode_text(p, np.full((2, 8), 100, np.int32), cfg)


def test_inside_an_outer_jit_nothing_is_checked(params):
  """Traced tokens cannot be read: the checks run where the tokens are concrete, never as a
  host sync inside a compiled step."""
  tokens = np.array([GOOD, _row(SOT, 60000, -3, 321)], np.int32)
  encode = jax.jit(lambda p, t: clip.encode_text(p, t, CFG))
  logits = jax.jit(lambda p, i, t: clip.apply(p, i, t, CFG)[0])
  assert np.isfinite(encode(params, tokens)).all()
  assert np.isfinite(logits(params, np.zeros((1, 16, 16, 3), np.float32), tokens)).all()
  assert np.isfinite(model.encode_text_jit(params, tokens, CFG)).all()
  np.testing.assert_array_equal(encode(params, tokens[:1]),
                                clip.encode_text(params, tokens[:1], CFG))


def test_text_config_rejects_an_end_of_text_id_outside_the_vocabulary():
  with pytest.raises(ValueError, match=r'eot_token_id must be None .* in \[0, 100\), got 100'):
    clip.TextConfig(32, 1, 2, 8, 100, eot_token_id=100)
  assert clip.TextConfig(32, 1, 2, 8, 100).eot_id == 99
  assert clip.TextConfig(32, 1, 2, 8, 100, eot_token_id=7).eot_id == 7


# ---------------------------------------------------------------- pooling at the first EOT

def _hf_clip(eos, vocab=49410, seed=0):
  config = transformers.CLIPConfig(
      text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, vocab_size=vocab, max_position_embeddings=8,
                       eos_token_id=eos, hidden_act='quick_gelu'),
      vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, image_size=16, patch_size=8,
                         hidden_act='quick_gelu'),
      projection_dim=16)
  torch.manual_seed(seed)
  return reference.perturb(transformers.CLIPModel(config).eval(), seed)


def _hf_text(hf, tokens):
  with torch.no_grad():
    return hf.get_text_features(input_ids=torch.from_numpy(np.asarray(tokens)).long())


def _features(out):
  return (out.pooler_output if hasattr(out, 'pooler_output') else out).numpy()


# Added tokens (ids above the EOT) inside the text and in the padding; HF's tokenizer pads with EOT.
ADDED_ROWS = np.array([_row(SOT, 320, ADDED, 2368, EOT), _row(SOT, 49409, EOT, ADDED, 49409),
                       _row(SOT, 320, EOT, EOT, EOT, EOT, EOT, EOT), _row(SOT, 5, 6, 7, 8, 9, EOT)],
                      np.int32)


def test_added_tokens_pool_at_the_first_end_of_text_token_as_transformers(tmp_path):
  hf = _hf_clip(EOT)
  hf.save_pretrained(tmp_path)
  params, cfg = clip.load(tmp_path)
  assert (cfg.text.vocab_size, cfg.text.eot_token_id) == (49410, EOT)
  want = _features(_hf_text(hf, ADDED_ROWS))
  assert _rel_err(clip.encode_text(params, ADDED_ROWS, cfg), want) < RTOL
  # the largest id (49408 in row 0) is not where the pooling is: the legacy rule differs
  legacy = _features(_hf_text(_hf_clip(2), ADDED_ROWS))
  assert _rel_err(legacy[0], want[0]) > 0.1
  with pytest.raises(ValueError, match='token id 49410 at row 0'):
    clip.encode_text(params, np.where(ADDED_ROWS == ADDED, 49410, ADDED_ROWS), cfg)


def test_hugging_face_export_writes_the_end_of_text_id(tmp_path):
  hf = _hf_clip(EOT)
  hf.save_pretrained(tmp_path / 'in')
  params, cfg = clip.load(tmp_path / 'in')
  save_hf(params, cfg, tmp_path / 'out')
  back = transformers.CLIPModel.from_pretrained(tmp_path / 'out').eval()
  assert back.config.text_config.eos_token_id == EOT
  want = _features(_hf_text(back, ADDED_ROWS))
  assert _rel_err(clip.encode_text(params, ADDED_ROWS, cfg), want) < RTOL
  openai = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, eot_token_id=None))
  assert hf_config(openai)['text_config']['eos_token_id'] == 49409  # vocab_size - 1
  two = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, eot_token_id=2))
  with pytest.raises(export.ExportError, match='end-of-text id of 2'):
    hf_config(two)


# A vocabulary other than OpenAI's gets its end-of-text id stated (99), not left to the rule.
@pytest.mark.parametrize('eos, vocab, eot', [(2, 49408, None), (49407, 49408, None),
                                             (49407, 49410, 49407), (99, 100, 99), (2, 100, 99)])
def test_hugging_face_eos_token_id_maps_to_the_end_of_text_id(eos, vocab, eot):
  t = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=128,
           vocab_size=vocab, eos_token_id=eos)
  v = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=128)
  cfg = config_from_hf({'model_type': 'clip', 'text_config': t, 'vision_config': v})
  assert cfg.text.eot_token_id == eot


@pytest.mark.parametrize('pool', ['eot', 'map'])
def test_bidirectional_padding_mask_ends_at_the_first_end_of_text_token(pool):
  """Bidirectional towers mask what follows the first EOT: changing it (added ids, more EOTs)
  changes nothing, changing a token before it does."""
  text = clip.TextConfig(32, 2, 2, 8, 49410, pool=pool, causal=False, eot_token_id=EOT)
  cfg = dataclasses.replace(CFG, text=text)
  p = clip.init(jax.random.PRNGKey(2), cfg)
  base = _row(SOT, 320, ADDED, EOT, 49409, ADDED, EOT, 7)
  after = _row(SOT, 320, ADDED, EOT, 1, 2, 3, 4)
  before = _row(SOT, 321, ADDED, EOT, 49409, ADDED, EOT, 7)
  out = np.asarray(clip.encode_text(p, np.array([base, after, before], np.int32), cfg))
  np.testing.assert_allclose(out[1], out[0], rtol=1e-5, atol=1e-6)
  assert _rel_err(out[2], out[0]) > 1e-3
