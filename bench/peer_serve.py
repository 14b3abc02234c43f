"""The peer's multi-adapter inference on the rows bench/serve.py sends: AdapterHub 1.3, torch.

  .venv/bin/python bench/peer_serve.py --model ../shared/models/all-MiniLM-L6-v2 \\
      --batch_sizes 1,8,32 --adapters 1,4

AdapterHub has no per-example routing: a batch whose rows belong to K tasks runs either
  - `Parallel(*adapters)`: every row through every adapter (the composition replicates the
    batch K times at the first adapter layer), each row then reads its own task's head; or
  - sequentially: one forward pass per task over that task's rows (`active_adapters = task`).
Both are timed on the same SST-2 dev sentences, tasks in turn as bench/serve.py assigns
them, batches of B rows (B = the batch a server sees with B concurrent single-row clients),
dynamic padding to the longest row (max 128 tokens), eager float32 on CPU with
torch.set_num_threads(--threads, default: all cores), no HTTP. Each adapter is Houlsby (DoubleSeqBnConfig,
reduction_factor = hidden / --adapter_size) with a one-layer head on the pooler, like ours.
One JSON line per (mode, K, B): rows/s and p50/p99 per-batch latency, with the CPU model.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from serve import ROOT, cpu_model, sentences  # noqa: E402  (bench/serve.py: stdlib only)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--model', default=str(ROOT.parent / 'shared/models/all-MiniLM-L6-v2'))
  p.add_argument('--glue_dir', default=str(ROOT.parent / 'shared/data/glue'))
  p.add_argument('--adapters', default='1,4')
  p.add_argument('--batch_sizes', default='1,8,32')
  p.add_argument('--modes', default='parallel,sequential')
  p.add_argument('--rows', type=int, default=256, help='rows per run, at most')
  p.add_argument('--max_seconds', type=float, default=60.0, help='per run, at most')
  p.add_argument('--adapter_size', type=int, default=64)
  p.add_argument('--max_seq_length', type=int, default=128)
  p.add_argument('--threads', type=int, default=os.cpu_count() or 1,
                 help='torch.set_num_threads (on a machine shared with other jobs, 1 avoids '
                      'OpenMP spin-waiting, which slowed 2 threads ~7x in our runs)')
  return p.parse_args(argv)


def build(model_dir: str, k: int, size: int, threads: int = 1):
  import adapters
  import torch
  from transformers import AutoTokenizer
  model = adapters.AutoAdapterModel.from_pretrained(model_dir)
  hidden = model.config.hidden_size
  names = [f'task{t}' for t in range(k)]
  for name in names:
    model.add_adapter(name, config=adapters.DoubleSeqBnConfig(reduction_factor=hidden / size))
    model.add_classification_head(name, num_labels=2, layers=1, use_pooler=True)
  model.eval()
  torch.set_num_threads(threads)
  return model, AutoTokenizer.from_pretrained(model_dir), names


def _logits(out):
  return out.logits if hasattr(out, 'logits') else out[0]


def run_batch(model, tok, names, texts, tasks, mode, max_len):
  """Logits per row ([rows, 2]) for rows of mixed tasks, the peer's way."""
  import torch
  from adapters.composition import Parallel
  with torch.no_grad():
    if mode == 'parallel':
      batch = tok(texts, padding=True, truncation=True, max_length=max_len, return_tensors='pt')
      model.active_adapters = Parallel(*names) if len(names) > 1 else names[0]
      out = model(**batch)
      per_task = [_logits(o) for o in out.head_outputs] if len(names) > 1 else [_logits(out)]
      b = len(texts)
      # Heads on the pooler get all K x B replicated rows (task t's are rows t*B..t*B+B-1);
      # heads on the [CLS] state get their own B.
      offset = [t * b if len(x) == len(names) * b else 0 for t, x in enumerate(per_task)]
      return torch.stack([per_task[t][offset[t] + i] for i, t in enumerate(tasks)])
    result = [None] * len(texts)
    for t, name in enumerate(names):
      idx = [i for i, task in enumerate(tasks) if task == t]
      if not idx:
        continue
      batch = tok([texts[i] for i in idx], padding=True, truncation=True, max_length=max_len,
                  return_tensors='pt')
      model.active_adapters = name
      model.active_head = name
      for i, row in zip(idx, _logits(model(**batch))):
        result[i] = row
    return torch.stack(result)


def measure(model, tok, names, texts, mode, batch_size, args) -> dict:
  tasks_all = [i % len(names) for i in range(len(texts))]
  run_batch(model, tok, names, texts[:batch_size], tasks_all[:batch_size], mode,
            args.max_seq_length)  # warm-up
  times, rows, start = [], 0, time.perf_counter()
  while rows < args.rows and time.perf_counter() - start < args.max_seconds:
    lo = rows % len(texts)
    chunk, tasks = texts[lo:lo + batch_size], tasks_all[lo:lo + batch_size]
    t = time.perf_counter()
    run_batch(model, tok, names, chunk, tasks, mode, args.max_seq_length)
    times.append(time.perf_counter() - t)
    rows += len(chunk)
  times.sort()
  return {'rows': rows, 'seconds': round(sum(times), 3),
          'rows_per_s': round(rows / sum(times), 2),
          'p50_ms': round(1000 * statistics.median(times), 2),
          'p99_ms': round(1000 * times[min(len(times) - 1, int(round(0.99 * (len(times) - 1))))],
                          2)}


def main(argv=None):
  args = parse_args(argv)
  texts = sentences(args.glue_dir)
  for k in [int(x) for x in args.adapters.split(',')]:
    model, tok, names = build(args.model, k, args.adapter_size, args.threads)
    for mode in args.modes.split(','):
      if k == 1 and mode == 'sequential':
        continue  # one adapter: the two modes are the same forward pass
      for b in [int(x) for x in args.batch_sizes.split(',')]:
        res = measure(model, tok, names, texts, mode, b, args)
        print(json.dumps({'tool': 'adapterhub', 'bench': 'peer_serve', 'cpu': cpu_model(),
                          'cores': os.cpu_count(), 'model': pathlib.Path(args.model).name,
                          'mode': mode if k > 1 else 'single', 'adapters': k,
                          'threads': args.threads,
                          'batch_size': b, **res}), flush=True)


if __name__ == '__main__':
  main()
