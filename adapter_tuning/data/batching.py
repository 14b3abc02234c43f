"""Tokenized examples -> fixed-shape numpy batches, bucketed by length.

Why buckets: XLA compiles one program per input shape, and padding every row to
`max_seq_length` wastes most of the compute on short-text tasks (SST-2 training phrases average ~9
words). A few static lengths (`bucket_boundaries`) keep the number of compiled shapes
small while each batch is padded only to the smallest boundary that fits its longest row.

Training order (deterministic given (seed, epoch), identical on every process):
  1. shuffle all example indices with `np.random.default_rng((seed, epoch))`;
  2. drop the last `n % global_batch` of them (every epoch has exactly `n // global_batch`
     full batches; the dropped rows change from epoch to epoch);
  3. cut the rest into chunks of `chunk_batches` batches, sort each chunk by length and cut
     it into batches, so a batch holds rows of similar length;
  4. shuffle the order of all batches with the same generator.
Each global batch is split across processes in contiguous slices: process p gets rows
[p*b, (p+1)*b) with b = global_batch // process_count, the layout `parallel.local_rows`
and `make_array_from_process_local_data` expect. All processes see the same padded length.

Evaluation visits every example exactly once, sorted by length; the last batch is filled
with copies of its first row marked `mask` 0 and `index` -1 (copies, not empty rows, so
no attention kernel ever sees a fully masked row).
"""

from __future__ import annotations

import math

from typing import Iterator, Sequence

import numpy as np

from adapter_tuning.errors import UsageError


