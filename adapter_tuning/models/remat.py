"""`model.remat`: which policy rematerialises each transformer layer in the backward pass."""

from __future__ import annotations

import jax

from adapter_tuning.errors import UsageError

# `model.remat` names: what each layer keeps from its forward pass for the backward pass.
# full keeps only its input (recomputes everything: least memory, ~1/3 more compute);
# dots_saveable keeps every matmul output and recomputes the cheap elementwise rest (layer
# norms, GELU, dropout masks, softmax); the others are jax.checkpoint_policies of that name.
REMAT_POLICIES = ('none', 'full', 'dots_saveable', 'dots_with_no_batch_dims_saveable',
                  'nothing_saveable', 'everything_saveable')


def remat_policy(remat) -> tuple[bool, object]:
  """(rematerialise?, jax.checkpoint policy or None) for a `model.remat` value; the
  booleans of older configs mean full (True) and none (False)."""
  if remat is True or remat == 'full':
    return True, None
  if remat is False or remat == 'none':
    return False, None
  if remat not in REMAT_POLICIES:
    raise UsageError(f'model.remat={remat!r} is not a remat policy; use one of '
                     f'{", ".join(REMAT_POLICIES)}')
  return True, getattr(jax.checkpoint_policies, remat)
