"""DeBERTa-v2 and v3 (He et al. 2021; `model_type` 'deberta-v2' for both).

What differs from BERT, read from Hugging Face `modeling_deberta_v2.py` (transformers 4.57):
- Attention is disentangled (content + relative-position terms, one shared relative table
  under `encoder.rel_embeddings` + `encoder.LayerNorm`): `models/deberta_attention.py`,
  handed to the encoder as this family's `attention`. Its settings come from config.json:
  `relative_attention`, `pos_att_type`, `position_buckets`, `max_relative_positions`,
  `share_att_key`, `norm_rel_ebd`.
- `position_biased_input` false (v3, most v2): no absolute position table.
  `type_vocab_size` defaults to 0 (no token types). The normalised embeddings are
  multiplied by the attention mask. LayerNorm eps defaults to 1e-7.
- Tensor names: `embeddings.*` and `encoder.layer.N.*` as BERT's, except the projections
  `attention.self.{query,key,value}_proj` (and `pos_{query,key}_proj` without
  `share_att_key`); prefix `deberta.` in *ForXxx saves.
- `ContextPooler`: dense, `pooler_hidden_act` (GELU by default) on the first token, then
  `classifier` in DebertaV2ForSequenceClassification, top-level `pooler.dense.*` and
  `classifier.*`: our pooler (with that activation) + head. Dropout differs in training
  only (HF drops the first token before the pooler's dense, `pooler_dropout`, 0 by default).
- Refused with a one-line error: v2-xlarge's convolution after the first layer
  (`conv_kernel_size`), an `embedding_size` other than hidden_size (HF projects before the
  LayerNorm, without bias), and a head size other than hidden_size / heads.
Tokenisation is BERT's pairing: [CLS] a [SEP] b [SEP], token types 0/1.
"""

from __future__ import annotations

import dataclasses

from adapter_tuning.errors import UsageError
from adapter_tuning.models import deberta_attention
from adapter_tuning.models.encoder import ModelConfig
from adapter_tuning.models.families import Attention, Family, MLMHeadNames, bert

_PROJECTIONS = {'query': 'query_proj', 'key': 'key_proj', 'value': 'value_proj',
                'pos_query': 'pos_query_proj', 'pos_key': 'pos_key_proj'}