def bucket_boundaries(max_len: int, n: int = 4, multiple: int = 8,
                      min_len: int = 0) -> tuple[int, ...]:
  """About `n` static lengths, geometric up to `max_len` (always the last), multiples of 8.

  By default they double (min_len = max_len / 2^(n-1)), which bounds the waste inside a
  bucket to under half its length; multiples of 8 suit matmul tiling. n=4, max_len=128 ->
  (16, 32, 64, 128). A smaller `min_len` with more buckets packs short texts tighter, e.g.
  n=7, min_len=8 -> (8, 16, 24, 32, 56, 88, 128), at the price of more compiled shapes.
  """
  if max_len < 1 or n < 1:
    raise UsageError(f'bucket_boundaries needs max_len >= 1 and n >= 1 (got {max_len}, {n})')
  ratio = 2.0 if not min_len or n < 2 else (max_len / min_len) ** (1.0 / (n - 1))
  lengths = set()
  for k in range(n - 1, 0, -1):
    length = math.ceil(max_len / ratio ** k - 1e-9)
    length = -(-length // multiple) * multiple
    if length < max_len:
      lengths.add(length)
  return tuple(sorted(lengths)) + (max_len,)


def fit_boundaries(batch_max_lengths: Sequence[int], n: int, multiple: int = 8,
                   max_len: int | None = None, shape_cost: float = 0.0) -> tuple[int, ...]:
  """At most `n` lengths (multiples of `multiple`) that minimise the padded positions of
  batches with these longest rows; the last covers the longest (capped at `max_len`).

  `shape_cost`: what one more length (one more compiled shape) costs, in padded length
  summed over the batches (token positions / batch size). The count k <= n minimising
  padded length + k * shape_cost wins, so a small split (a dev set) is not given shapes
  whose compilation takes longer than the padding they save.

  Exact dynamic programme over the distinct rounded-up maxima (at most max_len / multiple
  of them). With the same number of compiled shapes it pads less than doubling buckets
  when lengths cluster: 4,096 SST-2 rows, batch 32, 4 shapes: 79,104 positions against
  92,160 for (16, 32, 64, 128).
  """
  if n < 1 or not len(batch_max_lengths):
    raise UsageError(f'fit_boundaries needs n >= 1 and at least one batch (got {n})')
  rounded = np.asarray([-(-int(m) // multiple) * multiple for m in batch_max_lengths])
  if max_len is not None:
    rounded = np.minimum(rounded, max_len)
  cands, counts = np.unique(rounded, return_counts=True)
  upto = np.concatenate([[0], np.cumsum(counts)])  # batches with maxima <= cands[i]: upto[i+1]
  # best[k][i]: least padded length of the batches <= cands[i] with k+1 buckets, the last
  # at cands[i]; back[k][i]: the bucket below it.
  best, back = [upto[1:] * cands], []
  for _ in range(1, min(n, len(cands))):
    prev = best[-1]
    cur, arg = prev.copy(), np.full(len(cands), -1)
    for i in range(1, len(cands)):
      options = prev[:i] + (upto[i + 1] - upto[1:i + 1]) * cands[i]
      j = int(np.argmin(options))
      cur[i], arg[i] = options[j], j
    best.append(cur)
    back.append(arg)
  k = int(np.argmin([b[-1] + i * shape_cost for i, b in enumerate(best)]))
  bounds, i = [int(cands[-1])], len(cands) - 1
  for arg in reversed(back[:k]):
    i = int(arg[i])
    bounds.append(int(cands[i]))
  return tuple(sorted(bounds))


def train_batch_maxima(input_ids: Sequence[np.ndarray], batch_size: int, seed: int,
                       chunk_batches: int = 100) -> np.ndarray:
  """Longest row of each epoch-0 training batch, plus the longest row of all (later
  epochs batch differently, and every batch must fit the last boundary)."""
  lengths = _lengths(input_ids)
  return np.append(_epoch_maxima(lengths, batch_size, seed, 0, chunk_batches), lengths.max())


def _epoch_maxima(lengths: np.ndarray, batch_size: int, seed: int, epoch: int,
                  chunk_batches: int) -> np.ndarray:
  return lengths[train_order(lengths, batch_size, seed, epoch, chunk_batches)].max(axis=1)


def eval_batch_maxima(input_ids: Sequence[np.ndarray], batch_size: int) -> np.ndarray:
  """Longest row of each `eval_batches` batch."""
  lengths = np.sort(_lengths(input_ids), kind='stable')
  return lengths[np.minimum(np.arange(batch_size, len(lengths) + batch_size, batch_size),
                            len(lengths)) - 1]


def _lengths(input_ids: Sequence[np.ndarray]) -> np.ndarray:
  return np.fromiter((len(x) for x in input_ids), np.int64, count=len(input_ids))


def _padded_length(max_row_len: int, boundaries: Sequence[int]) -> int:
  i = int(np.searchsorted(boundaries, max_row_len))
  if i == len(boundaries):
    raise UsageError(f'an example has {max_row_len} tokens, more than the largest bucket '
                     f'{boundaries[-1]}; truncate to data.max_seq_length first')
  return int(boundaries[i])


def _stack(rows: np.ndarray, input_ids, token_type_ids, labels, boundaries, pad_id) -> dict:
  """Pads the examples `rows` to one bucket length: input_ids, attention_mask, types, labels."""
  length = _padded_length(max(len(input_ids[r]) for r in rows), boundaries)
  ids = np.full((len(rows), length), pad_id, np.int32)
  mask = np.zeros((len(rows), length), np.int32)
  types = np.zeros((len(rows), length), np.int32)
  for i, r in enumerate(rows):
    n = len(input_ids[r])
    ids[i, :n] = input_ids[r]
    mask[i, :n] = 1
    types[i, :n] = token_type_ids[r]
  return {'input_ids': ids, 'attention_mask': mask, 'token_type_ids': types,
          'labels': np.asarray(labels)[rows]}


def _check(input_ids, token_type_ids, labels, batch_size, process_count=1):
  if not len(input_ids) == len(token_type_ids) == len(labels):
    raise UsageError(f'input_ids, token_type_ids and labels differ in length '
                     f'({len(input_ids)}, {len(token_type_ids)}, {len(labels)})')
  if batch_size < 1 or batch_size % process_count:
    raise UsageError(f'batch size {batch_size} must be positive and divisible by the '
                     f'{process_count} processes')


def num_train_batches(num_examples: int, batch_size: int) -> int:
  """Batches per training epoch: incomplete final batches are dropped."""
  return num_examples // batch_size


def train_order(lengths: np.ndarray, batch_size: int, seed: int, epoch: int,
                chunk_batches: int = 100) -> np.ndarray:
  """[num_batches, batch_size] example indices of one epoch (see the module docstring)."""
  rng = np.random.default_rng((seed, epoch))
  num_batches = num_train_batches(len(lengths), batch_size)
  order = rng.permutation(len(lengths))[:num_batches * batch_size]
  chunk = chunk_batches * batch_size
  for start in range(0, len(order), chunk):
    part = order[start:start + chunk]
    order[start:start + chunk] = part[np.argsort(lengths[part], kind='stable')]
  batches = order.reshape(num_batches, batch_size)
  return batches[rng.permutation(num_batches)]


def train_batches(input_ids: Sequence[np.ndarray], token_type_ids: Sequence[np.ndarray],
                  labels: np.ndarray, batch_size: int, *, seed: int, epoch: int,
                  boundaries: Sequence[int], process_index: int = 0, process_count: int = 1,
                  start_batch: int = 0, chunk_batches: int = 100,
                  pad_id: int = 0) -> Iterator[dict]:
  """This process's rows of each global training batch of one epoch, from `start_batch` on.

  `batch_size` is the global batch; each yielded dict holds batch_size // process_count
  rows: input_ids, attention_mask, token_type_ids [B, L] int32 and labels [B, ...].
  Skipping to `start_batch` (resuming mid-epoch) costs one permutation, not a replay.
  """
  _check(input_ids, token_type_ids, labels, batch_size, process_count)
  if not 0 <= process_index < process_count:
    raise UsageError(f'process_index {process_index} is outside 0..{process_count - 1}')
  if not 0 <= start_batch <= num_train_batches(len(input_ids), batch_size):
    raise UsageError(f'start_batch {start_batch} is outside the epoch\'s '
                     f'{num_train_batches(len(input_ids), batch_size)} batches')
  per_process = batch_size // process_count
  lengths = _lengths(input_ids)
  order = train_order(lengths, batch_size, seed, epoch, chunk_batches)
  for rows in order[start_batch:]:
    length = _padded_length(int(lengths[rows].max()), boundaries)
    mine = rows[process_index * per_process:(process_index + 1) * per_process]
    yield _stack(mine, input_ids, token_type_ids, labels, (length,), pad_id)


def train_lengths(input_ids: Sequence[np.ndarray], batch_size: int, *, seed: int, epoch: int,
                  boundaries: Sequence[int], start_batch: int = 0,
                  chunk_batches: int = 100) -> list[int]:
  """The padded lengths of `train_batches`' batches, each once, in order of first use."""
  maxima = _epoch_maxima(_lengths(input_ids), batch_size, seed, epoch, chunk_batches)
  return list(dict.fromkeys(_padded_length(int(m), boundaries) for m in maxima[start_batch:]))


def eval_lengths(input_ids: Sequence[np.ndarray], batch_size: int,
                 boundaries: Sequence[int]) -> list[int]:
  """The padded lengths of `eval_batches`' batches, each once, in order of use."""
  return list(dict.fromkeys(_padded_length(int(m), boundaries)
                            for m in eval_batch_maxima(input_ids, batch_size)))


def num_eval_batches(num_examples: int, batch_size: int) -> int:
  return -(-num_examples // batch_size)


def eval_batches(input_ids: Sequence[np.ndarray], token_type_ids: Sequence[np.ndarray],
                 labels: np.ndarray, batch_size: int, boundaries: Sequence[int],
                 pad_id: int = 0) -> Iterator[dict]:
  """Global batches covering every example once, sorted by length, the last one filled up.

  Besides the train keys each batch has `mask` [B] float32 (1 real row, 0 filler) and
  `index` [B] int32 (the example's position in the inputs, -1 for filler): scatter
  per-row outputs back with `index[mask > 0]`.
  """
  _check(input_ids, token_type_ids, labels, batch_size)
  order = np.argsort(_lengths(input_ids), kind='stable')
  for start in range(0, len(order), batch_size):
    rows = order[start:start + batch_size]
    real = len(rows)
    index = np.full(batch_size, -1, np.int32)
    index[:real] = rows
    rows = np.concatenate([rows, np.full(batch_size - real, rows[0], rows.dtype)])
    batch = _stack(rows, input_ids, token_type_ids, labels, boundaries, pad_id)
    batch['mask'] = (index >= 0).astype(np.float32)
    batch['index'] = index
    yield batch
