"""Encoder + task head: the module the trainer differentiates.

Classification/regression use one linear layer on a sentence vector chosen by `pooling`:
`pooler` (the tanh pooler over [CLS], frozen under the adapters preset, as in the official
adapter code), `cls` (the [CLS] hidden state itself, AdapterHub's `use_pooler=False`) or
`mean` (the mean over real tokens, how sentence-transformers checkpoints were trained).
The choice matters for checkpoints whose pooler was never trained for [CLS]: MiniLM's pooled
output varies across inputs ~5x less than its [CLS] state (docs/glue_minilm.md). Extractive
QA uses a span head giving start and end logits per token; masked language modelling (MAD-X's
language adapters) the family's own LM head over the tied word embeddings (`mlm_head`).
Params: {'encoder': ..., 'head': {'kernel', 'bias'}} (the LM head: {'dense', 'layer_norm', 'bias'}).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import optax

from adapter_tuning.errors import UsageError
from adapter_tuning.models.dropout import Dropout
from adapter_tuning.models.encoder import Encoder, ModelConfig
from adapter_tuning.models.sequences import pool_tokens

POOLINGS = ('pooler', 'cls', 'mean')
HEAD_INIT = nn.initializers.normal(0.02)  # every head kernel; biases start at zero


def pool(enc: dict, attention_mask_BxT, pooling: str, segments=None):
  """The sentence vector [B, d] the head reads (see the module docstring); [E, d] for the
  E examples of packed rows (`segments`, as `Encoder` takes them)."""
  if pooling == 'pooler':
    return enc['pooled']
  return pool_tokens(enc['last_hidden_state'], attention_mask_BxT, pooling, segments)


class HeadKind:
  """What one kind of task head means, in one place: everything else asks its kind.

  A kind says how many outputs its linear layer has, whether it reads one vector per
  example (`per_token=False`, through `pool`) or every token, which batch keys carry its
  labels, its per-example loss, what its eval step returns, how a prediction is written,
  and how its eval outputs are scored. Token tagging or multiple choice would be one more
  subclass here.
  """

  name: str
  label_keys: tuple[str, ...] = ('labels',)
  per_token = False
  vocabulary = False  # outputs are the vocabulary: the family's LM head (mlm_head.MLMHead)
  not_servable = ''  # why predict/serve cannot run this kind ('' = they can)
  label_dtype = np.int32
  standardized_targets = False  # regression: learned on (y - mean) / std, see TargetScale

  def num_outputs(self, label_names) -> int:
    return len(label_names)

  def init_params(self, key, hidden: int, num_outputs: int) -> dict:
    """The head's starting params (the trainer's draw, the same init as the module's)."""
    return {'kernel': np.asarray(HEAD_INIT(key, (hidden, num_outputs), jnp.float32)),
            'bias': np.zeros((num_outputs,), np.float32)}

  def loss(self, logits, batch):
    """Per-example loss [B]."""
    raise NotImplementedError

  def example_weights(self, batch, per_example):
    """Each example's weight in the batch's mean loss, like `per_example` (this kind's
    `loss`): 1 per real example (`mask` where filler rows are present)."""
    return batch['mask'] if 'mask' in batch else jnp.ones_like(per_example)

  def model_inputs(self, batch) -> dict:
    """Keyword arguments of `TaskModel` that come from the batch beyond the token arrays."""
    return {}

  def eval_outputs(self, logits, batch) -> dict:
    """What the jitted eval step returns for a batch (host-side rows per example)."""
    raise NotImplementedError

  def prediction(self, value, label_names):
    """One eval prediction (an `eval_outputs()['predictions']` row) as written to JSONL."""
    return label_names[int(value)]

  def output_fields(self, logits_row, label_names) -> dict:
    """A `predict` output line's fields for one example's logits."""
    return {'label': label_names[int(np.argmax(logits_row))],
            'logits': [float(x) for x in logits_row]}

  def constant_warning(self, split: str, predictions, label_names) -> str | None:
    """One run-log line when every example of a split gets one class, else None."""
    preds = np.asarray(predictions)
    if preds.size < 2 or len(label_names) < 2 or len(np.unique(preds)) > 1:
      return None
    return (f'eval split {split}: predictions are constant (class {label_names[int(preds[0])]!r} '
            f'for all {preds.size} examples): the model learned only the majority label; try '
            'more steps, another learning_rate or model.head.pooling=mean (or cls)')

  def stack_labels(self, labels: dict) -> np.ndarray:
    """A split's labels as one [N] or [N, k] array for batching (see `unstack_labels`)."""
    return labels['labels']

  def unstack_labels(self, batch: dict) -> dict:
    return batch

  def score(self, split, outputs: dict, data, config):
    """(predictions to keep, metric dict or None for an unlabeled split)."""
    from adapter_tuning.data import metrics as metrics_lib
    labels = split.labels['labels']
    if np.all(labels == -1):
      return outputs['predictions'], None
    return outputs['predictions'], metrics_lib.compute_metrics(
        data.metric_names, outputs['predictions'], labels)


