"""Our zero-shot, retrieval and linear-probe metrics against clip_benchmark 1.6.2's own functions
(installed beside the tests, `experiments/references/clip_benchmark.py`) on the same features, and
our position-embedding resize against open_clip's `resize_pos_embed`."""
import inspect

import jax
import numpy as np
import pytest
import sklearn.metrics
import torch

import clip
from clip.formats import resize
from clip.eval import metrics
from clip.eval import retrieval
from data import synthetic
from experiments.references import clip_benchmark as clip_benchmark_reference
from experiments.references import open_clip as open_clip_reference

ATOL = 1e-6  # means of 0/1 hits; clip_benchmark takes them in float32


@pytest.fixture(scope='module')
def cb():
  classification, retrieval, probe = clip_benchmark_reference.import_metrics()
  return {'classification': classification, 'retrieval': retrieval, 'probe': probe}


class _Features(torch.nn.Module):
  """A "model" whose images and texts are indices into fixed feature tables."""

  def __init__(self, image_features, text_features):
    super().__init__()
    self.img = torch.as_tensor(np.asarray(image_features, np.float32))
    self.txt = torch.as_tensor(np.asarray(text_features, np.float32))

  def encode_image(self, idx):
    return self.img[idx]

  def encode_text(self, idx):
    return self.txt[idx]


def _tokenize(texts):
  return torch.tensor([int(t) for t in texts])


def cb_retrieval(cb, img_NxD, txt_MxD, text_to_image, batch_size=16):
  """clip_benchmark's `zeroshot_retrieval.evaluate` on the features: text j is the string 'j'."""
  n = len(img_NxD)
  captions = [[str(j) for j in np.flatnonzero(text_to_image == i)] for i in range(n)]
  loader = [(torch.arange(s, min(s + batch_size, n)), captions[s:s + batch_size])
            for s in range(0, n, batch_size)]
  order = np.concatenate([np.flatnonzero(text_to_image == i) for i in range(n)])
  model = _Features(img_NxD, txt_MxD)
  out = cb['retrieval'].evaluate(model, loader, _tokenize, 'cpu', amp=False,
                                 recall_k_list=[1, 5, 10])
  assert sorted(int(t) for c in captions for t in c) == sorted(order)
  return out


def cb_retrieval_ties_by_index(cb, img_NxD, txt_MxD, text_to_image):
  """clip_benchmark's `recall_at_k` on its score matrix, equal scores first made distinct by
  index (the lower first): its rule with our declared tie-break. `torch.topk` on CPU leaves the
  order of equal scores to std::partial_sort / std::nth_element; only its top 1 of 64 or more
  keys is always the first maximum."""
  img = torch.nn.functional.normalize(torch.as_tensor(np.asarray(img_NxD, np.float32)), dim=-1)
  txt = torch.nn.functional.normalize(torch.as_tensor(np.asarray(txt_MxD, np.float32)), dim=-1)
  scores_MxN = (txt @ img.t()).numpy()
  positive_MxN = torch.zeros(scores_MxN.shape, dtype=torch.bool)
  positive_MxN[torch.arange(len(txt)), torch.as_tensor(text_to_image)] = True

  def untied(s):  # -(place in a stable descending sort): distinct, order kept
    places = np.empty_like(s, dtype=np.int64)
    np.put_along_axis(places, np.argsort(-s, axis=1, kind='stable'), np.arange(s.shape[1]), 1)
    return torch.as_tensor(-places, dtype=torch.float64)

  out = {}
  for k in (1, 5, 10):
    hits = cb['retrieval'].recall_at_k(untied(scores_MxN), positive_MxN, k) > 0
    out[f'image_retrieval_recall@{k}'] = hits.double().mean().item()
    hits = cb['retrieval'].recall_at_k(untied(scores_MxN.T), positive_MxN.T, k) > 0
    out[f'text_retrieval_recall@{k}'] = hits.double().mean().item()
  return out


