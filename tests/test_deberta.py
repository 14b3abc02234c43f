"""DeBERTa-v2/v3 (models/families/deberta_v2, models/deberta_attention) against transformers.

Tiny randomly initialised `DebertaV2ForSequenceClassification` models (hidden 32, 2 layers,
4 heads, initializer_range 0.2 so that every term of the disentangled attention moves the
output) are saved with MiniLM's tokenizer.json and loaded through `load_pretrained`: last
hidden states and logits (our pooler + head) must match transformers to 1e-4 on a padded
batch of text pairs, for a v3-style config (log buckets, shared keys, no absolute
positions, no token types) and a v2-style one (no buckets, own position projections,
absolute positions, token types), plus LoRA hooked at every projection and its
hf_merged export.
"""

import shutil

import jax
import numpy as np
import pytest
import torch
import transformers

from adapter_tuning import load_pretrained, peft
from adapter_tuning.errors import UsageError
from adapter_tuning.interop import hf_checkpoint
from adapter_tuning.models import deberta_attention
from adapter_tuning.models.families import family_named
from adapter_tuning.models.heads import TaskModel
from adapter_tuning.peft.lora import LoRAConfig
from adapter_tuning.peft.prefix import PrefixConfig
from helpers import merged_classifier

SENTENCES = ['The quick brown fox jumps over the lazy dog.', 'Hello!',
             'adapters add few parameters per task and the base stays frozen']
PAIRS = ['What jumps?', 'A greeting', 'how many parameters']
NUM_LABELS = 3
TINY = dict(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=64, max_position_embeddings=64, initializer_range=0.2,
            num_labels=NUM_LABELS)
V3 = dict(relative_attention=True, pos_att_type=['p2c', 'c2p'], position_buckets=256,
          max_relative_positions=-1, share_att_key=True, norm_rel_ebd='layer_norm',
          position_biased_input=False, type_vocab_size=0, pooler_hidden_act='gelu')
V2 = dict(relative_attention=True, pos_att_type='c2p|p2c', position_buckets=-1,
          max_relative_positions=-1, share_att_key=False, norm_rel_ebd='none',
          position_biased_input=True, type_vocab_size=2, pooler_hidden_act='tanh')


def _deberta(directory, minilm_dir, **config):
  torch.manual_seed(0)
  model = transformers.DebertaV2ForSequenceClassification(
      transformers.DebertaV2Config(**TINY, **config)).eval()
  with torch.no_grad():  # non-zero LayerNorm affines and biases, so their mapping matters
    for name, param in model.named_parameters():
      if 'LayerNorm' in name or name.endswith('bias'):
        param.add_(torch.randn_like(param) * 0.2)
  model.save_pretrained(directory)
  shutil.copyfile(minilm_dir / 'tokenizer.json', directory / 'tokenizer.json')
  return model, directory


def _hf_forward(model, batch):
  inputs = {k: torch.tensor(batch[k], dtype=torch.long)
            for k in ('input_ids', 'attention_mask', 'token_type_ids')}
  with torch.no_grad():
    out = model(**inputs, output_hidden_states=True)
  return out.hidden_states[-1].numpy(), out.logits.numpy()


def _head_of(model):
  return {'kernel': model.classifier.weight.detach().numpy().T,
          'bias': model.classifier.bias.detach().numpy()}


def _logits(ours, encoder_params, head, batch, adapter=None):
  task = TaskModel(ours.config, adapter, 'classification', NUM_LABELS, pooling='pooler')
  return np.asarray(task.apply({'params': {'encoder': encoder_params, 'head': head}},
                               batch['input_ids'], batch['attention_mask'],
                               batch['token_type_ids']))


STYLES = {'v3': V3, 'v2': V2,
          # 4 buckets up to distance 16: most pairs of a ~20-token batch are log-bucketed
          'v3_log_buckets': {**V3, 'position_buckets': 4, 'max_relative_positions': 16}}


