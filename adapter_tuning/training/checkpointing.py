"""Resumable training state with orbax: trainable params, optimizer state, step and RNG.

The frozen base is not saved (it is the pretrained checkpoint, identified by its hash in
the metadata); the data position needs no saving because the data order is a pure
function of (seed, epoch) and the step says where in it we are. Saves are asynchronous;
every process joins them. A latest checkpoint that cannot be read is reported and the
previous one is used; one is never deleted to make room before the new one is complete
(orbax writes to a temporary folder and renames).
"""

from __future__ import annotations

import contextlib
import logging
import pathlib
import traceback

import jax
import orbax.checkpoint as ocp

from adapter_tuning import fileio
from adapter_tuning.errors import RunFailure


class _DropDiskFullLogs(logging.Filter):
  """Orbax logs every failed background write of a save with a traceback (four records for
  one full disk); `Checkpointer._disk_errors` reports a full disk once, in one line, so
  those records are dropped. Other errors are logged as before."""

  def filter(self, record: logging.LogRecord) -> bool:
    text = record.getMessage()
    if record.exc_info and record.exc_info[1] is not None:
      text += ' '.join(traceback.format_exception(record.exc_info[1]))
    return not fileio.is_disk_full(text)


_ORBAX_LOGGER = logging.getLogger('absl')  # orbax logs through absl's logger


class Checkpointer:
  def __init__(self, directory: pathlib.Path, keep: int):
    self.directory = pathlib.Path(directory).absolute()
    options = ocp.CheckpointManagerOptions(max_to_keep=max(keep, 1), create=True,
                                           enable_async_checkpointing=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options)
    self._size = 0  # bytes of the state last saved, for a full disk's message
    self._log_filter = _DropDiskFullLogs()
    _ORBAX_LOGGER.addFilter(self._log_filter)

  def latest_step(self):
    return self._manager.latest_step()

  def save(self, step: int, state, meta: dict, force: bool = False):
    """Starts an async save; a full disk (now, or from the previous save) is a RunFailure."""
    self._size = sum(x.nbytes for x in jax.tree.leaves(state))
    with self._disk_errors():
      self._manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=force)

  @contextlib.contextmanager
  def _disk_errors(self):
    """Orbax's write errors (raised here or from its background thread) as one line when
    the disk is full: orbax finalises a step by renaming a complete temporary folder, so
    the checkpoints before it stay readable and a rerun resumes from the newest."""
    try:
      yield
    except Exception as e:  # pylint: disable=broad-except  # orbax wraps OSError variously
      if not fileio.is_disk_full(e):
        raise
      where = self.directory  # the failed save may be an earlier, asynchronous one
      last = self._manager.latest_step()
      kept = (f'the checkpoint of step {last} is intact' if last is not None else
              'no checkpoint was complete yet')
      raise fileio.disk_failure(e, where, self._size, kept) from None

  def restore(self, abstract_state):
    """Restores the newest readable checkpoint: (state, meta, step), or None if there is none.

    Raises RunFailure when checkpoints exist but none can be read: never restart from
    scratch silently.
    """
    steps = sorted(self._manager.all_steps(), reverse=True)
    if not steps:
      return None
    errors = []
    for step in steps:
      try:
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
      except Exception as e:  # pylint: disable=broad-except  # any unreadable checkpoint
        errors.append(f'step {step}: {type(e).__name__}: {str(e).splitlines()[0][:200]}')
        logging.warning('checkpoint at step %d cannot be read (%s); trying an older one',
                        step, errors[-1])
        continue
      if errors and jax.process_index() == 0:
        print(f'warning: skipped unreadable checkpoint(s): {"; ".join(errors)}; '
              f'resuming from step {step}', flush=True)
      return restored['state'], restored['meta'], step
    raise RunFailure(f'checkpoints exist in {self.directory} but none can be read '
                     f'({"; ".join(errors)}); fix or move that folder, or use a new --workdir')

  def wait(self):
    with self._disk_errors():
      self._manager.wait_until_finished()

  def close(self):
    try:
      self.wait()
    finally:
      self._manager.close()
      _ORBAX_LOGGER.removeFilter(self._log_filter)
