"""Adapters: exact parameter counts, identity at init_scale=0, near-identity by default."""

import flax.traverse_util as tu
import numpy as np
import pytest

from adapter_tuning import load_pretrained
from adapter_tuning.errors import UsageError
from adapter_tuning.peft.bottleneck import AdapterConfig, adapter_param_count

TEXTS = ['a short sentence', 'another, somewhat longer sentence with more tokens in it']


def _adapter_params(params):
  return {'/'.join(k): v for k, v in tu.flatten_dict(params).items()
          if any(p.endswith('_adapter') for p in k)}


@pytest.mark.parametrize('placement,per_layer', [('houlsby', 2), ('pfeiffer', 1), ('none', 0)])
def test_parameter_count_per_placement(minilm_dir, placement, per_layer):
  m = 16
  pre = load_pretrained(minilm_dir, adapter={'size': m, 'placement': placement})
  adapters = _adapter_params(pre.params)
  d, layers = pre.config.hidden_size, pre.config.num_layers
  assert sum(v.size for v in adapters.values()) == layers * per_layer * adapter_param_count(d, m)
  assert adapter_param_count(d, m) == 2 * m * d + d + m
  assert all('adapter' in k for k in adapters)


def test_init_scale_zero_is_exactly_the_base(minilm_dir, minilm):
  pre = load_pretrained(minilm_dir, adapter={'size': 8, 'init_scale': 0.0})
  base = minilm.encode(TEXTS)
  ours = pre.encode(TEXTS)
  np.testing.assert_array_equal(ours['last_hidden_state'], base['last_hidden_state'])
  np.testing.assert_array_equal(ours['pooled'], base['pooled'])


def test_original_ln_before_with_zero_adapters_is_exactly_the_base(minilm_dir, minilm):
  """LN(x + h + up(f(down(LN(x + h))))): the LayerNorm runs twice, but the first result
  only feeds the adapter and h (not LN(x + h)) is the residual, so zero adapters leave
  LN(x + h): exactly the base (AdapterHub's residual_before_ln=True, SeqBnConfig's
  default). With random adapters the flag changes the output."""
  pre = load_pretrained(minilm_dir, adapter={'size': 8, 'init_scale': 0.0,
                                             'original_ln_before': True})
  base = minilm.encode(TEXTS)
  ours = pre.encode(TEXTS)
  np.testing.assert_array_equal(ours['last_hidden_state'], base['last_hidden_state'])
  np.testing.assert_array_equal(ours['pooled'], base['pooled'])
  on = load_pretrained(minilm_dir, adapter={'size': 8, 'init_scale': 0.1,
                                            'original_ln_before': True})
  off = load_pretrained(minilm_dir, adapter={'size': 8, 'init_scale': 0.1})
  assert np.abs(on.encode(TEXTS)['last_hidden_state']
                - off.encode(TEXTS)['last_hidden_state']).max() > 1e-3


def test_default_init_is_near_identity(minilm_dir, minilm):
  pre = load_pretrained(minilm_dir, adapter={'size': 64})
  base = minilm.encode(TEXTS)['last_hidden_state']
  ours = pre.encode(TEXTS)['last_hidden_state']
  diff = np.abs(ours - base).max()
  assert 0 < diff < 0.05, diff
  weights = [v for k, v in _adapter_params(pre.params).items() if k.endswith('kernel')]
  assert all(np.abs(w).max() <= 2e-3 + 1e-9 for w in weights)  # truncated at 2 std
  biases = [v for k, v in _adapter_params(pre.params).items() if k.endswith('bias')]
  assert all(np.all(b == 0) for b in biases)


def test_layers_restricts_where_adapters_exist(minilm_dir):
  pre = load_pretrained(minilm_dir, adapter={'size': 8, 'layers': [4, 5]})
  layers = {k.split('/')[0] for k in _adapter_params(pre.params)}
  assert layers == {'layer_4', 'layer_5'}


def test_adapter_seed_changes_init(minilm_dir):
  a = _adapter_params(load_pretrained(minilm_dir, adapter={'size': 8, 'seed': 0}).params)
  b = _adapter_params(load_pretrained(minilm_dir, adapter={'size': 8, 'seed': 1}).params)
  key = 'layer_0/ffn_adapter/down/kernel'
  assert not np.array_equal(a[key], b[key])


@pytest.mark.parametrize('bad,match', [
    ({'size': 0}, 'size must be a positive integer'),
    ({'size': -4}, 'size must be a positive integer'),
    ({'placement': 'sideways'}, 'unknown adapter placement'),
    ({'activation': 'softsign'}, 'unknown adapter activation'),
    ({'sise': 8}, 'unknown adapter config keys'),
    ({'original_ln_before': 'yes'}, 'original_ln_before must be true or false'),
])
def test_bad_adapter_config(bad, match):
  with pytest.raises(UsageError, match=match):
    AdapterConfig.from_any(bad)


def test_adapter_layers_out_of_range(minilm_dir):
  with pytest.raises(UsageError, match='do not exist'):
    load_pretrained(minilm_dir, adapter={'size': 8, 'layers': [6]})
