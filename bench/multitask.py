"""Serving throughput: one batch mixing K task adapters vs a single-adapter batch.

  python bench/multitask.py --model ../shared/models/all-MiniLM-L6-v2 --tasks 8

Builds K artifacts on the base (random adapter, layer-norm and head weights: speed does
not depend on the values), serves them with `MultiTaskModel` (per-example routing in one
jitted pass) and times forward passes on random token ids of a fixed shape. Prints one
JSON line; `mixed_vs_single` is the throughput ratio (target >= 0.9).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import statistics
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))


def _make_artifacts(model_dir, k, size, root):
  import jax
  import numpy as np

  from adapter_tuning.interop import artifact
  from adapter_tuning.interop.pretrained import load_pretrained
  from adapter_tuning.training import trainable as tl
  pre = load_pretrained(model_dir, {'size': size})
  rng = np.random.default_rng(0)
  dirs = []
  for t in range(k):
    params = {'encoder': pre.params,
              'head': {'kernel': np.zeros((pre.config.hidden_size, 3), np.float32),
                       'bias': np.zeros(3, np.float32)}}
    trained, _ = tl.split(params, tl.ADAPTERS)
    trained = jax.tree.map(lambda x: (x + 0.01 * rng.standard_normal(x.shape)).astype(np.float32),
                           trained)
    d = root / f'task{t}'
    artifact.save(d, trained, {
        'task': f'bench/task{t}', 'head': 'classification', 'label_names': ['a', 'b', 'c'],
        'num_outputs': 3, 'adapter': dataclasses.asdict(pre.adapter),
        'base': {**pre.identity, 'path': str(pre.directory)}, 'max_seq_length': 128})
    dirs.append(d)
  return dirs


def _time(mt, task_ids, batch, steps):
  mt.logits(task_ids, batch)  # compile
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    mt.logits(task_ids, batch)
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def main():
  p = argparse.ArgumentParser()
  p.add_argument('--model', default='../shared/models/all-MiniLM-L6-v2')
  p.add_argument('--tasks', type=int, default=8)
  p.add_argument('--adapter_size', type=int, default=64)
  p.add_argument('--batch_size', type=int, default=64)
  p.add_argument('--seq_len', type=int, default=128)
  p.add_argument('--steps', type=int, default=5)
  args = p.parse_args()
  import numpy as np

  from adapter_tuning.serving.multi_adapter import MultiTaskModel
  with tempfile.TemporaryDirectory() as tmp:
    dirs = _make_artifacts(args.model, args.tasks, args.adapter_size, pathlib.Path(tmp))
    single = MultiTaskModel(dirs[:1])
    mixed = MultiTaskModel(dirs)
    rng = np.random.default_rng(0)
    vocab = single.pretrained.config.vocab_size
    batch = {'input_ids': rng.integers(1000, vocab, (args.batch_size, args.seq_len)).astype(np.int32),
             'attention_mask': np.ones((args.batch_size, args.seq_len), np.int32),
             'token_type_ids': np.zeros((args.batch_size, args.seq_len), np.int32)}
    ids_single = np.zeros(args.batch_size, np.int32)
    ids_mixed = (np.arange(args.batch_size) % args.tasks).astype(np.int32)
    results = {}
    for round_ in range(2):  # alternate: the machine drifts
      results.setdefault('single', []).append(_time(single, ids_single, batch, args.steps))
      results.setdefault('mixed', []).append(_time(mixed, ids_mixed, batch, args.steps))
  single_s, mixed_s = min(results['single']), min(results['mixed'])
  print(json.dumps({
      'tool': 'adapter_tuning', 'bench': 'multitask_serving', 'model': args.model,
      'tasks': args.tasks, 'batch_size': args.batch_size, 'seq_len': args.seq_len,
      'single_examples_per_s': args.batch_size / single_s,
      'mixed_examples_per_s': args.batch_size / mixed_s,
      'mixed_vs_single': single_s / mixed_s}))


if __name__ == '__main__':
  main()
