"""GLUE QQP with Houlsby adapters on BERT-base: the paper's recipe (m=64, AdamW, 10% warm-up)."""

from adapter_tuning import config as defaults


def get_config():
  config = defaults.get_config()
  config.data.task = 'glue/qqp'
  return config


def sweep():
  """The paper's GLUE grid: lr x epochs x adapter size (best on validation)."""
  return defaults.paper_grid()