class Classification(HeadKind):
  name = 'classification'

  def loss(self, logits, batch):
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch['labels'])

  def eval_outputs(self, logits, batch):
    return {'predictions': jnp.argmax(logits, -1), 'logits': logits}


class Regression(HeadKind):
  name = 'regression'
  label_dtype = np.float32
  standardized_targets = True

  def num_outputs(self, label_names) -> int:
    return 1

  def loss(self, logits, batch):
    return jnp.square(logits[:, 0] - batch['labels'])

  def eval_outputs(self, logits, batch):
    return {'predictions': logits[:, 0]}

  def prediction(self, value, label_names):
    return float(value)

  def output_fields(self, logits_row, label_names) -> dict:
    return {'score': float(logits_row[0])}

  def constant_warning(self, split: str, predictions, label_names) -> str | None:
    """Constant = a spread below 1e-3 of the scale: the head learned only the label mean."""
    preds = np.asarray(predictions)
    center = float(np.mean(preds)) if preds.size else 0.0
    if preds.size < 2 or np.ptp(preds) > 1e-3 * max(1.0, abs(center)):
      return None
    return (f'eval split {split}: predictions are constant ({center:.5g} for all {preds.size} '
            'examples): the model learned only the label mean; try '
            'model.head.standardize_targets=True, model.head.pooling=mean (or cls), or another '
            'learning_rate')


class Span(HeadKind):
  """Extractive QA: start and end logits per token, scored by SQuAD's post-processing."""

  name = 'span'
  label_keys = ('start_positions', 'end_positions')
  per_token = True

  def num_outputs(self, label_names) -> int:
    return 2

  def loss(self, logits, batch):
    mask = batch['attention_mask'].astype(bool)
    start_logits = jnp.where(mask, logits[..., 0], -1e9)
    end_logits = jnp.where(mask, logits[..., 1], -1e9)
    return 0.5 * (
        optax.softmax_cross_entropy_with_integer_labels(start_logits, batch['start_positions']) +
        optax.softmax_cross_entropy_with_integer_labels(end_logits, batch['end_positions']))

  def eval_outputs(self, logits, batch):
    return {'start_logits': logits[..., 0], 'end_logits': logits[..., 1]}

  def stack_labels(self, labels: dict) -> np.ndarray:
    return np.stack([labels[k] for k in self.label_keys], axis=1)

  def unstack_labels(self, batch: dict) -> dict:
    batch = dict(batch)
    labels = batch.pop('labels')
    for i, key in enumerate(self.label_keys):
      batch[key] = labels[:, i]
    return batch

  def output_fields(self, logits_row, label_names) -> dict:
    raise UsageError('QA (span) adapters answer through the trainer\'s SQuAD evaluation, not '
                     'predict rows; evaluate with adapter_tuning.train')

  def constant_warning(self, split: str, predictions, label_names) -> str | None:
    return None  # answers are per-question text spans: no single value to collapse to

  def score(self, split, outputs: dict, data, config):
    from adapter_tuning.data import squad_task
    return squad_task.score(split, outputs, config)


