"""XLM-RoBERTa: RoBERTa exactly, with another vocabulary (Conneau et al. 2020).

Hugging Face's `XLMRobertaModel` is `RobertaModel` under another name: the same tensors,
positions counted from pad_token_id + 1, one token type, `<s> a </s></s> b </s>` pairs. Only
the names differ: config.json says `xlm-roberta`, the tokenizer is a SentencePiece unigram
model (read from the checkpoint's `tokenizer.json`, whose template adds the special tokens),
and the HF and AdapterHub classes are XLM-R's. Its *ForXxx saves keep RoBERTa's `roberta.`
prefix (`XLMRobertaPreTrainedModel.base_model_prefix`), so merged exports write it too.
"""

from __future__ import annotations

import dataclasses
import functools

from adapter_tuning.models.families import bert, roberta


def sequence_classifier(pooler: dict, head: dict):
  """XLMRobertaForSequenceClassification: RoBERTa's classifier tensors under its own class."""
  _, tensors, keep_pooler = roberta.sequence_classifier(pooler, head)
  return 'XLMRobertaForSequenceClassification', tensors, keep_pooler


FAMILY = dataclasses.replace(
    roberta.FAMILY, name='xlm-roberta',
    read_config=functools.partial(bert.read_config, model_type='xlm-roberta', default_pad=1),
    adapterhub_model_class='XLMRobertaAdapterModel', sequence_classifier=sequence_classifier)
