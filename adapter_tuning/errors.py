"""Errors that end a run with a one-line message instead of a traceback.

A user mistake (bad config, bad path, bad data) is a `UsageError` and exits with 2; a failure
at run time that is not the user's fault (corrupt checkpoint, NaN loss, full disk) is a
`RunFailure` and exits with 1. Both subclass a builtin so library callers can catch them
the ordinary way (`ValueError`, `RuntimeError`).
"""


class UsageError(ValueError):
  """The user asked for something that cannot work; the message names the fix."""

  exit_code = 2


class RunFailure(RuntimeError):
  """The run failed at run time; the message says what was kept and how to go on."""

  exit_code = 1


def listing(items, shown: int = 5) -> str:
  """'a, b, c and 7 more': a long list of names cut to fit a one-line message."""
  items = sorted(items)
  more = f' and {len(items) - shown} more' if len(items) > shown else ''
  return ', '.join(str(i) for i in items[:shown]) + more
