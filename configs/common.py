"""Every config key lives in adapter_tuning/config.py; this name stays for existing configs."""

from adapter_tuning.config import get_config, sweep  # noqa: F401
