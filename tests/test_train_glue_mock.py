"""The whole loop on mock TFDS GLUE data, one task of each kind (the real builders' features)."""

import json

import pytest
import tensorflow_datasets as tfds

from adapter_tuning.data import demo
from adapter_tuning.training.trainer import train_and_evaluate
from helpers import tiny_config


@pytest.fixture(scope='module')
def tiny_base(tmp_path_factory):
  return demo.ensure_checkpoint(tmp_path_factory.mktemp('base') / 'tiny')


@pytest.mark.parametrize('task,keys', [
    ('glue/sst2', ['eval/accuracy']),                           # single sentence
    ('glue/rte', ['eval/accuracy']),                            # sentence pair
    ('glue/stsb', ['eval/pearson', 'eval/spearman']),           # regression
    ('glue/mnli', ['eval/accuracy', 'eval/validation_mismatched/accuracy']),  # two eval splits
    ('glue/mrpc', ['eval/f1', 'eval/accuracy']),
])
def test_whole_loop_on_mock_tfds(tmp_path, tiny_base, task, keys):
  import tensorflow_datasets.text  # noqa: F401  registers the glue builder without TF
  config = tiny_config(tiny_base, task, **{
      'data.source': 'tfds', 'batch_size': 8, 'eval_batch_size': 16, 'num_train_steps': 6,
      'log_every_steps': 3})
  with tfds.testing.mock_data(num_examples=40):
    metrics = train_and_evaluate(config, tmp_path)
  for key in keys:
    assert key in metrics, metrics
    assert metrics[key] == metrics[key]  # not NaN
  meta = json.loads((tmp_path / 'adapter' / 'config.json').read_text())
  assert meta['task'] == task
  assert meta['head'] == ('regression' if task == 'glue/stsb' else 'classification')
  assert (tmp_path / 'metrics.jsonl').exists()
