"""The run's folder: one run per workdir, and `--overwrite` as the only way to start over.

A workdir holds `config.json` (the resolved config), `checkpoints/`, `metrics.jsonl`,
`tensorboard/`, predictions and the `adapter/` artifact. Rerunning the same command resumes;
a different config in the same folder is refused (mixing two runs would corrupt both).
"""

from __future__ import annotations

import json
import pathlib
import shutil

import jax

from adapter_tuning.errors import UsageError

RUN_FILES = ('metrics.jsonl', 'predictions*.json*', 'config.json')
RUN_DIRS = ('checkpoints', 'tensorboard', 'adapter')


def prepare(config, workdir, overwrite: bool) -> tuple[pathlib.Path, str]:
  """Checks (or clears, with --overwrite) the folder; returns (absolute path, config JSON)."""
  workdir = pathlib.Path(workdir).absolute()
  config_json = config.to_json_best_effort(indent=2, sort_keys=True)
  if workdir.exists():
    check_same_run(workdir, config_json, overwrite)
    if overwrite and jax.process_index() == 0:
      clear_run(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  return workdir, config_json


def check_same_run(workdir: pathlib.Path, config_json: str, overwrite: bool):
  """Refuses to mix two different runs in one workdir (that would corrupt both)."""
  path = workdir / 'config.json'
  if not path.exists() or overwrite:
    return
  old, new = _flat(json.loads(path.read_text())), _flat(json.loads(config_json))
  # Keys on one side only are schema changes between versions, not a different run.
  diff = sorted(k for k in set(old) & set(new) if old[k] != new[k])
  if diff:
    raise UsageError(f'{workdir} holds a run with a different config (differs in: '
                     f'{", ".join(diff[:5])}); use a new --workdir, or pass --overwrite to '
                     'start that run over')


def clear_run(workdir: pathlib.Path):
  """--overwrite: the user asked to start over, so the old run's state goes."""
  for name in RUN_DIRS:
    shutil.rmtree(workdir / name, ignore_errors=True)
  for pattern in RUN_FILES:
    for f in workdir.glob(pattern):
      f.unlink()


def _flat(d, prefix=''):
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat(v, f'{prefix}{k}.'))
    else:
      out[prefix + k] = v
  return out
