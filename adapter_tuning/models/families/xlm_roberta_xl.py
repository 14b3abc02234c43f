"""XLM-RoBERTa-XL and -XXL (Goyal et al. 2021; `model_type` 'xlm-roberta-xl'): pre-LN XLM-R.

What differs from XLM-R, read from Hugging Face `modeling_xlm_roberta_xl.py` (transformers
4.57): a LayerNorm before each sub-layer instead of after it (`attention.self_attn_layer_norm`
before self-attention, the layer's `LayerNorm` before the FFN), none on the embeddings, and
one after the last layer (`encoder.LayerNorm`). That is `modernbert_layer.PreNormLayer` with
BERT's attention and GELU MLP (`Options(rotary=False, gated_mlp=False,
norm_first_layer=True)`) and adapters where ModernBERT has them (README: "Adapters in a pre-LN
layer"). Embeddings, positions (from pad_token_id + 1), the tokenizer, `<s> a </s></s> b </s>`
and the classifier (dense, tanh, out_proj on <s>) are XLM-R's; prefix `roberta.`.
Dropout differs in training only: ours drops the attention output at the attention rate and
the FFN after its activation; HF drops the attention output at the hidden rate, the FFN not.
"""

from __future__ import annotations

import dataclasses
import functools

from adapter_tuning.models import modernbert_layer
from adapter_tuning.models.encoder import ModelConfig
from adapter_tuning.models.families import bert, xlm_roberta

_LAYER = {'attention_layer_norm': 'attention.self_attn_layer_norm',
          'ffn_layer_norm': 'LayerNorm', 'intermediate': 'intermediate.dense',
          'output': 'output.dense'}


def read_config(hf: dict, source) -> ModelConfig:
  """XLM-R's reader (RoBERTa positions and pad 1) plus the pre-LN facts."""
  config = bert.read_config(hf, source, model_type='xlm-roberta-xl', default_pad=1)
  return dataclasses.replace(
      config, final_norm=True, embedding_norm=False,
      family_options=modernbert_layer.Options(global_every=1, attention_bias=True,
                                              mlp_bias=True, rotary=False, gated_mlp=False,
                                              norm_first_layer=True))


def checkpoint_key(path: tuple[str, ...]) -> tuple[str, str]:
  """BERT's key map for embeddings, attention projections and pooler; the pre-LN norms."""
  wb = 'weight' if path[-1] in ('kernel', 'scale') else 'bias'
  if path[0] == 'final_layer_norm':
    return f'encoder.LayerNorm.{wb}', 'copy'
  if path[0].startswith('layer_') and path[1] in _LAYER:
    kind = 'copy' if path[1].endswith('layer_norm') else 'linear'
    return f'encoder.layer.{int(path[0].split("_")[1])}.{_LAYER[path[1]]}.{wb}', kind
  return bert.checkpoint_key(path)


def sequence_classifier(pooler: dict, head: dict):
  """XLMRobertaXLForSequenceClassification: XLM-R's classifier tensors under its class."""
  _, tensors, keep_pooler = xlm_roberta.sequence_classifier(pooler, head)
  return 'XLMRobertaXLForSequenceClassification', tensors, keep_pooler


FAMILY = dataclasses.replace(
    xlm_roberta.FAMILY, name='xlm-roberta-xl',
    read_config=functools.partial(read_config), checkpoint_key=checkpoint_key,
    # AdapterHub 1.3 has no XLM-R-XL model class: no AdapterHub export.
    adapterhub_model_class='', sequence_classifier=sequence_classifier,
    layer=modernbert_layer.PreNormLayer)
