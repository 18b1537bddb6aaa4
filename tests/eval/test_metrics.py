"""clip/eval/metrics.py: the classification metrics against their definition (their equality
with clip_benchmark's own functions: test_clip_benchmark_conformance.py), the ranking rule, and
the refusal of non-finite scores."""
import numpy as np
import pytest

from clip.eval import metrics


def test_classification_metrics_against_their_definition():
  scores = np.array([[0.9, 0.1, 0.0, 0.2, 0.3, 0.4],
                     [0.1, 0.2, 0.9, 0.0, 0.0, 0.0],
                     [0.5, 0.4, 0.3, 0.2, 0.1, 0.0],
                     [0.0, 0.1, 0.2, 0.3, 0.4, 0.5]])
  labels = np.array([0, 1, 5, 5])
  m = metrics.classification_metrics(scores, labels)
  assert m['acc1'] == 0.25 + 0.25  # rows 0 and 3
  lp = metrics.linear_probe_metrics(scores, labels)
  assert lp == {f'lp_{k}': v for k, v in m.items()}  # clip_benchmark's probe names
  assert m['acc5'] == 0.75         # row 2's label 5 ranks last
  assert m['mean_per_class_recall'] == np.mean([1.0, 0.0, 0.5])
  assert m['per_class_acc1'] == {'0': 1.0, '1': 0.0, '5': 0.5}
  named = metrics.classification_metrics(scores, labels, list('abcdef'))['per_class_acc1']
  assert named == {'a': 1.0, 'b': 0.0, 'f': 0.5}
  assert np.isnan(metrics.classification_metrics(scores[:, :4], labels % 4)['acc5'])
  # clip_benchmark's probe takes top-5 only where a label >= 5 occurs
  assert np.isnan(metrics.linear_probe_metrics(scores, labels % 4)['lp_acc5'])
  # equal scores: the lower class first (`metrics.top_k`, as torch's first maximum)
  tied = metrics.classification_metrics(np.array([[1.0, 1.0], [1.0, 1.0]]), np.array([0, 1]))
  assert tied['acc1'] == 0.5 and tied['per_class_acc1'] == {'0': 1.0, '1': 0.0}


def test_metrics_refuse_non_finite_scores_and_bad_labels():
  with pytest.raises(ValueError, match='scores must be finite, got 1 non-finite'):
    metrics.classification_metrics(np.array([[0.1, np.nan]]), np.array([0]))
  with pytest.raises(ValueError, match=r'labels must lie in \[0, 2\), got \[0, 2\]'):
    metrics.linear_probe_metrics(np.zeros((2, 2)), np.array([0, 2]))
  with pytest.raises(ValueError, match=r'x must be finite, got 1 non-finite values of 3 \(first at '
                     r'index \(2,\): inf\)'):
    metrics.check_finite([0.0, 1.0, np.inf], 'x')


def test_top_k_ranks_equal_scores_by_the_lower_index():
  np.testing.assert_array_equal(metrics.top_k(np.array([[1, 3, 3, 0, 3]]), 2), [[1, 2]])
