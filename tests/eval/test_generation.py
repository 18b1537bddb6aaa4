"""clip/eval/generation.py against independent references: the cached step against `decoder.apply`,
greedy decoding against the argmax of `decoder.apply` over its own output, caption scores against
float64 log-softmax sums (the same jitted and not), a vocabulary shortlist, and generative
zero-shot classification on a decoder trained to caption its images (beam search:
test_generation_beam_search.py)."""
import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from clip.train import captioning
from clip import configs
from clip import decoder
from clip.eval import generation
from experiments.configs import cappa_small
from tests.numpy_reference import BLOCK_OPTIONS

TOL = 1e-5  # fp32 log-likelihoods and scores of the same caption computed two ways
START = 1
IMAGE_WIDTH = 24
TINY = dict(width=32, layers=2, heads=2, context_length=12, vocab_size=50, tie_embedding=False,
            eot_token_id=7)


apply = jax.jit(decoder.apply, static_argnames='cfg')


def random_params(seed, cfg, stacked=False):
  """`decoder.init`'s tree filled from numpy (jax's random init compiles for seconds): matrices
  N(0, 1/fan_in), norm gains 1 + N(0, 0.1^2), other vectors N(0, 0.1^2); nothing sits at 0 or 1,
  so every parameter matters."""
  shapes = jax.eval_shape(lambda: decoder.init(jax.random.PRNGKey(0), cfg, IMAGE_WIDTH, stacked))
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = jax.tree_util.keystr(path)
    x = rng.standard_normal(leaf.shape).astype(np.float32)
    if len(leaf.shape) - (stacked and 'resblocks' in name) >= 2:  # a stacked layer axis
      return x * leaf.shape[-1] ** -0.5
    return x * 0.1 + name.endswith("['weight']")

  return jax.tree_util.tree_map_with_path(fill, shapes)


def column(token, cfg):
  """The score column of a token id: itself, or its place in a shortlist `cfg.output_ids`."""
  return token if cfg.output_ids is None else cfg.output_ids.index(token)


def tiny_model(seed, rows=4, stacked=False, eot_bias=2.0, **overrides):
  """A random decoder, its config and image tokens (rows, 5, IMAGE_WIDTH). `eot_bias` raises the
  EOT's score so that greedy rows end at various lengths (seeds 0-2), not all at max_length."""
  cfg = configs.DecoderConfig(**{**TINY, **overrides})
  image_NxTxW = jax.random.normal(jax.random.PRNGKey(seed + 100), (rows, 5, IMAGE_WIDTH))
  params = random_params(seed, cfg, stacked)
  if 'bias' in params.get('head', {}):
    params['head']['bias'][column(cfg.eot_id, cfg)] += eot_bias
  return params, cfg, image_NxTxW


def log_softmax64(scores):
  scores = np.asarray(scores, np.float64)
  return scores - np.log(np.exp(scores).sum(-1, keepdims=True))


def log_likelihood_reference(params, image_NxTxW, tokens_NxL, cfg):
  """Float64 log-softmax of `decoder.apply`'s scores, summed per row up to the first EOT."""
  logp = log_softmax64(apply(params, image_NxTxW, jnp.asarray(tokens_NxL)[:, :-1], cfg))
  tokens = np.asarray(tokens_NxL)
  out = np.zeros(len(tokens))
  for n, row in enumerate(tokens):
    for i in range(1, len(row)):
      out[n] += logp[n, i - 1, column(row[i], cfg)]
      if row[i] == cfg.eot_id:
        break
  return out


def cut_at_eot(tokens_NxL, eot_id):
  """Rows ended at their first EOT after the start token, 0 after it (the tokenizer's padding)."""
  out = np.array(tokens_NxL)
  for row in out:
    hits = np.flatnonzero(row[1:] == eot_id)
    if hits.size:
      row[hits[0] + 2:] = 0
  return out


def generated_length(tokens_NxL, eot_id):
  """Generated tokens per row, the EOT included."""
  return np.array([len(row) - 1 if not (row[1:] == eot_id).any()
                   else int(np.argmax(row[1:] == eot_id)) + 1 for row in np.asarray(tokens_NxL)])


