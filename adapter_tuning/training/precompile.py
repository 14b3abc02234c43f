"""Compile a jitted step for every batch shape of the run ahead of use, in background threads.

Length bucketing gives a handful of static batch shapes, and jit compiles each one the
first time it shows up: on a cold start that is ~3 s of XLA work per shape, paid in the
training loop while the cores do nothing else (14-16 s of a 60 s MiniLM SST-2 job). Here
the shapes are lowered and compiled by worker threads as soon as the trainer knows them:
while the first one compiles, the next compile on the other core; later ones overlap with
training steps and with the host work between them. Results are the jitted function's own
executables (same HLO, same persistent compilation cache), so numbers do not change.
Measured on that job, cold: 61.1 s -> 55.1 s with two workers (one worker: ~56 s).
"""

from __future__ import annotations

import concurrent.futures
from typing import Any

import jax


def abstract(tree):
  """ShapeDtypeStructs (with shardings) standing for the arrays of `tree`."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, 'sharding', None)),
      tree)


def with_length(batch, length: int, rows: int | None = None):
  """The abstract `batch` with its sequence axis (axis 1 of 2-D+ arrays) set to `length`
  and, if given, its batch axis to `rows`."""
  def one(x):
    shape = list(x.shape)
    if rows is not None:
      shape[0] = rows
    if len(shape) >= 2:
      shape[1] = length
    return jax.ShapeDtypeStruct(tuple(shape), x.dtype, sharding=x.sharding)
  return jax.tree.map(one, abstract(batch))


def _shapes(batch) -> tuple:
  leaves, treedef = jax.tree.flatten(batch)
  return treedef, tuple((tuple(x.shape), str(x.dtype)) for x in leaves)


class AheadOfTime:
  """Calls `jitted(*args)` through executables compiled in the background, keyed by the
  shapes of the last argument (the batch); the other arguments keep their shapes for the
  whole run. A batch whose shapes were never prepared goes through `jitted` as usual."""

  def __init__(self, jitted, pool: concurrent.futures.Executor):
    self._jitted = jitted
    self._pool = pool
    self._futures: dict[Any, concurrent.futures.Future] = {}
    self.misses = 0  # calls whose batch shapes were not prepared (compiled by jit instead)

  @property
  def prepared(self) -> bool:
    return bool(self._futures)

  @property
  def compiled_ahead(self) -> int:
    return len(self._futures)

  def prepare(self, *abstract_args):
    """Starts compiling for these abstract arguments (no-op if already started)."""
    key = _shapes(abstract_args[-1])
    if key not in self._futures:
      self._futures[key] = self._pool.submit(
          lambda: self._jitted.lower(*abstract_args).compile())

  def __call__(self, *args):
    future = self._futures.get(_shapes(args[-1]))
    if future is None:
      self.misses += 1
      return self._jitted(*args)
    return future.result()(*args)


def compile_pool(workers: int = 2) -> concurrent.futures.ThreadPoolExecutor:
  return concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix='xla-compile')

