"""Two processes on 127.0.0.1 (jax.distributed, CPU) train exactly what one process does."""

import socket
import subprocess

import numpy as np
from safetensors.numpy import load_file

from helpers import DEMO_REFERENCE, start_train

ARGS = DEMO_REFERENCE  # the config of conftest's demo_reference_run


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def test_two_processes_match_one(tmp_path, demo_reference_run):
  port = _free_port()
  workdir = tmp_path / 'two'
  procs = [start_train(*ARGS, '--workdir', workdir, f'--coordinator_address=127.0.0.1:{port}',
                       '--num_processes=2', f'--process_id={i}') for i in range(2)]
  outputs = []
  try:
    for p in procs:
      outputs.append(p.communicate(timeout=300))
  except subprocess.TimeoutExpired:
    for p in procs:
      p.kill()  # jax.distributed traps SIGTERM: SIGKILL is what stops a stuck worker
    raise
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for p, (out, err) in zip(procs, outputs):
    assert p.returncode == 0, err[-3000:]
  assert '2 cpu device(s)' in outputs[0][0]
  assert 'eval at step' not in outputs[1][0] and 'parameters:' not in outputs[1][0]  # only 0 reports
  a = load_file(str(demo_reference_run / 'adapter' / 'weights.safetensors'))
  b = load_file(str(workdir / 'adapter' / 'weights.safetensors'))
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_allclose(a[k], b[k], atol=1e-5, rtol=0, err_msg=k)
