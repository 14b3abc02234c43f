"""The trainer on an fsdp mesh, and a run resumed under another mesh (mesh.fsdp is not part
of a run's identity): the real command line on the demo base, 1 vs 8 fake CPU devices."""

import shutil

import numpy as np
from safetensors.numpy import load_file

from helpers import DEMO_REFERENCE, read_metrics, run_train

ARGS = DEMO_REFERENCE  # the config of conftest's demo_reference_run (log_every_steps=1)


def _adapter(workdir) -> dict:
  return load_file(str(workdir / 'adapter' / 'weights.safetensors'))


def _losses(workdir) -> dict:
  return {m['step']: m['train/loss'] for m in read_metrics(workdir) if 'train/loss' in m}


def _train(workdir, fsdp: int, devices: int):
  proc = run_train(*ARGS, '--workdir', workdir, f'--config.mesh.fsdp={fsdp}', devices=devices,
                   timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


def _close(a: dict, b: dict, atol: float = 1e-5):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_allclose(a[k], b[k], atol=atol, rtol=0, err_msg=k)


def test_fsdp_run_matches_and_resumes_under_another_mesh(tmp_path, demo_reference_run):
  one, eight = demo_reference_run, tmp_path / 'eight'  # one: mesh.fsdp=1 on 1 device (read only)
  out = _train(eight, fsdp=8, devices=8)
  assert '8 cpu device(s)' in out.stdout
  _close(_adapter(one), _adapter(eight))
  np.testing.assert_allclose(list(_losses(eight).values()), list(_losses(one).values()),
                             atol=1e-5, rtol=0)
  # Interrupted after step 4 (the step-8 checkpoint and artifact gone), resumed on the other
  # mesh: the same config but mesh.fsdp, so the run is not refused.
  for src, fsdp, devices, reference in ((eight, 1, 1, one), (one, 8, 8, eight)):
    resumed = tmp_path / f'{src.name}_resumed_on_{devices}'
    shutil.copytree(src, resumed)
    shutil.rmtree(resumed / 'checkpoints' / '8')
    shutil.rmtree(resumed / 'adapter')
    out = _train(resumed, fsdp=fsdp, devices=devices)
    assert 'resumed from the checkpoint at step 4' in out.stdout, out.stdout[-2000:]
    _close(_adapter(resumed), _adapter(reference))
