"""model.dtype=bfloat16 on CPU with MiniLM from ../shared: the loss tracks float32's and what
is trained and its Adam moments stay float32 (the mixed-precision recipe without loss
scaling: bf16 matmuls; float32 LayerNorm statistics, softmax, logits and loss)."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from adapter_tuning import load_pretrained
from adapter_tuning.models.heads import TaskModel
from adapter_tuning.training import steps
from adapter_tuning.training import trainable as tl
from adapter_tuning.training.optim import make_optimizer

STEPS = 8
# Largest |loss_bf16 - loss_fp32| allowed over the 8 steps (losses ~0.69 -> 0.65; measured
# 3e-4 on this machine, jax 0.10.2).
LOSS_TOLERANCE = 5e-3


def _batch(i: int) -> dict:
  r = np.random.default_rng(i % 2)  # two batches in turn: the loss must go down
  mask = np.ones((16, 32), np.int32)
  mask[::2, 24:] = 0
  return {'input_ids': r.integers(1000, 30000, (16, 32)).astype(np.int32),
          'attention_mask': mask, 'token_type_ids': np.zeros((16, 32), np.int32),
          'labels': (np.arange(16) % 2).astype(np.int32)}


def _train(pre, dtype):
  model = TaskModel(pre.config, pre.adapter, 'classification', 2, dtype=dtype)
  head = {'kernel': np.random.default_rng(0).normal(0, 0.02, (384, 2)).astype(np.float32),
          'bias': np.zeros(2, np.float32)}
  train, frozen = tl.split({'encoder': pre.params, 'head': head},
                           tl.resolve('adapters', pre.config.num_layers))
  opt = ml_collections.ConfigDict(dict(learning_rate=3e-3, warmup_ratio=0.0, weight_decay=0.01,
                                       adam_b1=0.9, adam_b2=0.999, adam_eps=1e-6,
                                       grad_clip_norm=1.0))
  tx = make_optimizer(opt, STEPS)
  state = steps.init_state(train, tx, 0)
  step = jax.jit(steps.make_train_step(model, tx, 'classification'))
  logits = jax.jit(lambda p, b: model.apply({'params': p}, b['input_ids'], b['attention_mask'],
                                            b['token_type_ids']))(tl.merge(train, frozen),
                                                                  _batch(0))
  losses = []
  for i in range(STEPS):
    state, metrics = step(state, frozen, _batch(i))
    assert bool(metrics['finite'])
    losses.append(float(metrics['loss']))
  return np.asarray(losses), state, logits


def test_bf16_tracks_fp32_and_keeps_float32_state(minilm_dir):
  pre = load_pretrained(minilm_dir, {'size': 16, 'init_scale': 1e-2})
  fp32, fp32_state, fp32_logits = _train(pre, jnp.float32)
  bf16, bf16_state, bf16_logits = _train(pre, jnp.bfloat16)
  print('fp32', fp32.round(4), 'bf16', bf16.round(4), 'max diff', np.abs(bf16 - fp32).max())
  assert fp32[-2:].mean() < fp32[:2].mean() - 0.02  # it learns, so the curves mean something
  assert np.abs(bf16 - fp32).max() <= LOSS_TOLERANCE, (fp32, bf16)
  assert bf16_logits.dtype == jnp.float32  # the head and the loss run in float32
  for leaf in jax.tree.leaves((bf16_state['params'], bf16_state['opt_state'])):
    assert leaf.dtype in (jnp.float32, jnp.int32), leaf.dtype
  moments = [x for x in jax.tree.leaves(bf16_state['opt_state']) if x.dtype == jnp.float32]
  assert len(moments) >= 2 * len(jax.tree.leaves(bf16_state['params']))  # mu and nu, float32
  # bf16 moved the trained params the way fp32 did (same direction, similar size).
  delta = lambda s: np.concatenate([np.ravel(a - b) for a, b in zip(
      jax.tree.leaves(s['params']), jax.tree.leaves(fp32_state['params']))])
  assert np.abs(delta(bf16_state)).max() < 0.05
