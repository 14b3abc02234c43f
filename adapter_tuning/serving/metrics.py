"""Prometheus text-format metrics for the server: counters and histograms, nothing more.

A few dozen lines here instead of a `prometheus_client` dependency: the server exports six
series, and the exposition format (text 0.0.4) is a stable, documented plain-text layout.
Updates come from the event loop (requests) and the worker thread (batches), so every
change and the rendering take one lock.
"""

from __future__ import annotations

import bisect
import threading

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Histogram:
  """Cumulative-bucket histogram (Prometheus semantics: `le` = less than or equal)."""

  def __init__(self, buckets):
    self.buckets = tuple(float(b) for b in buckets)
    self.counts = [0] * (len(self.buckets) + 1)  # the last one is +Inf
    self.total = 0.0
    self.n = 0

  def observe(self, value: float):
    self.counts[bisect.bisect_left(self.buckets, value)] += 1
    self.total += value
    self.n += 1

  def lines(self, name: str) -> list[str]:
    out, running = [], 0
    for bound, count in zip(self.buckets + (float('inf'),), self.counts):
      running += count
      le = '+Inf' if bound == float('inf') else f'{bound:g}'
      out.append(f'{name}_bucket{{le="{le}"}} {running}')
    out += [f'{name}_sum {self.total:.6f}', f'{name}_count {self.n}']
    return out


class ServerMetrics:
  """What the server counts; `render()` is the body of GET /metrics."""

  def __init__(self, max_batch_size: int):
    self._lock = threading.Lock()
    self.requests: dict[tuple[str, int], int] = {}  # (path, status) -> count
    self.inputs = 0
    self.latency = Histogram(LATENCY_BUCKETS)
    sizes, b = [], 1
    while b < max_batch_size:
      sizes.append(b)
      b *= 2
    self.batch_size = Histogram(sizes + [max_batch_size])
    self.queue_rows = 0
    self.adapters = 0

  def request(self, path: str, status: int, seconds: float):
    with self._lock:
      self.requests[(path, status)] = self.requests.get((path, status), 0) + 1
      if path == '/v1/predict':
        self.latency.observe(seconds)

  def batch(self, rows: int):
    with self._lock:
      self.batch_size.observe(rows)
      self.inputs += rows

  def mean_batch_size(self) -> float:
    with self._lock:
      return self.batch_size.total / max(1, self.batch_size.n)

  def render(self) -> str:
    p = 'adapter_serve_'
    with self._lock:
      lines = [f'# HELP {p}requests_total HTTP requests by path and status.',
               f'# TYPE {p}requests_total counter']
      lines += [f'{p}requests_total{{path="{path}",status="{status}"}} {n}'
                for (path, status), n in sorted(self.requests.items())]
      lines += [f'# HELP {p}inputs_total Inputs (rows) run through the model.',
                f'# TYPE {p}inputs_total counter', f'{p}inputs_total {self.inputs}',
                f'# HELP {p}batch_size Rows per model batch (dynamic batching).',
                f'# TYPE {p}batch_size histogram', *self.batch_size.lines(f'{p}batch_size'),
                f'# HELP {p}request_latency_seconds POST /v1/predict latency, server side.',
                f'# TYPE {p}request_latency_seconds histogram',
                *self.latency.lines(f'{p}request_latency_seconds'),
                f'# HELP {p}queue_rows Rows waiting for a batch.', f'# TYPE {p}queue_rows gauge',
                f'{p}queue_rows {self.queue_rows}',
                f'# HELP {p}adapters Adapters loaded.', f'# TYPE {p}adapters gauge',
                f'{p}adapters {self.adapters}']
    return '\n'.join(lines) + '\n'
