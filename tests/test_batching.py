"""Bucketed batching: determinism, coverage, few shapes, multi-process slices, resume, padding."""

import pathlib

import numpy as np
import pytest

from adapter_tuning.data import batching, glue
from adapter_tuning.errors import UsageError

GLUE_DIR = pathlib.Path(__file__).resolve().parents[1].parent / 'shared' / 'data' / 'glue'
BOUNDARIES = batching.bucket_boundaries(128, 4)


def _data(lengths, seed=0):
  """Examples whose token ids encode their own index, so batches can be traced back."""
  rng = np.random.default_rng(seed)
  ids = [np.full(n, i + 1, np.int32) for i, n in enumerate(lengths)]
  types = [(np.arange(n) >= n // 2).astype(np.int32) for n in lengths]
  labels = rng.integers(0, 3, len(lengths)).astype(np.int32)
  return ids, types, labels


def _rows(batch):
  """Example index of each row (from the token ids written by `_data`)."""
  return batch['input_ids'][:, 0] - 1


def _random_lengths(n, seed=0):
  return np.random.default_rng(seed).integers(3, 129, n)


def test_bucket_boundaries():
  assert batching.bucket_boundaries(128, 4) == (16, 32, 64, 128)
  assert batching.bucket_boundaries(512, 3) == (128, 256, 512)
  assert batching.bucket_boundaries(100, 4) == (16, 32, 56, 100)
  assert batching.bucket_boundaries(16, 4) == (8, 16)
  assert batching.bucket_boundaries(128, 1) == (128,)
  assert batching.bucket_boundaries(128, 7, min_len=8) == (8, 16, 24, 32, 56, 88, 128)
  assert batching.bucket_boundaries(128, 4, min_len=16) == (16, 32, 64, 128)
  with pytest.raises(ValueError):
    batching.bucket_boundaries(128, 0)


def test_train_batches_deterministic_and_epochs_differ():
  ids, types, labels = _data(_random_lengths(1000))
  run = lambda epoch, seed=0: [b for b in batching.train_batches(
      ids, types, labels, 32, seed=seed, epoch=epoch, boundaries=BOUNDARIES)]
  a, b, c, d = run(0), run(0), run(1), run(0, seed=1)
  assert len(a) == batching.num_train_batches(1000, 32) == 31
  for x, y in zip(a, b):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  assert not np.array_equal(np.concatenate([_rows(x) for x in a]),
                            np.concatenate([_rows(x) for x in c]))
  assert not np.array_equal(np.concatenate([_rows(x) for x in a]),
                            np.concatenate([_rows(x) for x in d]))


def test_train_batches_content_and_coverage():
  lengths = _random_lengths(1000)
  ids, types, labels = _data(lengths)
  seen = []
  shapes = set()
  for batch in batching.train_batches(ids, types, labels, 32, seed=3, epoch=2,
                                      boundaries=BOUNDARIES):
    shapes.add(batch['input_ids'].shape)
    assert batch['input_ids'].dtype == batch['attention_mask'].dtype == np.int32
    assert batch['token_type_ids'].dtype == np.int32 and batch['labels'].dtype == np.int32
    rows = _rows(batch)
    seen.extend(rows)
    np.testing.assert_array_equal(batch['labels'], labels[rows])
    np.testing.assert_array_equal(batch['attention_mask'].sum(1), lengths[rows])
    for i, r in enumerate(rows):
      n = lengths[r]
      np.testing.assert_array_equal(batch['input_ids'][i, :n], ids[r])
      np.testing.assert_array_equal(batch['token_type_ids'][i, :n], types[r])
      assert not batch['input_ids'][i, n:].any() and not batch['token_type_ids'][i, n:].any()
  assert len(seen) == len(set(seen))  # at most once per epoch
  assert 1000 - len(seen) < 32  # all but fewer than one batch
  assert {s[1] for s in shapes} <= set(BOUNDARIES) and all(s[0] == 32 for s in shapes)


def test_processes_split_each_global_batch_contiguously():
  ids, types, labels = _data(_random_lengths(500))
  kwargs = dict(seed=0, epoch=0, boundaries=BOUNDARIES)
  whole = list(batching.train_batches(ids, types, labels, 32, **kwargs))
  parts = [list(batching.train_batches(ids, types, labels, 32, process_index=p,
                                       process_count=4, **kwargs)) for p in range(4)]
  assert all(len(p) == len(whole) for p in parts)
  for i, batch in enumerate(whole):
    for key in batch:
      joined = np.concatenate([parts[p][i][key] for p in range(4)])  # rows p*8:(p+1)*8
      np.testing.assert_array_equal(joined, batch[key])  # same padded length everywhere


def test_start_batch_resumes_mid_epoch():
  ids, types, labels = _data(_random_lengths(400))
  kwargs = dict(seed=5, epoch=1, boundaries=BOUNDARIES)
  whole = list(batching.train_batches(ids, types, labels, 16, **kwargs))
  tail = list(batching.train_batches(ids, types, labels, 16, start_batch=7, **kwargs))
  assert len(tail) == len(whole) - 7
  for x, y in zip(whole[7:], tail):
    np.testing.assert_array_equal(x['input_ids'], y['input_ids'])
  assert list(batching.train_batches(ids, types, labels, 16, start_batch=25, **kwargs)) == []
  with pytest.raises(UsageError, match='start_batch'):
    next(batching.train_batches(ids, types, labels, 16, start_batch=26, **kwargs))


def test_eval_batches_cover_every_example_once():
  lengths = _random_lengths(203)
  ids, types, labels = _data(lengths)
  batches = list(batching.eval_batches(ids, types, labels, 32, BOUNDARIES))
  assert len(batches) == batching.num_eval_batches(203, 32) == 7
  index = np.concatenate([b['index'] for b in batches])
  mask = np.concatenate([b['mask'] for b in batches])
  assert mask.dtype == np.float32 and index.dtype == np.int32
  assert sorted(index[mask > 0]) == list(range(203))
  assert np.all(index[mask == 0] == -1) and (mask == 0).sum() == 7 * 32 - 203
  for b in batches:
    assert b['input_ids'].shape[0] == 32 and b['input_ids'].shape[1] in BOUNDARIES
    real = b['mask'] > 0
    np.testing.assert_array_equal(_rows(b)[real], b['index'][real])
    np.testing.assert_array_equal(b['labels'][real], labels[b['index'][real]])
    assert b['attention_mask'][~real].sum(1).min(initial=1) > 0  # filler rows are real rows
  assert len({b['input_ids'].shape for b in batches}) <= len(BOUNDARIES)


def test_labels_may_be_float_or_vectors():
  lengths = _random_lengths(70)
  ids, types, _ = _data(lengths)
  scores = np.linspace(0, 5, 70, dtype=np.float32)
  spans = np.stack([np.arange(70), np.arange(70) + 1], axis=1).astype(np.int32)
  batch = next(batching.train_batches(ids, types, scores, 8, seed=0, epoch=0,
                                      boundaries=BOUNDARIES))
  assert batch['labels'].dtype == np.float32
  np.testing.assert_array_equal(batch['labels'], scores[_rows(batch)])
  batch = next(batching.eval_batches(ids, types, spans, 8, BOUNDARIES))
  assert batch['labels'].shape == (8, 2)


def test_errors():
  ids, types, labels = _data([5, 200])
  with pytest.raises(UsageError, match='200 tokens, more than the largest bucket 128'):
    list(batching.eval_batches(ids, types, labels, 2, BOUNDARIES))
  with pytest.raises(UsageError, match='differ in length'):
    list(batching.eval_batches(ids, types[:1], labels, 2, BOUNDARIES))
  with pytest.raises(UsageError, match='divisible'):
    next(batching.train_batches(ids, types, labels, 3, seed=0, epoch=0, boundaries=BOUNDARIES,
                                process_count=2))


def test_padding_on_sst2_lengths_is_far_below_pad_to_max():
  """SST-2 train, lengths = words + [CLS]/[SEP] (a stand-in for word pieces)."""
  examples = glue.read_glue_dir(glue.get_task('glue/sst2'), GLUE_DIR, 'train')
  lengths = np.minimum([len(e['text'].split()) + 2 for e in examples], 128)
  ids, types, labels = _data(lengths)
  real = computed = 0
  shapes = set()
  for batch in batching.train_batches(ids, types, labels, 32, seed=0, epoch=0,
                                      boundaries=BOUNDARIES):
    real += batch['attention_mask'].sum()
    computed += batch['attention_mask'].size
    shapes.add(batch['input_ids'].shape)
  used = lengths[:batching.num_train_batches(len(lengths), 32) * 32]
  pad_to_max = 1 - used.sum() / (len(used) * 128)
  padding = 1 - real / computed
  assert pad_to_max > 0.9  # ~91% of positions would be padding
  assert padding < 0.5  # measured: ~44% with (16, 32, 64, 128)
  assert len(shapes) <= 4
  eval_real = eval_computed = 0
  dev = glue.read_glue_dir(glue.get_task('glue/sst2'), GLUE_DIR, 'validation')
  dev_lengths = np.minimum([len(e['text'].split()) + 2 for e in dev], 128)
  ids, types, labels = _data(dev_lengths)
  for batch in batching.eval_batches(ids, types, labels, 64, BOUNDARIES):
    eval_real += batch['attention_mask'][batch['mask'] > 0].sum()
    eval_computed += batch['attention_mask'].size
  assert 1 - eval_real / eval_computed < 0.5


def _padded(maxima, bounds):
  return sum(min(b for b in bounds if b >= -(-m // 8) * 8) for m in maxima)


def test_fit_boundaries_is_the_least_padding_choice():
  import itertools
  rng = np.random.default_rng(0)
  for _ in range(100):
    maxima = rng.integers(1, 128, rng.integers(1, 30))
    n = int(rng.integers(1, 5))
    got = batching.fit_boundaries(maxima, n)
    assert len(got) <= n and got[-1] == -(-maxima.max() // 8) * 8
    cands = sorted({-(-int(m) // 8) * 8 for m in maxima})
    brute = min(_padded(maxima, sorted(c) + [cands[-1]])
                for k in range(n) for c in itertools.combinations(cands[:-1], k))
    assert _padded(maxima, got) == brute


def test_fit_boundaries_charges_each_shape_its_cost():
  import itertools
  rng = np.random.default_rng(2)
  for _ in range(100):
    maxima = rng.integers(1, 128, rng.integers(1, 30))
    n, cost = int(rng.integers(1, 6)), float(rng.uniform(0, 200))
    got = batching.fit_boundaries(maxima, n, shape_cost=cost)
    cands = sorted({-(-int(m) // 8) * 8 for m in maxima})
    brute = min(_padded(maxima, sorted(c) + [cands[-1]]) + (k + 1) * cost
                for k in range(n) for c in itertools.combinations(cands[:-1], k))
    assert len(got) <= n and _padded(maxima, got) + len(got) * cost == pytest.approx(brute)
  # A shape that saves less padding than it costs is not worth compiling.
  assert batching.fit_boundaries([8] * 3 + [64], 4, shape_cost=3 * 56 + 1) == (64,)
  assert batching.fit_boundaries([8] * 3 + [64], 4, shape_cost=3 * 56 - 1) == (8, 64)


def test_fit_boundaries_caps_at_max_len_and_beats_doubling_on_clustered_lengths():
  assert batching.fit_boundaries([100, 3], 2, max_len=100) == (8, 100)
  maxima = [9] * 50 + [20] * 30 + [40] * 5
  assert _padded(maxima, batching.fit_boundaries(maxima, 3)) < _padded(
      maxima, batching.bucket_boundaries(128, 4))
  with pytest.raises(UsageError):
    batching.fit_boundaries([], 2)


def test_batch_maxima_match_the_batches():
  rng = np.random.default_rng(1)
  ids = [np.ones(n, np.int32) for n in rng.integers(3, 120, 300)]
  types = [np.zeros_like(x) for x in ids]
  labels = np.zeros(len(ids), np.int32)
  bounds = (128,)
  real = [int(b['attention_mask'].sum(1).max()) for b in batching.train_batches(
      ids, types, labels, 16, seed=4, epoch=0, boundaries=bounds)]
  maxima = batching.train_batch_maxima(ids, 16, seed=4)
  assert list(maxima[:-1]) == real and maxima[-1] == max(len(x) for x in ids)
  real = [int(b['attention_mask'].sum(1).max()) for b in batching.eval_batches(
      ids, types, labels, 32, bounds)]
  assert list(batching.eval_batch_maxima(ids, 32)) == real
