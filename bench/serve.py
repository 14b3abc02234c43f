"""Load test of the HTTP server: N concurrent clients x M single-row requests on localhost.

  .venv/bin/python bench/serve.py --model ../shared/models/all-MiniLM-L6-v2 \\
      --clients 1,8,32 --adapters 1,4 --requests 256 --max_seconds 60

For each adapter count K it writes K artifacts on the base (Houlsby adapters of
--adapter_size with random weights: speed does not depend on the values), starts
`python -m adapter_tuning.serve` on a free port, and for each client count runs the load:
every client holds one keep-alive connection and sends one SST-2 dev sentence per request,
tasks taken in turn, until --requests have been sent in all or --max_seconds have passed.
Clients are threads using stdlib http.client (a few microseconds of Python per request, so
the clients are not what is measured; they do share the machine's cores with the server).
One JSON line per (K, N): requests/s, p50/p99 latency as the client saw it, the server's
mean batch size, and the CPU model (lscpu). `--url` points it at a running server instead.
"""

from __future__ import annotations

import argparse
import csv
import http.client
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--model', default=str(ROOT.parent / 'shared/models/all-MiniLM-L6-v2'))
  p.add_argument('--glue_dir', default=str(ROOT.parent / 'shared/data/glue'),
                 help='GLUE TSV folder: request texts are SST-2 dev sentences')
  p.add_argument('--adapters', default='1,4', help='adapter counts, comma-separated')
  p.add_argument('--clients', default='1,8,32', help='client counts, comma-separated')
  p.add_argument('--requests', type=int, default=256, help='requests per run, at most')
  p.add_argument('--max_seconds', type=float, default=60.0, help='per run, at most')
  p.add_argument('--warmup', type=int, default=2, help='untimed requests per client')
  p.add_argument('--adapter_size', type=int, default=64)
  p.add_argument('--max_seq_length', type=int, default=128)
  p.add_argument('--max_batch_size', type=int, default=32)
  p.add_argument('--max_wait_ms', type=float, default=5.0)
  p.add_argument('--url', default=None, help='a running server (tasks from /v1/adapters)')
  return p.parse_args(argv)


def cpu_model() -> str:
  try:
    out = subprocess.run(['lscpu'], capture_output=True, text=True, timeout=10).stdout
  except (OSError, subprocess.SubprocessError):
    return 'unknown'
  match = re.search(r'^Model name:\s*(.+)$', out, re.M)
  return match.group(1).strip() if match else 'unknown'


def sentences(glue_dir: str, n: int = 512) -> list[str]:
  path = pathlib.Path(glue_dir) / 'SST-2' / 'dev.tsv'
  if not path.exists():
    return [f'sentence number {i} about a rather long and uneventful film' for i in range(n)]
  with open(path, newline='') as f:
    reader = csv.DictReader(f, delimiter='\t', quoting=csv.QUOTE_NONE)
    return [row['sentence'] for row, _ in zip(reader, range(n))]


def make_artifacts(model_dir: str, k: int, size: int, max_len: int, root: pathlib.Path):
  """K Houlsby-adapter artifacts on the base, random trained weights, as training writes them."""
  import flax.traverse_util as tu
  import numpy as np

  from adapter_tuning import peft
  from adapter_tuning.interop import artifact
  from adapter_tuning.interop.pretrained import load_pretrained
  from adapter_tuning.training import trainable as tl
  pre = load_pretrained(model_dir, {'size': size})
  rules = tl.resolve('adapters', pre.config.num_layers)
  dirs = []
  for t in range(k):
    rng = np.random.default_rng(t)
    params = {'encoder': pre.params, 'head': {
        'kernel': rng.normal(0, 0.05, (pre.config.hidden_size, 2)), 'bias': np.zeros(2)}}
    trained, _ = tl.split(params, rules)
    trained = tu.unflatten_dict({key: (np.asarray(v) + rng.normal(0, 0.01, np.shape(v))).astype(
        np.float32) for key, v in tu.flatten_dict(trained).items()})
    d = root / f'task{t}'
    artifact.save(d, trained, {
        'task': f'bench/task{t}', 'head': 'classification', 'label_names': ['neg', 'pos'],
        'num_outputs': 2, 'peft': peft.to_meta(pre.adapter),
        'trainable_rules': [list(r) for r in rules],
        'base': {**pre.identity, 'path': str(pre.directory)}, 'max_seq_length': max_len})
    dirs.append(d)
  return dirs