@pytest.mark.parametrize('style', sorted(STYLES))
def test_deberta_matches_transformers(tmp_path, minilm_dir, style):
  model, directory = _deberta(tmp_path, minilm_dir, **STYLES[style])
  style = style[:2]
  ours = load_pretrained(directory)
  assert ours.config.family == 'deberta-v2'
  embeddings = ours.params['embeddings']
  assert ('position_embeddings' in embeddings) == (style == 'v2')
  assert ('token_type_embeddings' in embeddings) == (style == 'v2')
  attention = ours.params['layer_1']['attention']
  assert ('pos_key' in attention) == (style == 'v2')
  assert ('layer_norm' in ours.params['relative_positions']) == (style == 'v3')
  batch = ours.encode(SENTENCES, PAIRS, max_length=48)
  assert not batch['attention_mask'].all() and batch['token_type_ids'].any()
  hidden, logits = _hf_forward(model, batch)
  mask = batch['attention_mask'].astype(bool)
  np.testing.assert_allclose(batch['last_hidden_state'][mask], hidden[mask], atol=1e-4, rtol=0)
  np.testing.assert_allclose(_logits(ours, ours.params, _head_of(model), batch), logits,
                             atol=1e-4, rtol=0)
  assert np.abs(logits).max() > 0.1  # the comparison is not between near-zero numbers


def test_scanned_rematerialised_training_forward(tmp_path, minilm_dir):
  """The shared relative table reaches every layer in the scanned, rematerialised stack
  too (same output), and a dropout forward differentiates to finite, non-zero gradients."""
  _, directory = _deberta(tmp_path, minilm_dir, **V3)
  ours = load_pretrained(directory)
  batch = ours.encode(SENTENCES, PAIRS, max_length=48)
  head = {'kernel': np.ones((32, NUM_LABELS), np.float32), 'bias': np.zeros(NUM_LABELS)}
  args = (batch['input_ids'], batch['attention_mask'], batch['token_type_ids'])
  variables = {'params': {'encoder': ours.params, 'head': head}}
  plain = TaskModel(ours.config, None, 'classification', NUM_LABELS, pooling='pooler')
  scanned = TaskModel(ours.config, None, 'classification', NUM_LABELS, pooling='pooler',
                      remat=True, scan=True)
  np.testing.assert_allclose(np.asarray(scanned.apply(variables, *args)),
                             np.asarray(plain.apply(variables, *args)), atol=1e-5, rtol=0)
  loss = lambda p: scanned.apply({'params': p}, *args, deterministic=False, rngs={
      'dropout': jax.random.PRNGKey(0)}).sum()
  grads = jax.grad(loss)(variables['params'])
  table = grads['encoder']['relative_positions']['embeddings']
  assert np.isfinite(table).all() and np.abs(table).max() > 0


def test_log_buckets_equal_transformers():
  """Distances past half the buckets are log-compressed exactly as HF's float32 formula."""
  from transformers.models.deberta_v2 import modeling_deberta_v2 as hf
  relative = np.arange(-700, 701)[None, :]
  for buckets, max_position in ((256, 512), (32, 64), (64, 1024)):
    ref = hf.make_log_bucket_position(torch.tensor(relative), buckets, max_position)
    np.testing.assert_array_equal(
        deberta_attention.log_buckets(relative, buckets, max_position), ref.numpy())
  options = deberta_attention.Disentangled(position_buckets=8, max_relative_positions=64)
  ref = hf.build_relative_position(torch.zeros(1, 40, 1), torch.zeros(1, 40, 1), 8, 64)
  np.testing.assert_array_equal(deberta_attention.relative_positions(40, options), ref[0])


