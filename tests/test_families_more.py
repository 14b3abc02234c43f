"""XLM-R, DistilBERT and ELECTRA against transformers, on tiny random checkpoints.

Each test saves a small randomly initialised Hugging Face *ForSequenceClassification model
(safetensors) with tokenizer files into tmp_path and loads it through the public API,
`load_pretrained`: the last hidden states, the classifier logits (our pooler + head) and,
with `adapters`, a non-zero bottleneck adapter must match transformers to 1e-4.
BERT-vocabulary families reuse MiniLM's tokenizer.json (so the vocabulary is BERT's 30522);
XLM-R gets a SentencePiece-style unigram tokenizer.json trained here.
"""

import inspect
import json
import re
import shutil

import jax
import numpy as np
import pytest
import torch
import transformers

from adapter_tuning import load_pretrained, peft
from adapter_tuning.errors import UsageError
from adapter_tuning.interop import hf_checkpoint
from adapter_tuning.models.families import family_named
from adapter_tuning.models.heads import TaskModel
from adapter_tuning.peft.bottleneck import AdapterConfig
from adapter_tuning.peft.lora import LoRAConfig

SENTENCES = ['The quick brown fox jumps over the lazy dog.', 'Hello!',
             'adapters add few parameters per task and the base stays frozen']
PAIRS = ['What jumps?', 'A greeting', 'how many parameters']
NUM_LABELS = 3
TINY = dict(num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=64)


def _save(model, directory, tokenizer_json, **save_kwargs):
  model.save_pretrained(directory, **save_kwargs)
  shutil.copyfile(tokenizer_json, directory / 'tokenizer.json')
  return directory


def _distilbert(tmp_path, minilm_dir, sinusoidal: bool):
  torch.manual_seed(0)
  config = transformers.DistilBertConfig(
      vocab_size=30522, dim=32, n_layers=2, n_heads=4, hidden_dim=64,
      max_position_embeddings=64, sinusoidal_pos_embds=sinusoidal, num_labels=NUM_LABELS)
  model = transformers.DistilBertForSequenceClassification(config).eval()
  return model, _save(model, tmp_path, minilm_dir / 'tokenizer.json')


def _electra(tmp_path, minilm_dir, embedding_size: int, **save_kwargs):
  torch.manual_seed(0)
  config = transformers.ElectraConfig(vocab_size=30522, embedding_size=embedding_size,
                                      hidden_size=32, num_labels=NUM_LABELS, **TINY)
  model = transformers.ElectraForSequenceClassification(config).eval()
  return model, _save(model, tmp_path, minilm_dir / 'tokenizer.json', **save_kwargs)


