"""Parity with transformers' PyTorch models: same token ids, same hidden states (fp32)."""

import json

import numpy as np
import pytest
import torch
import transformers

from adapter_tuning import load_pretrained

SENTENCES = ['The quick brown fox jumps over the lazy dog.', 'Hello!',
             'Adapters add few parameters per task; the base model stays frozen and is shared.',
             'ünïcödé and CAPITALS, numbers 12345']
PAIRS = ['What jumps?', 'Greeting', 'How many parameters?', 'a second segment']


def _compare(ours, theirs_model, batch):
  with torch.no_grad():
    ref = theirs_model(input_ids=torch.tensor(batch['input_ids'], dtype=torch.long),
                       attention_mask=torch.tensor(batch['attention_mask'], dtype=torch.long),
                       token_type_ids=torch.tensor(batch['token_type_ids'], dtype=torch.long))
  mask = batch['attention_mask'].astype(bool)
  hidden = ref.last_hidden_state.numpy()
  np.testing.assert_allclose(ours['last_hidden_state'][mask], hidden[mask], atol=1e-4, rtol=0)
  np.testing.assert_allclose(ours['pooled'], ref.pooler_output.numpy(), atol=1e-4, rtol=0)


@pytest.mark.parametrize('pairs', [False, True])
def test_minilm_matches_transformers(minilm_dir, minilm, pairs):
  hf_tok = transformers.AutoTokenizer.from_pretrained(str(minilm_dir))
  text_pairs = PAIRS if pairs else None
  ours = minilm.encode(SENTENCES, text_pairs, max_length=64)
  ref = hf_tok(SENTENCES, text_pairs, padding=True, truncation=True, max_length=64,
               return_tensors='np')
  np.testing.assert_array_equal(ours['input_ids'], ref['input_ids'])
  np.testing.assert_array_equal(ours['token_type_ids'], ref['token_type_ids'])
  np.testing.assert_array_equal(ours['attention_mask'], ref['attention_mask'])
  model = transformers.BertModel.from_pretrained(str(minilm_dir)).eval()
  _compare(ours, model, ours)


def test_truncation_matches_transformers(minilm_dir, minilm):
  hf_tok = transformers.AutoTokenizer.from_pretrained(str(minilm_dir))
  long_a = ' '.join(['word'] * 40)
  long_b = ' '.join(['other'] * 10)
  ours = minilm.tokenizer.tokenize([long_a], [long_b], max_length=24)[0][0]
  ref = hf_tok(long_a, long_b, truncation=True, max_length=24)['input_ids']
  assert list(ours) == list(ref)


def test_roberta_random_checkpoint(tmp_path):
  torch.manual_seed(0)
  config = transformers.RobertaConfig(vocab_size=300, hidden_size=32, num_hidden_layers=2,
                                      num_attention_heads=4, intermediate_size=64,
                                      max_position_embeddings=40, type_vocab_size=1)
  model = transformers.RobertaModel(config).eval()
  model.save_pretrained(tmp_path)
  _write_bpe_tokenizer(tmp_path)
  ours = load_pretrained(tmp_path)
  assert ours.config.family == 'roberta'
  rng = np.random.default_rng(0)
  ids = rng.integers(3, 300, size=(3, 12)).astype(np.int32)
  ids[:, 0] = 0
  mask = np.ones_like(ids)
  mask[1, 7:] = 0
  mask[2, 4:] = 0
  ids[mask == 0] = 1  # RoBERTa pads with id 1; positions skip pads
  batch = {'input_ids': ids, 'attention_mask': mask, 'token_type_ids': np.zeros_like(ids)}
  out = ours.apply(ids, mask)
  _compare({k: np.asarray(v) for k, v in out.items()}, model, batch)


def test_bert_pytorch_bin_with_prefix(tmp_path, minilm_dir):
  torch.manual_seed(0)
  config = transformers.BertConfig(vocab_size=200, hidden_size=32, num_hidden_layers=2,
                                   num_attention_heads=4, intermediate_size=64,
                                   max_position_embeddings=64)
  model = transformers.BertForSequenceClassification(config).eval()
  model.save_pretrained(tmp_path, safe_serialization=False)
  assert (tmp_path / 'pytorch_model.bin').exists()
  state = torch.load(tmp_path / 'pytorch_model.bin', weights_only=True)
  assert any(k.startswith('bert.') for k in state)
  (tmp_path / 'vocab.txt').write_text(
      '\n'.join(['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]'] +
                [f'w{i}' for i in range(195)]) + '\n')
  ours = load_pretrained(tmp_path)
  rng = np.random.default_rng(1)
  ids = rng.integers(5, 200, size=(2, 10)).astype(np.int32)
  mask = np.ones_like(ids)
  mask[0, 6:] = 0
  types = np.zeros_like(ids)
  types[:, 5:] = 1
  batch = {'input_ids': ids, 'attention_mask': mask, 'token_type_ids': types}
  out = ours.apply(ids, mask, types)
  _compare({k: np.asarray(v) for k, v in out.items()}, model.bert, batch)
  hf_tok = transformers.BertTokenizerFast(str(tmp_path / 'vocab.txt'))
  text = 'w1 w2 unknown w3'
  assert list(ours.tokenizer.tokenize([text], ['w4'])[0][0]) == hf_tok(text, 'w4')['input_ids']


def _write_bpe_tokenizer(directory):
  """A tiny byte-level BPE vocabulary, enough to check the RoBERTa template."""
  from tokenizers import ByteLevelBPETokenizer
  bpe = ByteLevelBPETokenizer()
  bpe.train_from_iterator(['hello world, this is a small corpus for roberta'] * 10,
                          vocab_size=300, special_tokens=['<s>', '<pad>', '</s>', '<unk>'])
  bpe.save_model(str(directory))
  (directory / 'tokenizer_config.json').write_text(json.dumps({'add_prefix_space': False}))


def test_roberta_tokenizer_from_vocab_and_merges(tmp_path):
  config = transformers.RobertaConfig(vocab_size=300, hidden_size=32, num_hidden_layers=1,
                                      num_attention_heads=4, intermediate_size=64,
                                      max_position_embeddings=40, type_vocab_size=1)
  transformers.RobertaModel(config).save_pretrained(tmp_path)
  _write_bpe_tokenizer(tmp_path)
  ours = load_pretrained(tmp_path)
  hf_tok = transformers.RobertaTokenizerFast(str(tmp_path / 'vocab.json'),
                                             str(tmp_path / 'merges.txt'))
  ids, types = ours.tokenizer.tokenize(['hello world'], ['small corpus'])
  ref = hf_tok('hello world', 'small corpus')
  assert list(ids[0]) == ref['input_ids']
