"""models/families: the family seam (config reader, key map, positions, special tokens)."""

import jax.numpy as jnp
import numpy as np
import pytest

from adapter_tuning.errors import UsageError
from adapter_tuning.interop import hf_checkpoint
from adapter_tuning.models.families import families, family_named

BERT_JSON = dict(model_type='bert', vocab_size=100, hidden_size=32, num_hidden_layers=2,
                 num_attention_heads=4, intermediate_size=64, max_position_embeddings=40)


def test_every_family_is_found_by_its_model_type():
  names = [f.name for f in families()]
  assert names == ['bert', 'roberta', 'xlm-roberta', 'distilbert', 'electra', 'deberta-v2',
                   'modernbert', 'xlm-roberta-xl']
  for name in names:
    assert family_named(name).name == name


def test_unknown_model_type_is_a_one_line_error_naming_the_supported():
  with pytest.raises(UsageError, match=r"unsupported model_type 'gpt2'; supported: bert, "
                     r"roberta, xlm-roberta, distilbert, electra, deberta-v2, modernbert, "
                     r"xlm-roberta-xl$"):
    family_named('gpt2')


def test_config_readers_differ_only_in_pad_default_and_family():
  bert = family_named('bert').read_config(BERT_JSON, 'config.json')
  roberta = family_named('roberta').read_config({**BERT_JSON, 'model_type': 'roberta'},
                                                'config.json')
  assert (bert.family, bert.pad_token_id, bert.position_offset) == ('bert', 0, 0)
  assert (roberta.family, roberta.pad_token_id, roberta.position_offset) == ('roberta', 1, 2)
  assert roberta.max_seq_length == 38 and bert.max_seq_length == 40
  assert bert.hidden_size == roberta.hidden_size == 32


def test_position_ids():
  ids = jnp.array([[5, 6, 7, 1, 1]])
  bert = family_named('bert').read_config(BERT_JSON, 'c')
  roberta = family_named('roberta').read_config({**BERT_JSON, 'model_type': 'roberta'}, 'c')
  np.testing.assert_array_equal(family_named('bert').position_ids(ids, bert), [[0, 1, 2, 3, 4]])
  # RoBERTa (HF create_position_ids_from_input_ids): non-pad tokens count from pad + 1.
  np.testing.assert_array_equal(family_named('roberta').position_ids(ids, roberta),
                                [[2, 3, 4, 1, 1]])
  # XLM-R is RoBERTa's layout exactly; DistilBERT and ELECTRA count from 0 like BERT.
  xlmr = family_named('xlm-roberta').read_config({**BERT_JSON, 'model_type': 'xlm-roberta'}, 'c')
  assert (xlmr.pad_token_id, xlmr.position_offset) == (1, 2)
  np.testing.assert_array_equal(family_named('xlm-roberta').position_ids(ids, xlmr),
                                [[2, 3, 4, 1, 1]])
  for name in ('distilbert', 'electra'):
    np.testing.assert_array_equal(family_named(name).position_ids(ids, bert), [[0, 1, 2, 3, 4]])


def test_special_tokens_around_a_pair():
  assert family_named('bert').build_pair(101, 102, [7, 8], [9]) == (
      [101, 7, 8, 102, 9, 102], [0, 0, 0, 0, 1, 1])
  assert family_named('roberta').build_pair(0, 2, [7, 8], [9]) == (
      [0, 7, 8, 2, 2, 9, 2], [0] * 7)
  assert family_named('xlm-roberta').build_pair(0, 2, [7, 8], [9]) == (
      [0, 7, 8, 2, 2, 9, 2], [0] * 7)
  for family in families():
    ids, _ = family.build_pair(1, 2, [], [])
    assert len(ids) == family.num_special_tokens_pair


def test_key_map_round_trips_every_encoder_tensor(minilm_dir, minilm):
  """export_encoder_state (key map forwards) then convert_encoder_params (backwards) is the
  identity on every encoder tensor, and names exactly the checkpoint's tensors."""
  import jax
  state = hf_checkpoint.export_encoder_state(minilm.params, 'bert')
  original = hf_checkpoint.load_state_dict(minilm_dir)
  assert set(state) == {k for k in original if not k.endswith('position_ids')}
  shapes = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), minilm.params)
  back, unused = hf_checkpoint.convert_encoder_params(state, shapes, 'bert', 'test')
  assert unused == []
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(minilm.params)):
    np.testing.assert_array_equal(a, b)
