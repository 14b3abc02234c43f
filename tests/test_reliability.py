"""Runs die; a trusted trainer loses nothing: kill anywhere, corrupt checkpoints, NaN guard."""

import pathlib
import random
import signal
import time

import numpy as np
from safetensors.numpy import load_file

from helpers import (DEMO_CHECKPOINTED, copy_run, final_eval, read_metrics, run_train,
                     start_train)

ARGS = ('--config', 'configs/demo.py', '--config.num_train_steps=150',
        '--config.checkpoint_every_steps=6', '--config.log_every_steps=3',
        '--config.data.max_train_examples=512')


def _weights(workdir):
  return load_file(str(pathlib.Path(workdir) / 'adapter' / 'weights.safetensors'))


def _assert_same_run(a, b):
  wa, wb = _weights(a), _weights(b)
  assert wa.keys() == wb.keys()
  for k in wa:
    np.testing.assert_array_equal(wa[k], wb[k], err_msg=k)
  assert final_eval(a)['eval/accuracy'] == final_eval(b)['eval/accuracy']


def _kill_when(proc, workdir, condition, timeout=240):
  deadline = time.time() + timeout
  while time.time() < deadline and proc.poll() is None:
    if condition(pathlib.Path(workdir)):
      break
    time.sleep(0.01)
  proc.send_signal(signal.SIGKILL)
  proc.wait(timeout=60)


def _logged_step(workdir):
  try:
    return max((m['step'] for m in read_metrics(workdir) if 'train/loss' in m), default=0)
  except (FileNotFoundError, ValueError):  # a line being written
    return 0


def _saving(workdir):
  ckpt = workdir / 'checkpoints'
  return ckpt.exists() and any('tmp' in p.name for p in ckpt.iterdir())


def test_sigkill_anywhere_then_rerun_is_bit_identical(tmp_path):
  clean = tmp_path / 'clean'
  assert run_train(*ARGS, '--workdir', clean).returncode == 0
  kill_step = random.Random(0).randint(8, 30)  # drawn once, not on every poll
  victim = tmp_path / 'victim'
  mid_save = []
  def saving_or_late(w):
    # A save lasts tens of ms, so the poll can miss every window: then the kill lands at
    # step 100 instead (still mid-run), and the test says so rather than failing.
    if _saving(w):
      mid_save.append(True)
      return True
    return _logged_step(w) >= 100
  conditions = [
      lambda w: _logged_step(w) >= kill_step,            # mid-training
      saving_or_late,                                    # during an (async) checkpoint save
      lambda w: _logged_step(w) >= 60,                   # later, past several checkpoints
  ]
  for condition in conditions:
    proc = start_train(*ARGS, '--workdir', victim)
    _kill_when(proc, victim, condition)
    assert not (victim / 'adapter').exists(), 'run finished before it could be killed'
  print(f'killed at step >= {kill_step}; during a save: {bool(mid_save)}')
  final = run_train(*ARGS, '--workdir', victim)
  assert final.returncode == 0, final.stderr[-3000:]
  assert 'resumed from the checkpoint at step' in final.stdout
  _assert_same_run(clean, victim)


def _corrupt(step_dir: pathlib.Path):
  for f in step_dir.rglob('*'):
    if f.is_file():
      f.write_bytes(b'\x00garbage')


def test_corrupt_latest_checkpoint_falls_back_to_previous(demo_checkpointed_run, tmp_path):
  """A finished run (keep_checkpoints=2) whose latest checkpoint is garbage: the rerun
  resumes from the one before and ends where the uninterrupted run ended."""
  clean = demo_checkpointed_run
  run = copy_run(clean, tmp_path / 'run')
  steps = sorted(int(p.name) for p in (run / 'checkpoints').iterdir() if p.name.isdigit())
  assert steps == [18, 24]
  _corrupt(run / 'checkpoints' / '24')
  again = run_train(*DEMO_CHECKPOINTED, '--config.keep_checkpoints=2', '--workdir', run)
  assert again.returncode == 0, again.stderr[-3000:]
  assert 'skipped unreadable checkpoint' in again.stdout + again.stderr
  assert 'resumed from the checkpoint at step 18' in again.stdout
  _assert_same_run(clean, run)


def test_all_checkpoints_unreadable_is_an_error_not_a_fresh_start(demo_checkpointed_run,
                                                                  tmp_path):
  run = copy_run(demo_checkpointed_run, tmp_path / 'run')
  for d in (run / 'checkpoints').iterdir():
    if d.name.isdigit():
      _corrupt(d)
  result = run_train(*DEMO_CHECKPOINTED, '--workdir', run)
  assert result.returncode == 1
  assert 'none can be read' in result.stderr.strip().splitlines()[-1]
  assert 'Traceback' not in result.stderr


def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
  result = run_train('--config', 'configs/demo.py', '--workdir', tmp_path,
                     '--config.learning_rate=1e30', '--config.warmup_ratio=0',
                     '--config.checkpoint_every_steps=1')
  assert result.returncode == 1
  line = result.stderr.strip().splitlines()[-1]
  assert 'non-finite loss or gradient at step 2' in line and 'checkpoint (step 1) is kept' in line
  assert sorted(p.name for p in (tmp_path / 'checkpoints').iterdir() if p.name.isdigit()) == ['1']
