"""Turns the project's errors into one-line messages and exit codes for every entry point.

Usage errors (UsageError, bad data as ValueError, missing files) exit 2; run-time failures
(RunFailure) exit 1. Tracebacks only with --verbose: a user mistake is not a crash.
"""

from __future__ import annotations

import sys
import traceback

from adapter_tuning.errors import RunFailure, UsageError


def run_guarded(fn, verbose: bool) -> int:
  try:
    fn()
  except (UsageError, ValueError, FileNotFoundError, NotADirectoryError) as e:
    if verbose:
      traceback.print_exc()
    print(f'error: {_one_line(e)}', file=sys.stderr)
    return UsageError.exit_code
  except (RunFailure, OSError) as e:
    if verbose:
      traceback.print_exc()
    print(f'error: {_one_line(e)}', file=sys.stderr)
    return RunFailure.exit_code
  except KeyboardInterrupt:
    print('interrupted; rerun the same command to resume from the last checkpoint',
          file=sys.stderr)
    return 130
  return 0


def flags_main(flag_values, run, argv) -> int:
  """An absl-flags entry point: parse `argv` into `flag_values` (a bad flag: one line, exit
  2), then `run()` guarded, with tracebacks only under --verbose."""
  from absl import flags
  try:
    flag_values(argv)
  except flags.Error as e:
    print(f'error: {str(e).splitlines()[0]}', file=sys.stderr)
    return UsageError.exit_code
  return run_guarded(run, flag_values.verbose)


def _one_line(e: BaseException) -> str:
  text = str(e).strip() or type(e).__name__
  return text.splitlines()[0]
