"""Validates a resolved config before anything is loaded: one line per mistake, with the fix.

ml_collections already rejects unknown keys and wrong types on command-line overrides;
this checks values (ranges, combinations) and types of keys set in config files.
"""

from __future__ import annotations

import ml_collections

from adapter_tuning.errors import UsageError
from adapter_tuning.task_model import POOLINGS


def _check_types(config: ml_collections.ConfigDict, reference: ml_collections.ConfigDict,
                 prefix: str = ''):
  for key in config.keys():
    name = f'{prefix}{key}'
    if key not in reference:
      raise UsageError(f'unknown config key {name!r}; see configs/common.py for valid keys')
    value, ref = config[key], reference[key]
    if isinstance(ref, ml_collections.ConfigDict):
      if not isinstance(value, ml_collections.ConfigDict):
        raise UsageError(f'config.{name} must be a group of keys, got {value!r}')
      _check_types(value, ref, name + '.')
    elif isinstance(ref, bool) and not isinstance(value, bool):
      raise UsageError(f'config.{name} must be true/false, got {value!r}')
    elif isinstance(ref, (int, float)) and not isinstance(ref, bool):
      if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UsageError(f'config.{name} must be a number, got {value!r}')
      if isinstance(ref, int) and not isinstance(ref, bool) and isinstance(value, float) \
          and not value.is_integer():
        raise UsageError(f'config.{name} must be an integer, got {value!r}')
    elif isinstance(ref, str) and not isinstance(value, str):
      raise UsageError(f'config.{name} must be a string, got {value!r}')


def validate(config: ml_collections.ConfigDict):
  from configs import common
  _check_types(config, common.get_config())
  a = config.model.adapter
  checks = [
      (a.placement == 'none' or a.size > 0,
       f'model.adapter.size must be > 0, got {a.size}; the paper uses 8, 64 or 256'),
      (config.learning_rate > 0, f'learning_rate must be > 0, got {config.learning_rate}'),
      (0 <= config.warmup_ratio <= 1, f'warmup_ratio must be in [0, 1], got {config.warmup_ratio}'),
      (config.weight_decay >= 0, f'weight_decay must be >= 0, got {config.weight_decay}'),
      (config.batch_size > 0, f'batch_size must be > 0, got {config.batch_size}'),
      (config.eval_batch_size > 0, f'eval_batch_size must be > 0, got {config.eval_batch_size}'),
      (config.num_train_steps >= 0, 'num_train_steps must be >= 0 (0 = use num_epochs)'),
      (config.num_train_steps > 0 or config.num_epochs > 0,
       'set num_train_steps > 0 or num_epochs > 0'),
      (config.data.max_seq_length >= 8,
       f'data.max_seq_length must be >= 8, got {config.data.max_seq_length}'),
      (config.data.num_buckets >= 1, 'data.num_buckets must be >= 1'),
      (config.data.bucket_shape_cost >= 0, 'data.bucket_shape_cost must be >= 0'),
      (config.log_every_steps > 0, 'log_every_steps must be > 0'),
      (config.eval_every_steps >= 0, 'eval_every_steps must be >= 0 (0 = only at the end)'),
      (config.checkpoint_every_steps > 0, 'checkpoint_every_steps must be > 0'),
      (config.model.dtype in ('float32', 'bfloat16'),
       f'model.dtype must be float32 or bfloat16, got {config.model.dtype!r}'),
      (config.model.head.pooling in POOLINGS,
       f'model.head.pooling must be one of {", ".join(POOLINGS)}, got '
       f'{config.model.head.pooling!r}'),
      (config.grad_clip_norm >= 0, 'grad_clip_norm must be >= 0 (0 = off)'),
  ]
  for ok, message in checks:
    if not ok:
      raise UsageError(message)
  _check_task(config.data)


def _check_task(data):
  """Fails on a bad task/source before anything slow (checkpoint, tokenisation) happens."""
  from adapter_tuning.data.glue import get_task
  from adapter_tuning.task_data import SOURCES
  if data.source not in SOURCES:
    raise UsageError(f'unknown data.source {data.source!r}; use one of {", ".join(SOURCES)}')
  if data.task.startswith('glue/'):
    get_task(data.task)
  elif data.task not in ('squad', 'text', 'demo'):
    raise UsageError(f'unknown data.task {data.task!r}; use glue/<task>, squad, text or demo')
