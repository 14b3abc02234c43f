"""Executables compiled ahead in background threads give the jitted function's results."""

import jax
import jax.numpy as jnp
import numpy as np

from adapter_tuning.data import batching
from adapter_tuning.training import precompile


def test_prepared_shapes_run_compiled_ahead_and_others_fall_back():
  f = jax.jit(lambda w, batch: {'y': batch['x'] @ w, 'n': batch['label'] * 2})
  w = jnp.arange(12.0).reshape(4, 3)
  batch = {'x': jnp.ones((2, 8, 4)), 'label': jnp.arange(2)}
  with precompile.compile_pool() as pool:
    step = precompile.AheadOfTime(f, pool)
    assert not step.prepared
    for length in (8, 16):
      step.prepare(precompile.abstract(w), precompile.with_length(batch, length))
    step.prepare(precompile.abstract(w), precompile.with_length(batch, 8))  # no-op: known
    assert step.compiled_ahead == 2
    for length in (16, 8):
      b = {'x': jnp.ones((2, length, 4)), 'label': jnp.arange(2)}
      jax.tree.map(np.testing.assert_array_equal, step(w, b), f(w, b))
    assert step.misses == 0
    odd = {'x': jnp.ones((2, 5, 4)), 'label': jnp.arange(2)}
    jax.tree.map(np.testing.assert_array_equal, step(w, odd), f(w, odd))
    assert step.misses == 1


def test_with_length_sets_rows_and_sequence_axes_only():
  batch = {'ids': jnp.zeros((4, 16), jnp.int32), 'labels': jnp.zeros((4,), jnp.float32),
           'spans': jnp.zeros((4, 16, 2))}
  spec = precompile.with_length(batch, 32, rows=8)
  assert spec['ids'].shape == (8, 32) and spec['ids'].dtype == jnp.int32
  assert spec['labels'].shape == (8,) and spec['labels'].dtype == jnp.float32
  assert spec['spans'].shape == (8, 32, 2)


def test_predicted_lengths_are_the_batches_lengths():
  rng = np.random.default_rng(0)
  ids = [np.ones(n, np.int32) for n in rng.integers(3, 120, 500)]
  types = [np.zeros_like(x) for x in ids]
  labels = np.zeros(len(ids), np.int32)
  bounds = batching.bucket_boundaries(128, 4)
  for start in (0, 5):
    seen = [b['input_ids'].shape[1] for b in batching.train_batches(
        ids, types, labels, 16, seed=3, epoch=1, boundaries=bounds, start_batch=start)]
    assert batching.train_lengths(ids, 16, seed=3, epoch=1, boundaries=bounds,
                                  start_batch=start) == list(dict.fromkeys(seen))
  seen = [b['input_ids'].shape[1] for b in batching.eval_batches(ids, types, labels, 48, bounds)]
  assert batching.eval_lengths(ids, 48, bounds) == list(dict.fromkeys(seen))


def test_compile_ahead_false_compiles_nothing_ahead(tmp_path, capsys):
  """config.compile_ahead switches the background compiles off; the run is the same run."""
  from adapter_tuning import config as defaults
  from adapter_tuning.training.trainer import train_and_evaluate
  from configs import demo
  config = demo.get_config()
  config.num_train_steps = 6
  config.progress_bar = False
  config.compile_ahead = False
  config.model.adapter.size = 8
  metrics = train_and_evaluate(config, tmp_path / 'run')
  assert 'eval/accuracy' in metrics
  assert '0 step shapes compiled ahead' in capsys.readouterr().out
  assert defaults.get_config().compile_ahead  # on by default
