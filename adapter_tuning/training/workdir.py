"""The run's folder: one run per workdir, and `--overwrite` as the only way to start over.

A workdir holds `config.json` (the resolved config), `checkpoints/`, `metrics.jsonl`,
`tensorboard/`, predictions and the `adapter/` artifact. Rerunning the same command resumes;
a different config in the same folder is refused (mixing two runs would corrupt both), and
so is a second run while one is alive in it (`locked`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pathlib
import shutil
import socket

import jax
import numpy as np

from adapter_tuning import fileio
from adapter_tuning.errors import UsageError

RUN_FILES = ('metrics.jsonl', 'predictions*.json*', 'config.json')
RUN_DIRS = ('checkpoints', 'tensorboard', 'adapter', 'adapter_best')


LOCK_FILE = '.lock'
NOT_IDENTITY = ('mesh.',)  # config keys a resumed run may change (`check_same_run`)


@contextlib.contextmanager
def locked(workdir):
  """Holds an exclusive OS lock on `workdir` for the run's whole life.

  `fcntl.flock` on workdir/.lock: the kernel drops it when the process dies, so SIGKILL
  never leaves a stale lock, and a second run on the same folder (a double launch, a
  scheduler requeue while the old job still runs) stops at once, naming the holder,
  before it reads or writes anything of the run. On several processes, process 0 holds
  the lock for the run and tells the others whether it got it.
  """
  workdir = pathlib.Path(workdir).absolute()
  handle, holder = None, 'another run'
  if jax.process_index() == 0:
    workdir.mkdir(parents=True, exist_ok=True)
    handle, holder = _try_lock(workdir / LOCK_FILE)
  got = handle is not None if jax.process_index() == 0 else True
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    got = bool(multihost_utils.broadcast_one_to_all(np.int32(got)))
  if not got:
    raise UsageError(f'{workdir} is in use by {holder}; wait for it to end or stop it, or use '
                     'another --workdir')
  try:
    yield workdir
  finally:
    if handle is not None:
      handle.close()  # closing the file releases the lock


def _try_lock(path: pathlib.Path):
  """(open file holding the lock, None) or (None, 'PID n on host h' of the holder)."""
  handle = open(path, 'a+', encoding='utf-8')
  try:
    fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
  except OSError:
    handle.seek(0)
    holder = handle.read().strip() or 'another process'
    handle.close()
    return None, holder
  handle.seek(0)
  handle.truncate()
  handle.write(f'PID {os.getpid()} on host {socket.gethostname()}')
  handle.flush()
  return handle, None


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
  recorded = fileio.read_json(path, 'it is the resolved config of the run in this workdir: '
                             'move the folder aside, or pass --overwrite to start over')
  old, new = _flat(recorded), _flat(json.loads(config_json))
  # Keys on one side only are schema changes between versions, not a different run. The
  # mesh says where a run computes, not what: checkpoints restore under any mesh.
  diff = sorted(k for k in set(old) & set(new)
                if old[k] != new[k] and not k.startswith(NOT_IDENTITY))
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
