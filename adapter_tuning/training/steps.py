"""Pure train and eval steps. The trainable subtree is the only thing differentiated.

`state` = {'step', 'params' (trainable only), 'opt_state', 'rng'}; the frozen params are a
separate, non-donated argument. Because the gradient is taken with respect to the
trainable subtree alone, XLA never forms weight gradients for the frozen base (the
backward pass still propagates activations through it where a trainable param lies below).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from adapter_tuning.data import packing
from adapter_tuning.models.heads import head_kind
from adapter_tuning.training import trainable as trainable_lib


def task_loss(head: str, logits, batch):
  """Mean loss over the real examples of a batch (weights: the head kind's
  `example_weights`, batch['mask'] when present)."""
  kind = head_kind(head)
  per_example = kind.loss(logits, batch)
  weights = kind.example_weights(batch, per_example)  # MLM: its number of masked tokens
  return jnp.sum(per_example * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def init_state(trainable_params, tx, seed: int):
  return {'step': jnp.zeros((), jnp.int32), 'params': trainable_params,
          'opt_state': tx.init(trainable_params), 'rng': jax.random.PRNGKey(seed)}


def make_train_step(model, tx, head: str):
  """Returns train_step(state, frozen, batch) -> (state, metrics).

  A step whose loss or gradients are not finite leaves the state unchanged and reports
  `finite = 0`; the loop stops the run there, keeping the last good checkpoint.
  """

  kind = head_kind(head)

  def loss_fn(params, frozen, batch, rng):
    logits = model.apply({'params': trainable_lib.merge(params, frozen)}, batch['input_ids'],
                         batch['attention_mask'], batch['token_type_ids'], deterministic=False,
                         rngs={'dropout': rng}, segments=packing.segments_of(batch),
                         **kind.model_inputs(batch))
    return task_loss(head, logits, batch)

  def train_step(state, frozen, batch):
    rng = jax.random.fold_in(state['rng'], state['step'])
    loss, grads = jax.value_and_grad(loss_fn)(state['params'], frozen, batch, rng)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
    new_state = {'step': state['step'] + 1,
                 'params': optax.apply_updates(state['params'], updates),
                 'opt_state': opt_state, 'rng': state['rng']}
    new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
    return new_state, {'loss': loss, 'grad_norm': grad_norm, 'finite': finite}

  return train_step


def make_eval_step(model, head: str):
  """Returns eval_step(params, batch) -> predictions: class ids, scores, or span logits."""

  kind = head_kind(head)

  def eval_step(params, batch):
    logits = model.apply({'params': params}, batch['input_ids'], batch['attention_mask'],
                         batch['token_type_ids'], deterministic=True,
                         segments=packing.segments_of(batch), **kind.model_inputs(batch))
    return kind.eval_outputs(logits, batch)

  return eval_step