def _unigram_tokenizer(path):
  """A SentencePiece-unigram tokenizer.json with XLM-R's special tokens and pair template."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
  tok = Tokenizer(models.Unigram())
  tok.pre_tokenizer = pre_tokenizers.Metaspace()
  tok.decoder = decoders.Metaspace()
  corpus = SENTENCES + PAIRS + ['der schnelle braune Fuchs springt über den faulen Hund',
                                'le renard brun saute par-dessus le chien paresseux']
  tok.train_from_iterator(corpus * 20, trainers.UnigramTrainer(
      vocab_size=120, unk_token='<unk>',
      special_tokens=['<s>', '<pad>', '</s>', '<unk>', '<mask>']))
  tok.post_processor = processors.TemplateProcessing(
      single='<s> $A </s>', pair='<s> $A </s> </s> $B </s>',
      special_tokens=[('<s>', 0), ('</s>', 2)])
  tok.save(str(path))
  return tok.get_vocab_size()


def _xlm_roberta(tmp_path):
  vocab = _unigram_tokenizer(tmp_path / 'tokenizer.json')
  torch.manual_seed(0)
  config = transformers.XLMRobertaConfig(vocab_size=vocab, hidden_size=32, type_vocab_size=1,
                                         num_labels=NUM_LABELS, **TINY)
  model = transformers.XLMRobertaForSequenceClassification(config).eval()
  model.save_pretrained(tmp_path)
  return model, tmp_path


def _hf_forward(model, batch):
  """(last hidden state, logits) of a transformers *ForSequenceClassification model."""
  inputs = {'input_ids': torch.tensor(batch['input_ids'], dtype=torch.long),
            'attention_mask': torch.tensor(batch['attention_mask'], dtype=torch.long)}
  if 'token_type_ids' in inspect.signature(model.forward).parameters:  # not DistilBERT's
    inputs['token_type_ids'] = torch.tensor(batch['token_type_ids'], dtype=torch.long)
  with torch.no_grad():
    out = model(**inputs, output_hidden_states=True)
  return out.hidden_states[-1].numpy(), out.logits.numpy()


def _classifier_from(model, family: str):
  """(pooler, head) params from an HF sequence classifier, by inverting the family's
  `sequence_classifier` naming (which HF tensor holds which of our four)."""
  state = {k: v.numpy() for k, v in model.state_dict().items()}
  marks = {'pooler': {'kernel': np.full((1, 1), 1.0), 'bias': np.full(1, 2.0)},
           'head': {'kernel': np.full((1, 1), 3.0), 'bias': np.full(1, 4.0)}}
  _, names, _ = family_named(family).sequence_classifier(marks['pooler'], marks['head'])
  out = {'pooler': {}, 'head': {}}
  for key, mark in names.items():
    part, leaf = {1.0: ('pooler', 'kernel'), 2.0: ('pooler', 'bias'), 3.0: ('head', 'kernel'),
                  4.0: ('head', 'bias')}[float(np.ravel(mark)[0])]
    out[part][leaf] = state[key].T if leaf == 'kernel' else state[key]
  return out['pooler'], out['head']


def _check_parity(ours, model, texts, pairs, family):
  """Hidden states and logits of the loaded model vs transformers (our pooler + head set
  from the HF classifier); where the family's key map names the classifier's first layer as
  its pooler, load_pretrained already loaded it."""
  batch = ours.encode(texts, pairs, max_length=48)
  hidden, logits = _hf_forward(model, batch)
  mask = batch['attention_mask'].astype(bool)
  np.testing.assert_allclose(batch['last_hidden_state'][mask], hidden[mask], atol=1e-4, rtol=0)
  pooler, head = _classifier_from(model, family)
  pooler_key, _ = family_named(family).checkpoint_key(('pooler', 'kernel'))
  if pooler_key in model.state_dict():
    np.testing.assert_array_equal(ours.params['pooler']['kernel'], pooler['kernel'])
  task = TaskModel(ours.config, ours.adapter, 'classification', NUM_LABELS, pooling='pooler')
  encoder = {**ours.params, 'pooler': pooler}
  ours_logits = task.apply({'params': {'encoder': encoder, 'head': head}},
                           batch['input_ids'], batch['attention_mask'], batch['token_type_ids'])
  np.testing.assert_allclose(np.asarray(ours_logits), logits, atol=1e-4, rtol=0)
  assert family_named(family).sequence_classifier(pooler, head)[0] == type(model).__name__
  return batch


@pytest.mark.parametrize('sinusoidal', [False, True])
def test_distilbert_matches_transformers(tmp_path, minilm_dir, sinusoidal):
  model, directory = _distilbert(tmp_path, minilm_dir, sinusoidal)
  ours = load_pretrained(directory)
  assert (ours.config.family, ours.config.hidden_size, ours.config.num_layers) == (
      'distilbert', 32, 2)
  assert 'token_type_embeddings' not in ours.params['embeddings']
  hf_tok = transformers.DistilBertTokenizerFast(tokenizer_file=str(directory / 'tokenizer.json'))
  batch = _check_parity(ours, model, SENTENCES, PAIRS, 'distilbert')
  ref = hf_tok(SENTENCES, PAIRS, padding=True, truncation=True, max_length=48)
  np.testing.assert_array_equal(batch['input_ids'], ref['input_ids'])


def test_distilbert_sinusoidal_table_is_transformers_and_fills_a_missing_tensor(
    tmp_path, minilm_dir):
  """A sinusoidal checkpoint saved without position embeddings gets HF's table, as
  `from_pretrained` does; the saved values win when present (the test above)."""
  from safetensors.numpy import load_file, save_file
  from transformers.models.distilbert import modeling_distilbert
  from adapter_tuning.models.families import distilbert
  table = torch.empty(64, 32)
  modeling_distilbert.create_sinusoidal_embeddings(64, 32, table)
  np.testing.assert_array_equal(distilbert.sinusoidal_positions(64, 32), table.numpy())
  model, directory = _distilbert(tmp_path, minilm_dir, sinusoidal=True)
  state = load_file(directory / 'model.safetensors')
  del state['distilbert.embeddings.position_embeddings.weight']
  save_file(state, directory / 'model.safetensors', metadata={'format': 'pt'})
  ours = load_pretrained(directory)
  np.testing.assert_array_equal(ours.params['embeddings']['position_embeddings']['embedding'],
                                table.numpy())
  _check_parity(ours, model, SENTENCES, None, 'distilbert')


def test_distilbert_learned_checkpoint_without_positions_is_a_one_line_error(
    tmp_path, minilm_dir):
  from safetensors.numpy import load_file, save_file
  _, directory = _distilbert(tmp_path, minilm_dir, sinusoidal=False)
  state = load_file(directory / 'model.safetensors')
  del state['distilbert.embeddings.position_embeddings.weight']
  save_file(state, directory / 'model.safetensors', metadata={'format': 'pt'})
  with pytest.raises(UsageError, match='lacks tensor .embeddings.position_embeddings.weight') as e:
    load_pretrained(directory)
  assert '\n' not in str(e.value)


def test_electra_matches_transformers_with_a_projected_embedding_and_shards(
    tmp_path, minilm_dir):
  model, directory = _electra(tmp_path, minilm_dir, embedding_size=16, max_shard_size='500KB')
  assert (directory / 'model.safetensors.index.json').exists()
  assert not (directory / 'model.safetensors').exists()
  ours = load_pretrained(directory)
  assert ours.config.embedding_size == 16
  assert ours.params['embeddings']['layer_norm']['scale'].shape == (16,)
  assert ours.params['embeddings']['project']['kernel'].shape == (16, 32)
  batch = _check_parity(ours, model, SENTENCES, PAIRS, 'electra')
  assert batch['token_type_ids'].any()  # the pair's second segment reaches the model


def test_electra_without_projection(tmp_path, minilm_dir):
  model, directory = _electra(tmp_path, minilm_dir, embedding_size=32)
  ours = load_pretrained(directory)
  assert 'project' not in ours.params['embeddings']
  _check_parity(ours, model, SENTENCES, None, 'electra')


def test_xlm_roberta_matches_transformers_with_pair_special_tokens(tmp_path):
  model, directory = _xlm_roberta(tmp_path)
  ours = load_pretrained(directory)
  assert (ours.config.family, ours.config.pad_token_id, ours.config.position_offset) == (
      'xlm-roberta', 1, 2)
  hf_tok = transformers.XLMRobertaTokenizerFast(tokenizer_file=str(directory / 'tokenizer.json'))
  batch = _check_parity(ours, model, SENTENCES, PAIRS, 'xlm-roberta')
  ref = hf_tok(SENTENCES, PAIRS, padding=True, truncation=True, max_length=48)
  np.testing.assert_array_equal(batch['input_ids'], ref['input_ids'])
  np.testing.assert_array_equal(batch['attention_mask'], ref['attention_mask'])
  # <s> a </s></s> b </s>, as the family builds pairs and HF's slow-tokenizer rule says.
  a = hf_tok(SENTENCES[0], add_special_tokens=False)['input_ids']
  b = hf_tok(PAIRS[0], add_special_tokens=False)['input_ids']
  ids, types = ours.tokenizer.build_pair(a, b)
  assert ids == hf_tok.build_inputs_with_special_tokens(a, b) == [0] + a + [2, 2] + b + [2]
  assert list(batch['input_ids'][0][:len(ids)]) == ids and not any(types)


FAMILIES = {
    'distilbert': lambda tmp_path, minilm_dir: _distilbert(tmp_path, minilm_dir, False),
    'electra': lambda tmp_path, minilm_dir: _electra(tmp_path, minilm_dir, 16),
    'xlm-roberta': lambda tmp_path, minilm_dir: _xlm_roberta(tmp_path),
}


@pytest.mark.parametrize('family', sorted(FAMILIES))
def test_nonzero_houlsby_adapters_match_adapterhub(tmp_path, minilm_dir, family):
  """Our adapters at the 'attention' and 'ffn' sites = AdapterHub's DoubleSeqBnConfig (swish,
  d/4) on the same family, with the same non-zero weights."""
  import adapters
  model, directory = FAMILIES[family](tmp_path, minilm_dir)
  ours = load_pretrained(directory, AdapterConfig(size=8, placement='houlsby',
                                                   activation='swish', init_scale=0.3))
  adapters.init(model)
  model.add_adapter('a', config=adapters.DoubleSeqBnConfig(reduction_factor=4))
  model.set_active_adapters('a')
  pattern = re.compile(r'layer\.(\d+)\.(.+)\.adapters\.a\.(adapter_down\.0|adapter_up)\.'
                       r'(weight|bias)$')
  placed = 0
  with torch.no_grad():
    for name, param in model.named_parameters():
      if (m := pattern.search(name)) is None:
        continue
      site = 'attention' if 'attention' in m[2] else 'ffn'
      proj = ours.params[f'layer_{m[1]}'][f'{site}_adapter'][
          'down' if m[3].startswith('adapter_down') else 'up']
      if m[4] == 'bias':
        proj['bias'] = np.random.default_rng(placed).normal(0, 0.3, proj['bias'].shape)
      value = proj['kernel'].T if m[4] == 'weight' else proj['bias']
      param.copy_(torch.tensor(np.asarray(value, np.float32)))
      placed += 1
  assert placed == 2 * 2 * 4  # layers x sites x tensors
  batch = ours.encode(SENTENCES, None, max_length=48)
  hidden, _ = _hf_forward(model, batch)
  mask = batch['attention_mask'].astype(bool)
  np.testing.assert_allclose(batch['last_hidden_state'][mask], hidden[mask], atol=1e-4, rtol=0)
  base = load_pretrained(directory).encode(SENTENCES, None, max_length=48)
  assert np.abs(base['last_hidden_state'] - batch['last_hidden_state']).max() > 1e-2


@pytest.mark.parametrize('family', sorted(FAMILIES))
def test_lora_at_every_projection_site_merges_into_the_family_checkpoint(
    tmp_path, minilm_dir, family):
  """LoRA on all seven projection targets, hooked in our encoder, equals transformers
  running the merged weights written under the family's tensor names: each site hooks the
  projection the key map says it does."""
  model, directory = FAMILIES[family](tmp_path, minilm_dir)
  lora = LoRAConfig(rank=2, alpha=4.0, targets=('query', 'key', 'value', 'attention_output',
                                                 'intermediate', 'output'))
  ours = load_pretrained(directory, lora)
  flat = jax.tree_util.tree_flatten_with_path(ours.params)[0]
  assert sum('_lora' in jax.tree_util.keystr(p) for p, _ in flat) == 2 * 6 * 2
  rng = np.random.default_rng(0)
  ours.params = jax.tree_util.tree_map_with_path(
      lambda p, v: rng.normal(0, 0.2, v.shape).astype(np.float32)
      if '_lora' in jax.tree_util.keystr(p) else v, ours.params)
  batch = ours.encode(SENTENCES, None, max_length=48)
  merged = peft.method_of(lora).merge(ours.params, lora, ours.config.num_layers)
  state = hf_checkpoint.export_encoder_state(
      {k: v for k, v in merged.items() if k != 'pooler'}, family)
  base = getattr(model, model.base_model_prefix)
  missing, unexpected = base.load_state_dict(
      {k: torch.tensor(v) for k, v in state.items()}, strict=False)
  assert not unexpected and all(k.endswith('position_ids') for k in missing)
  hidden, _ = _hf_forward(model, batch)
  mask = batch['attention_mask'].astype(bool)
  np.testing.assert_allclose(batch['last_hidden_state'][mask], hidden[mask], atol=1e-4, rtol=0)


@pytest.mark.parametrize('family', sorted(FAMILIES))
def test_merged_lora_classifier_loads_in_transformers_with_same_logits(
    tmp_path, minilm_dir, family):
  """hf_merged writes the family's *ForSequenceClassification (its prefix, its classifier
  names, our pooler as the classifier's first layer): transformers alone reproduces our
  LoRA + pooler + head logits."""
  import flax.traverse_util as tu
  from adapter_tuning.interop import hf_merged
  (tmp_path / 'base').mkdir()
  _, directory = FAMILIES[family](tmp_path / 'base', minilm_dir)
  lora = LoRAConfig(rank=2, targets=('query', 'value', 'output'))
  ours = load_pretrained(directory, lora)
  rng = np.random.default_rng(1)
  flat = tu.flatten_dict(ours.params)
  trained = {('encoder',) + k: rng.normal(0, 0.2, v.shape).astype(np.float32)
             for k, v in flat.items() if k[0] == 'pooler' or peft.is_method_param(k)}
  trained[('head', 'kernel')] = rng.normal(0, 0.2, (32, NUM_LABELS)).astype(np.float32)
  trained[('head', 'bias')] = rng.normal(0, 0.2, (NUM_LABELS,)).astype(np.float32)
  trained = tu.unflatten_dict(trained)
  meta = {'head': 'classification', 'pooling': 'pooler', 'peft': peft.to_meta(lora),
          'label_names': ['a', 'b', 'c'], 'num_outputs': NUM_LABELS}
  hf_config, state = hf_merged.build(meta, trained, directory)
  hf_merged.write(tmp_path / 'merged', hf_config, state, directory)
  merged = transformers.AutoModelForSequenceClassification.from_pretrained(
      tmp_path / 'merged').eval()
  assert type(merged).__name__ == family_named(family).sequence_classifier(
      trained['encoder']['pooler'], trained['head'])[0]
  batch = ours.encode(SENTENCES, PAIRS, max_length=48)
  encoder = tu.unflatten_dict({**flat, **tu.flatten_dict(trained['encoder'])})
  task = TaskModel(ours.config, lora, 'classification', NUM_LABELS, pooling='pooler')
  logits = task.apply({'params': {'encoder': encoder, 'head': trained['head']}},
                      batch['input_ids'], batch['attention_mask'], batch['token_type_ids'])
  _, ref = _hf_forward(merged, batch)
  np.testing.assert_allclose(np.asarray(logits), ref, atol=1e-4, rtol=0)


def test_unsupported_model_type_is_one_line_naming_the_supported(tmp_path):
  (tmp_path / 'config.json').write_text(json.dumps({'model_type': 'gpt2', 'n_embd': 32}))
  with pytest.raises(UsageError) as e:
    load_pretrained(tmp_path)
  assert str(e.value) == ("unsupported model_type 'gpt2'; supported: bert, roberta, "
                          'xlm-roberta, distilbert, electra, deberta-v2, modernbert, '
                          'xlm-roberta-xl')


def test_distilbert_config_reader_and_key_map():
  """config.json names -> ModelConfig; BERT's Flax paths -> DistilBERT's tensor names."""
  family = family_named('distilbert')
  config = family.read_config(
      {'model_type': 'distilbert', 'vocab_size': 100, 'dim': 48, 'n_layers': 3, 'n_heads': 6,
       'hidden_dim': 96, 'activation': 'relu', 'max_position_embeddings': 50,
       'sinusoidal_pos_embds': True, 'dropout': 0.2, 'attention_dropout': 0.3,
       'pad_token_id': 0}, 'config.json')
  assert (config.hidden_size, config.num_layers, config.num_heads, config.intermediate_size,
          config.hidden_act, config.hidden_dropout, config.attention_dropout,
          config.type_vocab_size, config.sinusoidal_positions, config.layer_norm_eps) == (
              48, 3, 6, 96, 'relu', 0.2, 0.3, 0, True, 1e-12)
  assert family.checkpoint_key(('layer_2', 'attention', 'query', 'kernel')) == (
      'transformer.layer.2.attention.q_lin.weight', 'attn_in')
  assert family.checkpoint_key(('layer_0', 'attention', 'out', 'bias')) == (
      'transformer.layer.0.attention.out_lin.bias', 'attn_out')
  assert family.checkpoint_key(('layer_1', 'ffn_layer_norm', 'scale')) == (
      'transformer.layer.1.output_layer_norm.weight', 'copy')
  assert family.checkpoint_key(('layer_1', 'intermediate', 'kernel')) == (
      'transformer.layer.1.ffn.lin1.weight', 'linear')
  with pytest.raises(UsageError, match="unsupported activation 'mish'"):
    family.read_config({'activation': 'mish'}, 'config.json')
