"""The paper's GLUE search space lives in adapter_tuning/config.py; this name stays for configs."""

from adapter_tuning.config import paper_grid  # noqa: F401
