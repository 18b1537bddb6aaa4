"""clip/eval/retrieval.py: recall@k against a numpy reimplementation, with one or several
captions per image; equal scores ranked by the lower index (clip_benchmark's rule: the
conformance tests hold it against clip_benchmark's own code); bad input refused."""
import numpy as np
import pytest

from clip.eval import retrieval
from tests.eval.test_zero_shot import np_normalize


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
  got = retrieval.retrieval_metrics(img, txt, text_to_image, ks=ks, batch_size=batch_size)
  expected = np_recalls(img, txt, text_to_image, ks)
  assert got == pytest.approx(expected, abs=1e-12)
  assert 0 < got['image_to_text_R@1'] < 1 and 0 < got['text_to_image_R@1'] < 1


def test_retrieval_ties_rank_the_lower_index_first():
  """clip_benchmark's rule (the top k by score; `torch.topk` picks the first maximum): before,
  ties counted in the query's favour, and 50 identical images scored text->image R@1 = 1.0."""
  rng = np.random.default_rng(6)
  img = np.tile(rng.standard_normal((1, 8)), (50, 1))
  got = retrieval.retrieval_metrics(img, rng.standard_normal((250, 8)), np.repeat(np.arange(50), 5))
  assert got['text_to_image_R@1'] == pytest.approx(0.02)  # image 0's five captions
  assert got['text_to_image_R@5'] == pytest.approx(0.1)
  assert got['text_to_image_R@10'] == pytest.approx(0.2)
  # Image 1's only caption is a copy of image 0's, placed after it: its top 1 is image 0's.
  txt = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
  got = retrieval.retrieval_metrics(np.array([[1.0, 0.1], [1.0, -0.1], [0.0, 1.0]]), txt,
                                    ks=(1, 2))
  assert got['image_to_text_R@1'] == pytest.approx(2 / 3)
  assert got['image_to_text_R@2'] == 1.0


def test_non_finite_features_are_refused():
  feats = np.ones((50, 4), np.float32)
  with pytest.raises(ValueError, match='image features must be finite, got 200 non-finite'):
    retrieval.retrieval_metrics(np.full((50, 4), np.nan), np.ones((250, 4)),
                                np.repeat(np.arange(50), 5))
  with pytest.raises(ValueError, match=r'text features must be finite.*index \(3, 1\): inf'):
    retrieval.retrieval_metrics(feats, np.where(np.arange(200).reshape(50, 4) == 13, np.inf, 1))
  with pytest.raises(ValueError, match=r'normalised image features \(a zero feature\?\)'):
    retrieval.retrieval_metrics(np.zeros((50, 4)), feats)


def test_retrieval_one_caption_per_image():
  rng = np.random.default_rng(3)
  img = rng.standard_normal((9, 6))
  txt = img + rng.standard_normal((9, 6))
  got = retrieval.retrieval_metrics(img, txt, ks=(1, 2), batch_size=4)
  assert got == pytest.approx(np_recalls(img, txt, np.arange(9), (1, 2)), abs=1e-12)


def test_bad_input():
  feats = np.ones((4, 8), np.float32)
  with pytest.raises(ValueError, match='same D'):
    retrieval.retrieval_metrics(feats, np.ones((4, 6)))
  with pytest.raises(ValueError, match='4 images and 3 texts: give text_to_image'):
    retrieval.retrieval_metrics(feats, feats[:3])
  with pytest.raises(ValueError, match=r'1 images have no text \(first: \[3\]\)'):
    retrieval.retrieval_metrics(feats, feats[:3], text_to_image=[0, 1, 2])
  with pytest.raises(ValueError, match=r'indices outside \[0, 4\)'):
    retrieval.retrieval_metrics(feats, feats, text_to_image=[0, 1, 2, 4])
