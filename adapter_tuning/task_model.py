"""Encoder + task head: the module the trainer differentiates.

Classification/regression use one linear layer on the pooled [CLS] output (the pooler itself
stays frozen, as in the official adapter code); extractive QA uses a span head giving start
and end logits per token. Params: {'encoder': ..., 'head': {'kernel', 'bias'}}.
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax.numpy as jnp

from adapter_tuning.adapters import AdapterConfig
from adapter_tuning.modeling import Dropout, Encoder, ModelConfig

HEAD_KINDS = ('classification', 'regression', 'span')


class TaskModel(nn.Module):
  """Returns logits [B, num_outputs] (classification/regression) or [B, T, 2] (span)."""

  config: ModelConfig
  adapter: Optional[AdapterConfig]
  head: str
  num_outputs: int
  dtype: jnp.dtype = jnp.float32
  remat: bool = False
  scan: bool = False  # Encoder.scan

  @nn.compact
  def __call__(self, input_ids_BxT, attention_mask_BxT, token_type_ids_BxT=None,
               deterministic: bool = True):
    enc = Encoder(self.config, self.adapter, self.dtype, self.remat, self.scan,
                  name='encoder')(input_ids_BxT, attention_mask_BxT, token_type_ids_BxT,
                                  deterministic)
    drop = Dropout(self.config.hidden_dropout)
    init = nn.initializers.normal(0.02)
    if self.head == 'span':
      x_BxTxD = drop(enc['last_hidden_state'], deterministic)
      logits = nn.Dense(2, kernel_init=init, name='head')(x_BxTxD.astype(jnp.float32))
      return logits
    x_BxD = drop(enc['pooled'], deterministic)
    return nn.Dense(self.num_outputs, kernel_init=init, name='head')(x_BxD.astype(jnp.float32))
