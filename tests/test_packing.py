"""Sequence packing (data/packing.py, Encoder(segments=...)): packed == unpacked per example.

Examples of different lengths are packed into rows; for every family (BERT's absolute
positions, RoBERTa's offset positions, DeBERTa's relative attention, ModernBERT's rotary and
windowed layers) and every way of reading a sentence vector (pooler, cls, mean), with
adapters and with prefix tuning, each example's logits must equal its logits alone in an
unpacked, padded batch to 1e-5, and the losses of both layouts must agree.
"""

import numpy as np
import pytest

from adapter_tuning import load_pretrained, peft
from adapter_tuning.data import packing
from adapter_tuning.models.heads import TaskModel
from adapter_tuning.peft.bottleneck import AdapterConfig
from adapter_tuning.peft.prefix import PrefixConfig
from adapter_tuning.training import steps
from test_deberta import V2, V3, _deberta
from test_families_more import _xlm_roberta
from test_modernbert import GEOMETRIES, _modernbert

TEXTS = ['a', 'the quick brown fox jumps over the lazy dog', 'hello there', 'packing rows',
         'one more sentence that is a little longer than the others in this batch', 'ok',
         'short', 'adapters are small']
PAIRS = ['b', 'what jumps?', 'general kenobi', None, 'and its pair', None, 'x y z', 'yes']


def _unpacked_and_packed(tokenizer, capacity=32):
  ids, types = tokenizer.tokenize(TEXTS, [p or '' for p in PAIRS], max_length=capacity)
  unpacked = tokenizer.pad(ids, types, capacity)
  examples = np.arange(len(ids))
  counts = packing.fit_row_counts([examples], ids, capacity)
  packed = packing.pack(examples, ids, types, np.zeros(len(ids)), capacity, counts)
  assert packed['input_ids'].shape[0] < len(ids)  # several examples per row
  return unpacked, packed


def _logits(model, params, batch, packed: bool):
  segments = {k: batch[k] for k in packing.SEGMENT_KEYS} if packed else None
  return np.asarray(model.apply({'params': params}, batch['input_ids'],
                                batch['attention_mask'], batch['token_type_ids'],
                                segments=segments))


def _check(pre, adapter=None, pooling='pooler', head='classification'):
  unpacked, packed = _unpacked_and_packed(pre.tokenizer)
  model = TaskModel(pre.config, adapter, head, 3, pooling=pooling)
  rng = np.random.default_rng(0)
  params = {'encoder': pre.params, 'head': {
      'kernel': rng.normal(0, 0.2, (pre.config.hidden_size, 3)).astype(np.float32),
      'bias': np.zeros(3, np.float32)}}
  alone = _logits(model, params, unpacked, packed=False)
  together = _logits(model, params, packed, packed=True)
  np.testing.assert_allclose(together, alone, atol=1e-5, rtol=0)
  assert np.abs(alone).max() > 0.1
  return model, params, unpacked, packed


@pytest.mark.parametrize('pooling', ['pooler', 'cls', 'mean'])
def test_minilm_with_adapters(minilm_dir, pooling):
  adapter = AdapterConfig(size=8, init_scale=0.1)
  _check(load_pretrained(minilm_dir, adapter), adapter, pooling)


def test_minilm_with_prefix_tuning_and_regression_loss(minilm_dir):
  """Prefix positions are seen by every example of a row; the regression loss over the
  examples of the packed batch is the unpacked batch's."""
  config = peft.combine([PrefixConfig(length=4), AdapterConfig(size=8, init_scale=0.1)])
  model, params, unpacked, packed = _check(load_pretrained(minilm_dir, config), config, 'mean',
                                           head='regression')
  labels = np.linspace(-1, 1, len(TEXTS)).astype(np.float32)
  losses = [float(steps.task_loss('regression', _logits(model, params, b, p)[:, :1],
                                  {'labels': labels}))
            for b, p in ((unpacked, False), (packed, True))]
  assert losses[0] == pytest.approx(losses[1], abs=1e-5)


