"""ModernBERT (Warner et al. 2024, arXiv 2412.13663): a pre-LN encoder with rotary positions.

What differs from BERT, read from Hugging Face `modeling_modernbert.py` (transformers 4.57):
- Its own layer (`models/modernbert_layer.PreNormLayer`: pre-LN, rotary, global and
  sliding-window layers, GeGLU), handed to the encoder as this family's `layer`; a final
  LayerNorm after the last layer; LayerNorms and projections without biases by default.
- Embeddings: `tok_embeddings` and a LayerNorm only (no positions, no token types).
- Tensor names: `embeddings.{tok_embeddings,norm}`, `layers.N.{attn_norm,attn.Wqkv,attn.Wo,
  mlp_norm,mlp.Wi,mlp.Wo}`, `final_norm`; prefix `model.` in *ForXxx saves. The fused
  `Wqkv` loads as our query/key/value (its thirds, kind 'attn_in:0..2'), so every PEFT
  method sees the three projections BERT has.
- `ModernBertForSequenceClassification`: `head.dense` (no bias unless `classifier_bias`),
  `classifier_activation`, `head.norm`, dropout, `classifier` -- on the first token or on
  the mean over real tokens (`classifier_pooling` cls | mean). That is our pooler (dense,
  activation, `norm/`, reading `ModelConfig.pooler_input`) plus our head, outside `model.`.
- Dropout: `attention_dropout` on the probabilities and the attention output,
  `mlp_dropout` after the gated activation and (our one embedding rate) on the embeddings;
  every released ModernBERT sets all of them to 0.
- Tokenisation: [CLS] a [SEP] b [SEP] (BERT's pairing), no token types.
Refused with a one-line error: hidden_size not divisible by the heads, an odd head size
(rotary pairs dimensions), `rope_scaling` other than the default, an activation we lack.
"""

from __future__ import annotations

from adapter_tuning.errors import UsageError
from adapter_tuning.models import modernbert_layer
from adapter_tuning.models.encoder import ModelConfig
from adapter_tuning.models.families import Family, bert

_NAMES = {'attention_layer_norm': 'attn_norm', 'ffn_layer_norm': 'mlp_norm',
          'intermediate': 'mlp.Wi', 'output': 'mlp.Wo'}
_QKV = ('query', 'key', 'value')  # the row thirds of Wqkv, in HF's view(..., 3, heads, dim)


def _refuse_unsupported(hf: dict, source):
  hidden, heads = hf.get('hidden_size', 768), hf.get('num_attention_heads', 12)
  if hidden % heads or (hidden // heads) % 2:
    raise UsageError(f'hidden_size {hidden} / num_attention_heads {heads} in {source} must be '
                     'a whole, even head size (rotary embeddings pair dimensions)')
  scaling = hf.get('rope_scaling')
  if scaling and (scaling.get('rope_type') or scaling.get('type')) not in (None, 'default'):
    raise UsageError(f'rope_scaling {scaling} in {source} is not supported; only the default '
                     'rotary embedding is')
  if hf.get('classifier_pooling', 'cls') not in ('cls', 'mean'):
    raise UsageError(f'classifier_pooling {hf["classifier_pooling"]!r} in {source} is not '
                     'supported; use cls or mean')


def read_config(hf: dict, source) -> ModelConfig:
  """ModernBERT's config.json -> ModelConfig; absent keys take ModernBertConfig's defaults."""
  _refuse_unsupported(hf, source)
  global_theta = float(hf.get('global_rope_theta', 160000.0))
  local_theta = hf.get('local_rope_theta', 10000.0)  # null: the global theta, as HF does
  options = modernbert_layer.Options(
      global_rope_theta=global_theta,
      local_rope_theta=global_theta if local_theta is None else float(local_theta),
      local_attention=int(hf.get('local_attention', 128)),
      global_every=int(hf.get('global_attn_every_n_layers', 3)),
      attention_bias=bool(hf.get('attention_bias', False)),
      mlp_bias=bool(hf.get('mlp_bias', False)))
  return ModelConfig(
      family='modernbert',
      vocab_size=hf.get('vocab_size', 50368),
      hidden_size=hf.get('hidden_size', 768),
      num_layers=hf.get('num_hidden_layers', 22),
      num_heads=hf.get('num_attention_heads', 12),
      intermediate_size=hf.get('intermediate_size', 1152),
      max_positions=hf.get('max_position_embeddings', 8192),
      type_vocab_size=0,
      pad_token_id=hf.get('pad_token_id', 50283),
      layer_norm_eps=hf.get('norm_eps', 1e-5),
      hidden_act=bert.activation(hf, 'hidden_activation', source),
      hidden_dropout=hf.get('mlp_dropout', 0.0),
      attention_dropout=hf.get('attention_dropout', 0.0),
      absolute_positions=False,
      pooler_act=bert.activation(hf, 'classifier_activation', source),
      family_options=options,
      norm_bias=bool(hf.get('norm_bias', False)),
      final_norm=True,
      pooler_input=hf.get('classifier_pooling', 'cls'),
      pooler_bias=bool(hf.get('classifier_bias', False)),
      pooler_norm=True,
  )


def checkpoint_key(path: tuple[str, ...]) -> tuple[str, str]:
  """A Flax param path under the encoder -> (HF key without `model.`, conversion kind)."""
  wb = 'weight' if path[-1] in ('kernel', 'scale', 'embedding') else 'bias'
  if path[0] == 'embeddings':
    return f'embeddings.{"norm" if path[1] == "layer_norm" else "tok_embeddings"}.{wb}', 'copy'
  if path[0] == 'final_layer_norm':
    return f'final_norm.{wb}', 'copy'
  if path[0] == 'pooler':
    return (f'head.norm.{wb}', 'copy') if path[1] == 'norm' else (f'head.dense.{wb}', 'linear')
  base = f'layers.{int(path[0].split("_")[1])}.'
  if path[1] == 'attention':
    if path[2] == 'out':
      return base + f'attn.Wo.{wb}', 'attn_out'
    return base + f'attn.Wqkv.{wb}', f'attn_in:{_QKV.index(path[2])}'
  kind = 'copy' if path[1].endswith('layer_norm') else 'linear'
  return base + f'{_NAMES[path[1]]}.{wb}', kind


def sequence_classifier(pooler: dict, head: dict):
  """ModernBertForSequenceClassification: `head.dense` (+ bias), `head.norm` (our pooler),
  `classifier` (our head), all outside the `model.` prefix."""
  tensors = {f'head.dense.{"weight" if k == "kernel" else "bias"}':
             (v.T if k == 'kernel' else v) for k, v in pooler.items() if k != 'norm'}
  tensors.update({f'head.norm.{"weight" if k == "scale" else "bias"}': v
                  for k, v in pooler['norm'].items()})
  tensors.update({'classifier.weight': head['kernel'].T, 'classifier.bias': head['bias']})
  return 'ModernBertForSequenceClassification', tensors, False


FAMILY = Family(name='modernbert', read_config=read_config, checkpoint_key=checkpoint_key,
                key_prefixes=('model.',), position_ids=bert.position_ids,
                position_offset=lambda config: 0, special_tokens=('[CLS]', '[SEP]'),
                build_pair=bert.build_pair, num_special_tokens_pair=3,
                # adapters 1.3 reaches ModernBERT only through its plugin interface
                # (adapters.init), not an *AdapterModel class: no AdapterHub export.
                adapterhub_model_class='',
                sequence_classifier=sequence_classifier, pooler_act='gelu',
                layer=modernbert_layer.PreNormLayer)
