"""The fused bias + GELU (hand-written VJP) equals plain autodiff of jax.nn.gelu."""

import jax
import jax.numpy as jnp
import numpy as np

from adapter_tuning.models.activations import bias_gelu, gelu_exact


def _plain(y, b):
  return jax.nn.gelu(y + b, approximate=False)


def _inputs():
  r = np.random.default_rng(0)
  y = jnp.asarray(r.standard_normal((4, 16, 64)) * 3, jnp.float32)
  b = jnp.asarray(r.standard_normal(64), jnp.float32)
  g = jnp.asarray(r.standard_normal((4, 16, 64)), jnp.float32)
  return y, b, g


def test_values_match_erfc_form():
  y, b, _ = _inputs()
  np.testing.assert_allclose(bias_gelu(y, b), _plain(y, b), atol=2e-6)
  np.testing.assert_allclose(gelu_exact(y), jax.nn.gelu(y, approximate=False), atol=2e-6)


def test_vjp_matches_autodiff():
  y, b, g = _inputs()
  fused = jax.vjp(bias_gelu, y, b)[1](g)
  plain = jax.vjp(_plain, y, b)[1](g)
  np.testing.assert_allclose(fused[0], plain[0], atol=1e-5)
  np.testing.assert_allclose(fused[1], plain[1], rtol=1e-5, atol=1e-4)


def test_jit_vmap_and_bfloat16():
  y, b, g = _inputs()
  f = jax.jit(jax.vmap(jax.grad(lambda y, b: jnp.sum(bias_gelu(y, b) * 2.0)), (0, None)))
  np.testing.assert_allclose(
      f(y, b), jax.vmap(jax.grad(lambda y, b: jnp.sum(_plain(y, b) * 2.0)), (0, None))(y, b),
      atol=1e-5)
  out = bias_gelu(y.astype(jnp.bfloat16), b.astype(jnp.bfloat16))
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out, np.float32), _plain(y, b), atol=0.1)
