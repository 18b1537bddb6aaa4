"""Classification metrics equal to LAION's clip_benchmark's, and the rules every metric here
shares: one ranking of scores (`top_k`: equal scores rank the lower index first) and the refusal
of non-finite inputs (`check_finite`).

  classification_metrics(scores_NxC, labels_N)   # zero-shot: acc1, acc5, mean_per_class_recall
  linear_probe_metrics(scores_NxC, labels_N)     # the same as lp_acc1, lp_acc5, ...

The conformance tests (tests/eval/test_clip_benchmark_conformance.py) hold them against
clip_benchmark's own functions on the same scores.
"""
import numpy as np


def check_finite(x, what):
  """`x` as a numpy array, or a ValueError naming `what` when any value is NaN or infinite."""
  x = np.asarray(x)
  bad = ~np.isfinite(x)
  if bad.any():
    first = tuple(int(i) for i in np.argwhere(bad)[0])
    raise ValueError(f'{what} must be finite, got {int(bad.sum())} non-finite values of '
                     f'{x.size} (first at index {first}: {x[first]})')
  return x


def top_k(scores_NxC, k):
  """Indices `(N, k)` of the k highest scores per row, best first, the lower index first among
  equal scores: the one ranking rule of clip/eval (`jax.lax.top_k`'s order), which is also
  clip_benchmark's `torch.topk` wherever no tie straddles the k-th place."""
  return np.argsort(-np.asarray(scores_NxC), axis=1, kind='stable')[:, :k]


def classification_metrics(scores_NxC, labels_N, classnames=None):
  """clip_benchmark's zero-shot top-1, top-5 (nan under 5 classes) and mean per-class recall,
  plus the top-1 accuracy of every class present (`per_class_acc1`, keyed by class name when
  given). Ranks by `top_k` (the lower class first among equal scores). ValueError for non-finite
  scores or labels outside [0, C)."""
  scores, labels = _checked_scores(scores_NxC, labels_N)
  return _metrics(scores, labels, classnames, with_acc5=scores.shape[1] >= 5)


def linear_probe_metrics(scores_NxC, labels_N, classnames=None):
  """clip_benchmark's linear-probe metrics (`lp_acc1`, `lp_acc5`, `lp_mean_per_class_recall`,
  and `lp_per_class_acc1`); like clip_benchmark, top-5 is nan unless a label >= 5 occurs."""
  scores, labels = _checked_scores(scores_NxC, labels_N)
  metrics = _metrics(scores, labels, classnames, with_acc5=labels.max() >= 5)
  return {f'lp_{k}': v for k, v in metrics.items()}


def _checked_scores(scores_NxC, labels_N):
  scores, labels = check_finite(scores_NxC, 'scores'), np.asarray(labels_N)
  if scores.ndim != 2 or labels.shape != scores.shape[:1]:
    raise ValueError(f'need scores (N, C) and labels (N,), got {scores.shape} and {labels.shape}')
  if labels.min() < 0 or labels.max() >= scores.shape[1]:
    raise ValueError(f'labels must lie in [0, {scores.shape[1]}), got [{labels.min()}, '
                     f'{labels.max()}]')
  return scores, labels


def _metrics(scores, labels, classnames, with_acc5):
  top = top_k(scores, min(5, scores.shape[1]))
  acc1 = float(np.mean(top[:, 0] == labels))
  acc5 = float(np.mean((top == labels[:, None]).any(1))) if with_acc5 else float('nan')
  per_class = {int(c): float(np.mean(top[labels == c, 0] == c)) for c in np.unique(labels)}
  names = classnames or [str(c) for c in range(scores.shape[1])]
  return {'acc1': acc1, 'acc5': acc5, 'mean_per_class_recall': float(np.mean(list(
      per_class.values()))), 'per_class_acc1': {names[c]: v for c, v in per_class.items()}}
