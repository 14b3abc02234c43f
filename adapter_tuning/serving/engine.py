"""What the server runs: the resident `MultiTaskModel`, its compiled shapes, and hot-loading.

A batch of requests becomes mixed-task model calls through the pieces `predict` uses
(multi_adapter.py's `tokenize_rows`, `padded_logits`, `output_fields`), so a served output
is exactly a `predict` output line. Shapes are fixed: the length is padded to `predict`'s
32-token buckets and the row count to a power of two (up to `max_batch_size`), and every
(rows, length) pair is compiled by `warm_up` before the model takes traffic, so no request
ever waits for XLA. Rows are grouped by length bucket, so one long text does not pad a
whole batch of short ones.

Loading or removing an adapter builds and warms a whole new `MultiTaskModel` (the stacked
task axis and the PEFT union change shape) off the worker thread, then swaps one
reference; the worker reads that reference once per batch, so a swap always lands between
batches and a batch never sees half a model. Each text is truncated to its own adapter's
`max_seq_length`, as in its training run.
"""

from __future__ import annotations

import dataclasses
import pathlib
import threading
import time

import numpy as np

from adapter_tuning import peft
from adapter_tuning.errors import UsageError
from adapter_tuning.interop import artifact
from adapter_tuning.serving.multi_adapter import (MultiTaskModel, bucket_length, output_fields,
                                                  padded_logits, tokenize_rows)


class UnknownTask(UsageError):
  """A request names a task no loaded adapter was trained on (HTTP 404)."""


class Conflict(UsageError):
  """The request contradicts the server's state (HTTP 409)."""


@dataclasses.dataclass(frozen=True)
class Served:
  """A model and each task's truncation length: swapped together, as one reference."""

  model: MultiTaskModel
  limits: tuple[int, ...]  # per task index


def batch_buckets(max_batch_size: int) -> tuple[int, ...]:
  """Row counts a batch is padded to: powers of two below the maximum, and the maximum."""
  sizes, b = [], 1
  while b < max_batch_size:
    sizes.append(b)
    b *= 2
  return tuple(sizes) + (max_batch_size,)


