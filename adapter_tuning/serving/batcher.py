"""Dynamic batching: requests that arrive within a few milliseconds share one model call.

The HTTP handlers run on the asyncio event loop; JAX calls block, so every model call runs
on one worker thread, and the loop only queues work and awaits a future. The worker takes
the oldest request, then waits for more until `max_wait_ms` after its arrival or until
the batch holds `max_batch_size` rows (a request is never split: each carries at most that
many rows, so the first always fits), runs them as one call and hands each request its own
results. One thread means one model call at a time: XLA:CPU already uses every core for a
batch, and a second concurrent call would only contend with it.

The queue is bounded in rows: a request that would overflow it is refused at once
(`QueueFull`, a 503 to the client) rather than waiting behind a backlog it cannot catch up
with. `close` stops new requests, answers everything already queued, and stops the thread:
that is how SIGTERM drains.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import threading
import time
from typing import Callable


class QueueFull(Exception):
  """The queue holds too many rows to accept this request now."""


class ShuttingDown(Exception):
  """The server is draining; it takes no new requests."""


@dataclasses.dataclass
class _Job:
  rows: list
  future: asyncio.Future
  loop: asyncio.AbstractEventLoop
  enqueued: float  # time.monotonic()


def _settle(future: asyncio.Future, result):
  """Runs on the event loop: a client that went away leaves a cancelled future behind."""
  if future.done():
    return
  if isinstance(result, BaseException):
    future.set_exception(result)
  else:
    future.set_result(result)


class Batcher:
  """Queues row lists from the event loop; one worker thread runs them in batches.

  `run_batch(list of row lists) -> list of (result | Exception)`, one entry per request: a
  request's failure (say its task was deleted meanwhile) is its own, not the batch's.
  """

  def __init__(self, run_batch: Callable, max_batch_size: int, max_wait_ms: float,
               max_queue_rows: int, on_batch: Callable[[int], None] | None = None):
    self.run_batch = run_batch
    self.max_batch_size = max_batch_size
    self.max_wait = max_wait_ms / 1000.0
    self.max_queue_rows = max_queue_rows
    self.on_batch = on_batch
    self._cond = threading.Condition()
    self._jobs: collections.deque[_Job] = collections.deque()
    self.queued_rows = 0
    self._closing = False
    self._thread = threading.Thread(target=self._loop, name='model-worker', daemon=True)
    self._thread.start()

  def submit(self, rows: list) -> asyncio.Future:
    """Queues one request's rows; await the returned future for its results."""
    loop = asyncio.get_running_loop()
    job = _Job(rows, loop.create_future(), loop, time.monotonic())
    with self._cond:
      if self._closing:
        raise ShuttingDown('the server is shutting down')
      if self.queued_rows + len(rows) > self.max_queue_rows:
        raise QueueFull(f'{self.queued_rows} inputs are queued (at most {self.max_queue_rows}); '
                        'retry shortly')
      self._jobs.append(job)
      self.queued_rows += len(rows)
      self._cond.notify()
    return job.future

  def close(self, timeout: float | None = None):
    """Refuses new work, answers what is queued, and stops the worker thread."""
    with self._cond:
      self._closing = True
      self._cond.notify_all()
    self._thread.join(timeout)

  def _take(self) -> list[_Job]:
    """The next batch: empty only when closing with nothing left."""
    with self._cond:
      while not self._jobs and not self._closing:
        self._cond.wait()
      # The wait counts from the oldest request's arrival: one that queued while the
      # previous batch ran has waited long enough already.
      deadline = self._jobs[0].enqueued + self.max_wait if self._jobs else 0.0
      while self.queued_rows < self.max_batch_size and not self._closing:
        left = deadline - time.monotonic()
        if left <= 0:
          break
        self._cond.wait(left)
      batch, rows = [], 0
      while self._jobs and (not batch or rows + len(self._jobs[0].rows) <= self.max_batch_size):
        job = self._jobs.popleft()
        batch.append(job)
        rows += len(job.rows)
      self.queued_rows -= rows
      return batch

  def _loop(self):
    while True:
      batch = self._take()
      if not batch:
        return
      try:
        results = self.run_batch([job.rows for job in batch])
      except Exception as e:  # a bug, not a request's fault: fail this batch, keep serving
        results = [e] * len(batch)
      if self.on_batch is not None:
        self.on_batch(sum(len(job.rows) for job in batch))
      for job, result in zip(batch, results):
        try:
          job.loop.call_soon_threadsafe(_settle, job.future, result)
        except RuntimeError:  # the loop is gone (process exiting): nobody is waiting
          pass
