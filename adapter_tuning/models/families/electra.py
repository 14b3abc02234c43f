"""ELECTRA discriminators (Clark et al. 2020): BERT layers on a narrower embedding.

What differs from BERT, read from Hugging Face `modeling_electra.py` (transformers 4.57):
- Embeddings (word, position, token type) and their LayerNorm work at `embedding_size`;
  when that differs from hidden_size, `embeddings_project` (Linear) maps the normalised,
  dropped-out embeddings up to hidden_size (`ModelConfig.embedding_size`; our
  `embeddings/project`).
- No pooler. `ElectraClassificationHead` reads the first token: dropout, `dense` (d->d),
  GELU (exact), dropout, `out_proj`. Our pooler with a GELU is `classifier.dense` (loaded
  from an `ElectraForSequenceClassification` save), our head is `out_proj`.
- The *ForXxx prefix is `electra.`. Everything else (layers, key names, positions,
  [CLS] a [SEP] b [SEP]) is BERT's, so the BERT key map and reader serve it.
"""

from __future__ import annotations

import dataclasses

from adapter_tuning.models.encoder import ModelConfig
from adapter_tuning.models.families import Family, MLMHeadNames, bert


def read_config(hf: dict, source) -> ModelConfig:
  """BERT's reader plus `embedding_size` (ElectraConfig's default 128 when absent)."""
  config = bert.read_config(hf, source, model_type='electra')
  return dataclasses.replace(config, embedding_size=hf.get('embedding_size', 128))


def checkpoint_key(path: tuple[str, ...]) -> tuple[str, str]:
  """BERT's key map, plus the embedding projection; the pooler is the classifier's dense."""
  wb = 'bias' if path[-1] == 'bias' else 'weight'
  if path[:2] == ('embeddings', 'project'):
    return f'embeddings_project.{wb}', 'linear'
  if path[0] == 'pooler':
    return f'classifier.dense.{wb}', 'linear'
  return bert.checkpoint_key(path)


def sequence_classifier(pooler: dict, head: dict):
  """ElectraForSequenceClassification: out_proj(gelu(dense(first token))), our pooler + head."""
  return 'ElectraForSequenceClassification', {
      'classifier.dense.weight': pooler['kernel'].T, 'classifier.dense.bias': pooler['bias'],
      'classifier.out_proj.weight': head['kernel'].T, 'classifier.out_proj.bias': head['bias'],
  }, False


FAMILY = Family(name='electra', read_config=read_config, checkpoint_key=checkpoint_key,
                key_prefixes=('electra.',), position_ids=bert.position_ids,
                position_offset=lambda config: 0, special_tokens=('[CLS]', '[SEP]'),
                build_pair=bert.build_pair, num_special_tokens_pair=3,
                adapterhub_model_class='ElectraAdapterModel',
                # ElectraAdapterModel hands its heads no pooled output (no pooler in HF's model)
                adapterhub_modules=dataclasses.replace(bert.ADAPTERHUB, pooled_output=False),
                sequence_classifier=sequence_classifier, pooler_act='gelu',
                # ElectraForMaskedLM (the generator): generator_predictions.{dense (d -> the
                # embedding width), exact GELU, LayerNorm}, generator_lm_head (tied, + bias)
                mlm_heads=(MLMHeadNames(dense='generator_predictions.dense',
                                        layer_norm='generator_predictions.LayerNorm',
                                        bias=('generator_lm_head.bias',), activation='gelu'),))
