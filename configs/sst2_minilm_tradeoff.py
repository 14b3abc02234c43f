"""A parameter/performance trade-off sweep that runs on a CPU: MiniLM on GLUE SST-2.

  python -m launch.sweep --config configs/sst2_minilm_tradeoff.py --workdir runs/tradeoff

Uses ../shared (the MiniLM checkpoint and the GLUE TSVs); 200 steps of 32 per run.
"""

from adapter_tuning import config as defaults


def get_config():
  config = defaults.get_config()
  config.data.task = 'glue/sst2'
  config.model.checkpoint = '../shared/models/all-MiniLM-L6-v2'
  config.data.source = 'glue_dir'
  config.data.data_dir = '../shared/data/glue'
  config.num_train_steps = 200
  config.log_every_steps = 50
  config.progress_bar = False
  return config


def sweep():
  """Adapters by size, top-k fine-tuning, full fine-tuning and the head alone."""
  no_adapter = {'model.adapter.placement': 'none'}
  return ([{'trainable': 'adapters', 'model.adapter.size': m, 'learning_rate': 1e-3}
           for m in (8, 64, 256)] +
          [{'trainable': 'top:1', 'learning_rate': 1e-4, **no_adapter},
           {'trainable': 'full', 'learning_rate': 5e-5, **no_adapter},
           {'trainable': 'head', 'learning_rate': 1e-3, **no_adapter}])
