"""Zero-shot classifier weights, classification and retrieval recall against numpy
reimplementations; a model built so that the right answers are known; the CLI end to end."""
import csv
import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import clip
from clip import preprocess
from clip.eval import zero_shot
from experiments import zero_shot as cli
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
  weights = zero_shot.classifier_weights_from_tokens(params, CFG, tokens_CxTxL, batch_size)
  txt = np.asarray(clip.encode_text(params, tokens_CxTxL.reshape(c * t, -1), CFG))
  expected = np_normalize(np_normalize(txt).reshape(c, t, -1).mean(axis=1)).T
  chex.assert_shape(weights, (CFG.embed_dim, c))
  chex.assert_trees_all_close(weights, expected.astype(np.float32), atol=ATOL)


@pytest.mark.parametrize('batch_size', [2, 32])
def test_classify_matches_numpy(params, batch_size):
  rng = np.random.default_rng(1)
  images = rng.standard_normal((5, 16, 16, 3)).astype(np.float32)
  weights = np_normalize(rng.standard_normal((CFG.embed_dim, 7)).T).T.astype(np.float32)
  indices, probs = zero_shot.classify(params, CFG, images, weights, k=3, batch_size=batch_size)
  img = np_normalize(clip.encode_image(params, images, CFG))
  all_probs = np_softmax(37.0 * img @ weights)
  expected = np.argsort(-all_probs, axis=1)[:, :3]
  np.testing.assert_array_equal(indices, expected)
  chex.assert_trees_all_close(probs, np.take_along_axis(all_probs, expected, 1).astype(np.float32),
                              atol=ATOL)
  assert all_probs[:, 0].max() < 0.99  # a non-trivial distribution was compared


def np_recalls(img, txt, text_to_image, ks):
  sim = np_normalize(img) @ np_normalize(txt).T
  out = {}
  for k in ks:
    top_texts = np.argsort(-sim, axis=1)[:, :k]
    out[f'image_to_text_R@{k}'] = np.mean(
        [np.any(text_to_image[top_texts[i]] == i) for i in range(len(img))])
    top_images = np.argsort(-sim.T, axis=1)[:, :k]
    out[f'text_to_image_R@{k}'] = np.mean(
        [text_to_image[j] in top_images[j] for j in range(len(txt))])
  return out


@pytest.mark.parametrize('batch_size', [4, 1024])
def test_retrieval_matches_numpy(batch_size):
  rng = np.random.default_rng(2)
  n, m, d = 12, 30, 8
  text_to_image = np.concatenate([np.arange(n), rng.integers(0, n, m - n)])
  rng.shuffle(text_to_image)
  img = rng.standard_normal((n, d)).astype(np.float32)
  # Captions near their image, so that recall lands strictly between 0 and 1.
  txt = (img[text_to_image] + 1.2 * rng.standard_normal((m, d))).astype(np.float32)
  ks = (1, 3, 5, 10)
  got = zero_shot.retrieval_metrics(img, txt, text_to_image, ks=ks, batch_size=batch_size)
  expected = np_recalls(img, txt, text_to_image, ks)
  assert got == pytest.approx(expected, abs=1e-12)
  assert 0 < got['image_to_text_R@1'] < 1 and 0 < got['text_to_image_R@1'] < 1


def test_retrieval_ties_rank_the_lower_index_first():
  """clip_benchmark's rule (the top k by score; `torch.topk` picks the first maximum): before,
  ties counted in the query's favour, and 50 identical images scored text->image R@1 = 1.0."""
  rng = np.random.default_rng(6)
  img = np.tile(rng.standard_normal((1, 8)), (50, 1))
  got = zero_shot.retrieval_metrics(img, rng.standard_normal((250, 8)), np.repeat(np.arange(50), 5))
  assert got['text_to_image_R@1'] == pytest.approx(0.02)  # image 0's five captions
  assert got['text_to_image_R@5'] == pytest.approx(0.1)
  assert got['text_to_image_R@10'] == pytest.approx(0.2)
  # Image 1's only caption is a copy of image 0's, placed after it: its top 1 is image 0's.
  txt = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
  got = zero_shot.retrieval_metrics(np.array([[1.0, 0.1], [1.0, -0.1], [0.0, 1.0]]), txt,
                                    ks=(1, 2))
  assert got['image_to_text_R@1'] == pytest.approx(2 / 3)
  assert got['image_to_text_R@2'] == 1.0
  np.testing.assert_array_equal(zero_shot.top_k(np.array([[1, 3, 3, 0, 3]]), 2), [[1, 2]])


