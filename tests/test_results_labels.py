"""Sweep result labels: every PEFT method the model keys switch on is named."""


def test_method_labels_name_every_peft_method():
  from launch.results import method_of
  none = {'adapter': {'placement': 'none'}}
  assert method_of({'trainable': 'adapters', 'model': {}}) == 'adapters'
  assert method_of({'trainable': 'peft', 'model': {**none, 'lora': {'rank': 8}}}) == 'lora (peft)'
  assert method_of({'trainable': 'peft', 'model': {**none, 'prefix': {'length': 30}}}) == \
      'prefix (peft)'
  mam = {'adapter': {'placement': 'parallel_ffn', 'scaling': 4.0}, 'prefix': {'length': 30}}
  assert method_of({'trainable': 'peft', 'model': mam}) == 'parallel_ffn x4+prefix (peft)'
  assert method_of({'trainable': 'bitfit', 'model': none}) == 'bitfit'
