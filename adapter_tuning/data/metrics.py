"""The official GLUE metrics in numpy (scipy and scikit-learn are not runtime dependencies).

Definitions follow what GLUE's leaderboard and scikit-learn/scipy compute:
  accuracy       fraction of exact matches;
  f1             binary F1 of the positive class 1 (MRPC equivalent, QQP duplicate);
  matthews_corr  Matthews correlation over the confusion matrix (multi-class form, which
                 equals the familiar binary formula for two classes);
  pearson        Pearson correlation;
  spearman       Pearson correlation of ranks, tied values sharing their average rank.
Degenerate inputs give 0.0 instead of NaN where the score is undefined (a constant
prediction has no correlation with anything; F1 with no positives anywhere), as
scikit-learn does for MCC and F1, so a collapsed model reads as "no signal", not a crash.
All values are fractions in [-1, 1], not percentages.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from adapter_tuning.errors import UsageError


def accuracy(predictions, labels) -> float:
  return float(np.mean(np.asarray(predictions) == np.asarray(labels)))


def f1(predictions, labels) -> float:
  predictions, labels = np.asarray(predictions) == 1, np.asarray(labels) == 1
  tp = np.sum(predictions & labels)
  fp = np.sum(predictions & ~labels)
  fn = np.sum(~predictions & labels)
  denominator = 2 * tp + fp + fn
  return float(2 * tp / denominator) if denominator else 0.0


def matthews_corr(predictions, labels) -> float:
  predictions, labels = np.asarray(predictions), np.asarray(labels)
  classes, codes = np.unique(np.concatenate([labels, predictions]), return_inverse=True)
  k, n = len(classes), len(labels)
  confusion = np.bincount(codes[:n] * k + codes[n:], minlength=k * k).reshape(k, k)
  confusion = confusion.astype(np.float64)  # products of counts overflow int32 quickly
  true_sum, pred_sum = confusion.sum(axis=1), confusion.sum(axis=0)
  correct, total = np.trace(confusion), confusion.sum()
  cov_tp = correct * total - true_sum @ pred_sum
  cov_pp = total ** 2 - pred_sum @ pred_sum
  cov_tt = total ** 2 - true_sum @ true_sum
  if cov_pp * cov_tt == 0:
    return 0.0
  return float(cov_tp / np.sqrt(cov_tt * cov_pp))


def pearson(predictions, labels) -> float:
  x = np.asarray(predictions, np.float64)
  y = np.asarray(labels, np.float64)
  x, y = x - x.mean(), y - y.mean()
  denominator = np.sqrt((x @ x) * (y @ y))
  if denominator == 0:
    return 0.0
  return float(np.clip((x @ y) / denominator, -1.0, 1.0))


def rankdata(values) -> np.ndarray:
  """1-based ranks; tied values get the average of the ranks they span."""
  values = np.asarray(values)
  order = np.argsort(values, kind='stable')
  ordered = values[order]
  starts_group = np.concatenate([[True], ordered[1:] != ordered[:-1]])
  group = np.cumsum(starts_group) - 1
  bounds = np.concatenate([np.flatnonzero(starts_group), [len(values)]])
  average = (bounds[:-1] + bounds[1:] + 1) / 2.0  # mean of ranks bounds[g]+1 .. bounds[g+1]
  ranks = np.empty(len(values), np.float64)
  ranks[order] = average[group]
  return ranks


def spearman(predictions, labels) -> float:
  return pearson(rankdata(predictions), rankdata(labels))


METRICS = {'accuracy': accuracy, 'f1': f1, 'matthews_corr': matthews_corr,
           'pearson': pearson, 'spearman': spearman}
_REGRESSION = ('pearson', 'spearman')


# Metrics where smaller is better (model selection and early stopping minimise them):
# masked-LM perplexity, and losses or error rates by name.
LOWER_IS_BETTER = ('perplexity',)


def lower_is_better(metric: str) -> bool:
  """For a metric name or a metrics key ('eval/perplexity', 'eval/dev/loss')."""
  name = metric.rsplit('/', 1)[-1]
  return name in LOWER_IS_BETTER or name.endswith(('loss', 'error'))


def compute_metrics(metric_names: Sequence[str], predictions, labels) -> dict[str, float]:
  """{name: value} for each metric; predictions are class ids (or [N, C] logits) or floats."""
  unknown = [m for m in metric_names if m not in METRICS]
  if unknown:
    raise UsageError(f'unknown metric(s) {unknown}; use {", ".join(METRICS)}')
  predictions, labels = np.asarray(predictions), np.asarray(labels)
  regression = any(m in _REGRESSION for m in metric_names)
  if regression and predictions.ndim == 2 and predictions.shape[1] == 1:
    predictions = predictions[:, 0]
  elif not regression and predictions.ndim == 2:
    predictions = predictions.argmax(axis=1)
  if predictions.shape != labels.shape or labels.ndim != 1:
    raise UsageError(f'predictions {predictions.shape} and labels {labels.shape} must be '
                     'equal-length vectors')
  if len(labels) == 0:
    raise UsageError('no examples to score')
  return {m: METRICS[m](predictions, labels) for m in metric_names}
