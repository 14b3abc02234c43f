"""The counter-based dropout masks: right rate, exact expectation, no visible correlations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adapter_tuning.models.dropout import Dropout, random_bits32

SHAPE = (8, 12, 128, 96)  # ~1.2M elements, the shape class of attention probabilities
N = int(np.prod(SHAPE))
SIGMAS = 6.0


def _keep(key, rate=0.1, shape=SHAPE):
  out = Dropout(rate).apply({}, jnp.ones(shape), deterministic=False, rngs={'dropout': key})
  return np.asarray(out) > 0, np.asarray(out)


def _close(observed, p, n):
  assert abs(observed - p) < SIGMAS * np.sqrt(p * (1 - p) / n), (observed, p)


@pytest.mark.parametrize('rate', [0.1, 0.5])
def test_keep_rate_and_expectation(rate):
  keep, out = _keep(jax.random.key(0), rate)
  _close(keep.mean(), 1 - rate, N)
  # Inverted dropout: E[out] = x (the scale uses the rate as quantised to 2**-32).
  assert abs(out.mean() - 1.0) < SIGMAS * np.sqrt(rate / (1 - rate) / N)
  np.testing.assert_allclose(out[keep], 1 / (1 - rate), rtol=1e-6)


def test_neighbours_are_independent():
  keep, _ = _keep(jax.random.key(1), 0.5)
  flat = keep.reshape(-1)
  for stride in (1, 2, SHAPE[-1], SHAPE[-1] * SHAPE[-2]):  # along rows, columns, heads
    _close(np.mean(flat[stride:] & flat[:-stride]), 0.25, N)


def test_keys_give_independent_masks_and_the_same_key_the_same_mask():
  a, _ = _keep(jax.random.key(2), 0.5)
  b, _ = _keep(jax.random.key(3), 0.5)
  c, _ = _keep(jax.random.key(2), 0.5)
  _close(np.mean(a & b), 0.25, N)
  np.testing.assert_array_equal(a, c)
  # fold_in-derived keys (one per layer and step in the trainer) are independent too.
  d, _ = _keep(jax.random.fold_in(jax.random.key(2), 1), 0.5)
  _close(np.mean(a & d), 0.25, N)


def test_every_bit_is_fair():
  bits = np.asarray(random_bits32(jax.random.key(4), (1 << 18,)))
  for i in range(32):
    _close(np.mean((bits >> i) & 1), 0.5, bits.size)


def test_masks_differ_across_the_batch():
  # Row r of example 0 and of example 1 must not share a mask (flat indices differ).
  keep, _ = _keep(jax.random.key(5), 0.5)
  _close(np.mean(keep[0] & keep[1]), 0.25, keep[0].size)


def test_deterministic_and_zero_rate_are_identity():
  x = jnp.arange(12.0).reshape(3, 4)
  key = {'dropout': jax.random.key(0)}
  np.testing.assert_array_equal(Dropout(0.1).apply({}, x, deterministic=True, rngs=key), x)
  np.testing.assert_array_equal(Dropout(0.0).apply({}, x, deterministic=False, rngs=key), x)