def test_non_finite_features_are_refused():
  feats = np.ones((50, 4), np.float32)
  with pytest.raises(ValueError, match='image features must be finite, got 200 non-finite'):
    zero_shot.retrieval_metrics(np.full((50, 4), np.nan), np.ones((250, 4)),
                                np.repeat(np.arange(50), 5))
  with pytest.raises(ValueError, match=r'text features must be finite.*index \(3, 1\): inf'):
    zero_shot.retrieval_metrics(feats, np.where(np.arange(200).reshape(50, 4) == 13, np.inf, 1))
  with pytest.raises(ValueError, match=r'normalised image features \(a zero feature\?\)'):
    zero_shot.retrieval_metrics(np.zeros((50, 4)), feats)


def test_retrieval_one_caption_per_image():
  rng = np.random.default_rng(3)
  img = rng.standard_normal((9, 6))
  txt = img + rng.standard_normal((9, 6))
  got = zero_shot.retrieval_metrics(img, txt, ks=(1, 2), batch_size=4)
  assert got == pytest.approx(np_recalls(img, txt, np.arange(9), (1, 2)), abs=1e-12)


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
  idx_unit, p_unit = zero_shot.classify(params, CFG, images, unit, k=4)
  idx_scaled, p_scaled = zero_shot.classify(params, CFG, images, scaled, k=4)
  np.testing.assert_array_equal(idx_scaled, idx_unit)
  chex.assert_trees_all_close(p_scaled, p_unit, atol=ATOL)
  with pytest.raises(ValueError, match=r'non-zero norm; columns \[2\] are zero'):
    zero_shot.classify(params, CFG, images, unit * np.array([1, 1, 0, 1], np.float32), k=1)
  with pytest.raises(ValueError, match='classifier weights must be finite, got 1 non-finite'):
    zero_shot.classify(params, CFG, images, np.where(unit == unit[0, 0], np.nan, unit), k=1)
  with pytest.raises(ValueError, match='images must be finite'):
    zero_shot.classify(params, CFG, images * np.inf, unit, k=1)


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
  weights = zero_shot.classifier_weights_from_tokens(known, CFG, tokens_NxL.reshape(c, t, -1))
  chex.assert_trees_all_close(weights, np_normalize(img[perm]).T.astype(np.float32), atol=1e-4)
  indices, probs = zero_shot.classify(known, CFG, images, weights, k=c)
  np.testing.assert_array_equal(indices[:, 0], np.argsort(perm))
  cos = np_normalize(img) @ np_normalize(img[perm]).T
  expected = np.sort(np_softmax(37.0 * cos), axis=1)[:, ::-1]
  chex.assert_trees_all_close(probs, expected.astype(np.float32), atol=1e-4)
  txt = clip.encode_text(known, tokens_NxL, CFG)
  metrics = zero_shot.retrieval_metrics(img, txt, np.repeat(perm, t), ks=(1,))
  assert metrics == {'image_to_text_R@1': 1.0, 'text_to_image_R@1': 1.0}