def _refuse_unsupported(hf: dict, source):
  """One-line errors for the DeBERTa-v2 options our encoder does not compute."""
  hidden, heads = hf.get('hidden_size', 1536), hf.get('num_attention_heads', 24)
  if hf.get('conv_kernel_size', 0) > 0:
    raise UsageError(f'conv_kernel_size={hf["conv_kernel_size"]} in {source} (DeBERTa-v2 '
                     "xlarge's convolution layer) is not supported; use a checkpoint without "
                     'it, such as DeBERTa-v3')
  if hf.get('embedding_size', hidden) != hidden:
    raise UsageError(f'embedding_size {hf["embedding_size"]} != hidden_size {hidden} in '
                     f'{source} is not supported for deberta-v2; use a checkpoint whose '
                     'embeddings have the hidden size')
  if hf.get('attention_head_size', hidden // heads) != hidden // heads:
    raise UsageError(f'attention_head_size {hf["attention_head_size"]} in {source} is not '
                     f'hidden_size / num_attention_heads = {hidden // heads}; not supported')
  if hf.get('pooler_hidden_size', hidden) != hidden:
    raise UsageError(f'pooler_hidden_size {hf["pooler_hidden_size"]} != hidden_size {hidden} '
                     f'in {source} is not supported')


def attention_options(hf: dict, source) -> deberta_attention.Disentangled:
  """config.json -> the disentangled attention's settings, defaulted as HF defaults them."""
  terms = hf.get('pos_att_type') or ()
  if isinstance(terms, str):
    terms = terms.lower().split('|')
  terms = tuple(dict.fromkeys(t.strip() for t in terms))
  bad = [t for t in terms if t not in deberta_attention.POSITION_TERMS]
  if bad:
    raise UsageError(f'pos_att_type {bad} in {source} is not supported; supported: '
                     f'{", ".join(deberta_attention.POSITION_TERMS)}')
  max_relative = hf.get('max_relative_positions', -1)
  if max_relative < 1:
    max_relative = hf.get('max_position_embeddings', 512)
  norm = [x.strip() for x in str(hf.get('norm_rel_ebd', 'none')).lower().split('|')]
  return deberta_attention.Disentangled(
      relative=bool(hf.get('relative_attention', False)), pos_att_type=terms,
      position_buckets=hf.get('position_buckets', -1), max_relative_positions=max_relative,
      share_att_key=bool(hf.get('share_att_key', False)),
      norm_rel_embeddings='layer_norm' in norm)


def read_config(hf: dict, source) -> ModelConfig:
  """DeBERTa-v2's config.json -> ModelConfig; absent keys take DebertaV2Config's defaults."""
  _refuse_unsupported(hf, source)
  return ModelConfig(
      family='deberta-v2',
      vocab_size=hf.get('vocab_size', 128100),
      hidden_size=hf.get('hidden_size', 1536),
      num_layers=hf.get('num_hidden_layers', 24),
      num_heads=hf.get('num_attention_heads', 24),
      intermediate_size=hf.get('intermediate_size', 6144),
      max_positions=hf.get('max_position_embeddings', 512),
      type_vocab_size=hf.get('type_vocab_size', 0),
      pad_token_id=hf.get('pad_token_id', 0),
      layer_norm_eps=hf.get('layer_norm_eps', 1e-7),
      hidden_act=bert.activation(hf, 'hidden_act', source),
      hidden_dropout=hf.get('hidden_dropout_prob', 0.1),
      attention_dropout=hf.get('attention_probs_dropout_prob', 0.1),
      absolute_positions=bool(hf.get('position_biased_input', True)),
      mask_embeddings=True,
      pooler_act=bert.activation(hf, 'pooler_hidden_act', source),
      family_options=attention_options(hf, source),
  )


def checkpoint_key(path: tuple[str, ...]) -> tuple[str, str]:
  """A Flax param path under the encoder -> (HF key without prefix, conversion kind):
  BERT's map, with DeBERTa's projection names and the shared relative table."""
  wb = 'bias' if path[-1] == 'bias' else 'weight'
  if path[0] == 'relative_positions':
    if path[1] == 'layer_norm':
      return f'encoder.LayerNorm.{wb}', 'copy'
    return 'encoder.rel_embeddings.weight', 'copy'
  if path[0].startswith('layer_') and path[1] == 'attention' and path[2] in _PROJECTIONS:
    return (f'encoder.layer.{int(path[0].split("_")[1])}.attention.self.'
            f'{_PROJECTIONS[path[2]]}.{wb}', 'attn_in')
  return bert.checkpoint_key(path)


def sequence_classifier(pooler: dict, head: dict):
  """DebertaV2ForSequenceClassification: `pooler.dense` (our pooler), `classifier`, both
  outside the `deberta.` prefix."""
  return 'DebertaV2ForSequenceClassification', {
      'pooler.dense.weight': pooler['kernel'].T, 'pooler.dense.bias': pooler['bias'],
      'classifier.weight': head['kernel'].T, 'classifier.bias': head['bias']}, False


# AdapterHub's modules in DebertaV2Model (adapters 1.3): BERT's, with DeBERTa's projection
# names. DebertaV2AdapterModel hands its heads the whole sequence as "pooled output", so our
# ContextPooler travels in the head.
ADAPTERHUB = dataclasses.replace(
    bert.ADAPTERHUB,
    sites={**bert.ADAPTERHUB.sites, 'query': 'attention.self.query_proj',
           'key': 'attention.self.key_proj', 'value': 'attention.self.value_proj'},
    prefix_refused='this project has no prefix tuning on DeBERTa (relative positions of '
    'prefix keys are undefined)', pooled_output=False)

FAMILY = Family(name='deberta-v2', read_config=read_config, checkpoint_key=checkpoint_key,
                key_prefixes=('deberta.',), position_ids=bert.position_ids,
                position_offset=lambda config: 0, special_tokens=('[CLS]', '[SEP]'),
                build_pair=bert.build_pair, num_special_tokens_pair=3,
                adapterhub_model_class='DebertaV2AdapterModel', adapterhub_modules=ADAPTERHUB,
                sequence_classifier=sequence_classifier, pooler_act='gelu',
                attention=Attention(shared=deberta_attention.RelativeEmbeddings,
                                    layer=deberta_attention.DisentangledSelfAttention),
                # DebertaV2ForMaskedLM: `legacy` (the default) keeps BERT's cls.predictions.*,
                # otherwise lm_predictions.lm_head.{dense, LayerNorm, bias}; hidden_act both
                mlm_heads=(bert.MLM_HEAD, MLMHeadNames(
                    dense='lm_predictions.lm_head.dense',
                    layer_norm='lm_predictions.lm_head.LayerNorm',
                    bias=('lm_predictions.lm_head.bias',))))
