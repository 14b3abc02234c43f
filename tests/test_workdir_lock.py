"""One run per workdir: a second run on a busy workdir exits 2 naming the first's PID and
touches nothing; SIGKILL leaves no stale lock."""

import signal

from helpers import read_metrics, run_train, start_train, wait_for_step

ARGS = ('--config', 'configs/demo.py', '--config.num_train_steps=5000',  # outlives the test
        '--config.log_every_steps=2', '--config.checkpoint_every_steps=10',
        '--config.data.max_train_examples=256')


def test_second_run_on_a_busy_workdir_is_refused_and_the_first_is_untouched(tmp_path):
  first = start_train(*ARGS, '--workdir', tmp_path)
  try:
    wait_for_step(tmp_path, 2, first)
    second = run_train(*ARGS, '--workdir', tmp_path)
    assert second.returncode == 2, second.stderr[-2000:]
    assert f'is in use by PID {first.pid} on host' in second.stderr
    assert len(second.stderr.strip().splitlines()) == 1
    first.send_signal(signal.SIGTERM)  # pre-emption: the first checkpoints and exits 0
    assert first.wait(timeout=300) == 0, first.stderr.read()[-2000:]
  finally:
    first.kill()
  steps = [m['step'] for m in read_metrics(tmp_path) if 'train/loss' in m]
  assert len(steps) >= 1 and steps == sorted(set(steps))  # one writer: no duplicated records


def test_after_sigkill_a_new_run_takes_the_lock_at_once(tmp_path):
  short = (*ARGS, '--config.num_train_steps=60')  # the last flag wins: the rerun is short
  first = start_train(*short, '--workdir', tmp_path)
  wait_for_step(tmp_path, 2, first)
  first.send_signal(signal.SIGKILL)
  first.wait(timeout=60)
  rerun = run_train(*short, '--workdir', tmp_path)
  assert rerun.returncode == 0, rerun.stderr[-2000:]
  assert 'in use' not in rerun.stderr