def start_server(dirs, args, log_path: pathlib.Path):
  """The server in a subprocess; (process, url) once it prints its ready line."""
  with open(log_path, 'w') as log:
    proc = subprocess.Popen(
        [sys.executable, '-m', 'adapter_tuning.serve', '--adapter', ','.join(map(str, dirs)),
         '--port', '0', '--max_batch_size', str(args.max_batch_size),
         '--max_wait_ms', str(args.max_wait_ms)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=log, text=True)
  line = proc.stdout.readline()
  match = re.search(r'on (http://\S+)', line)
  if not match:
    proc.kill()
    raise SystemExit(f'server did not start:\n{log_path.read_text()[-2000:]}')
  return proc, match.group(1)


def _connection(url: str):
  parsed = urllib.parse.urlparse(url)
  return http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=120)


def _post(conn, body: bytes) -> int:
  conn.request('POST', '/v1/predict', body, {'Content-Type': 'application/json'})
  response = conn.getresponse()
  response.read()
  return response.status


def batch_stats(url: str) -> tuple[float, float]:
  conn = _connection(url)
  conn.request('GET', '/metrics')
  text = conn.getresponse().read().decode()
  conn.close()
  get = lambda key: float(re.search(rf'^{key} (\S+)$', text, re.M).group(1))  # noqa: E731
  return get('adapter_serve_batch_size_sum'), get('adapter_serve_batch_size_count')


def load(url: str, bodies: list[bytes], clients: int, total: int, max_seconds: float,
         warmup: int) -> dict:
  """Runs the clients; latencies of successful requests, errors, wall time."""
  latencies, errors, lock = [], [0], threading.Lock()
  counter = iter(range(total))
  start_gate = threading.Barrier(clients + 1)
  deadline = [0.0]

  def client(k):
    conn = _connection(url)
    for i in range(warmup):
      _post(conn, bodies[(k + i) % len(bodies)])
    start_gate.wait()
    mine = []
    for i in counter:  # shared: `total` requests over all clients
      if time.perf_counter() > deadline[0]:
        break
      t = time.perf_counter()
      ok = _post(conn, bodies[i % len(bodies)]) == 200
      if ok:
        mine.append(time.perf_counter() - t)
      else:
        with lock:
          errors[0] += 1
    with lock:
      latencies.extend(mine)
    conn.close()

  threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
  for t in threads:
    t.start()
  deadline[0] = time.perf_counter() + max_seconds + 3600  # set for real at the gate
  start_gate.wait()
  t0 = time.perf_counter()
  deadline[0] = t0 + max_seconds
  for t in threads:
    t.join()
  return {'latencies': sorted(latencies), 'errors': errors[0], 'seconds': time.perf_counter() - t0}


def _percentile(sorted_values, q):
  if not sorted_values:
    return float('nan')
  return sorted_values[min(len(sorted_values) - 1, int(round(q * (len(sorted_values) - 1))))]


def run(url: str, tasks: list[str], args, extra: dict):
  texts = sentences(args.glue_dir)
  bodies = [json.dumps({'inputs': [{'task': tasks[i % len(tasks)], 'text': s}]}).encode()
            for i, s in enumerate(texts)]
  for clients in [int(c) for c in args.clients.split(',')]:
    before = batch_stats(url)
    res = load(url, bodies, clients, args.requests, args.max_seconds, args.warmup)
    after = batch_stats(url)
    lat = res['latencies']
    print(json.dumps({
        'tool': 'adapter_tuning', 'bench': 'serve', 'cpu': cpu_model(), 'cores': os.cpu_count(),
        **extra, 'adapters': len(tasks), 'clients': clients, 'requests': len(lat),
        'errors': res['errors'], 'seconds': round(res['seconds'], 3),
        'requests_per_s': round(len(lat) / res['seconds'], 2),
        'p50_ms': round(1000 * _percentile(lat, 0.5), 2),
        'p99_ms': round(1000 * _percentile(lat, 0.99), 2),
        'mean_batch_size': round((after[0] - before[0]) / max(1.0, after[1] - before[1]), 2),
        'max_batch_size': args.max_batch_size, 'max_wait_ms': args.max_wait_ms}), flush=True)


def main(argv=None):
  args = parse_args(argv)
  if args.url:
    conn = _connection(args.url)
    conn.request('GET', '/v1/adapters')
    tasks = [a['task'] for a in json.loads(conn.getresponse().read())['adapters']]
    run(args.url, tasks, args, {'model': 'external'})
    return
  with tempfile.TemporaryDirectory() as tmp:
    root = pathlib.Path(tmp)
    counts = [int(k) for k in args.adapters.split(',')]
    dirs = make_artifacts(args.model, max(counts), args.adapter_size, args.max_seq_length, root)
    for k in counts:
      start = time.perf_counter()
      proc, url = start_server(dirs[:k], args, root / f'serve{k}.log')
      extra = {'model': pathlib.Path(args.model).name,
               'server_start_s': round(time.perf_counter() - start, 1)}
      try:
        run(url, [f'bench/task{t}' for t in range(k)], args, extra)
      finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(120)


if __name__ == '__main__':
  main()