# ---------------------------------------------------------------- the cache and greedy decoding

@pytest.mark.parametrize('name,stacked', [('openai', False), ('everything', True)])
def test_cached_step_scores_equal_teacher_forcing(name, stacked):
  params, cfg, image = tiny_model(0, stacked=stacked, **BLOCK_OPTIONS[name])
  tokens_NxL = jax.random.randint(jax.random.PRNGKey(1), (4, 12), 0, cfg.vocab_size)
  expected_NxLxV = apply(params, image, tokens_NxL, cfg)
  step = jax.jit(decoder.step, static_argnames='cfg')
  cache = decoder.init_cache(params, image, cfg)
  for i in range(12):
    scores_NxV, cache = step(params, cache, tokens_NxL[:, i], i, cfg)
    chex.assert_trees_all_close(scores_NxV, expected_NxLxV[:, i], atol=TOL, rtol=TOL)


def test_greedy_with_and_without_cache_equals_argmax_of_teacher_forcing():
  """Token by token: each generated token is the argmax of `decoder.apply` over the row's own
  prefix, and after the EOT only padding follows; no recompilation across models."""
  compiled = []
  for seed in range(3):
    params, cfg, image = tiny_model(seed)
    cached = np.asarray(generation.greedy(params, image, cfg, START, 12))
    uncached = generation.greedy(params, image, cfg, START, 12, use_cache=False)
    np.testing.assert_array_equal(cached, uncached)
    argmax_NxL = np.asarray(jnp.argmax(apply(params, image, cached, cfg), axis=-1))
    lengths = generated_length(cached, cfg.eot_id)
    for n, row in enumerate(cached):
      assert row[0] == START
      np.testing.assert_array_equal(row[1:lengths[n] + 1], argmax_NxL[n, :lengths[n]])
      assert not row[lengths[n] + 1:].any()
    compiled.append(generation._greedy._cache_size())  # pylint: disable=protected-access
  assert compiled[0] == compiled[-1]


def test_eot_stops_a_row_and_pads_it():
  """The same model with another EOT id: each row stops at its first occurrence of that token
  and is 0 after it, the others decode on unchanged (greedy and beam 1)."""
  params, cfg, image = tiny_model(0, eot_bias=0.0)
  unstopped = np.asarray(generation.greedy(params, image, cfg, START, 12))
  assert not (unstopped == cfg.eot_id).any()  # nothing stopped it
  eot = int(unstopped[0, 5])
  expected = cut_at_eot(unstopped, eot)
  cut = (expected != unstopped).any(axis=1)
  assert cut.any() and not cut.all()  # rows stop mid-caption, others run to max_length
  cfg_eot = configs.DecoderConfig(**{**TINY, 'eot_token_id': eot})
  np.testing.assert_array_equal(generation.greedy(params, image, cfg_eot, START, 12), expected)
  np.testing.assert_array_equal(
      generation.beam_search(params, image, cfg_eot, START, 12, 1)[0], expected)


def test_decoding_stops_when_every_row_is_done():
  """An EOT that wins every first step: both loops stop after one position."""
  params, cfg, image = tiny_model(0, eot_bias=100.0)
  expected = np.array([[START, cfg.eot_id] + [0] * 10] * 4)
  # pylint: disable=protected-access
  tokens, position = generation._greedy(params, image, cfg, START, 12, configs.Execution(), True)
  np.testing.assert_array_equal(tokens, expected)
  assert int(position) == 1
  tokens, _, position = generation._beam_search(params, image, cfg, START, 12, 3, 0.0,
                                                configs.Execution())
  np.testing.assert_array_equal(tokens, expected)
  assert int(position) == 1


# ---------------------------------------------------------------- scores

def test_sequence_log_likelihood_matches_float64_reference():
  """Rows ending at an EOT (padding after it, or another EOT) and a row without one."""
  params, cfg, image = tiny_model(1)
  tokens_NxL = np.array(jax.random.randint(jax.random.PRNGKey(5), (4, 12), 0, cfg.vocab_size - 1))
  tokens_NxL[0, 4], tokens_NxL[1, 1], tokens_NxL[1, 6] = cfg.eot_id, cfg.eot_id, cfg.eot_id
  tokens_NxL[0, 5:] = 0
  tokens_NxL[2:][tokens_NxL[2:] == cfg.eot_id] = 0
  np.testing.assert_allclose(generation.sequence_log_likelihood(params, image, tokens_NxL, cfg),
                             log_likelihood_reference(params, image, tokens_NxL, cfg), rtol=TOL)


