"""Running the real command line in a subprocess, as users do."""

import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run_train(*args, devices: int = 1, timeout: int = 600, env_extra=None):
  """python -m adapter_tuning.train ARGS; returns the CompletedProcess (text)."""
  return subprocess.run([sys.executable, '-m', 'adapter_tuning.train', *map(str, args)],
                        cwd=ROOT, env=_env(devices, env_extra), capture_output=True, text=True,
                        timeout=timeout)


def read_metrics(workdir) -> list[dict]:
  path = pathlib.Path(workdir) / 'metrics.jsonl'
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def final_eval(workdir) -> dict:
  evals = [m for m in read_metrics(workdir) if any(k.startswith('eval/') for k in m)]
  return evals[-1]


def _env(devices: int, env_extra=None):
  env = dict(os.environ)
  env['JAX_PLATFORMS'] = 'cpu'
  env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={devices}'
  env.update(env_extra or {})
  return env


def start_train(*args, devices: int = 1, env_extra=None) -> subprocess.Popen:
  return subprocess.Popen([sys.executable, '-m', 'adapter_tuning.train', *map(str, args)],
                          cwd=ROOT, env=_env(devices, env_extra), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def wait_for_step(workdir, step: int, proc: subprocess.Popen, timeout: float = 300):
  """Blocks until metrics.jsonl shows a train log at or past `step`."""
  import time
  deadline = time.time() + timeout
  path = pathlib.Path(workdir) / 'metrics.jsonl'
  while time.time() < deadline:
    if proc.poll() is not None:
      raise AssertionError(f'training exited early: {proc.stderr.read()[-2000:]}')
    if path.exists() and any(m.get('step', 0) >= step and 'train/loss' in m
                             for m in read_metrics(workdir)):
      return
    time.sleep(0.2)
  proc.kill()
  raise AssertionError(f'no step {step} within {timeout}s')
