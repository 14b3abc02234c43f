"""Checked reading and atomic writing of the files users hand us and the files we leave them.

Every user-supplied file is read through one of the readers here, so a damaged file --
missing, truncated, not JSON, a tensor of the wrong dtype or with NaN in it -- gives the
same one-line error everywhere it is read (train, predict, export, import):
`<path>: <what is wrong>; <how to fix it>`, a `UsageError` (exit 2), never a traceback
and never a silent stand-in.

Every file a later step or a later process reads is written whole or not at all
(`write_atomic`: a temporary file, fsync, rename), and a write that fails for want of
space is a `RunFailure` naming the path and the space needed (`disk_failure`): what was
written before stays as it was. `_write` is the one place bytes reach the disk here, so
tests can make it fail at the n-th write.
"""

from __future__ import annotations

import errno
import json
import os
import pathlib
import shutil

import numpy as np

from adapter_tuning.errors import RunFailure, UsageError


def file_error(path, what: str, fix: str) -> UsageError:
  return UsageError(f'{path}: {what}; {fix}')


def read_json(path, fix: str, required: tuple[str, ...] = ()) -> dict:
  """A JSON object from `path`; `required` keys must be present."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise file_error(path, 'missing' if not path.exists() else 'not a file', fix)
  try:
    value = json.loads(path.read_text())
  except UnicodeDecodeError:
    raise file_error(path, 'not text (binary data where JSON was expected)', fix) from None
  except json.JSONDecodeError as e:
    raise file_error(path, f'not valid JSON ({e.msg} at line {e.lineno} column {e.colno})',
                     fix) from None
  if not isinstance(value, dict):
    raise file_error(path, f'holds a JSON {type(value).__name__}, not an object', fix)
  missing = [k for k in required if k not in value]
  if missing:
    raise file_error(path, f'lacks the key(s) {", ".join(missing)}', fix)
  return value


def read_tensors(path, fix: str) -> dict[str, np.ndarray]:
  """Every tensor of a safetensors file, as float32; refuses non-float or non-finite ones."""
  from safetensors.numpy import load_file
  path = pathlib.Path(path)
  if not path.is_file():
    raise file_error(path, 'missing' if not path.exists() else 'not a file', fix)
  try:
    tensors = load_file(str(path))
  except Exception as e:  # pylint: disable=broad-except  # SafetensorError, truncation, ...
    reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise file_error(path, f'not a readable safetensors file ({reason}); it is truncated '
                     'or damaged', fix) from None
  return check_values(path, tensors, fix)


def check_values(path, tensors: dict, fix: str) -> dict[str, np.ndarray]:
  """Weights as float32; a non-float dtype or a NaN/Inf anywhere is an error naming it."""
  for name, value in tensors.items():
    if not np.issubdtype(value.dtype, np.floating):
      raise file_error(path, f'tensor {name!r} has dtype {value.dtype}, expected floating '
                       'point weights', fix)
    if not np.all(np.isfinite(value)):
      bad = int(np.size(value) - np.count_nonzero(np.isfinite(value)))
      raise file_error(path, f'tensor {name!r} holds {bad} non-finite value(s) (NaN/Inf)', fix)
  return {k: v.astype(np.float32, copy=False) for k, v in tensors.items()}


def check_tensors(path, tensors: dict, expected: dict, fix: str):
  """The tensors are exactly `expected` ({name: shape}): none missing, extra or misshapen."""
  missing = sorted(set(expected) - set(tensors))
  if missing:
    raise file_error(path, f'lacks tensor(s) {_names(missing)}', fix)
  extra = sorted(set(tensors) - set(expected))
  if extra:
    raise file_error(path, f'holds tensor(s) this model has no place for: {_names(extra)}', fix)
  for name in sorted(expected):
    if tuple(tensors[name].shape) != tuple(expected[name]):
      raise file_error(path, f'tensor {name!r} has shape {tuple(tensors[name].shape)}, '
                       f'expected {tuple(expected[name])}', fix)


def _names(names: list[str], most: int = 3) -> str:
  shown = ', '.join(repr(n) for n in names[:most])
  return shown + (f' and {len(names) - most} more' if len(names) > most else '')


# ----------------------------------------------------------------------------- writing


def _write(fh, data: bytes):
  """The one place this module writes bytes, to an unbuffered file (tests make it raise
  ENOSPC); a raw write may take only part of the bytes, so it loops."""
  view = memoryview(data)
  while view:
    view = view[fh.write(view):]


def write_file(path, data: bytes | str):
  """Writes and fsyncs `path` (no rename: for files inside a folder renamed whole later).
  Raises OSError as the system does."""
  data = data.encode() if isinstance(data, str) else data
  with open(path, 'wb', buffering=0) as fh:
    _write(fh, data)
    os.fsync(fh.fileno())


def write_atomic(path, data: bytes | str):
  """Writes `path` whole or not at all: a temporary file beside it, fsync, rename."""
  path = pathlib.Path(path)
  data = data.encode() if isinstance(data, str) else data
  tmp = path.with_name(f'.{path.name}.tmp{os.getpid()}')
  try:
    write_file(tmp, data)
    os.replace(tmp, path)
  except OSError as e:
    tmp.unlink(missing_ok=True)
    raise disk_failure(e, path, len(data)) from None


def open_append(path):
  """An unbuffered append handle for `append_line`."""
  return open(path, 'ab', buffering=0)


def append_line(fh, path, line: str):
  """Appends one whole line to an `open_append` file; a failed write leaves no half line."""
  data = (line.rstrip('\n') + '\n').encode()
  start = fh.seek(0, os.SEEK_END)
  try:
    _write(fh, data)
  except OSError as e:
    try:
      fh.truncate(start)  # drop a partly written line
    except OSError:
      pass
    raise disk_failure(e, path, len(data)) from None


def is_disk_full(e: BaseException | str) -> bool:
  """An OSError for a full disk or quota, or an error (text) that says so (orbax and
  tensorstore wrap the OSError in ValueError('RESOURCE_EXHAUSTED: ... No space left ...'))."""
  return (isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)) or \
      'No space left on device' in str(e) or 'Disk quota exceeded' in str(e)


def disk_failure(e: BaseException, path, needed_bytes: int | None = None,
                 kept: str = 'the files written before are intact') -> RunFailure:
  """A failed write as one line: the path, why, the space needed and free, what was kept."""
  path = pathlib.Path(path)
  if not is_disk_full(e):
    reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0]
    return RunFailure(f'{path}: cannot write ({reason}); {kept}: fix the cause and rerun the '
                      'same command')
  need = f'needs about {_mib(needed_bytes)}, ' if needed_bytes else ''
  return RunFailure(f'{path}: no space left on device ({need}{_mib(free_bytes(path))} free); '
                    f'{kept}: free some space and rerun the same command (a training run '
                    'resumes from its last checkpoint)')


def free_bytes(path) -> int:
  path = pathlib.Path(path)
  while not path.exists() and path != path.parent:
    path = path.parent
  return shutil.disk_usage(path).free


def _mib(n: int) -> str:
  return f'{n / 2**20:.1f} MiB' if n >= 2**20 else f'{max(n, 1) / 2**10:.1f} KiB'
