"""Trainable rules: presets, custom rules, split/merge, summary, and the optimizer's view."""

import numpy as np
import optax
import pytest

from adapter_tuning.errors import UsageError
from adapter_tuning.training import trainable as tl
from adapter_tuning.training.optim import decay_mask, learning_rate_schedule

PARAMS = {
    'encoder': {
        'embeddings': {'word_embeddings': {'embedding': np.zeros((10, 4))},
                       'layer_norm': {'scale': np.ones(4), 'bias': np.zeros(4)}},
        'layer_0': {'attention': {'query': {'kernel': np.zeros((4, 2, 2)), 'bias': np.zeros((2, 2))}},
                    'ffn_adapter': {'down': {'kernel': np.zeros((4, 2)), 'bias': np.zeros(2)},
                                    'up': {'kernel': np.zeros((2, 4)), 'bias': np.zeros(4)}},
                    'ffn_layer_norm': {'scale': np.ones(4), 'bias': np.zeros(4)}},
        'layer_1': {'output': {'kernel': np.zeros((4, 4)), 'bias': np.zeros(4)}},
        'pooler': {'kernel': np.zeros((4, 4)), 'bias': np.zeros(4)},
    },
    'head': {'kernel': np.zeros((4, 2)), 'bias': np.zeros(2)},
}


def _trained(rules):
  import flax.traverse_util as tu
  return sorted('/'.join(k) for k, v in tu.flatten_dict(tl.mask(PARAMS, rules)).items() if v)


def test_adapters_preset_trains_adapters_layer_norms_and_head():
  assert _trained(tl.resolve('adapters', 2)) == [
      'encoder/embeddings/layer_norm/bias', 'encoder/embeddings/layer_norm/scale',
      'encoder/layer_0/ffn_adapter/down/bias', 'encoder/layer_0/ffn_adapter/down/kernel',
      'encoder/layer_0/ffn_adapter/up/bias', 'encoder/layer_0/ffn_adapter/up/kernel',
      'encoder/layer_0/ffn_layer_norm/bias', 'encoder/layer_0/ffn_layer_norm/scale',
      'head/bias', 'head/kernel']


def test_peft_preset_trains_method_params_and_head_not_layer_norms():
  assert _trained(tl.resolve('peft', 2)) == [
      'encoder/layer_0/ffn_adapter/down/bias', 'encoder/layer_0/ffn_adapter/down/kernel',
      'encoder/layer_0/ffn_adapter/up/bias', 'encoder/layer_0/ffn_adapter/up/kernel',
      'head/bias', 'head/kernel']


def test_bitfit_preset_trains_every_bias_and_the_head():
  assert _trained(tl.resolve('bitfit', 2)) == [
      'encoder/embeddings/layer_norm/bias', 'encoder/layer_0/attention/query/bias',
      'encoder/layer_0/ffn_adapter/down/bias', 'encoder/layer_0/ffn_adapter/up/bias',
      'encoder/layer_0/ffn_layer_norm/bias', 'encoder/layer_1/output/bias', 'encoder/pooler/bias',
      'head/bias', 'head/kernel']


def test_head_full_and_top_k():
  assert _trained(tl.resolve('head', 2)) == ['head/bias', 'head/kernel']
  assert len(_trained(tl.resolve('full', 2))) == 17
  top1 = _trained(tl.resolve('top:1', 2))
  assert top1 == ['encoder/layer_1/output/bias', 'encoder/layer_1/output/kernel', 'head/bias',
                  'head/kernel']


def test_custom_rules_first_match_wins():
  rules = tl.resolve([('pooler', 'train'), ('^head/', 'freeze'), ('head', 'train'),
                      ('.*', 'freeze')], 2)
  assert _trained(rules) == ['encoder/pooler/bias', 'encoder/pooler/kernel']


@pytest.mark.parametrize('spec,match', [
    ('everything', 'unknown trainable preset'), ('top:x', 'must be an integer'),
    ('top:5', 'has 2 layers'), ([('(', 'train')], 'bad regex'), ([('a', 'maybe')], 'bad trainable rule'),
])
def test_bad_specs(spec, match):
  with pytest.raises(UsageError, match=match):
    tl.resolve(spec, 2)


def test_unmatched_param_is_an_error():
  with pytest.raises(UsageError, match='no trainable rule matches'):
    tl.mask(PARAMS, (('head', 'train'),))


def test_split_merge_roundtrip_and_summary():
  rules = tl.resolve('adapters', 2)
  train, frozen = tl.split(PARAMS, rules)
  assert 'head' in train and 'head' not in frozen
  merged = tl.merge(train, frozen)
  import flax.traverse_util as tu
  assert set(tu.flatten_dict(merged)) == set(tu.flatten_dict(PARAMS))
  counts = tl.summary(PARAMS, rules)
  assert counts['adapter'] == 4 * 2 + 2 + 2 * 4 + 4
  assert counts['head'] == 10
  assert counts['trainable'] == 8 + counts['adapter'] + 8 + counts['head']
  assert 'trainable' in tl.format_summary(counts)


def test_weight_decay_skips_layer_norms_and_biases():
  import flax.traverse_util as tu
  flat = tu.flatten_dict(decay_mask(PARAMS))
  assert flat[('encoder', 'layer_0', 'ffn_adapter', 'down', 'kernel')]
  assert not flat[('encoder', 'layer_0', 'ffn_adapter', 'down', 'bias')]
  assert not flat[('encoder', 'layer_0', 'ffn_layer_norm', 'scale')]
  assert not flat[('encoder', 'embeddings', 'layer_norm', 'scale')]


def test_schedule_warmup_then_linear_decay():
  s = learning_rate_schedule(1.0, 100, 0.1)
  assert float(s(0)) == 0.0
  assert float(s(10)) == pytest.approx(1.0)
  assert float(s(55)) == pytest.approx(0.5)
  assert float(s(100)) == pytest.approx(0.0)
  assert isinstance(optax.adamw(s), optax.GradientTransformation)


def test_rules_from_a_config_file_and_the_command_line():
  """Rule lists pass config validation (a tuple in a config file) and have a command-line
  spelling, 'REGEX=mode;...', split at each item's last '='."""
  from adapter_tuning import config as defaults
  assert tl.resolve('_adapter/=train;^head/=train;.*=freeze', 2) == (
      ('_adapter/', 'train'), ('^head/', 'train'), ('.*', 'freeze'))
  assert tl.resolve('a=b=train', 2) == (('a=b', 'train'),)
  c = defaults.get_config()
  c.data.task, c.data.source = 'demo', 'generated'
  c.trainable = (('_adapter/', 'train'), ('.*', 'freeze'))
  defaults.validate(c)
  c.trainable = 3
  with pytest.raises(UsageError, match='config.trainable must be a preset name or'):
    defaults.validate(c)