def test_bad_input(params):
  images = np.zeros((2, 16, 16, 3), np.float32)
  weights = np.ones((CFG.embed_dim, 3), np.float32)
  with pytest.raises(ValueError, match=r'weights must be \(embed_dim=32, classes\), got \(3, 32\)'):
    zero_shot.classify(params, CFG, images, weights.T)
  with pytest.raises(ValueError, match=r'k must be an int in \[1, 3\].*got 5'):
    zero_shot.classify(params, CFG, images, weights, k=5)
  with pytest.raises(ValueError, match=r'\(N, 16, 16, 3\) for this model'):
    zero_shot.classify(params, CFG, np.zeros((2, 32, 32, 3), np.float32), weights, k=1)
  with pytest.raises(ValueError, match='batch_size must be a positive int, got 0'):
    zero_shot.classify(params, CFG, images, weights, k=1, batch_size=0)
  with pytest.raises(ValueError, match=r'\(classes, templates, L\), got shape \(3, 8\)'):
    zero_shot.classifier_weights_from_tokens(params, CFG, np.zeros((3, 8), np.int32))
  with pytest.raises(ValueError, match='exactly one "{}" or "{c}"'):
    zero_shot.prompts(['cat'], ['a photo'])
  with pytest.raises(ValueError, match='exactly one "{}" or "{c}"'):
    zero_shot.prompts(['cat'], ['a {c} or a {}'])
  feats = np.ones((4, 8), np.float32)
  with pytest.raises(ValueError, match='same D'):
    zero_shot.retrieval_metrics(feats, np.ones((4, 6)))
  with pytest.raises(ValueError, match='4 images and 3 texts: give text_to_image'):
    zero_shot.retrieval_metrics(feats, feats[:3])
  with pytest.raises(ValueError, match=r'1 images have no text \(first: \[3\]\)'):
    zero_shot.retrieval_metrics(feats, feats[:3], text_to_image=[0, 1, 2])
  with pytest.raises(ValueError, match=r'indices outside \[0, 4\)'):
    zero_shot.retrieval_metrics(feats, feats, text_to_image=[0, 1, 2, 4])


# ---------------------------------------------------------------- with OpenAI's BPE tokenizer

def test_classifier_weights_tokenize_prompts():
  from clip import tokenizer  # pylint: disable=g-import-not-at-top
  params = clip.init(jax.random.PRNGKey(1), BPE_CFG)
  names, templates = ['cat', 'sea lion'], ('a photo of a {}.', 'art of the {}.')
  weights = zero_shot.classifier_weights(params, BPE_CFG, names, templates, batch_size=1)
  tokens = tokenizer.tokenize(['a photo of a cat.', 'art of the cat.', 'a photo of a sea lion.',
                               'art of the sea lion.'], context_length=16)
  expected = zero_shot.classifier_weights_from_tokens(params, BPE_CFG, tokens.reshape(2, 2, -1))
  chex.assert_trees_all_close(weights, expected, atol=ATOL)


@pytest.fixture(scope='module')
def cli_case(tmp_path_factory):
  """A tiny checkpoint whose default-template prompts of class c land on the feature of image
  perm[c], saved as a torch state dict beside a folder of PNGs."""
  import torch  # pylint: disable=g-import-not-at-top
  from clip import tokenizer  # pylint: disable=g-import-not-at-top
  folder = tmp_path_factory.mktemp('zero_shot')
  (folder / 'images').mkdir()
  rng = np.random.default_rng(5)
  classes, perm = ['red', 'green', 'blue'], np.array([1, 2, 0])
  paths = []
  for i, size in enumerate([(40, 50), (64, 33), (32, 32)]):
    paths.append(folder / 'images' / f'img{i}.png')
    Image.fromarray(rng.integers(0, 256, size[::-1] + (3,), dtype=np.uint8)).save(paths[-1])
  (folder / 'images' / 'notes.txt').write_text('not an image')
  params = clip.init(jax.random.PRNGKey(2), BPE_CFG)
  img = np.asarray(clip.encode_image(params, preprocess.preprocess(paths, 32), BPE_CFG))
  templates = zero_shot.DEFAULT_TEMPLATES
  tokens = tokenizer.tokenize(zero_shot.prompts(classes, templates), context_length=16)
  known = text_projection_for(params, BPE_CFG, tokens, img[np.repeat(perm, len(templates))])
  torch.save(clip.to_torch_state_dict(known), folder / 'model.pt')
  (folder / 'classes.txt').write_text('\n'.join(classes) + '\n\n')
  return folder, classes, perm, img


