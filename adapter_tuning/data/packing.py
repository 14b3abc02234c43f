"""Sequence packing (data.packing): several examples per row, no attention across them.

Why: short-text tasks pad most positions away. SST-2's training phrases average ~13
tokens, so even length buckets (batching.py) compute ~1.5x the real tokens; packing the
examples of a batch into rows of `max_seq_length` leaves only the tail of each row empty.

The optimisation is the same as unpacked: a batch still holds `batch_size` examples (the
same examples, in the same order as `batching.train_order` draws them), only laid out
differently. Each row holds whole examples, placed first-fit by decreasing length; the row
count is rounded up to one of a few static counts (`row_counts`, fitted over the epoch like
the length buckets), so few shapes compile. A packed batch carries, besides the token arrays
[R, T], `segment_ids` [R, T] (1, 2, ... per example in its row, 0 padding) and per example
[E]: `example_row`, `example_start` (where its first token sits) and the labels; the model
restricts attention to each example, restarts positions per example and reads each
example's own first token or mean (`Encoder(segments=...)`), so per-example logits equal the
unpacked ones. Evaluation packs too (filler examples point at the first example, mask 0).
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np

from adapter_tuning.data import batching
from adapter_tuning.errors import UsageError

SEGMENT_KEYS = ('segment_ids', 'example_row', 'example_start')


def first_fit(lengths: np.ndarray, capacity: int) -> list[list[int]]:
  """Positions (into `lengths`) per row: first-fit, longest first (ties in input order)."""
  rows: list[list[int]] = []
  free: list[int] = []
  for i in np.argsort(-np.asarray(lengths), kind='stable'):
    n = int(lengths[i])
    if n > capacity:
      raise UsageError(f'an example has {n} tokens, more than the packed row length '
                       f'{capacity}; truncate to data.max_seq_length first')
    for r, space in enumerate(free):
      if n <= space:
        rows[r].append(int(i))
        free[r] -= n
        break
    else:
      rows.append([int(i)])
      free.append(capacity - n)
  return rows


def _round_up(count: int, counts: Sequence[int]) -> int:
  i = int(np.searchsorted(counts, count))
  if i == len(counts):
    raise UsageError(f'a batch packs into {count} rows, more than the largest row count '
                     f'{counts[-1]}')
  return int(counts[i])


def pack(examples: np.ndarray, input_ids, token_type_ids, labels, capacity: int,
         row_counts: Sequence[int], pad_id: int = 0) -> dict:
  """The examples (indices into the inputs) as one packed batch (module docstring)."""
  lengths = np.asarray([len(input_ids[e]) for e in examples])
  rows = first_fit(lengths, capacity)
  num_rows = _round_up(len(rows), row_counts)
  ids = np.full((num_rows, capacity), pad_id, np.int32)
  types = np.zeros((num_rows, capacity), np.int32)
  segments = np.zeros((num_rows, capacity), np.int32)
  example_row = np.zeros(len(examples), np.int32)
  example_start = np.zeros(len(examples), np.int32)
  for r, members in enumerate(rows):
    at = 0
    for k, position in enumerate(members):
      e, n = examples[position], int(lengths[position])
      ids[r, at:at + n] = input_ids[e]
      types[r, at:at + n] = token_type_ids[e]
      segments[r, at:at + n] = k + 1
      example_row[position], example_start[position] = r, at
      at += n
  return {'input_ids': ids, 'attention_mask': (segments > 0).astype(np.int32),
          'token_type_ids': types, 'segment_ids': segments, 'example_row': example_row,
          'example_start': example_start, 'labels': np.asarray(labels)[examples]}


def fit_row_counts(batches: Sequence[np.ndarray], input_ids, capacity: int, n: int = 4,
                   multiple: int = 1) -> tuple[int, ...]:
  """At most `n` static row counts (multiples of `multiple`: the devices) that waste the
  fewest rows over these batches (batching.fit_boundaries on the packed row counts)."""
  needed = [len(first_fit(np.asarray([len(input_ids[e]) for e in b]), capacity))
            for b in batches]
  return batching.fit_boundaries(needed, n, multiple=multiple)


def train_batches(input_ids, token_type_ids, labels, batch_size: int, *, seed: int,
                  epoch: int, capacity: int, row_counts: Sequence[int], start_batch: int = 0,
                  pad_id: int = 0) -> Iterator[dict]:
  """`batching.train_batches`' examples, batch by batch, packed (one process only)."""
  lengths = np.asarray([len(x) for x in input_ids])
  for examples in batching.train_order(lengths, batch_size, seed, epoch)[start_batch:]:
    yield pack(examples, input_ids, token_type_ids, labels, capacity, row_counts, pad_id)


def eval_batches(input_ids, token_type_ids, labels, batch_size: int, capacity: int,
                 row_counts: Sequence[int], pad_id: int = 0) -> Iterator[dict]:
  """`batching.eval_batches`' examples (sorted by length, `mask` and `index` per example),
  packed; filler examples reuse the first example's tokens."""
  order = np.argsort([len(x) for x in input_ids], kind='stable')
  for start in range(0, len(order), batch_size):
    real = order[start:start + batch_size]
    batch = pack(real, input_ids, token_type_ids, labels, capacity, row_counts, pad_id)
    fill = batch_size - len(real)
    for key in ('example_row', 'example_start', 'labels'):
      batch[key] = np.concatenate([batch[key], np.repeat(batch[key][:1], fill, axis=0)])
    batch['mask'] = (np.arange(batch_size) < len(real)).astype(np.float32)
    batch['index'] = np.concatenate([real, np.full(fill, -1)]).astype(np.int32)
    yield batch


def eval_order_batches(num_examples: int, input_ids, batch_size: int) -> list[np.ndarray]:
  """The example indices of each evaluation batch, for `fit_row_counts`."""
  order = np.argsort([len(x) for x in input_ids], kind='stable')
  return [order[s:s + batch_size] for s in range(0, num_examples, batch_size)]