BUILDERS = {
    'xlm-roberta': lambda d, minilm: _xlm_roberta(d)[1],  # positions from pad_token_id + 1
    'deberta-v3': lambda d, minilm: _deberta(d, minilm, **V3)[1],
    'deberta-v2': lambda d, minilm: _deberta(d, minilm, **V2)[1],
    'modernbert': lambda d, minilm: _modernbert(d, minilm, **GEOMETRIES['biased_mean'])[1],
}


@pytest.mark.parametrize('family', sorted(BUILDERS))
def test_families(tmp_path, minilm_dir, family):
  directory = BUILDERS[family](tmp_path, minilm_dir)
  adapter = AdapterConfig(size=4, init_scale=0.1)
  _check(load_pretrained(directory, adapter), adapter, 'pooler')


def test_first_fit_and_pack_layout():
  lengths = np.asarray([5, 3, 8, 2, 4])
  assert packing.first_fit(lengths, 10) == [[2, 3], [0, 4], [1]]  # longest first
  ids = [np.full(n, i + 10) for i, n in enumerate(lengths)]
  batch = packing.pack(np.arange(5), ids, [np.zeros(n) for n in lengths], np.arange(5), 10,
                       (2, 4))
  assert batch['input_ids'].shape == (4, 10)  # 3 rows rounded up to the static count 4
  for e, n in enumerate(lengths):
    row, start = batch['example_row'][e], batch['example_start'][e]
    assert (batch['input_ids'][row, start:start + n] == e + 10).all()
    assert len(set(batch['segment_ids'][row, start:start + n])) == 1
  assert batch['attention_mask'].sum() == lengths.sum()
  assert not batch['attention_mask'][3].any()  # the filler row


def test_packed_evaluation_equals_bucketed_and_a_packed_run_trains(tmp_path):
  """run_split with a packed layout gives every example the bucketed prediction, in split
  order; and a short packed training run on the GLUE TSVs writes a working artifact."""
  import jax
  from adapter_tuning.data import demo
  from adapter_tuning.interop import artifact
  from adapter_tuning.training import evaluation, parallel
  from adapter_tuning.training.trainer import train_and_evaluate
  from conftest import GLUE_DIR
  from helpers import tiny_config
  base = demo.ensure_checkpoint(tmp_path / 'base')
  config = tiny_config(base, 'glue/rte', **{
      'data.source': 'glue_dir', 'data.data_dir': str(GLUE_DIR), 'data.packing': True,
      'data.max_train_examples': 64, 'data.max_eval_examples': 24, 'batch_size': 16})
  result = train_and_evaluate(config, tmp_path / 'run')
  assert 0 <= result['eval/accuracy'] <= 1, result
  meta, trained = artifact.load(tmp_path / 'run' / 'adapter')
  pre = load_pretrained(base, AdapterConfig.from_any(meta['adapter']))
  model = TaskModel(pre.config, pre.adapter, 'classification', 2)
  params = {'encoder': pre.params, 'head': trained['head']}
  eval_step = jax.jit(steps.make_eval_step(model, 'classification'))
  ids, types = pre.tokenizer.tokenize(TEXTS, [p or '' for p in PAIRS], max_length=32)
  split = type('Split', (), {'input_ids': ids, 'token_type_ids': types,
                             '__len__': lambda self: len(ids)})()
  shard = parallel.batch_sharded(parallel.make_mesh())
  bucketed = evaluation.run_split(eval_step, params, split, 8, (16, 32), shard)
  layout = packing.eval_layout(ids, 8, 32, 4, 1)
  packed = evaluation.run_split(eval_step, params, split, 8, layout, shard)
  assert bucketed.keys() == packed.keys()
  for key in bucketed:
    np.testing.assert_allclose(bucketed[key], packed[key], atol=1e-5, rtol=0)