def test_lora_at_every_projection_site_merges_into_the_deberta_checkpoint(tmp_path, minilm_dir):
  """LoRA on q/k/v (which, with share_att_key, also project the relative table), the
  attention output and the FFN equals transformers running the merged weights; and it
  moves the output away from the base."""
  model, directory = _deberta(tmp_path, minilm_dir, **V3)
  lora = LoRAConfig(rank=2, alpha=4.0, targets=('query', 'key', 'value', 'attention_output',
                                                 'intermediate', 'output'))
  ours = load_pretrained(directory, lora)
  rng = np.random.default_rng(0)
  ours.params = jax.tree_util.tree_map_with_path(
      lambda p, v: rng.normal(0, 0.2, v.shape).astype(np.float32)
      if '_lora' in jax.tree_util.keystr(p) else v, ours.params)
  batch = ours.encode(SENTENCES, PAIRS, max_length=48)
  mask = batch['attention_mask'].astype(bool)
  base, _ = _hf_forward(model, batch)
  assert np.abs(batch['last_hidden_state'][mask] - base[mask]).max() > 1e-2
  merged = peft.method_of(lora).merge(ours.params, lora, ours.config.num_layers)
  state = hf_checkpoint.export_encoder_state(
      {k: v for k, v in merged.items() if k != 'pooler'}, 'deberta-v2')
  missing, unexpected = model.deberta.load_state_dict(
      {k: torch.tensor(v) for k, v in state.items()}, strict=False)
  assert not unexpected and all(k.endswith('position_ids') for k in missing)
  hidden, _ = _hf_forward(model, batch)
  np.testing.assert_allclose(batch['last_hidden_state'][mask], hidden[mask], atol=1e-4, rtol=0)


def test_merged_lora_classifier_loads_in_transformers_with_same_logits(tmp_path, minilm_dir):
  """hf_merged writes a DebertaV2ForSequenceClassification (pooler.dense = our pooler,
  classifier = our head) that transformers alone runs to our LoRA logits."""
  (tmp_path / 'base').mkdir()
  _, directory = _deberta(tmp_path / 'base', minilm_dir, **V2)
  lora = LoRAConfig(rank=2, targets=('query', 'value', 'output'))
  ours = load_pretrained(directory, lora)
  encoder, head, merged = merged_classifier(ours, lora, directory, tmp_path / 'merged',
                                            NUM_LABELS)
  assert type(merged).__name__ == 'DebertaV2ForSequenceClassification'
  batch = ours.encode(SENTENCES, PAIRS, max_length=48)
  _, ref = _hf_forward(merged, batch)
  np.testing.assert_allclose(_logits(ours, encoder, head, batch, lora), ref,
                             atol=1e-4, rtol=0)


def test_config_reader_and_key_map():
  family = family_named('deberta-v2')
  config = family.read_config({'model_type': 'deberta-v2', **TINY, **V3}, 'config.json')
  assert (config.type_vocab_size, config.absolute_positions, config.layer_norm_eps,
          config.pooler_act) == (0, False, 1e-7, 'gelu')
  options = config.family_options
  assert (options.span, options.scale_factor, options.max_relative_positions,
          options.share_att_key, options.norm_rel_embeddings) == (256, 3, 64, True, True)
  assert family.checkpoint_key(('layer_1', 'attention', 'key', 'kernel')) == (
      'encoder.layer.1.attention.self.key_proj.weight', 'attn_in')
  assert family.checkpoint_key(('layer_0', 'attention', 'pos_query', 'bias')) == (
      'encoder.layer.0.attention.self.pos_query_proj.bias', 'attn_in')
  assert family.checkpoint_key(('layer_0', 'attention', 'out', 'kernel')) == (
      'encoder.layer.0.attention.output.dense.weight', 'attn_out')
  assert family.checkpoint_key(('relative_positions', 'layer_norm', 'scale')) == (
      'encoder.LayerNorm.weight', 'copy')
  assert family.checkpoint_key(('pooler', 'kernel')) == ('pooler.dense.weight', 'linear')


@pytest.mark.parametrize('change, message', [
    ({'conv_kernel_size': 3}, 'conv_kernel_size=3 .* is not supported'),
    ({'pos_att_type': ['p2p']}, r"pos_att_type \['p2p'\] .* not supported"),
    ({'embedding_size': 16}, 'embedding_size 16 != hidden_size 32'),
])
def test_unsupported_configs_are_one_line_errors(change, message):
  with pytest.raises(UsageError, match=message) as e:
    family_named('deberta-v2').read_config({**TINY, **V3, **change}, 'config.json')
  assert '\n' not in str(e.value)


