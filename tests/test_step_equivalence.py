"""Optimisations must not change numbers, and the backward pass does only what it must.

Numbers: remat, the layer scan, the folded-head attention and the fused bias + GELU
(hand-written VJP) are each compared with the plain formulation in whole training steps,
dropout on.

Also checks DESIGN decision 3 in the compiled step: with the base frozen, XLA's FLOP count
drops to ~2/3 of full fine-tuning (no weight gradients for frozen matmuls).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adapter_tuning.interop.pretrained import load_pretrained
from adapter_tuning.models import activations, encoder as modeling
from adapter_tuning.models.heads import TaskModel
from adapter_tuning.training import steps, trainable as tl
from adapter_tuning.training.optim import make_optimizer
from adapter_tuning import config as common


@pytest.fixture(scope='module')
def setup(minilm_dir):
  pre = load_pretrained(minilm_dir, adapter={'size': 16, 'layers': [3, 4, 5], 'init_scale': 0.02})
  head = {'kernel': np.full((384, 2), 0.01, np.float32), 'bias': np.zeros(2, np.float32)}
  params = {'encoder': pre.params, 'head': head}
  texts = ['a fine film', 'a dull, tedious and overlong film', 'ok', 'not good at all']
  batch = pre.tokenizer.pad(*pre.tokenizer.tokenize(texts))
  batch['labels'] = np.array([1, 0, 1, 0], np.int32)
  return pre, params, batch


_RUNS = {}  # (rules, n, model options) -> _run's result, for the tests of this module


def _run(pre, params, batch, rules, n=3, shared=True, **model_kwargs):
  """(losses, params after n steps, the compiled step). The steps are deterministic (fixed
  dropout key), so the tests here share each (rules, n, model options) run (3 steps by
  default, so that every comparison below shares them); a run under a monkeypatch passes
  shared=False."""
  key = (repr(rules), n, tuple(sorted(model_kwargs.items())))
  if shared and key in _RUNS:
    return _RUNS[key]
  config = common.get_config()
  model = TaskModel(pre.config, pre.adapter, 'classification', 2, **model_kwargs)
  train_p, frozen_p = tl.split(params, rules)
  tx = make_optimizer(config, 10)
  state = steps.init_state(train_p, tx, 0)
  step = jax.jit(steps.make_train_step(model, tx, 'classification'))
  losses = []
  for _ in range(n):
    state, metrics = step(state, frozen_p, batch)
    losses.append(float(metrics['loss']))
  result = losses, jax.tree.map(np.asarray, state['params']), step.lower(
      state, frozen_p, batch).compile()
  if shared:
    _RUNS[key] = result
  return result


def _plain_attention(q, k, v, mask, drop_probs):
  """The textbook 4-D formulation (scale on the logits), for comparison."""
  logits = jnp.einsum('btnh,bsnh->bnts', q, k) / np.sqrt(q.shape[-1])
  logits = jnp.where(mask[:, None, None, :], logits, jnp.finfo(logits.dtype).min)
  return jnp.einsum('bnts,bsnh->btnh', drop_probs(jax.nn.softmax(logits, axis=-1)), v)


def test_fused_attention_and_gelu_match_the_plain_step(setup, monkeypatch):
  # Same dropout masks (same RNG stream, same shapes) in both runs: every difference would
  # come from the optimised formulations. Full fine-tuning differentiates all of them.
  for rules in (tl.resolve('adapters', 6), tl.resolve('full', 6)):
    a_loss, a_params, _ = _run(*setup, rules)
    with monkeypatch.context() as m:
      m.setattr(modeling, 'folded_attention', _plain_attention)
      m.setattr(activations, 'bias_gelu', lambda y, b: jax.nn.gelu(y + b, approximate=False))
      b_loss, b_params, _ = _run(*setup, rules, shared=False)
    np.testing.assert_allclose(a_loss, b_loss, rtol=1e-5)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=2e-5), a_params, b_params)


TOP = ((r'^encoder/layer_[345]/.*(_adapter|layer_norm)/', 'train'), (r'^head/', 'train'),
       (r'.*', 'freeze'))


def test_remat_changes_nothing(setup):
  rules = tl.resolve('adapters', 6)
  a_loss, a_params, _ = _run(*setup, rules)
  b_loss, b_params, _ = _run(*setup, rules, remat=True)
  np.testing.assert_allclose(a_loss, b_loss, rtol=1e-6)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6), a_params, b_params)


def test_scanned_layers_match_the_unrolled_stack(setup):
  # Adapters sit in layers 3-5 only: two runs of identically shaped layers, two scans.
  for rules in (tl.resolve('adapters', 6), TOP, tl.resolve('full', 6)):
    a_loss, a_params, _ = _run(*setup, rules)
    b_loss, b_params, _ = _run(*setup, rules, scan=True)
    np.testing.assert_allclose(a_loss, b_loss, rtol=1e-6)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6), a_params, b_params)
  c_loss, c_params, _ = _run(*setup, tl.resolve('adapters', 6), scan=True, remat=True)
  np.testing.assert_allclose(a_loss, c_loss, rtol=1e-6)


def test_uniform_runs_split_where_layer_shapes_change():
  layer = lambda adapter: {'w': np.zeros((2, 2))} | ({'adapter': np.zeros(3)} if adapter else {})
  runs = modeling._uniform_runs([layer(a) for a in (0, 0, 0, 1, 1, 0)], [None] * 6)
  assert runs == [(0, 2), (3, 4), (5, 5)]


def test_backward_pass_stops_at_the_lowest_trained_layer(setup):
  # Adapters and layer norms train only in layers 3-5: nothing below needs a cotangent,
  # and JAX's transpose computes none (no explicit stop-gradient required).
  pre, params, batch = setup
  *_, top = _run(pre, params, batch, TOP)  # the compiled steps (of the runs above)
  *_, everywhere = _run(pre, params, batch, tl.resolve('adapters', 6))
  *_, full = _run(pre, params, batch, tl.resolve('full', 6))
  forward_flops = (_flops(full) / 3)  # full = forward + 2x backward
  # Layers 0-2 cost one forward only: ~ forward + half of (everywhere - forward).
  assert _flops(top) < 0.8 * _flops(everywhere)
  assert _flops(top) > forward_flops


def _flops(exe):
  cost = exe.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost['flops'])


def test_frozen_base_needs_no_weight_gradients(setup):
  pre, params, batch = setup
  *_, adapters = _run(pre, params, batch, tl.resolve('adapters', 6))  # the compiled steps
  *_, full = _run(pre, params, batch, tl.resolve('full', 6))
  ratio = _flops(adapters) / _flops(full)
  assert ratio < 0.75, ratio  # ~4N vs ~6N per token