def test_cli_end_to_end(cli_case, capsys):
  folder, classes, perm, img = cli_case
  out = folder / 'results'
  predictions = cli.main(['--model', str(folder / 'model.pt'), '--images', str(folder / 'images'),
                          '--classes', str(folder / 'classes.txt'), '--top-k', '5',
                          '--csv', str(folder / 'out.csv'), '--out', str(out)])
  printed = capsys.readouterr().out
  assert 'skipped 1 entries' in printed and 'notes.txt' in printed
  assert '--top-k 5 > 3 classes: showing 3' in printed
  expected_class = [classes[c] for c in np.argsort(perm)]
  cos = np_normalize(img) @ np_normalize(img[perm]).T
  scale = float(np.exp(clip.init(jax.random.PRNGKey(2), BPE_CFG)['logit_scale']))
  expected_p = np.sort(np_softmax(scale * cos), axis=1)[:, ::-1]
  assert [p['image'] for p in predictions] == ['img0.png', 'img1.png', 'img2.png']
  assert [p['top'][0]['class'] for p in predictions] == expected_class
  got_p = np.array([[t['probability'] for t in p['top']] for p in predictions])
  chex.assert_trees_all_close(got_p, expected_p, atol=1e-4)
  for name, cls in zip(['img0.png', 'img1.png', 'img2.png'], expected_class):
    assert any(line.startswith(name) and f'{cls} ' in line for line in printed.splitlines())
  with open(folder / 'out.csv', encoding='utf-8') as f:
    table = list(csv.reader(f))
  assert table[0] == ['image', 'class_1', 'prob_1', 'class_2', 'prob_2', 'class_3', 'prob_3']
  assert [row[1] for row in table[1:]] == expected_class
  np.testing.assert_allclose(np.array([row[2::2] for row in table[1:]], float), got_p, atol=1e-6)
  with open(out / 'predictions.json', encoding='utf-8') as f:
    assert json.load(f)['predictions'] == predictions


def test_cli_classes_as_list(cli_case, capsys):
  folder, _, _, _ = cli_case
  predictions = cli.main(['--model', str(folder / 'model.pt'), '--images', str(folder / 'images'),
                          '--classes', 'red, green', '--top-k', '1', '--out',
                          str(folder / 'results2')])
  assert [len(p['top']) for p in predictions] == [1, 1, 1]
  assert {p['top'][0]['class'] for p in predictions} <= {'red', 'green'}
  assert 'top-1' in capsys.readouterr().out


def test_cli_errors(cli_case, tmp_path):
  folder, _, _, _ = cli_case
  model = str(folder / 'model.pt')
  (tmp_path / 'empty').mkdir()
  (tmp_path / 'text_only').mkdir()
  (tmp_path / 'text_only' / 'a.txt').write_text('x')
  (tmp_path / 'broken').mkdir()
  (tmp_path / 'broken' / 'bad.png').write_bytes(b'not a png')
  cases = [
      (['--model', model, '--images', str(tmp_path / 'empty')], 'no images in'),
      (['--model', model, '--images', str(tmp_path / 'text_only')], 'no images in'),
      (['--model', model, '--images', str(tmp_path / 'nowhere')], 'is not a folder'),
      (['--model', 'ViT-Z/99', '--images', str(folder / 'images')],
       "--model must be an official model .* got 'ViT-Z/99'"),
      (['--model', model, '--images', str(tmp_path / 'broken')], "bad.png' as an image"),
  ]
  for args, message in cases:
    with pytest.raises(SystemExit, match=message):
      cli.main(args + ['--classes', 'a,b', '--out', str(tmp_path / 'out')])
  with pytest.raises(SystemExit, match='names some classes twice'):
    cli.main(['--model', model, '--images', str(folder / 'images'), '--classes', 'a,b,a'])
