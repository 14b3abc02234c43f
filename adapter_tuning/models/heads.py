"""Encoder + task head: the module the trainer differentiates.

Classification/regression use one linear layer on a sentence vector chosen by `pooling`:
`pooler` (the tanh pooler over [CLS], frozen under the adapters preset, as in the official
adapter code), `cls` (the [CLS] hidden state itself, AdapterHub's `use_pooler=False`) or
`mean` (the mean over real tokens, how sentence-transformers checkpoints were trained).
The choice matters for checkpoints whose pooler was never trained for [CLS]: MiniLM's pooled
output varies across inputs ~5x less than its [CLS] state (docs/glue_minilm.md). Extractive
QA uses a span head giving start and end logits per token.
Params: {'encoder': ..., 'head': {'kernel', 'bias'}}.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from adapter_tuning.models.encoder import Dropout, Encoder, ModelConfig
from adapter_tuning.peft.bottleneck import AdapterConfig

HEAD_KINDS = ('classification', 'regression', 'span')
POOLINGS = ('pooler', 'cls', 'mean')


def pool(enc: dict, attention_mask_BxT, pooling: str):
  """The sentence vector [B, d] the head reads (see the module docstring)."""
  if pooling == 'pooler':
    return enc['pooled']
  hidden_BxTxD = enc['last_hidden_state']
  if pooling == 'cls':
    return hidden_BxTxD[:, 0]
  mask_BxTx1 = attention_mask_BxT[..., None].astype(hidden_BxTxD.dtype)
  return (hidden_BxTxD * mask_BxTx1).sum(1) / jnp.maximum(mask_BxTx1.sum(1), 1)


class TaskModel(nn.Module):
  """Returns logits [B, num_outputs] (classification/regression) or [B, T, 2] (span)."""

  config: ModelConfig
  adapter: Optional[AdapterConfig]
  head: str
  num_outputs: int
  dtype: jnp.dtype = jnp.float32
  remat: bool = False
  scan: bool = False  # Encoder.scan
  pooling: str = 'pooler'  # one of POOLINGS (classification/regression heads)

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
    x_BxD = drop(pool(enc, attention_mask_BxT, self.pooling), deterministic)
    return nn.Dense(self.num_outputs, kernel_init=init, name='head')(x_BxD.astype(jnp.float32))


@dataclasses.dataclass(frozen=True)
class TargetScale:
  """Regression targets are learned standardised, (y - mean) / std, with train-split stats.

  On raw targets (STS-B: 0-5, mean 2.7) the squared error is dominated at first by the
  label mean, which the head bias cannot reach at adapter learning rates (Adam moves it
  ~lr per step); the adapters and LayerNorms learn the constant instead and the run
  predicts it everywhere (issue 21). `fold` writes the scale into the head's kernel and
  bias, so evaluation and the artifact see a plain linear head on the raw scale.
  """

  mean: float = 0.0
  std: float = 1.0

  @classmethod
  def from_labels(cls, labels) -> 'TargetScale':
    labels = np.asarray(labels, np.float64)
    std = float(labels.std()) if labels.size else 1.0
    return cls(float(labels.mean()) if labels.size else 0.0, std if std > 1e-8 else 1.0)

  def standardize(self, labels):
    return ((np.asarray(labels, np.float64) - self.mean) / self.std).astype(np.float32)

  def fold(self, head_params: dict) -> dict:
    """Head params on the standardised scale -> the same head on the raw target scale."""
    return {'kernel': head_params['kernel'] * self.std,
            'bias': head_params['bias'] * self.std + self.mean}