class MaskedLM(HeadKind):
  """Masked language modelling: logits over the vocabulary at the masked positions.

  The batch (data/mlm.py, BERT's recipe) names P prediction slots per row: `mlm_positions`
  (token positions), `mlm_ids` (the original tokens) and `mlm_weights` (1 for a real slot);
  the model gathers those positions before its head, so the vocabulary projection costs P
  rows, not T. The batch loss is the mean over masked tokens (each example weighs its
  number of them), and evaluation sums the cross-entropy and counts tokens per example so
  that perplexity = exp(total / tokens) over the whole split, not a mean of batch exps.
  """

  name = 'mlm'
  label_keys = ()
  per_token = True
  vocabulary = True
  not_servable = ('a masked-LM (language) adapter predicts no task labels: stack it below a '
                  'task adapter (model.stack.below) and predict with that one; its perplexity '
                  'is in its run\'s metrics.jsonl')

  def num_outputs(self, label_names) -> int:
    return 0  # the vocabulary: ModelConfig.vocab_size

  def init_params(self, key, hidden: int, num_outputs: int) -> dict:
    raise NotImplementedError('the LM head comes from mlm_head.load_or_init')

  def _nll(self, logits_BxPxV, batch):
    nll = optax.softmax_cross_entropy_with_integer_labels(logits_BxPxV, batch['mlm_ids'])
    return nll * batch['mlm_weights'], batch['mlm_weights']

  def loss(self, logits, batch):
    nll, weights = self._nll(logits, batch)
    return jnp.sum(nll, -1) / jnp.maximum(jnp.sum(weights, -1), 1.0)

  def example_weights(self, batch, per_example):
    return jnp.sum(batch['mlm_weights'], -1) * super().example_weights(batch, per_example)

  def model_inputs(self, batch) -> dict:
    return {'positions_BxP': batch['mlm_positions']}

  def eval_outputs(self, logits, batch):
    nll, weights = self._nll(logits, batch)
    hits = (jnp.argmax(logits, -1) == batch['mlm_ids']) * weights
    return {'nll': jnp.sum(nll, -1), 'tokens': jnp.sum(weights, -1), 'hits': jnp.sum(hits, -1)}

  def prediction(self, value, label_names):
    return float(value)  # the example's mean masked-token cross-entropy

  def output_fields(self, logits_row, label_names) -> dict:
    raise UsageError(self.not_servable)

  def constant_warning(self, split: str, predictions, label_names) -> str | None:
    return None

  def score(self, split, outputs: dict, data, config):
    """Per-example mean cross-entropy; perplexity, loss and accuracy over masked tokens."""
    nll, tokens = np.asarray(outputs['nll'], np.float64), np.asarray(outputs['tokens'])
    total = max(float(tokens.sum()), 1.0)
    loss = float(nll.sum()) / total
    return nll / np.maximum(tokens, 1.0), {
        'perplexity': float(np.exp(loss)), 'loss': loss,
        'accuracy': float(np.sum(outputs['hits'])) / total}


HEADS = {kind.name: kind for kind in (Classification(), Regression(), Span(), MaskedLM())}
HEAD_KINDS = tuple(HEADS)


def head_kind(name: str) -> HeadKind:
  if name not in HEADS:
    raise UsageError(f'unknown head kind {name!r}; known: {", ".join(HEADS)}')
  return HEADS[name]


class TaskModel(nn.Module):
  """Returns logits [B, num_outputs] (one vector per example), [B, T, 2] (span) or [B, P, V]
  over the vocabulary (mlm, at `positions_BxP`)."""

  config: ModelConfig
  adapter: Optional[object]  # a peft method config (bottleneck.AdapterConfig)
  head: str  # a key of HEADS
  num_outputs: int
  dtype: jnp.dtype = jnp.float32
  remat: bool = False
  scan: bool = False  # Encoder.scan
  pooling: str = 'pooler'  # one of POOLINGS (heads with one vector per example)

  @nn.compact
  def __call__(self, input_ids_BxT, attention_mask_BxT, token_type_ids_BxT=None,
               deterministic: bool = True, segments=None, positions_BxP=None):
    """`segments`: packed rows (`Encoder`); the logits are then one row per example [E, n].
    `positions_BxP` (vocabulary heads): the LM head reads only these positions ([B, P, V]
    logits; all [B, T, V] without)."""
    encoder = Encoder(self.config, self.adapter, self.dtype, self.remat, self.scan,
                      name='encoder')
    enc = encoder(input_ids_BxT, attention_mask_BxT, token_type_ids_BxT, deterministic, segments)
    if head_kind(self.head).vocabulary:
      from adapter_tuning.models.mlm_head import MLMHead
      if segments is not None:
        raise UsageError(f'data.packing is for heads with one output per example, not '
                         f'{self.head}; set data.packing=false')
      x = enc['last_hidden_state']
      if positions_BxP is not None:
        x = jnp.take_along_axis(x, positions_BxP[..., None], axis=1)
      words = encoder.variables['params']['embeddings']['word_embeddings']['embedding']
      return MLMHead(self.config, name='head')(x, words)  # the decoder is tied: E^T
    if head_kind(self.head).per_token:
      if segments is not None:
        raise UsageError(f'data.packing is for heads with one output per example, not '
                         f'{self.head}; set data.packing=false')
      x = enc['last_hidden_state']
    else:
      x = pool(enc, attention_mask_BxT, self.pooling, segments)
    x = Dropout(self.config.hidden_dropout)(x, deterministic)
    return nn.Dense(self.num_outputs, kernel_init=HEAD_INIT, name='head')(x.astype(jnp.float32))


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
