"""Encoder families: what differs between BERT-like checkpoints, one module per family.

A family is the `model_type` of a Hugging Face `config.json` plus the few facts that
differ between checkpoints of that type: how its config.json reads into a `ModelConfig`,
where each Flax parameter lives in its state dict (the key map), how position ids are
made, how its tokenizer wraps one or two texts in special tokens, and the activation of
the first layer of its sequence classifier (our pooler), and, where it is not BERT's, its
self-attention (`Attention`: DeBERTa's relative-position attention) or its whole layer
(ModernBERT's pre-LN layer). The encoder, the
checkpoint reader, the tokenizer and the AdapterHub converter ask the family for these
and never test family names themselves, so a new family is one new module here plus one
entry in `families()`.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from adapter_tuning.errors import UsageError


@dataclasses.dataclass(frozen=True)
class Attention:
  """A family's own self-attention, in place of `encoder.SelfAttention`.

  `shared` is built once per encoder (Flax scope `relative_positions`) and called with the
  sequence length; what it returns (e.g. a relative-position table) is passed to every
  layer's `layer` module, which takes SelfAttention's fields and call plus `shared=`.
  """

  shared: Callable  # nn.Module class: (ModelConfig, dtype) -> __call__(length) -> pytree
  layer: Callable  # nn.Module class: SelfAttention's fields; __call__(..., shared=)


@dataclasses.dataclass(frozen=True)
class Family:
  """One encoder family, as the rest of the code sees it."""

  name: str  # config.json's model_type
  read_config: Callable  # (config.json as a dict, its path for messages) -> ModelConfig
  checkpoint_key: Callable  # Flax path under the encoder -> (HF key, conversion kind)
  key_prefixes: tuple[str, ...]  # what a saved *ForXxx model puts before encoder keys
  # (the first is what a merged *ForSequenceClassification export writes)
  position_ids: Callable  # (input_ids_BxT, ModelConfig) -> position ids [B, T]
  position_offset: Callable  # ModelConfig -> the first position id of a sequence
  special_tokens: tuple[str, str]  # (the sequence-start token, the separator)
  build_pair: Callable  # (cls_id, sep_id, ids_a, ids_b | None) -> (ids, token type ids)
  num_special_tokens_pair: int  # special tokens around a text pair
  adapterhub_model_class: str  # AdapterHub's flexible-head model class for this family
  sequence_classifier: Callable  # (pooler {kernel, bias}, head {kernel, bias}) -> (HF
  # *ForSequenceClassification class name, its tensors outside the encoder, keep_pooler)
  pooler_act: str = 'tanh'  # ACTIVATIONS name after the pooler's dense layer
  missing_tensor: Callable = lambda path, config: None  # (Flax path, ModelConfig) -> the
  # value HF computes for a tensor a checkpoint may omit, or None (omitting it is an error)
  attention: Attention | None = None  # None: BERT's softmax attention (encoder.SelfAttention)
  layer: Callable | None = None  # nn.Module class with TransformerLayer's fields and call:
  # the family's own layer (ModernBERT's pre-LN layer); None: encoder.TransformerLayer


def model_types() -> str:
  """The supported config.json model_types, for messages."""
  return ', '.join(f.name for f in families())


def families() -> tuple[Family, ...]:
  # lazy: they import the encoder
  from adapter_tuning.models.families import (bert, deberta_v2, distilbert, electra,
                                              modernbert, roberta, xlm_roberta)
  return (bert.FAMILY, roberta.FAMILY, xlm_roberta.FAMILY, distilbert.FAMILY, electra.FAMILY,
          deberta_v2.FAMILY, modernbert.FAMILY)


def family_named(name: str) -> Family:
  for family in families():
    if family.name == name:
      return family
  raise UsageError(f'unsupported model_type {name!r}; supported: {model_types()}')