def test_a_vocabulary_shortlist_decodes_and_scores_its_own_ids():
  """A decoder scoring 18 of the 50 ids (`output_ids`): greedy emits those ids, each the argmax
  column of teacher forcing mapped back, cached or not; beam 1 is greedy; scores are
  log-likelihoods over the shortlist; a caption with another id is refused."""
  ids = tuple(sorted(set(range(0, 50, 3)) | {7}))
  params, cfg, image = tiny_model(0, eot_bias=0.5, output_ids=ids)
  assert params['head']['weight'].shape == (len(ids), 32)
  greedy = np.asarray(generation.greedy(params, image, cfg, START, 12))
  np.testing.assert_array_equal(generation.greedy(params, image, cfg, START, 12, use_cache=False),
                                greedy)
  columns_NxL = np.asarray(jnp.argmax(apply(params, image, greedy, cfg), axis=-1))
  for n, length in enumerate(generated_length(greedy, cfg.eot_id)):
    np.testing.assert_array_equal(greedy[n, 1:length + 1], np.array(ids)[columns_NxL[n, :length]])
  tokens, scores = generation.beam_search(params, image, cfg, START, 12, 1)
  np.testing.assert_array_equal(tokens, greedy)
  np.testing.assert_allclose(scores, log_likelihood_reference(params, image, greedy, cfg),
                             rtol=TOL)
  outside = greedy.copy()
  outside[1, 1] = 2
  with pytest.raises(ValueError, match=r'token id 2 at row 1, position 1 is not among the 18 ids'):
    generation.sequence_log_likelihood(params, image, outside, cfg)


class ScoresUnderJitTest(chex.TestCase):
  """The scoring functions take traced tokens too (a jitted caller skips the concrete checks and
  the trimming after the longest prompt): the same scores jitted and not."""

  @chex.variants(with_jit=True, without_jit=True)
  def test_sequence_log_likelihood(self):
    params, cfg, image = tiny_model(2)
    tokens_NxL = np.array([[START, 10, 11, cfg.eot_id] + [0] * 8] * 4)
    score = self.variant(generation.sequence_log_likelihood, static_argnames=('cfg',))
    np.testing.assert_allclose(score(params, image, tokens_NxL, cfg=cfg),
                               log_likelihood_reference(params, image, tokens_NxL, cfg), rtol=TOL)

  @chex.variants(with_jit=True, without_jit=True)
  def test_generative_zero_shot_scores(self):
    params, cfg, image = tiny_model(3)
    classes_CxL = np.array([[START, 10, 11, cfg.eot_id] + [0] * 8,
                            [START, 12, cfg.eot_id] + [0] * 9,
                            [START, 13, 14, 15, cfg.eot_id] + [0] * 7])
    score = self.variant(generation.generative_zero_shot_scores, static_argnames=('cfg', 'chunk'))
    scores_NxC = score(params, image, classes_CxL, cfg=cfg, chunk=2)
    for n in range(len(image)):
      np.testing.assert_allclose(
          scores_NxC[n], log_likelihood_reference(params, jnp.repeat(image[n:n + 1], 3, 0),
                                                  classes_CxL, cfg), rtol=TOL, atol=TOL)


# ---------------------------------------------------------------- generative zero-shot

