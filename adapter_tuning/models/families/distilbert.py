"""DistilBERT (Sanh et al. 2019): BERT's post-LN layer under other names, no token types.

What differs from BERT, read from Hugging Face `modeling_distilbert.py` (transformers 4.57):
- config.json names: `dim`, `n_layers`, `n_heads`, `hidden_dim`, `activation`, `dropout`,
  `attention_dropout`; LayerNorm eps is fixed at 1e-12.
- No token-type embedding (type_vocab_size 0 here): token_type_ids are ignored.
- Positions count from 0, learned, or with `sinusoidal_pos_embds` the fixed table of
  `create_sinusoidal_embeddings`. That table is a stored (frozen) tensor: a checkpoint's
  saved values win, and only a checkpoint without them gets the computed table
  (`missing_tensor`), as `from_pretrained` does.
- Tensor names: `transformer.layer.N.attention.{q,k,v,out}_lin`, `sa_layer_norm`,
  `ffn.lin1`/`ffn.lin2`, `output_layer_norm`; prefix `distilbert.` in *ForXxx saves.
- No pooler. `DistilBertForSequenceClassification` reads the first token through
  `pre_classifier` (Linear d->d), ReLU, dropout, `classifier`: our pooler with a ReLU is
  `pre_classifier` (loaded from such a save), our head is `classifier`.
Our Flax parameter paths stay BERT's, so PEFT sites and trainable rules match unchanged.
Dropout differs in training only: HF applies none to the attention output (we apply the
hidden dropout there, as BERT does) and `seq_classif_dropout` before the classifier.
"""

from __future__ import annotations

import numpy as np

from adapter_tuning.models.encoder import ModelConfig
from adapter_tuning.models.families import AdapterHubModules, Family, MLMHeadNames, bert

_ATTENTION = {'query': 'q_lin', 'key': 'k_lin', 'value': 'v_lin', 'out': 'out_lin'}
_LAYER_MODULES = {
    'attention_layer_norm': 'sa_layer_norm',
    'intermediate': 'ffn.lin1',
    'output': 'ffn.lin2',
    'ffn_layer_norm': 'output_layer_norm',
}
POSITIONS = ('embeddings', 'position_embeddings', 'embedding')


def read_config(hf: dict, source) -> ModelConfig:
  """DistilBERT's config.json -> ModelConfig; absent keys take DistilBertConfig's defaults."""
  return ModelConfig(
      family='distilbert',
      vocab_size=hf.get('vocab_size', 30522),
      hidden_size=hf.get('dim', 768),
      num_layers=hf.get('n_layers', 6),
      num_heads=hf.get('n_heads', 12),
      intermediate_size=hf.get('hidden_dim', 3072),
      max_positions=hf.get('max_position_embeddings', 512),
      type_vocab_size=0,
      pad_token_id=hf.get('pad_token_id', 0),
      layer_norm_eps=1e-12,
      hidden_act=bert.activation(hf, 'activation', source),
      hidden_dropout=hf.get('dropout', 0.1),
      attention_dropout=hf.get('attention_dropout', 0.1),
      sinusoidal_positions=bool(hf.get('sinusoidal_pos_embds', False)),
  )


def checkpoint_key(path: tuple[str, ...]) -> tuple[str, str]:
  """A Flax param path under the encoder -> (HF key without prefix, conversion kind)."""
  leaf = path[-1]
  wb = 'bias' if leaf == 'bias' else 'weight'
  if path[0] == 'embeddings':
    if path[1] == 'layer_norm':
      return f'embeddings.LayerNorm.{wb}', 'copy'
    return f'embeddings.{path[1]}.weight', 'copy'
  if path[0] == 'pooler':
    return f'pre_classifier.{wb}', 'linear'
  base = f'transformer.layer.{int(path[0].split("_")[1])}.'
  module = path[1]
  if module == 'attention':
    kind = 'attn_out' if path[2] == 'out' else 'attn_in'
    return base + f'attention.{_ATTENTION[path[2]]}.{wb}', kind
  kind = 'copy' if module.endswith('layer_norm') else 'linear'
  return base + f'{_LAYER_MODULES[module]}.{wb}', kind


def sinusoidal_positions(num_positions: int, dim: int) -> np.ndarray:
  """HF `_create_sinusoidal_embeddings`: angle pos / 10000^(2 (j // 2) / dim) in float64,
  sine on even columns, cosine on odd ones, then float32."""
  pos = np.arange(num_positions, dtype=np.float64)[:, None]
  j = np.arange(dim)[None, :]
  angle = pos / np.power(10000, 2 * (j // 2) / dim)
  return np.where(j % 2 == 0, np.sin(angle), np.cos(angle)).astype(np.float32)


def missing_tensor(path: tuple[str, ...], config: ModelConfig):
  """The sinusoidal table for a sinusoidal checkpoint saved without its positions."""
  if path == POSITIONS and config.sinusoidal_positions:
    return sinusoidal_positions(config.max_positions, config.hidden_size)
  return None


def sequence_classifier(pooler: dict, head: dict):
  """DistilBertForSequenceClassification: `pre_classifier` (our ReLU pooler), `classifier`."""
  return 'DistilBertForSequenceClassification', {
      'pre_classifier.weight': pooler['kernel'].T, 'pre_classifier.bias': pooler['bias'],
      'classifier.weight': head['kernel'].T, 'classifier.bias': head['bias']}, False


# AdapterHub's modules in DistilBertModel (adapters 1.3): the bottleneck adapters are modules
# of the layer itself, the prefix pool sits on `attention` (no `.self`) under location 'self',
# and DistilBertAdapterModel hands its heads no pooled output. Its prefix tuning equals ours
# under eager attention only: the default sdpa path pads the additive 4-D mask of a padded
# batch with ones, i.e. adds 1 to every prefix score, so prefixes do not convert.
ADAPTERHUB = AdapterHubModules(
    layers='transformer.layer',
    sites={'attention': 'attention_adapters', 'ffn': 'output_adapters',
           'query': 'attention.q_lin', 'key': 'attention.k_lin', 'value': 'attention.v_lin',
           'intermediate_dense': 'ffn.lin1', 'output': 'ffn.lin2'},
    prefix_pool='attention.prefix_tuning', prefix_location='self',
    prefix_refused='AdapterHub 1.3 computes DistilBERT prefixes differently under its default '
    'sdpa attention (+1 on every prefix score in padded batches) than under eager attention',
    pooled_output=False)

FAMILY = Family(name='distilbert', read_config=read_config, checkpoint_key=checkpoint_key,
                key_prefixes=('distilbert.',), position_ids=bert.position_ids,
                position_offset=lambda config: 0, special_tokens=('[CLS]', '[SEP]'),
                build_pair=bert.build_pair, num_special_tokens_pair=3,
                adapterhub_model_class='DistilBertAdapterModel', adapterhub_modules=ADAPTERHUB,
                sequence_classifier=sequence_classifier, pooler_act='relu',
                missing_tensor=missing_tensor,
                # DistilBertForMaskedLM: vocab_transform, `activation`, vocab_layer_norm
                # (eps 1e-12), vocab_projector (weight tied, its bias ours)
                mlm_heads=(MLMHeadNames(dense='vocab_transform', layer_norm='vocab_layer_norm',
                                        bias=('vocab_projector.bias',)),))
