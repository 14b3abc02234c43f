"""Every family through every PEFT method, the trainer and mixed-task predict.

Per family, all methods at once (Houlsby adapters, LoRA at every projection, IA³, prefix
tuning; DeBERTa refuses prefixes) must get finite, non-zero gradients, and zero-initialised
adapters must be the base exactly with 2md + d + m parameters each.

For each family beyond BERT a tiny random checkpoint (the parity tests' builders) is the
base of two short real runs on the GLUE TSVs in ../shared: Houlsby adapters on SST-2 and
LoRA on RTE. Their artifacts are then served together by `predict` in one mixed batch,
which must give each row what its artifact gives alone.
"""

import flax.traverse_util as tu
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adapter_tuning import load_pretrained, peft
from adapter_tuning.interop import artifact
from adapter_tuning.models.heads import TaskModel
from adapter_tuning.peft.bottleneck import AdapterConfig, adapter_param_count
from adapter_tuning.peft.ia3 import IA3Config
from adapter_tuning.peft.lora import LoRAConfig
from adapter_tuning.peft.prefix import PrefixConfig
from adapter_tuning.predict import predict_rows
from adapter_tuning.serving.multi_adapter import MultiTaskModel
from adapter_tuning.training.trainer import train_and_evaluate
from conftest import GLUE_DIR
from helpers import tiny_config
from test_deberta import V3, _deberta
from test_families_more import _distilbert, _electra, _xlm_roberta
from test_modernbert import GEOMETRIES, _modernbert

BUILDERS = {
    'xlm-roberta': lambda d, minilm: _xlm_roberta(d)[1],
    'distilbert': lambda d, minilm: _distilbert(d, minilm, sinusoidal=True)[1],
    'electra': lambda d, minilm: _electra(d, minilm, embedding_size=16)[1],
    'deberta-v2': lambda d, minilm: _deberta(d, minilm, **V3)[1],
    'modernbert': lambda d, minilm: _modernbert(d, minilm, **GEOMETRIES['base'])[1],
}
METHODS = {  # artifact name -> (task, config overrides)
    'sst2_houlsby': ('glue/sst2', {}),
    'rte_lora': ('glue/rte', {'model.adapter.placement': 'none', 'model.lora.rank': 4,
                              'model.lora.targets': 'query,value,output'}),
}


def _train(base, root, name):
  task, overrides = METHODS[name]
  config = tiny_config(base, task, **{
      'data.source': 'glue_dir', 'data.data_dir': str(GLUE_DIR), 'data.max_train_examples': 16,
      'data.max_eval_examples': 8, 'num_train_steps': 1, 'batch_size': 8, 'data.num_buckets': 1,
      'learning_rate': 1e-3, **overrides})
  train_and_evaluate(config, root / name)
  return root / name / 'adapter'


@pytest.mark.parametrize('family', sorted(BUILDERS))
def test_family_trains_and_serves_mixed_tasks(tmp_path, minilm_dir, family):
  (tmp_path / 'base').mkdir()
  base = BUILDERS[family](tmp_path / 'base', minilm_dir)
  artifacts = {name: _train(base, tmp_path, name) for name in METHODS}
  meta, trained = artifact.load(artifacts['rte_lora'])
  assert any('_lora' in '/'.join(k) for k in _paths(trained))
  mixed = MultiTaskModel(list(artifacts.values()))
  assert mixed.pretrained.config.family == family
  rows = [{'text': f'a short sentence number {i}', 'text_pair':
           None if i % 2 == 0 else 'and a hypothesis', 'task':
           'glue/sst2' if i % 2 == 0 else 'glue/rte'} for i in range(8)]
  together = predict_rows(mixed, rows, batch_size=8, max_seq_length=32)
  for name, path in artifacts.items():
    alone_model = MultiTaskModel([path])
    task = METHODS[name][0]
    mine = [(row, out) for row, out in zip(rows, together) if row['task'] == task]
    alone = predict_rows(alone_model, [row for row, _ in mine], 8, 32)
    for (_, out), ref in zip(mine, alone):
      assert out['label'] == ref['label']
      np.testing.assert_allclose(out['logits'], ref['logits'], atol=1e-5, rtol=0)


def _paths(tree, prefix=()):
  for key, value in tree.items():
    if isinstance(value, dict):
      yield from _paths(value, prefix + (key,))
    else:
      yield prefix + (key,)


def _all_methods(family):
  parts = [AdapterConfig(size=4, placement='houlsby', init_scale=0.1),
           LoRAConfig(rank=2, targets=('query', 'key', 'value', 'attention_output',
                                       'intermediate', 'output')),
           IA3Config()]
  if family != 'deberta-v2':  # refused there, one line (tests/test_deberta.py)
    parts.append(PrefixConfig(length=3))
  return peft.combine(parts)


@pytest.mark.parametrize('family', sorted(BUILDERS))
def test_every_method_gets_gradients_and_zero_adapters_are_the_base(tmp_path, minilm_dir,
                                                                   family):
  base = BUILDERS[family](tmp_path, minilm_dir)
  config = _all_methods(family)
  ours = load_pretrained(base, config)
  batch = ours.encode(['a sentence to adapt', 'another one, longer than the first'],
                      ['its pair', 'and one more'], max_length=32)
  width = ours.config.hidden_size
  model = TaskModel(ours.config, config, 'classification', 2, pooling='cls')
  head = {'kernel': np.ones((width, 2), np.float32), 'bias': np.zeros(2, np.float32)}
  args = (batch['input_ids'], batch['attention_mask'], batch['token_type_ids'])
  loss = lambda p: jnp.sum(model.apply({'params': {'encoder': p, 'head': head}}, *args) ** 2)
  grads = tu.flatten_dict(jax.grad(loss)(ours.params))
  for part in peft.parts(config):
    marker = peft.method_of(part).param_marker
    mine = [g for k, g in grads.items() if any(marker in name for name in k)]
    assert mine and all(np.isfinite(g).all() for g in mine), marker
    assert max(np.abs(g).max() for g in mine) > 0, marker
  adapters = [v for k, v in tu.flatten_dict(ours.params).items()
              if any(name.endswith('_adapter') for name in k)]
  assert sum(v.size for v in adapters) == (
      ours.config.num_layers * 2 * adapter_param_count(width, 4))
  zero = load_pretrained(base, AdapterConfig(size=4, init_scale=0.0))
  plain = load_pretrained(base)
  np.testing.assert_allclose(zero.encode(['a sentence'], None, 16)['last_hidden_state'],
                             plain.encode(['a sentence'], None, 16)['last_hidden_state'],
                             atol=1e-6, rtol=0)
