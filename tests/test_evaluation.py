"""Evaluation visits every example exactly once and returns outputs in the split's order."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from adapter_tuning.data.tasks import Split, TaskData
from adapter_tuning.training import evaluation, parallel


def _split(name, lengths, labels):
  # Token 0 of example i is 100 + i: the fake model's prediction names the example it saw.
  ids = [np.asarray([100 + i] + [7] * (n - 1), np.int32) for i, n in enumerate(lengths)]
  types = [np.zeros(n, np.int32) for n in lengths]
  examples = [{'idx': i, 'label': int(l)} for i, l in enumerate(labels)]
  return Split(name, ids, types, {'labels': np.asarray(labels, np.int32)}, examples)


def _eval_step(params, batch):
  first = batch['input_ids'][:, 0]
  return {'predictions': first - 100, 'lengths': jnp.sum(batch['attention_mask'], 1)}


def test_run_split_restores_the_split_order_across_buckets_and_filler():
  lengths = [30, 3, 17, 9, 3, 25, 12, 5, 8, 31]  # sorted by length inside, 10 rows, batches of 4
  split = _split('validation', lengths, [0] * 10)
  shard = parallel.batch_sharded(parallel.make_mesh())
  out = evaluation.run_split(jax.jit(_eval_step), None, split, 4, (8, 16, 32), shard)
  np.testing.assert_array_equal(out['predictions'], np.arange(10))  # each example once, in order
  np.testing.assert_array_equal(out['lengths'], lengths)


def test_evaluate_all_names_the_primary_split_plainly_and_skips_unlabeled_metrics():
  labels = [0, 1, 2, 3, 4, 5]
  data = TaskData('demo', 'classification', tuple(str(i) for i in range(6)), ('accuracy',),
                  None, {'matched': _split('matched', [4] * 6, labels),
                         'mismatched': _split('mismatched', [4] * 6, [5, 1, 2, 3, 4, 0]),
                         'test': _split('test', [4] * 6, [-1] * 6)})
  config = ml_collections.ConfigDict({'eval_batch_size': 4})
  shard = parallel.batch_sharded(parallel.make_mesh())
  results = evaluation.evaluate_all(jax.jit(_eval_step), None, data, config,
                                    {k: (8,) for k in data.evals}, shard)
  assert results.metrics == {'eval/accuracy': 1.0, 'eval/mismatched/accuracy': 4 / 6}
  np.testing.assert_array_equal(results.predictions['test'], np.arange(6))  # kept, not scored
  assert results.warnings == []
