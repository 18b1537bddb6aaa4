"""clip/text.py: the text tower against float64 numpy for every pooling (eot, first, last, map),
causal or bidirectional attention, RoPE, block option and norm epsilon; padding after the
end-of-text token is masked out (or, with SigLIP's mask_padding=False, attended to); the biased
text projection is a torch Linear. A tower that reads the padding (pool 'last', or no padding
mask) takes rows of exactly its context length at every entry point; the others take shorter
rows, whose features equal their padded rows'."""
import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import clip
from clip import configs
from clip import text
from clip.eval import zero_shot
from tests.numpy_reference import BLOCK_OPTIONS
from tests.numpy_reference import MUST_DIFFER
from tests.numpy_reference import RTOL
from tests.numpy_reference import TEXT
from tests.numpy_reference import VISION
from tests.numpy_reference import np_text
from tests.numpy_reference import perturbed
from tests.numpy_reference import perturbed_numpy
from tests.numpy_reference import rel_err
from tests.numpy_reference import text_tokens
from tests.numpy_reference import to_np


TEXT_CASES = {
    'eot-causal': {},
    'eot-bidirectional': dict(causal=False),
    'first-bidirectional': dict(pool='first', causal=False),
    'map-causal': dict(pool='map'),
    'map-bidirectional-rope': dict(pool='map', causal=False, pos_embedding='rope'),
    'eot-rope-everything': dict(pos_embedding='rope', rope_theta=500.0,
                                **BLOCK_OPTIONS['everything']),
    'no-projection': dict(projection=False, mlp='geglu'),
    'map-bidirectional-unmasked-norm-eps': dict(pool='map', causal=False, mask_padding=False,
                                                norm_eps=0.5),
    'eot-norm-eps-gelu-tanh': dict(norm_eps=0.5, mlp='gelu_tanh', qk_norm=True),
}


@pytest.mark.parametrize('name', sorted(TEXT_CASES))
def test_text_tower_matches_numpy(name):
  text_cfg = configs.TextConfig(**TEXT, **TEXT_CASES[name])
  cfg = configs.CLIPConfig(32, configs.VisionConfig(**VISION), text_cfg)
  params = perturbed(clip.init(jax.random.PRNGKey(0), cfg))
  tokens = text_tokens(np.random.default_rng(4), 5, 12, 64)
  out = clip.encode_text(params, tokens, cfg)
  assert rel_err(out, np_text(to_np(params), tokens, text_cfg)) < RTOL
  assert ('positional_embedding' in params) == (text_cfg.pos_embedding == 'learned')
  assert isinstance(params.get('text_projection'), dict) == text_cfg.projection_bias
  if text_cfg.norm_eps is not None:
    default_eps = dataclasses.replace(text_cfg, norm_eps=None)
    assert rel_err(out, np_text(to_np(params), tokens, default_eps)) > MUST_DIFFER


@pytest.mark.parametrize('text_options', [dict(causal=False), dict(causal=False, pool='map'),
                                          dict(pool='map')])
def test_padding_after_eot_is_masked_out(text_options):
  cfg = configs.CLIPConfig(32, configs.VisionConfig(**VISION),
                           configs.TextConfig(**TEXT, **text_options))
  params = perturbed(clip.init(jax.random.PRNGKey(0), cfg))
  tokens = text_tokens(np.random.default_rng(5), 4, 12, 64)
  noisy = tokens.copy()
  after_eot = np.arange(12)[None] > tokens.argmax(-1)[:, None]
  noisy[after_eot] = np.random.default_rng(6).integers(1, 60, after_eot.sum())
  chex.assert_trees_all_close(clip.encode_text(params, noisy, cfg),
                              clip.encode_text(params, tokens, cfg), rtol=1e-5, atol=1e-6)


def test_last_position_pooling_with_and_without_the_padding_mask():
  """pool='last' against numpy. mask_padding=False (SigLIP) attends to the padding: other padding
  tokens change every row. Masked, they change nothing (the pooled last position keeps its
  token)."""
  tokens = np.pad(text_tokens(np.random.default_rng(5), 4, 10, 64), ((0, 0), (0, 2)))
  between = (np.arange(12)[None] > tokens.argmax(-1)[:, None]) & (np.arange(12)[None] < 11)
  noisy = tokens.copy()
  noisy[between] = np.random.default_rng(6).integers(1, 60, between.sum())
  for mask_padding in (True, False):
    text_cfg = configs.TextConfig(**TEXT, pool='last', causal=False, mask_padding=mask_padding)
    cfg = configs.CLIPConfig(32, configs.VisionConfig(**VISION), text_cfg)
    params = perturbed(text.init(jax.random.PRNGKey(0), text_cfg, 32))
    clean, changed = clip.encode_text(params, tokens, cfg), clip.encode_text(params, noisy, cfg)
    assert rel_err(clean, np_text(to_np(params), tokens, text_cfg)) < RTOL
    assert rel_err(changed, np_text(to_np(params), noisy, text_cfg)) < RTOL
    if mask_padding:
      chex.assert_trees_all_close(changed, clean, rtol=1e-5, atol=1e-6)
    else:
      for row in range(4):
        assert rel_err(changed[row], np.asarray(clean[row], np.float64)) > MUST_DIFFER


