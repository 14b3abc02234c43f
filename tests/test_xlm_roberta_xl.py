"""XLM-RoBERTa-XL/XXL (models/families/xlm_roberta_xl: pre-LN XLM-R) against transformers.

A tiny random `XLMRobertaXLForSequenceClassification` (hidden 32, 3 layers, perturbed
LayerNorms) with a SentencePiece-unigram tokenizer.json is loaded through `load_pretrained`:
hidden states and classifier logits to 1e-4 on a padded batch of pairs; LoRA, IA³ and a
trained classifier merged by hf_merged load in transformers with the same logits; bottleneck
adapters at zero are the base and every method gets gradients.
"""

import flax.traverse_util as tu
import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

from adapter_tuning import load_pretrained, peft
from adapter_tuning.models.heads import TaskModel
from adapter_tuning.peft.bottleneck import AdapterConfig
from adapter_tuning.peft.ia3 import IA3Config
from adapter_tuning.peft.lora import LoRAConfig
from adapter_tuning.peft.prefix import PrefixConfig
from helpers import merged_classifier
from test_families_more import PAIRS, SENTENCES, _unigram_tokenizer

NUM_LABELS = 3


def _xl(directory):
  vocab = _unigram_tokenizer(directory / 'tokenizer.json')
  torch.manual_seed(0)
  config = transformers.XLMRobertaXLConfig(
      vocab_size=vocab, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
      intermediate_size=64, max_position_embeddings=64, type_vocab_size=1,
      num_labels=NUM_LABELS, initializer_range=0.2)
  model = transformers.XLMRobertaXLForSequenceClassification(config).eval()
  with torch.no_grad():
    for name, param in model.named_parameters():
      if 'LayerNorm' in name or 'layer_norm' in name or name.endswith('bias'):
        param.add_(torch.randn_like(param) * 0.2)
  model.save_pretrained(directory)
  return model, directory


def _hf(model, batch):
  inputs = {k: torch.tensor(batch[k], dtype=torch.long) for k in ('input_ids', 'attention_mask')}
  with torch.no_grad():
    return model.roberta(**inputs).last_hidden_state.numpy(), model(**inputs).logits.numpy()


def _classifier(model):
  state = {k: v.numpy() for k, v in model.state_dict().items()}
  return ({'kernel': state['classifier.dense.weight'].T, 'bias': state['classifier.dense.bias']},
          {'kernel': state['classifier.out_proj.weight'].T,
           'bias': state['classifier.out_proj.bias']})


def _logits(ours, encoder, head, batch, adapter=None):
  task = TaskModel(ours.config, adapter, 'classification', NUM_LABELS, pooling='pooler')
  return np.asarray(task.apply({'params': {'encoder': encoder, 'head': head}},
                               batch['input_ids'], batch['attention_mask'],
                               batch['token_type_ids']))


def test_matches_transformers(tmp_path):
  model, directory = _xl(tmp_path)
  ours = load_pretrained(directory)
  assert ours.config.family == 'xlm-roberta-xl' and 'layer_norm' not in ours.params['embeddings']
  batch = ours.encode(SENTENCES, PAIRS, max_length=48)
  assert not batch['attention_mask'].all()
  hidden, logits = _hf(model, batch)
  mask = batch['attention_mask'].astype(bool)
  np.testing.assert_allclose(batch['last_hidden_state'][mask], hidden[mask], atol=1e-4, rtol=0)
  pooler, head = _classifier(model)
  np.testing.assert_allclose(_logits(ours, {**ours.params, 'pooler': pooler}, head, batch),
                             logits, atol=1e-4, rtol=0)
  assert np.abs(logits).max() > 0.1


def test_lora_and_ia3_merge_into_a_classifier_transformers_runs(tmp_path):
  (tmp_path / 'base').mkdir()
  _, directory = _xl(tmp_path / 'base')
  config = peft.combine([LoRAConfig(rank=2, targets=('query', 'value', 'output')),
                         IA3Config()])
  ours = load_pretrained(directory, config)
  encoder, head, merged = merged_classifier(ours, config, directory, tmp_path / 'merged',
                                            NUM_LABELS)
  assert type(merged).__name__ == 'XLMRobertaXLForSequenceClassification'
  batch = ours.encode(SENTENCES, PAIRS, max_length=48)
  _, ref = _hf(merged, batch)
  np.testing.assert_allclose(_logits(ours, encoder, head, batch, config), ref,
                             atol=1e-4, rtol=0)


def test_every_method_gets_gradients_and_zero_adapters_are_the_base(tmp_path):
  _, directory = _xl(tmp_path)
  config = peft.combine([AdapterConfig(size=4, init_scale=0.1), LoRAConfig(rank=2),
                         IA3Config(), PrefixConfig(length=3)])
  ours = load_pretrained(directory, config)
  batch = ours.encode(SENTENCES, PAIRS, max_length=32)
  model = TaskModel(ours.config, config, 'classification', 2, pooling='cls')
  head = {'kernel': np.ones((32, 2), np.float32), 'bias': np.zeros(2, np.float32)}
  args = (batch['input_ids'], batch['attention_mask'], batch['token_type_ids'])
  loss = lambda p: jnp.sum(model.apply({'params': {'encoder': p, 'head': head}}, *args) ** 2)
  grads = tu.flatten_dict(jax.grad(loss)(ours.params))
  for part in peft.parts(config):
    marker = peft.method_of(part).param_marker
    mine = [g for k, g in grads.items() if any(marker in name for name in k)]
    assert mine and max(np.abs(g).max() for g in mine) > 0 and all(
        np.isfinite(g).all() for g in mine), marker
  zero = load_pretrained(directory, AdapterConfig(size=4, init_scale=0.0))
  np.testing.assert_allclose(zero.encode(SENTENCES, None, 16)['last_hidden_state'],
                             load_pretrained(directory).encode(SENTENCES, None, 16)[
                                 'last_hidden_state'], atol=1e-6, rtol=0)
