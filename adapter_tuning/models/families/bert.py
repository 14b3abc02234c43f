"""BERT: config.json reader, checkpoint key map, absolute positions, [CLS] a [SEP] b [SEP].

The key map and config reader are shared by families with BERT's checkpoint layout
(RoBERTa imports them); what such a family changes is passed in, not forked.
"""

from __future__ import annotations

import jax.numpy as jnp

from adapter_tuning.errors import UsageError
from adapter_tuning.models.activations import ACTIVATIONS
from adapter_tuning.models.encoder import ModelConfig
from adapter_tuning.models.families import AdapterHubModules, Family, MLMHeadNames


def activation(hf: dict, key: str, source) -> str:
  """config.json's activation name under `key`, checked against the one activation table."""
  act = hf.get(key, 'gelu')
  if act not in ACTIVATIONS:
    raise UsageError(f'unsupported {key} {act!r} in {source}; supported: '
                     f'{", ".join(ACTIVATIONS)}')
  return act


def read_config(hf: dict, source, *, model_type: str = 'bert', default_pad: int = 0) -> ModelConfig:
  """A BERT-layout config.json (as a dict) -> ModelConfig; `source` names it in errors."""
  act = activation(hf, 'hidden_act', source)
  if hf.get('position_embedding_type', 'absolute') != 'absolute':
    raise UsageError(f'position_embedding_type {hf["position_embedding_type"]!r} in '
                     f'{source} is not supported; only absolute positions are')
  return ModelConfig(
      family=model_type,
      vocab_size=hf['vocab_size'],
      hidden_size=hf['hidden_size'],
      num_layers=hf['num_hidden_layers'],
      num_heads=hf['num_attention_heads'],
      intermediate_size=hf['intermediate_size'],
      max_positions=hf['max_position_embeddings'],
      type_vocab_size=hf.get('type_vocab_size', 2),
      pad_token_id=hf.get('pad_token_id', default_pad),
      layer_norm_eps=hf.get('layer_norm_eps', 1e-12),
      hidden_act=act,
      hidden_dropout=hf.get('hidden_dropout_prob', 0.1),
      attention_dropout=hf.get('attention_probs_dropout_prob', 0.1),
  )


_LAYER_MODULES = {
    'attention_layer_norm': 'attention.output.LayerNorm',
    'intermediate': 'intermediate.dense',
    'output': 'output.dense',
    'ffn_layer_norm': 'output.LayerNorm',
}


def checkpoint_key(path: tuple[str, ...]) -> tuple[str, str]:
  """A Flax param path under the encoder -> (HF key without prefix, conversion kind).

  Kinds: 'copy' (same layout), 'linear' (torch [out, in] -> Flax [in, out]), 'attn_in'
  (q/k/v, split per head) and 'attn_out' (the attention output projection, per head).
  """
  leaf = path[-1]
  if path[0] == 'embeddings':
    if path[1] == 'layer_norm':
      return f'embeddings.LayerNorm.{"weight" if leaf == "scale" else "bias"}', 'copy'
    return f'embeddings.{path[1]}.weight', 'copy'
  if path[0] == 'pooler':
    return f'pooler.dense.{"weight" if leaf == "kernel" else "bias"}', 'linear'
  base = f'encoder.layer.{int(path[0].split("_")[1])}.'
  wb = 'weight' if leaf in ('kernel', 'scale') else 'bias'
  module = path[1]
  if module == 'attention':
    if path[2] == 'out':
      return base + f'attention.output.dense.{wb}', 'attn_out'
    return base + f'attention.self.{path[2]}.{wb}', 'attn_in'
  kind = 'copy' if module.endswith('layer_norm') else 'linear'
  return base + f'{_LAYER_MODULES[module]}.{wb}', kind


def position_ids(input_ids_BxT, config: ModelConfig):
  del config
  return jnp.broadcast_to(jnp.arange(input_ids_BxT.shape[1]), input_ids_BxT.shape)


def build_pair(cls_id: int, sep_id: int, ids_a, ids_b=None):
  """[CLS] a [SEP] (b [SEP]); token types 0 for the first segment, 1 for the second."""
  ids = [cls_id] + list(ids_a) + [sep_id]
  types = [0] * len(ids)
  if ids_b is not None:
    ids += list(ids_b) + [sep_id]
    types += [1] * (len(ids_b) + 1)
  return ids, types


def sequence_classifier(pooler: dict, head: dict):
  """BertForSequenceClassification: the tanh pooler over [CLS], then `classifier`."""
  return 'BertForSequenceClassification', {
      'classifier.weight': head['kernel'].T, 'classifier.bias': head['bias']}, True


# AdapterHub's modules in BertModel; RoBERTa, XLM-R and ELECTRA share BERT's module names.
ADAPTERHUB = AdapterHubModules(
    layers='encoder.layer',
    sites={'attention': 'attention.output', 'ffn': 'output',
           'query': 'attention.self.query', 'key': 'attention.self.key',
           'value': 'attention.self.value', 'intermediate_dense': 'intermediate.dense',
           'output': 'output.dense'},
    prefix_pool='attention.self.prefix_tuning')

# BertForMaskedLM: cls.predictions.transform.{dense, hidden_act, LayerNorm}, decoder + bias.
MLM_HEAD = MLMHeadNames(dense='cls.predictions.transform.dense',
                        layer_norm='cls.predictions.transform.LayerNorm',
                        bias=('cls.predictions.bias', 'cls.predictions.decoder.bias'))

FAMILY = Family(name='bert', read_config=read_config, checkpoint_key=checkpoint_key,
                key_prefixes=('bert.',), position_ids=position_ids,
                position_offset=lambda config: 0, special_tokens=('[CLS]', '[SEP]'),
                build_pair=build_pair, num_special_tokens_pair=3,
                adapterhub_model_class='BertAdapterModel', adapterhub_modules=ADAPTERHUB,
                sequence_classifier=sequence_classifier, mlm_heads=(MLM_HEAD,))
