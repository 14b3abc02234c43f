"""SQuAD through the same trainer: windows, span head, EM/F1 and predictions.json."""

import json
import re

from adapter_tuning.data import demo
from adapter_tuning.training.trainer import train_and_evaluate
from configs import squad as squad_config
from conftest import SQUAD_DEV


def test_squad_loop_writes_official_predictions(tmp_path, capsys):
  base = demo.ensure_checkpoint(tmp_path / 'base')
  config = squad_config.get_config()
  config.model.checkpoint = str(base)
  config.model.adapter.size = 8
  config.data.source = 'squad_json'
  config.data.train_file = str(SQUAD_DEV)
  config.data.eval_file = str(SQUAD_DEV)
  config.data.holdout_articles = 0.2
  config.data.max_seq_length = 64
  config.data.doc_stride = 24
  config.data.max_query_length = 16
  config.data.max_train_examples = 96
  config.data.max_eval_examples = 40
  config.batch_size = 16
  config.eval_batch_size = 32
  config.num_train_steps = 4
  config.log_every_steps = 2
  config.progress_bar = False
  metrics = train_and_evaluate(config, tmp_path / 'run')
  assert set(metrics) == {'eval/exact_match', 'eval/f1'}
  assert 0 <= metrics['eval/exact_match'] <= metrics['eval/f1'] <= 100
  predictions = json.loads((tmp_path / 'run' / 'predictions.json').read_text())
  assert len(predictions) == 40 and all(isinstance(v, str) for v in predictions.values())
  meta = json.loads((tmp_path / 'run' / 'adapter' / 'config.json').read_text())
  assert meta['head'] == 'span'
  # The span batches' shapes were all compiled ahead (precompile.py): no batch fell back.
  assert re.search(r'[1-9]\d* step shapes compiled ahead, 0 batches not', capsys.readouterr().out)


def test_same_file_without_holdout_is_refused(tmp_path):
  import pytest
  from adapter_tuning.errors import UsageError
  config = squad_config.get_config()
  config.model.checkpoint = str(demo.ensure_checkpoint(tmp_path / 'base'))
  config.data.source = 'squad_json'
  config.data.train_file = config.data.eval_file = str(SQUAD_DEV)
  config.data.max_seq_length = 64
  with pytest.raises(UsageError, match='holdout_articles'):
    train_and_evaluate(config, tmp_path / 'run')
