"""The paper's GLUE search space (Houlsby et al. 2019, section 3.2), as config overrides."""

import itertools

LEARNING_RATES = (3e-5, 3e-4, 3e-3)
EPOCHS = (3.0, 20.0)
ADAPTER_SIZES = (8, 64, 256)


def paper_grid(seeds=(0,)):
  """18 adapter runs per seed, plus full fine-tuning and top-k baselines at their usual lrs."""
  runs = []
  for lr, epochs, size, seed in itertools.product(LEARNING_RATES, EPOCHS, ADAPTER_SIZES, seeds):
    runs.append({'trainable': 'adapters', 'model.adapter.size': size, 'learning_rate': lr,
                 'num_epochs': epochs, 'seed': seed})
  for lr, seed in itertools.product((3e-5, 5e-5), seeds):
    runs.append({'trainable': 'full', 'model.adapter.placement': 'none', 'learning_rate': lr,
                 'num_epochs': 3.0, 'seed': seed})
  return runs