def test_prefix_tuning_is_refused_in_one_line(tmp_path, minilm_dir):
  _, directory = _deberta(tmp_path, minilm_dir, **V3)
  with pytest.raises(UsageError, match='prefix tuning is not supported on DeBERTa') as e:
    load_pretrained(directory, PrefixConfig(length=4))
  assert '\n' not in str(e.value)


def test_broken_spm_model_is_a_one_line_error(tmp_path, minilm_dir):
  _, directory = _deberta(tmp_path, minilm_dir, **V3)
  (directory / 'tokenizer.json').unlink()
  (directory / 'spm.model').write_bytes(b'not a sentencepiece model')
  with pytest.raises(UsageError, match=r'spm.model is not a readable SentencePiece model') as e:
    load_pretrained(directory)
  assert '\n' not in str(e.value)


def _train_spm(directory, **options):
  """A small unigram spm.model with DeBERTa-v3's special pieces ([PAD] 0, [CLS] 1, [SEP] 2,
  [UNK] 3, [MASK]), trained here: no download."""
  import io
  import sentencepiece
  corpus = SENTENCES + PAIRS + ['Ünïcödé  text, with   spaces and ＦＵＬＬＷＩＤＴＨ letters!',
                                'tokenizers normalise; sentencepiece decides.'] * 20
  model = io.BytesIO()
  sentencepiece.SentencePieceTrainer.train(
      sentence_iterator=iter(corpus), model_writer=model, vocab_size=120, model_type='unigram',
      pad_id=0, pad_piece='[PAD]', bos_id=1, bos_piece='[CLS]', eos_id=2, eos_piece='[SEP]',
      unk_id=3, unk_piece='[UNK]', user_defined_symbols=['[MASK]'], hard_vocab_limit=False,
      minloglevel=2, **options)
  (directory / 'spm.model').write_bytes(model.getvalue())
  return directory / 'spm.model'


@pytest.mark.parametrize('lower', [False, True])
def test_spm_model_tokenizes_as_transformers_sentencepiece_tokenizer(tmp_path, lower):
  """A folder with only spm.model (as the DeBERTa-v3 hub repos ship) tokenises exactly as
  transformers' SentencePiece-based DebertaV2Tokenizer: ids and token types, pairs too."""
  from adapter_tuning.interop.tokenization import load_tokenizer
  path = _train_spm(tmp_path)
  ours = load_tokenizer(tmp_path, 'deberta-v2', 0) if not lower else None
  if lower:
    (tmp_path / 'tokenizer_config.json').write_text('{"do_lower_case": true}')
    ours = load_tokenizer(tmp_path, 'deberta-v2', 0)
  reference = transformers.DebertaV2Tokenizer(str(path), do_lower_case=lower)
  texts = SENTENCES + ['Ünïcödé  text, with   spaces and ＦＵＬＬＷＩＤＴＨ letters!  ',
                       'unseen wörds: zebra-crossing 42']
  ids, types = ours.tokenize(texts, texts[::-1], max_length=128)
  expected = reference(texts, texts[::-1], return_token_type_ids=True)
  assert [list(x) for x in ids] == expected['input_ids']
  assert [list(x) for x in types] == expected['token_type_ids']
  single, _ = ours.tokenize(texts, None, max_length=128)
  assert [list(x) for x in single] == reference(texts)['input_ids']


def test_deberta_folder_with_only_spm_model_loads(tmp_path, minilm_dir):
  model, directory = _deberta(tmp_path, minilm_dir, **V3)
  (directory / 'tokenizer.json').unlink()
  _train_spm(directory)
  ours = load_pretrained(directory)
  batch = ours.encode(SENTENCES, PAIRS, max_length=48)
  assert batch['input_ids'].max() < 120 and (batch['input_ids'][:, 0] == 1).all()
  hidden, _ = _hf_forward(model, batch)
  mask = batch['attention_mask'].astype(bool)
  np.testing.assert_allclose(batch['last_hidden_state'][mask], hidden[mask], atol=1e-4, rtol=0)
