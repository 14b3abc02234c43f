"""task_loss for every head kind, against the formulas written out by hand."""

import jax.numpy as jnp
import numpy as np
import pytest

from adapter_tuning.models.heads import HEADS, head_kind
from adapter_tuning.training.steps import task_loss


def _log_softmax(x):
  x = np.asarray(x, np.float64)
  m = x.max(-1, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def test_regression_loss_is_masked_mean_squared_error():
  logits = jnp.asarray([[1.0], [3.0], [-2.0], [9.0]])
  batch = {'labels': jnp.asarray([0.5, 3.0, 0.0, 0.0]), 'mask': jnp.asarray([1.0, 1.0, 1.0, 0.0])}
  # The 4th row is batch filler: it must not count.
  np.testing.assert_allclose(task_loss('regression', logits, batch), (0.25 + 0.0 + 4.0) / 3,
                             rtol=1e-6)
  del batch['mask']  # no mask: every row counts
  np.testing.assert_allclose(task_loss('regression', logits, batch), (0.25 + 4.0 + 81.0) / 4,
                             rtol=1e-6)


def test_classification_loss_is_cross_entropy():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(5, 3)).astype(np.float32)
  labels = np.array([0, 2, 1, 1, 0])
  expected = -_log_softmax(logits)[np.arange(5), labels].mean()
  np.testing.assert_allclose(task_loss('classification', jnp.asarray(logits),
                                       {'labels': jnp.asarray(labels)}), expected, rtol=1e-5)


def test_span_loss_averages_start_and_end_and_ignores_padding():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(2, 6, 2)).astype(np.float32)
  mask = np.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
  start, end = np.array([1, 0]), np.array([3, 5])
  padded = logits.copy()
  padded[0, 4:] = 50.0  # huge logits on padding: masked out, so they change nothing
  batch = {'attention_mask': jnp.asarray(mask), 'start_positions': jnp.asarray(start),
           'end_positions': jnp.asarray(end)}
  expected = []
  for b in range(2):
    n = mask[b].sum()
    ls, le = _log_softmax(logits[b, :n, 0]), _log_softmax(logits[b, :n, 1])
    expected.append(-0.5 * (ls[start[b]] + le[end[b]]))
  np.testing.assert_allclose(task_loss('span', jnp.asarray(padded), batch), np.mean(expected),
                             rtol=1e-5)


def test_every_head_kind_has_its_outputs_and_label_keys():
  assert set(HEADS) == {'classification', 'regression', 'span', 'mlm'}
  assert head_kind('regression').num_outputs(()) == 1
  assert head_kind('classification').num_outputs(('a', 'b', 'c')) == 3
  span = head_kind('span')
  assert span.per_token and span.num_outputs(()) == 2
  labels = {'start_positions': np.array([1, 2]), 'end_positions': np.array([3, 4])}
  stacked = span.stack_labels(labels)
  back = span.unstack_labels({'labels': stacked, 'input_ids': 0})
  np.testing.assert_array_equal(back['start_positions'], [1, 2])
  np.testing.assert_array_equal(back['end_positions'], [3, 4])
  assert 'labels' not in back
  with pytest.raises(Exception, match='unknown head kind'):
    head_kind('tagging')
