"""SQuAD v1.1 with Houlsby adapters on BERT-base (paper-style: length 384, stride 128).

Offline, train and evaluate on held-out articles of one SQuAD-format file:
  --config.data.source=squad_json --config.data.train_file=../shared/data/squad/dev-v1.1.json
  --config.data.eval_file=../shared/data/squad/dev-v1.1.json --config.data.holdout_articles=0.2
"""

from adapter_tuning import config as defaults


def get_config():
  config = defaults.get_config()
  config.data.task = 'squad'
  config.data.source = 'tfds'
  config.data.max_seq_length = 384
  config.data.doc_stride = 128
  config.data.max_query_length = 64
  config.data.max_answer_length = 30
  config.batch_size = 32
  config.learning_rate = 1e-3
  config.num_epochs = 3.0
  return config


def sweep():
  return [{'model.adapter.size': size, 'learning_rate': lr}
          for size in (8, 64, 256) for lr in (3e-4, 1e-3)]
