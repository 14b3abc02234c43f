"""RoBERTa: BERT's checkpoint layout; positions past the padding index; <s> a </s></s> b </s>.

Only these differ from BERT (Liu et al. 2019; Hugging Face `RobertaEmbeddings`): position
ids count non-padding tokens from pad_token_id + 1, there is one token type, and a pair is
joined by a doubled separator.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp

from adapter_tuning.models.encoder import ModelConfig
from adapter_tuning.models.families import Family, MLMHeadNames, bert


def position_ids(input_ids_BxT, config: ModelConfig):
  not_pad_BxT = (input_ids_BxT != config.pad_token_id).astype(jnp.int32)
  return jnp.cumsum(not_pad_BxT, axis=1) * not_pad_BxT + config.pad_token_id


def build_pair(cls_id: int, sep_id: int, ids_a, ids_b=None):
  """<s> a </s> (</s> b </s>); token types all 0."""
  ids = [cls_id] + list(ids_a) + [sep_id]
  if ids_b is not None:
    ids += [sep_id] + list(ids_b) + [sep_id]
  return ids, [0] * len(ids)


def sequence_classifier(pooler: dict, head: dict):
  """RobertaClassificationHead is out_proj(tanh(dense(<s> state))): our pooler + head."""
  return 'RobertaForSequenceClassification', {
      'classifier.dense.weight': pooler['kernel'].T, 'classifier.dense.bias': pooler['bias'],
      'classifier.out_proj.weight': head['kernel'].T, 'classifier.out_proj.bias': head['bias'],
  }, False


# RobertaLMHead: dense, exact GELU whatever hidden_act says, layer_norm, decoder + bias
# (XLM-R and XLM-R-XL keep these names).
MLM_HEAD = MLMHeadNames(dense='lm_head.dense', layer_norm='lm_head.layer_norm',
                        bias=('lm_head.bias', 'lm_head.decoder.bias'), activation='gelu',
                        mask_token='<mask>')

FAMILY = Family(name='roberta',
                read_config=functools.partial(bert.read_config, model_type='roberta',
                                              default_pad=1),
                checkpoint_key=bert.checkpoint_key, key_prefixes=('roberta.',),
                position_ids=position_ids,
                position_offset=lambda config: config.pad_token_id + 1,
                special_tokens=('<s>', '</s>'), build_pair=build_pair,
                num_special_tokens_pair=4, adapterhub_model_class='RobertaAdapterModel',
                adapterhub_modules=bert.ADAPTERHUB, sequence_classifier=sequence_classifier,
                mlm_heads=(MLM_HEAD,))