def check_retrieval(cb, img, txt, text_to_image, ks_free_of_ties=(1, 5, 10)):
  """Ours against clip_benchmark's `evaluate` at the k whose top k no tie straddles (or whose
  hits do not depend on how it is broken), and against its `recall_at_k` with ties broken by
  index at every k."""
  ours = retrieval.retrieval_metrics(img, txt, text_to_image, ks=(1, 5, 10), batch_size=64)
  ref = cb_retrieval_ties_by_index(cb, img, txt, text_to_image)
  for k in (1, 5, 10):
    for key in (f'image_retrieval_recall@{k}', f'text_retrieval_recall@{k}'):
      ours_key = 'text_to_image' if key.startswith('image') else 'image_to_text'
      assert ours[f'{ours_key}_R@{k}'] == pytest.approx(ref[key], abs=1e-12), key
  ref = cb_retrieval(cb, img, txt, text_to_image)
  for k in ks_free_of_ties:
    assert ours[f'text_to_image_R@{k}'] == pytest.approx(ref[f'image_retrieval_recall@{k}'],
                                                         abs=ATOL), k
    assert ours[f'image_to_text_R@{k}'] == pytest.approx(ref[f'text_retrieval_recall@{k}'],
                                                         abs=ATOL), k
  return ours


def test_retrieval_with_several_captions_per_image(cb):
  rng = np.random.default_rng(0)
  n, m, d = 40, 130, 16
  text_to_image = np.concatenate([np.arange(n), rng.integers(0, n, m - n)])
  img = rng.standard_normal((n, d))
  txt = img[text_to_image] + 1.5 * rng.standard_normal((m, d))
  got = check_retrieval(cb, img, txt, text_to_image)
  assert 0 < got['image_to_text_R@1'] < 1 and 0 < got['text_to_image_R@1'] < 1


def test_retrieval_of_identical_images(cb):
  """50 identical images, 5 distinct captions each: every image ties with every other, so one
  image fills the top 1 (R@1 = 5 / 250) and five the top 5, whichever the tie-break picks."""
  rng = np.random.default_rng(1)
  img = np.tile(rng.standard_normal((1, 8)), (50, 1))
  txt = rng.standard_normal((250, 8))
  got = check_retrieval(cb, img, txt, np.repeat(np.arange(50), 5))
  assert got['text_to_image_R@1'] == pytest.approx(0.02)
  assert got['text_to_image_R@5'] == pytest.approx(0.1)


def test_retrieval_with_the_built_in_sets_repeated_captions(cb):
  """The built-in captions repeat (a caption's features tie with its copies'): features of the
  captions by text, images near their caption's. clip_benchmark's own top 5 and 10 break those
  ties by its heap order (one image of 1024 differs at R@5 here), its top 1 by index."""
  ds = synthetic.SyntheticCaptions(seed=1, resolution=32, split='heldout')
  captions = list(ds.get(np.arange(1024))['caption'])
  unique, caption_id = np.unique(captions, return_inverse=True)
  assert len(unique) < 1024 - 100  # many repeats, so ties decide hits
  rng = np.random.default_rng(2)
  txt = rng.standard_normal((len(unique), 32))[caption_id]
  img = txt + 1.0 * rng.standard_normal((1024, 32))
  got = check_retrieval(cb, img, txt, np.arange(1024), ks_free_of_ties=(1,))
  assert 0 < got['image_to_text_R@1'] < 1


def cb_zero_shot(cb, img_NxD, txt_CxTxD, labels):
  """clip_benchmark's `zeroshot_classification.evaluate`: prompt j of class c is text c*T+j."""
  c, t, _ = txt_CxTxD.shape
  model = _Features(img_NxD, txt_CxTxD.reshape(c * t, -1))
  names = [str(i) for i in range(c)]
  templates = {name: [str(i * t + j) for j in range(t)] for i, name in enumerate(names)}

  class Loader(list):
    dataset = type('Dataset', (), {'classes': names})

  n = len(img_NxD)
  loader = Loader((torch.arange(s, min(s + 16, n)), torch.as_tensor(labels[s:s + 16]))
                  for s in range(0, n, 16))
  return cb['classification'].evaluate(model, loader, _tokenize, names, templates, 'cpu',
                                       amp=False)


