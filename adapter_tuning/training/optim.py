"""The optimizer of the official adapter code: AdamW + global-norm clipping + warm-up/decay.

It is built over the trainable subtree only, so frozen params get no Adam moments at all.
Weight decay skips LayerNorm params and biases, as in BERT.
"""

from __future__ import annotations

import flax.traverse_util as tu
import optax


def learning_rate_schedule(peak: float, num_steps: int, warmup_ratio: float) -> optax.Schedule:
  """Linear warm-up over warmup_ratio of the steps, then linear decay to 0."""
  warmup = int(round(num_steps * warmup_ratio))
  return optax.join_schedules(
      [optax.linear_schedule(0.0, peak, max(warmup, 1)),
       optax.linear_schedule(peak, 0.0, max(num_steps - warmup, 1))],
      boundaries=[warmup])


def decay_mask(params: dict) -> dict:
  flat = tu.flatten_dict(params)
  return tu.unflatten_dict({
      k: not (k[-1] == 'bias' or any('layer_norm' in p for p in k)) for k in flat})


def make_optimizer(config, num_steps: int) -> optax.GradientTransformation:
  """AdamW(b1, b2, eps) with decoupled weight decay, after clipping to config.grad_clip_norm."""
  schedule = learning_rate_schedule(config.learning_rate, num_steps, config.warmup_ratio)
  parts = []
  if config.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(config.grad_clip_norm))
  parts.append(optax.adamw(schedule, b1=config.adam_b1, b2=config.adam_b2, eps=config.adam_eps,
                           weight_decay=config.weight_decay, mask=decay_mask))
  return optax.chain(*parts)
