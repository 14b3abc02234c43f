"""Encoder families: what differs between BERT-like checkpoints, one module per family.

A family is the `model_type` of a Hugging Face `config.json` plus the few facts that
differ between checkpoints of that type: how its config.json reads into a `ModelConfig`,
where each Flax parameter lives in its state dict (the key map), how position ids are
made, how its tokenizer wraps one or two texts in special tokens, and the activation of
the first layer of its sequence classifier (our pooler), and, where it is not BERT's, its
self-attention (`Attention`: DeBERTa's relative-position attention) or its whole layer
(ModernBERT's pre-LN layer), and where AdapterHub puts its modules in the family's model
(`AdapterHubModules`). The encoder, the
checkpoint reader, the tokenizer and the AdapterHub converter ask the family for these
and never test family names themselves, so a new family is one new module here plus one
entry in `families()`.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Mapping

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
class AdapterHubModules:
  """Where AdapterHub (`adapters` 1.3) hangs its modules in this family's model, as state-dict
  paths after the model prefix (`Family.key_prefixes[0]`): the AdapterHub converters build
  and parse keys from these, so a family's module names are stated once, here.

  Read off `named_parameters()` of the family's *AdapterModel after `add_adapter` with each
  method (bottleneck modules hold `.adapters.{name}.`, LoRA/IA³ modules `.loras.{name}.`).
  """

  layers: str  # the layer list; layer i is '{layers}.{i}'
  # our site -> the module under a layer that AdapterHub wraps: bottleneck 'attention'/'ffn',
  # LoRA/IA³ 'query'/'key'/'value'/'intermediate_dense'/'output' (unhashed: Family hashes)
  sites: Mapping[str, str] = dataclasses.field(hash=False)
  prefix_pool: str  # the module under a layer whose `.pool` lists the shared prefix module
  prefix_location: str = 'self_prefix'  # that module's name under `prefix_tunings.{name}`
  prefix_refused: str = ''  # why prefix tuning does not convert for this family; '' if it does
  pooled_output: bool = True  # the model hands its heads a pooler output (`use_pooler`);
  # without one, our pooler travels as the first layer of a 2-layer head

  def module(self, layer: int, site: str) -> str:
    return f'{self.layers}.{layer}.{self.sites[site]}'

  def parse(self, key: str, sites, collection: str, name: str):
    """(layer, our site, leaf) of a key `[prefix.]{layers}.{i}.{module}.{collection}.{name}.
    {leaf}` whose module is one of `sites`, else None: the inverse of `module`."""
    m = re.fullmatch(rf'(?:\w+\.)?{re.escape(self.layers)}\.(\d+)\.(.+?)\.'
                     rf'{re.escape(collection)}\.{re.escape(name)}\.(.+)', key)
    site = m and {self.sites[s]: s for s in sites}.get(m[2])
    return (int(m[1]), site, m[3]) if site else None


@dataclasses.dataclass(frozen=True)
class MLMHeadNames:
  """Where a family's `*ForMaskedLM` save keeps its LM head, as state-dict names without the
  model prefix: transform `dense` (Linear d -> embedding width), activation, `layer_norm`, then
  the decoder, whose weight is tied to the word embeddings (so it is read from the encoder, never
  stored twice) and whose bias is `bias` (HF ties `decoder.bias` to it: a save may keep either
  name, hence several). A family may have several layouts (DeBERTa-v2's legacy `cls.*` and
  `lm_predictions.*`); the first whose dense weight a checkpoint holds is loaded.
  """

  dense: str  # module name: '{dense}.weight', '{dense}.bias'
  layer_norm: str  # module name: '{layer_norm}.weight', '{layer_norm}.bias'
  bias: tuple[str, ...]  # tensor names of the output bias, any one of them
  activation: str = ''  # ACTIVATIONS name after `dense`; '' = config.json's hidden_act
  mask_token: str = '[MASK]'  # the tokenizer's mask token (RoBERTa's is '<mask>')


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
  adapterhub_modules: AdapterHubModules | None = None  # set with adapterhub_model_class
  mlm_heads: tuple[MLMHeadNames, ...] = ()  # its masked-LM head layouts (data.task=mlm);
  # () = masked-LM training is refused for the family


def model_types() -> str:
  """The supported config.json model_types, for messages."""
  return ', '.join(f.name for f in families())


def families() -> tuple[Family, ...]:
  # lazy: they import the encoder
  from adapter_tuning.models.families import (bert, deberta_v2, distilbert, electra,
                                              modernbert, roberta, xlm_roberta, xlm_roberta_xl)
  return (bert.FAMILY, roberta.FAMILY, xlm_roberta.FAMILY, distilbert.FAMILY, electra.FAMILY,
          deberta_v2.FAMILY, modernbert.FAMILY, xlm_roberta_xl.FAMILY)


def family_named(name: str) -> Family:
  for family in families():
    if family.name == name:
      return family
  raise UsageError(f'unsupported model_type {name!r}; supported: {model_types()}')
