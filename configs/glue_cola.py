"""GLUE COLA with Houlsby adapters on BERT-base: the paper's recipe (m=64, AdamW, 10% warm-up)."""

from configs import common
from configs import glue_sweep


def get_config():
  config = common.get_config()
  config.data.task = 'glue/cola'
  return config


def sweep():
  """The paper's GLUE grid: lr x epochs x adapter size (best on validation)."""
  return glue_sweep.paper_grid()
