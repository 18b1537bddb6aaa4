"""clip/eval/zero_shot.py: classifier weights and classification against numpy
reimplementations; a model built so that the right answers are known (its retrieval too)."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import clip
from clip import tokenizer
from clip.eval import retrieval
from clip.eval import zero_shot
from experiments.references import openai as reference

CFG = clip.CLIPConfig(32, clip.VisionConfig('vit', 32, 1, 2, 16, 8),
                      clip.TextConfig(32, 1, 2, 8, 64))
# Head counts follow OpenAI's 64-wide rule, so that `clip.load` infers this config from the file.
BPE_CFG = clip.CLIPConfig(64, clip.VisionConfig('vit', 64, 1, 1, 32, 16),
                          clip.TextConfig(64, 1, 1, 16, 49408))
ATOL = 1e-5  # fp32 features of unit norm


@pytest.fixture(scope='module')
def params():
  p = clip.init(jax.random.PRNGKey(0), CFG)
  return dict(p, logit_scale=jnp.log(jnp.float32(37.0)))  # not the init value: it must be used


def np_normalize(x):
  x = np.asarray(x, np.float64)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def np_softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def test_templates():
  assert len(zero_shot.IMAGENET_TEMPLATES) == 80 == len(set(zero_shot.IMAGENET_TEMPLATES))
  assert set(zero_shot.DEFAULT_TEMPLATES) < set(zero_shot.IMAGENET_TEMPLATES)
  assert all(t.count('{}') == 1 for t in zero_shot.IMAGENET_TEMPLATES)
  assert zero_shot.IMAGENET_TEMPLATES[0] == 'a bad photo of a {}.'
  assert zero_shot.IMAGENET_TEMPLATES[-1] == 'a tattoo of the {}.'
  assert zero_shot.prompts(['cat', 'dog'], ('a {}.', 'the {}!')) == [
      'a cat.', 'the cat!', 'a dog.', 'the dog!']
  # clip_benchmark's template files write the class as {c}
  assert zero_shot.prompts(['cat'], ('a photo of a {c}.', 'a {}.')) == ['a photo of a cat.',
                                                                       'a cat.']


@pytest.mark.parametrize('batch_size', [1, 6, 64])  # prompts: 1 and 2 classes a batch, all
def test_classifier_weights_match_numpy(params, batch_size):
  rng = np.random.default_rng(0)
  c, t = 5, 3
  tokens_CxTxL = reference.random_tokens(rng, c * t, CFG).reshape(c, t, -1)
  weights = zero_shot.classifier_weights_from_tokens(params, tokens_CxTxL, CFG, batch_size)
  txt = np.asarray(clip.encode_text(params, tokens_CxTxL.reshape(c * t, -1), CFG))
  expected = np_normalize(np_normalize(txt).reshape(c, t, -1).mean(axis=1)).T
  chex.assert_shape(weights, (CFG.embed_dim, c))
  chex.assert_trees_all_close(weights, expected.astype(np.float32), atol=ATOL)


@pytest.mark.parametrize('batch_size', [2, 32])
def test_classify_matches_numpy(params, batch_size):
  rng = np.random.default_rng(1)
  images = rng.standard_normal((5, 16, 16, 3)).astype(np.float32)
  weights = np_normalize(rng.standard_normal((CFG.embed_dim, 7)).T).T.astype(np.float32)
  indices, probs = zero_shot.classify(params, images, weights, CFG, k=3, batch_size=batch_size)
  img = np_normalize(clip.encode_image(params, images, CFG))
  all_probs = np_softmax(37.0 * img @ weights)
  expected = np.argsort(-all_probs, axis=1)[:, :3]
  np.testing.assert_array_equal(indices, expected)
  chex.assert_trees_all_close(probs, np.take_along_axis(all_probs, expected, 1).astype(np.float32),
                              atol=ATOL)
  assert all_probs[:, 0].max() < 0.99  # a non-trivial distribution was compared


def text_projection_for(params, cfg, tokens_NxL, targets_NxD):
  """A `text_projection` that maps the pooled text of `tokens_NxL` exactly onto `targets_NxD`:
  the pooled (pre-projection) features are read with the identity projection, then solved for."""
  identity = dict(params, text_projection=jnp.eye(cfg.text.width, dtype=jnp.float32))
  pooled_NxW = np.asarray(clip.encode_text(identity, tokens_NxL, cfg), np.float64)
  projection, *_ = np.linalg.lstsq(pooled_NxW, np.asarray(targets_NxD, np.float64), rcond=None)
  np.testing.assert_allclose(pooled_NxW @ projection, targets_NxD, atol=1e-6)  # an exact fit
  return dict(params, text_projection=jnp.asarray(projection, jnp.float32))


def test_classify_normalises_the_class_weights(params):
  """The scores are cosines whatever the weights' norms (raw `encode_text` features, or scaled
  per class): before, class weights scaled by (1, 3, 0.5, 2) changed the top 1 of most images."""
  rng = np.random.default_rng(7)
  images = rng.standard_normal((8, 16, 16, 3)).astype(np.float32)
  raw = np.asarray(clip.encode_text(params, reference.random_tokens(rng, 4, CFG), CFG)).T
  unit = np_normalize(raw.T).T.astype(np.float32)
  scaled = raw * np.array([1, 3, 0.5, 2], np.float32)
  idx_unit, p_unit = zero_shot.classify(params, images, unit, CFG, k=4)
  idx_scaled, p_scaled = zero_shot.classify(params, images, scaled, CFG, k=4)
  np.testing.assert_array_equal(idx_scaled, idx_unit)
  chex.assert_trees_all_close(p_scaled, p_unit, atol=ATOL)
  with pytest.raises(ValueError, match=r'non-zero norm; columns \[2\] are zero'):
    zero_shot.classify(params, images, unit * np.array([1, 1, 0, 1], np.float32), CFG, k=1)
  with pytest.raises(ValueError, match='classifier weights must be finite, got 1 non-finite'):
    zero_shot.classify(params, images, np.where(unit == unit[0, 0], np.nan, unit), CFG, k=1)
  with pytest.raises(ValueError, match='images must be finite'):
    zero_shot.classify(params, images * np.inf, unit, CFG, k=1)


def test_known_answer(params):
  """Every prompt of class c is mapped onto image perm[c]'s feature (times a positive scale), so
  image i must be classified as the class c with perm[c] = i, with known probabilities, and
  retrieval must be perfect."""
  rng = np.random.default_rng(4)
  c, t = 4, 3
  perm = np.array([2, 0, 3, 1])
  images = rng.standard_normal((c, 16, 16, 3)).astype(np.float32)
  img = np.asarray(clip.encode_image(params, images, CFG))
  tokens_NxL = reference.random_tokens(rng, c * t, CFG, min_len=6)  # distinct rows
  targets = img[np.repeat(perm, t)] * rng.uniform(0.5, 2.0, (c * t, 1))
  known = text_projection_for(params, CFG, tokens_NxL, targets)
  weights = zero_shot.classifier_weights_from_tokens(known, tokens_NxL.reshape(c, t, -1), CFG)
  chex.assert_trees_all_close(weights, np_normalize(img[perm]).T.astype(np.float32), atol=1e-4)
  indices, probs = zero_shot.classify(known, images, weights, CFG, k=c)
  np.testing.assert_array_equal(indices[:, 0], np.argsort(perm))
  cos = np_normalize(img) @ np_normalize(img[perm]).T
  expected = np.sort(np_softmax(37.0 * cos), axis=1)[:, ::-1]
  chex.assert_trees_all_close(probs, expected.astype(np.float32), atol=1e-4)
  txt = clip.encode_text(known, tokens_NxL, CFG)
  metrics = retrieval.retrieval_metrics(img, txt, np.repeat(perm, t), ks=(1,))
  assert metrics == {'image_to_text_R@1': 1.0, 'text_to_image_R@1': 1.0}


def test_bad_input(params):
  images = np.zeros((2, 16, 16, 3), np.float32)
  weights = np.ones((CFG.embed_dim, 3), np.float32)
  with pytest.raises(ValueError, match=r'weights must be \(embed_dim=32, classes\), got \(3, 32\)'):
    zero_shot.classify(params, images, weights.T, CFG)
  with pytest.raises(ValueError, match=r'k must be an int in \[1, 3\].*got 5'):
    zero_shot.classify(params, images, weights, CFG, k=5)
  with pytest.raises(ValueError, match=r'\(N, 16, 16, 3\) for this model'):
    zero_shot.classify(params, np.zeros((2, 32, 32, 3), np.float32), weights, CFG, k=1)
  with pytest.raises(ValueError, match='batch_size must be a positive int, got 0'):
    zero_shot.classify(params, images, weights, CFG, k=1, batch_size=0)
  with pytest.raises(ValueError, match=r'\(classes, templates, L\), got shape \(3, 8\)'):
    zero_shot.classifier_weights_from_tokens(params, np.zeros((3, 8), np.int32), CFG)
  with pytest.raises(ValueError, match='exactly one "{}" or "{c}"'):
    zero_shot.prompts(['cat'], ['a photo'])
  with pytest.raises(ValueError, match='exactly one "{}" or "{c}"'):
    zero_shot.prompts(['cat'], ['a {c} or a {}'])


# ---------------------------------------------------------------- with OpenAI's BPE tokenizer

def test_classifier_weights_tokenize_prompts():
  params = clip.init(jax.random.PRNGKey(1), BPE_CFG)
  names, templates = ['cat', 'sea lion'], ('a photo of a {}.', 'art of the {}.')
  weights = zero_shot.classifier_weights(params, names, BPE_CFG, templates, batch_size=1)
  tokens = tokenizer.tokenize(['a photo of a cat.', 'art of the cat.', 'a photo of a sea lion.',
                               'art of the sea lion.'], context_length=16)
  expected = zero_shot.classifier_weights_from_tokens(params, tokens.reshape(2, 2, -1), BPE_CFG)
  chex.assert_trees_all_close(weights, expected, atol=ATOL)