def normalize(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.mark.parametrize('classes', [3, 12])
def test_zero_shot_metrics(cb, classes):
  rng = np.random.default_rng(classes)
  txt = rng.standard_normal((classes, 4, 16))
  labels = rng.integers(0, classes, 200)
  img = txt[labels].mean(1) + 1.2 * rng.standard_normal((200, 16))
  weights_DxC = normalize(normalize(txt).mean(1)).T  # the prompt ensemble, as ours
  ours = metrics.classification_metrics(normalize(img) @ weights_DxC, labels)
  ref = cb_zero_shot(cb, img, txt, labels)
  assert ours['acc1'] == pytest.approx(ref['acc1'], abs=ATOL)
  assert ours['mean_per_class_recall'] == pytest.approx(ref['mean_per_class_recall'], abs=ATOL)
  if classes < 5:
    assert np.isnan(ours['acc5']) and np.isnan(ref['acc5'])
  else:
    assert ours['acc5'] == pytest.approx(ref['acc5'], abs=ATOL)
  assert 0 < ours['acc1'] < 1


@pytest.mark.parametrize('classes', [4, 10])
def test_linear_probe_metrics_and_names(cb, classes):
  """clip_benchmark's probe metrics (its `accuracy` and `balanced_accuracy_score` of the argmax,
  top-5 only where a label >= 5 occurs) and its `lp_` names."""
  rng = np.random.default_rng(classes)
  labels = rng.integers(0, classes, 300)
  logits = rng.standard_normal((300, classes)) + 1.5 * np.eye(classes)[labels]
  ours = metrics.linear_probe_metrics(logits, labels)
  target, scores = torch.as_tensor(labels).float(), torch.as_tensor(logits).float()
  if labels.max() >= 5:
    acc1, acc5 = cb['probe'].accuracy(scores, target, topk=(1, 5))
    assert ours['lp_acc5'] == pytest.approx(acc5, abs=ATOL)
  else:
    acc1, = cb['probe'].accuracy(scores, target, topk=(1,))
    assert np.isnan(ours['lp_acc5'])
  assert ours['lp_acc1'] == pytest.approx(acc1, abs=ATOL)
  recall = sklearn.metrics.balanced_accuracy_score(labels, scores.argmax(axis=1).numpy())
  assert ours['lp_mean_per_class_recall'] == pytest.approx(recall, abs=ATOL)
  source = inspect.getsource(cb['probe'].evaluate)
  assert all(f'"{name}"' in source for name in ('lp_acc1', 'lp_acc5', 'lp_mean_per_class_recall'))


def test_position_embedding_resize_matches_open_clip():
  """`interpolate_pos_embed` against open_clip's `resize_pos_embed` (bicubic, antialias), up and
  down, class token kept."""
  open_clip_reference.import_open_clip()
  from open_clip import model as oc_model  # pylint: disable=g-import-not-at-top
  cfg = clip.CLIPConfig(32, clip.VisionConfig('vit', 40, 1, 2, 8, 8),
                        clip.TextConfig(32, 1, 2, 8, 64))  # a 5x5 grid
  params = clip.init(jax.random.PRNGKey(0), cfg)
  rng = np.random.default_rng(3)
  pos = rng.standard_normal(params['visual']['positional_embedding'].shape).astype(np.float32)
  params = dict(params, visual=dict(params['visual'], positional_embedding=pos))
  for resolution in (24, 32, 56, 96):  # grids 3, 4, 7, 12
    got, new_cfg = resize.interpolate_pos_embed(params, cfg, resolution)
    target = type('Model', (), {'visual': type('Visual', (), {
        'grid_size': (new_cfg.vision.grid_size,) * 2})})
    state = {'visual.positional_embedding': torch.from_numpy(pos)}
    oc_model.resize_pos_embed(state, target)
    np.testing.assert_allclose(got['visual']['positional_embedding'],
                               state['visual.positional_embedding'].numpy(), atol=1e-5)