def test_biased_text_projection_is_a_torch_linear():
  """projection_bias=True: `text_projection` in nn.Linear's layout, weight (embed_dim, width)."""
  text_cfg = configs.TextConfig(**TEXT, projection_bias=True)
  cfg = configs.CLIPConfig(16, configs.VisionConfig(**VISION), text_cfg)
  params = perturbed(text.init(jax.random.PRNGKey(0), text_cfg, 16))  # the text tower's keys only
  assert jax.tree.map(jnp.shape, params['text_projection']) == {'weight': (16, 32), 'bias': (16,)}
  tokens = text_tokens(np.random.default_rng(4), 5, 12, 64)
  out = clip.encode_text(params, tokens, cfg)
  chex.assert_shape(out, (5, 16))
  assert rel_err(out, np_text(to_np(params), tokens, text_cfg)) < RTOL


# ---------------------------------------------------------------- rows shorter than the context

# Towers whose feature reads positions after the end-of-text token, and towers that stop there.
READS_PADDING = {
    'last-bidirectional-unmasked': dict(pool='last', causal=False, mask_padding=False),  # SigLIP
    'last-causal': dict(pool='last'),
    'map-bidirectional-unmasked': dict(pool='map', causal=False, mask_padding=False),
    'first-bidirectional-unmasked': dict(pool='first', causal=False, mask_padding=False),
}
STOPS_AT_EOT = {
    'eot-causal': {}, 'eot-bidirectional': dict(causal=False), 'map-causal': dict(pool='map'),
    'first-bidirectional': dict(pool='first', causal=False),
}
SHORT_LENGTHS = (6, 9, 11)  # of a context of 12; every row's end-of-text token is before 5


@functools.lru_cache
def _model_params(map_head):
  """Every option here but pool='map' (its head) leaves the parameters' shapes as they are."""
  cfg = configs.CLIPConfig(32, configs.VisionConfig(**VISION),
                           configs.TextConfig(**TEXT, pool='map' if map_head else 'eot'))
  return perturbed_numpy(clip.init(jax.random.PRNGKey(0), cfg))


def _tower(options):
  cfg = configs.CLIPConfig(32, configs.VisionConfig(**VISION), configs.TextConfig(**TEXT,
                                                                                  **options))
  full = np.pad(text_tokens(np.random.default_rng(9), 4, 6, 64), ((0, 0), (0, 6)))
  return cfg, _model_params(cfg.text.pool == 'map'), full


@pytest.mark.parametrize('name', sorted(READS_PADDING))
def test_towers_that_read_the_padding_refuse_rows_shorter_than_the_context(name):
  """A short row would pool another position (or attend to fewer): its feature is not its padded
  row's, so encode_text, apply, a jitted caller and the zero-shot weights all refuse it by its
  shape, naming both lengths and the tokenizer that pads."""
  cfg, params, full = _tower(READS_PADDING[name])
  assert text.reads_padding(cfg.text)
  tower = jax.jit(text.apply, static_argnames='cfg')  # unchecked: what a short row would give
  assert rel_err(tower(params, full[:, :9], cfg.text),
                 np.asarray(tower(params, full, cfg.text), np.float64)) > MUST_DIFFER
  images = np.zeros((1, 24, 24, 3), np.float32)
  for length in SHORT_LENGTHS:
    short = full[:, :length]
    refusal = rf'length {length}, but this text tower .* context length 12.*clip.get_tokenizer'
    with pytest.raises(ValueError, match=refusal):
      clip.encode_text(params, short, cfg)
    with pytest.raises(ValueError, match=refusal):
      clip.apply(params, images, short, cfg)
    with pytest.raises(ValueError, match=refusal):
      jax.jit(lambda p, t: clip.encode_text(p, t, cfg))(params, short)
    with pytest.raises(ValueError, match=refusal):
      zero_shot.classifier_weights_from_tokens(params, short.reshape(2, 2, length), cfg)
  chex.assert_shape(clip.encode_text(params, full, cfg), (4, 32))


@pytest.mark.parametrize('name', sorted(STOPS_AT_EOT))
def test_towers_that_stop_at_the_end_of_text_token_take_shorter_rows(name):
  """Causal or padding-masked towers pooling at or before the end-of-text token read nothing
  after it: a row cut after it gives its padded row's feature, logits and zero-shot weights."""
  cfg, params, full = _tower(STOPS_AT_EOT[name])
  assert not text.reads_padding(cfg.text)
  features = clip.encode_text(params, full, cfg)
  for length in SHORT_LENGTHS:
    chex.assert_trees_all_close(clip.encode_text(params, full[:, :length], cfg), features,
                                rtol=1e-5, atol=1e-5)
  images = np.random.default_rng(3).standard_normal((2, 24, 24, 3)).astype(np.float32)
  chex.assert_trees_all_close(clip.apply(params, images, full[:, :6], cfg),
                              clip.apply(params, images, full, cfg), rtol=1e-5, atol=1e-5)
  chex.assert_trees_all_close(
      zero_shot.classifier_weights_from_tokens(params, full[:, :6].reshape(2, 2, 6), cfg),
      zero_shot.classifier_weights_from_tokens(params, full.reshape(2, 2, 12), cfg),
      rtol=1e-5, atol=1e-5)