def test_generative_zero_shot_on_a_decoder_trained_to_caption_images():
  """Four images trained to two captions (images 0, 2: the first; 1, 3: the second): each is
  classified as its caption (against a distractor too, classes in chunks of 2), greedy and beam
  search caption it so, and the scores equal each pair's log-likelihood."""
  params, cfg, image = tiny_model(0)
  eot = cfg.eot_id
  classes = np.array([[START, 10, 11, 12, eot] + [0] * 7, [START, 10, 13, 14, eot] + [0] * 7,
                      [START, 10, 11, 14, eot] + [0] * 7])
  labels = np.array([0, 1, 0, 1])
  optimizer = optax.adam(1e-2)

  @jax.jit
  def train_step(params, opt_state):
    loss_fn = lambda p: captioning.loss(p, image, classes[labels], cfg, None, 0.0)[0]
    updates, opt_state = optimizer.update(jax.grad(loss_fn)(params), opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  opt_state = optimizer.init(params)
  for _ in range(40):
    params, opt_state = train_step(params, opt_state)
  scores_NxC = generation.generative_zero_shot_scores(params, image, classes, cfg, chunk=2)
  for n in range(len(image)):
    np.testing.assert_allclose(
        scores_NxC[n], log_likelihood_reference(params, jnp.repeat(image[n:n + 1], 3, 0),
                                                classes, cfg), rtol=TOL, atol=TOL)
  np.testing.assert_array_equal(generation.generative_classify(params, image, classes, cfg),
                                labels)
  np.testing.assert_array_equal(generation.greedy(params, image, cfg, START, 12), classes[labels])
  np.testing.assert_array_equal(generation.beam_search(params, image, cfg, START, 12, 3)[0],
                                classes[labels])


# ---------------------------------------------------------------- input checks

@pytest.mark.parametrize('call,message', [
    (lambda p, c, i: generation.greedy(p, i, c, START, 1), r'max_length must be in \[2, 12\].*1'),
    (lambda p, c, i: generation.greedy(p, i, c, START, 13), r'\[2, 12\].*max_length 13'),
    (lambda p, c, i: generation.greedy(p, i, c, 50, 12), r'start_id.*\[0, 50\).*got 50'),
    (lambda p, c, i: generation.greedy(p, i, c, -1, 12), r'start_id.*got -1'),
    (lambda p, c, i: generation.greedy(p, i[0], c, START, 12), r'\(N, T, W\).*\(5, 24\)'),
    (lambda p, c, i: generation.greedy(p, i[..., :8], c, START, 12), r'width 24, got width 8'),
    (lambda p, c, i: generation.greedy({'text_decoder': p}, i, c, START, 12), 'text_decoder'),
    (lambda p, c, i: generation.beam_search(p, i, c, START, 12, 0), 'beam_size.*>= 1, got 0'),
    (lambda p, c, i: generation.beam_search(p, i, c, START, 12, 2, -0.5),
     'length_penalty.*got -0.5'),
    (lambda p, c, i: generation.sequence_log_likelihood(p, i, np.ones((3, 6), np.int32), c),
     '3 token rows for 4 images'),
    (lambda p, c, i: generation.sequence_log_likelihood(p, i, np.full((4, 6), 50), c),
     r'token id 50 at row 0, position 0.*\[0, 50\)'),
    (lambda p, c, i: generation.generative_zero_shot_scores(p, i, np.ones((3, 13), int), c),
     r'2 <= L <= 12.*\(3, 13\)'),
    (lambda p, c, i: generation.generative_zero_shot_scores(p, i, np.ones((3, 6), int), c, chunk=0),
     r'chunk must be >= 1.*got 0'),
])
def test_bad_inputs_raise_naming_the_values(call, message):
  params, cfg, image = tiny_model(0)
  with pytest.raises(ValueError, match=message):
    call(params, cfg, image)


def test_the_start_token_is_the_models_tokenizers():
  """`start_token_id` of a whole model: its tokenizer's start-of-text id, OpenAI's 49406 for the
  captioning configs (OpenAI's BPE); a model without a decoder, or not a CLIPConfig, is refused
  (a tokenizer without a start token: tests/test_processing_paths.py)."""
  captioner = cappa_small.get_config().model
  assert generation.start_token_id(captioner) == 49406
  with pytest.raises(ValueError, match='no captioning decoder'):
    generation.start_token_id(dataclasses.replace(captioner, decoder=None,
                                                  text=configs.TextConfig(128, 1, 2, 32)))
  with pytest.raises(TypeError, match='expected a clip.CLIPConfig.*got DecoderConfig'):
    generation.start_token_id(captioner.decoder)