class Engine:
  """The current model plus what serving needs around it; thread-safe swaps."""

  def __init__(self, adapter_dirs, base: str | None, max_batch_size: int,
               max_seq_length: int = 0, log=print):
    self.max_batch_size = max_batch_size
    self.max_seq_length = max_seq_length  # 0 = each adapter's own
    self.log = log
    self._admin = threading.Lock()  # one load/remove at a time
    self.served = self._build([pathlib.Path(d) for d in adapter_dirs], base)
    self.base = str(self.model.pretrained.directory)  # every later model: this base

  @property
  def model(self) -> MultiTaskModel:
    return self.served.model

  # ---- building -------------------------------------------------------------------------

  def _build(self, dirs: list[pathlib.Path], base: str | None) -> Served:
    start = time.perf_counter()
    mt = MultiTaskModel(dirs, base)
    if mt.kind.per_token:
      raise UsageError(f'{mt.kind.name} adapters are not served over HTTP; use '
                       'python -m adapter_tuning.predict for them')
    served = Served(mt, tuple(self._limit(mt, t) for t in mt.tasks))
    shapes = self.warm_up(served)
    self.log(f'model ready: {len(mt.tasks)} adapter(s), {shapes} compiled shapes, '
             f'{time.perf_counter() - start:.1f}s')
    return served

  def _limit(self, mt: MultiTaskModel, task) -> int:
    own = self.max_seq_length or int(task.meta.get('max_seq_length', 128))
    return min(own, mt.pretrained.config.max_seq_length)

  @staticmethod
  def length_buckets(served: Served) -> tuple[int, ...]:
    top = max(served.limits)
    return tuple(sorted({bucket_length(n, top) for n in range(1, top + 1)}))

  def warm_up(self, served: Served) -> int:
    """Compiles every (rows, length) shape a batch can take; returns how many."""
    shapes = [(b, n) for b in batch_buckets(self.max_batch_size)
              for n in self.length_buckets(served)]
    for rows, length in shapes:
      ids = np.zeros((rows, length), np.int32)
      batch = {'input_ids': ids, 'token_type_ids': ids, 'attention_mask': np.ones_like(ids)}
      served.model.logits(np.zeros(rows, np.int32), batch)
    return len(shapes)

  # ---- serving --------------------------------------------------------------------------

  def task_names(self) -> list[str]:
    return [t.name for t in self.model.tasks]

  def run_batch(self, requests: list[list[dict]]) -> list:
    """Row lists -> per request, its output lines or an exception (batcher contract)."""
    served = self.served  # read once: a hot swap lands between batches, never inside one
    mt = served.model
    results: list = [None] * len(requests)
    rows, task_ids, owner = [], [], []
    for r, request in enumerate(requests):
      try:
        ids = [mt.task_index(row.get('task')) for row in request]
      except UsageError as e:  # its task was removed while it waited
        results[r] = UnknownTask(str(e))
        continue
      rows += request
      task_ids += ids
      owner += [r] * len(request)
      results[r] = []
    for out, r in zip(self._predict(served, rows, task_ids), owner):
      results[r].append(out)
    return results

  def _predict(self, served: Served, rows: list[dict], task_ids: list[int]) -> list[dict]:
    """Output lines for rows of any tasks: grouped by length bucket, one call per group."""
    if not rows:
      return []
    mt, limits = served.model, served.limits
    tok = mt.pretrained.tokenizer
    encoded: list = [None] * len(rows)
    for limit in sorted({limits[t] for t in task_ids}):
      idx = [i for i, t in enumerate(task_ids) if limits[t] == limit]
      for i, ids in zip(idx, tokenize_rows(tok, [rows[i] for i in idx], limit)):
        encoded[i] = ids
    top = max(limits)
    groups: dict[int, list[int]] = {}
    for i, ids in enumerate(encoded):
      groups.setdefault(bucket_length(len(ids[0]), top), []).append(i)
    out: list = [None] * len(rows)
    buckets = batch_buckets(self.max_batch_size)
    for length, idx in sorted(groups.items()):
      for start in range(0, len(idx), self.max_batch_size):
        chunk = idx[start:start + self.max_batch_size]
        padded = next(b for b in buckets if b >= len(chunk))
        tids = np.asarray([task_ids[i] for i in chunk], np.int32)
        logits = padded_logits(mt, tids, [encoded[i] for i in chunk], length, padded)
        for i, row in zip(chunk, logits):
          out[i] = output_fields(mt, task_ids[i], row)
    return out

  # ---- hot loading ----------------------------------------------------------------------

  def load(self, path: str) -> dict:
    """Adds the artifact at `path` (refused, with the reason, if it cannot join)."""
    with self._admin:
      directory = pathlib.Path(path)
      meta, _ = artifact.load(directory)  # a broken artifact: a one-line UsageError
      loaded = self.task_names()
      if meta['task'] in loaded:
        raise Conflict(f'an adapter for task {meta["task"]!r} is already loaded; '
                       f'DELETE /v1/adapters/{meta["task"]} first to replace it')
      self.served = self._build([t.directory for t in self.model.tasks] + [directory],
                                self.base)
      return self.describe_task(self.model.tasks[-1])

  def remove(self, task: str) -> list[str]:
    """Removes the adapter of `task`; the server keeps at least one."""
    with self._admin:
      keep = [t.directory for t in self.model.tasks if t.name != task]
      if len(keep) == len(self.model.tasks):
        raise UnknownTask(f'no adapter for task {task!r}; loaded: {", ".join(self.task_names())}')
      if not keep:
        raise Conflict(f'{task!r} is the only adapter loaded; load another before removing it')
      self.served = self._build(keep, self.base)
      return self.task_names()

  # ---- description ----------------------------------------------------------------------

  def describe_task(self, task) -> dict:
    return {'task': task.name, 'method': peft.describe(peft.config_from_meta(task.meta)),
            'head': task.head, 'labels': list(task.label_names),
            'max_seq_length': self._limit(self.model, task), 'path': str(task.directory)}

  def describe(self) -> dict:
    mt = self.model
    identity = mt.pretrained.identity
    return {'base': {'name': identity['name'], 'sha256': identity['sha256'], 'path': self.base},
            'adapters': [self.describe_task(t) for t in mt.tasks]}
