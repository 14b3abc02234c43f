"""Where numbers go: metrics.jsonl, TensorBoard, and a progress bar or plain log lines.

Only process 0 writes. Every event is one JSON object per line, e.g.
{"step": 300, "eval/validation/accuracy": 0.87}, so runs can be compared with a few lines
of pandas or jq.
"""

from __future__ import annotations

import contextlib
import json
import math
import pathlib
import sys
import time

from adapter_tuning import fileio


@contextlib.contextmanager
def _torch_hidden():
  """tensorboardX imports torch at import time when it is installed (~2 s of start-up
  here, on a job that never uses it: only scalars are written). A None entry in
  sys.modules makes that `import torch` fail fast, which tensorboardX handles."""
  if 'torch' in sys.modules:
    yield
    return
  sys.modules['torch'] = None
  try:
    yield
  finally:
    del sys.modules['torch']


class Reporter:
  def __init__(self, workdir: pathlib.Path, enabled: bool, total_steps: int, batch_size: int,
               progress_bar: bool):
    self.enabled = enabled
    self.total_steps = total_steps
    self.batch_size = batch_size
    self.bar = progress_bar and enabled and sys.stderr.isatty()
    self._jsonl_path = workdir / 'metrics.jsonl'
    self._jsonl = fileio.open_append(self._jsonl_path) if enabled else None
    self._tb = None
    if enabled:
      try:
        with _torch_hidden():
          from tensorboardX import SummaryWriter
        self._tb = SummaryWriter(str(workdir / 'tensorboard'))
      except ImportError:  # TensorBoard events are a convenience, not a requirement
        self._tb = None
    self._last_time = None
    self._last_step = None

  def write(self, step: int, metrics: dict):
    if not self.enabled:
      return
    record = {'step': int(step)}
    record.update({k: (float(v) if isinstance(v, (int, float)) or hasattr(v, 'item') else v)
                   for k, v in metrics.items()})
    fileio.append_line(self._jsonl, self._jsonl_path, json.dumps(record))
    if self._tb is not None:
      for k, v in record.items():
        if k != 'step' and isinstance(v, float) and math.isfinite(v):
          self._tb.add_scalar(k, v, step)
      self._tb.flush()

  def rate(self, step: int) -> dict:
    """Steps/s and examples/s since the previous call."""
    now = time.perf_counter()
    out = {}
    if self._last_time is not None and step > self._last_step:
      steps_per_s = (step - self._last_step) / (now - self._last_time)
      out = {'train/steps_per_s': steps_per_s,
             'train/examples_per_s': steps_per_s * self.batch_size}
    self._last_time, self._last_step = now, step
    return out

  def progress(self, step: int, loss: float | None, steps_per_s: float | None):
    if not self.enabled:
      return
    eta = ''
    if steps_per_s:
      remaining = (self.total_steps - step) / steps_per_s
      eta = f' ETA {int(remaining // 60)}:{int(remaining % 60):02d}'
      rate = f' {steps_per_s:.2f} step/s {steps_per_s * self.batch_size:.1f} ex/s'
    else:
      rate = ''
    loss_s = f' loss {loss:.4f}' if loss is not None else ''
    if self.bar:
      width = 24
      filled = int(width * step / max(self.total_steps, 1))
      sys.stderr.write(f'\r[{"#" * filled}{"." * (width - filled)}] {step}/{self.total_steps}'
                       f'{loss_s}{rate}{eta}   ')
      sys.stderr.flush()
    else:
      self.log(f'step {step}/{self.total_steps}{loss_s}{rate}{eta}')

  def log(self, message: str):
    if self.enabled:
      if self.bar:
        sys.stderr.write('\r' + ' ' * 100 + '\r')
      print(message, flush=True)

  def close(self):
    if self._jsonl:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()
    if self.bar:
      sys.stderr.write('\n')
