"""GLUE metrics against scikit-learn/scipy (test-only dependencies) and hand-computed values."""

import warnings

import numpy as np
import pytest
import scipy.stats
import sklearn.metrics

from adapter_tuning.data import metrics
from adapter_tuning.errors import UsageError


def _random_cases(seed=0, n_cases=30):
  rng = np.random.default_rng(seed)
  for i in range(n_cases):
    n = int(rng.integers(2, 300))
    classes = 2 if i % 3 else 3
    labels = rng.integers(0, classes, n)
    noisy = rng.integers(0, classes, n)
    predictions = np.where(rng.random(n) < rng.random(), labels, noisy)
    yield predictions, labels


@pytest.mark.parametrize('case', list(_random_cases()))
def test_classification_metrics_match_sklearn(case):
  predictions, labels = case
  assert metrics.accuracy(predictions, labels) == pytest.approx(
      sklearn.metrics.accuracy_score(labels, predictions))
  assert metrics.matthews_corr(predictions, labels) == pytest.approx(
      sklearn.metrics.matthews_corrcoef(labels, predictions), abs=1e-12)
  if labels.max() <= 1 and predictions.max() <= 1:
    assert metrics.f1(predictions, labels) == pytest.approx(
        sklearn.metrics.f1_score(labels, predictions), abs=1e-12)


@pytest.mark.parametrize('seed', range(10))
def test_correlations_match_scipy(seed):
  rng = np.random.default_rng(seed)
  n = int(rng.integers(3, 500))
  labels = np.round(rng.uniform(0, 5, n), 1)  # STS-B-like scores: many ties
  predictions = labels + rng.normal(0, rng.uniform(0.1, 3), n)
  if seed % 2:
    predictions = np.round(predictions)  # ties in the predictions too
  assert metrics.pearson(predictions, labels) == pytest.approx(
      scipy.stats.pearsonr(predictions, labels)[0], abs=1e-12)
  assert metrics.spearman(predictions, labels) == pytest.approx(
      scipy.stats.spearmanr(predictions, labels)[0], abs=1e-12)
  np.testing.assert_allclose(metrics.rankdata(predictions), scipy.stats.rankdata(predictions))


def test_hand_computed_values():
  # tp=2, fp=1, fn=1, tn=2: accuracy 4/6, F1 = 4/(4+2), MCC = (4-1)/sqrt(3*3*3*3) = 1/3.
  predictions, labels = [1, 1, 1, 0, 0, 0], [1, 1, 0, 1, 0, 0]
  assert metrics.accuracy(predictions, labels) == pytest.approx(4 / 6)
  assert metrics.f1(predictions, labels) == pytest.approx(2 / 3)
  assert metrics.matthews_corr(predictions, labels) == pytest.approx(1 / 3)
  # Ties share their average rank: [10, 20, 20, 30] -> [1, 2.5, 2.5, 4].
  np.testing.assert_allclose(metrics.rankdata([10, 20, 20, 30]), [1, 2.5, 2.5, 4])
  assert metrics.pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
  assert metrics.spearman([1, 2, 3], [30, 20, 10]) == pytest.approx(-1.0)


def test_degenerate_inputs_give_zero_not_nan():
  labels = np.array([0, 1, 1, 0, 1])
  constant = np.ones(5, np.int64)
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')
    assert metrics.matthews_corr(constant, labels) == sklearn.metrics.matthews_corrcoef(
        labels, constant) == 0.0
    zeros = np.zeros(5, np.int64)
    # No positive label and no positive prediction: sklearn reports 0.0 (with a warning).
    assert metrics.f1(zeros, zeros) == sklearn.metrics.f1_score(zeros, zeros) == 0.0
    assert metrics.f1(zeros, labels) == 0.0
  assert metrics.matthews_corr(labels, labels) == pytest.approx(1.0)
  assert metrics.pearson(np.full(5, 2.5), labels) == 0.0  # scipy: NaN and a warning
  assert metrics.spearman(np.full(5, 2.5), labels) == 0.0
  assert metrics.matthews_corr([1], [1]) == 0.0  # a single class: undefined


def test_mcc_large_counts_do_not_overflow():
  labels = np.tile([0, 1], 200_000)
  predictions = labels.copy()
  predictions[:1000] = 1 - predictions[:1000]
  assert metrics.matthews_corr(predictions, labels) == pytest.approx(
      sklearn.metrics.matthews_corrcoef(labels, predictions), abs=1e-12)


def test_compute_metrics():
  out = metrics.compute_metrics(('f1', 'accuracy'), [1, 0, 1, 1], [1, 0, 0, 1])
  assert out == {'f1': pytest.approx(0.8), 'accuracy': pytest.approx(0.75)}
  assert all(isinstance(v, float) for v in out.values())
  logits = np.array([[0.1, 0.9], [2.0, -1.0], [0.0, 1.0]])  # argmax -> 1, 0, 1
  assert metrics.compute_metrics(('accuracy',), logits, [1, 0, 0])['accuracy'] == pytest.approx(
      2 / 3)
  scores = metrics.compute_metrics(('pearson', 'spearman'), [[1.0], [2.0], [3.5]], [1, 2, 3])
  assert scores['spearman'] == pytest.approx(1.0)
  with pytest.raises(UsageError, match='unknown metric'):
    metrics.compute_metrics(('bleu',), [1], [1])
  with pytest.raises(ValueError, match='equal-length'):
    metrics.compute_metrics(('accuracy',), [1, 0], [1])
  with pytest.raises(ValueError, match='no examples'):
    metrics.compute_metrics(('accuracy',), [], [])
