"""The embedded demo: no network, nothing from ../shared, < 2 minutes on 2 CPU cores.

A tiny BERT-shaped checkpoint (random weights, frozen) and a text task are generated in
the workdir; Houlsby adapters + layer norms + head learn to find the opinion word.
"""

from adapter_tuning import config as defaults


def get_config():
  config = defaults.get_config()
  config.model.checkpoint = ''     # '' + task demo: generate the tiny base in the workdir
  config.model.adapter.size = 32
  config.data.task = 'demo'
  config.data.source = 'generated'
  config.data.max_seq_length = 32
  config.data.num_buckets = 2
  config.learning_rate = 3e-3
  config.num_epochs = 3.0
  config.log_every_steps = 25
  config.checkpoint_every_steps = 100
  return config


def sweep():
  """A tiny sweep for trying launch/sweep.py: two adapter sizes and a head-only baseline."""
  return [{'model.adapter.size': 8}, {'model.adapter.size': 32},
          {'trainable': 'head', 'model.adapter.placement': 'none'}]
