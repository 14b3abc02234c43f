"""A full disk loses nothing: the write that fails is one line naming the path and the space
needed (exit 1), what was written before stays intact, and a rerun with space resumes to
the same weights, bit for bit. The disk fills by making the n-th write raise ENOSPC (no
root needed): orbax's checkpoint save, or `fileio._write` (metrics lines, predictions,
artifacts)."""

import errno
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file

from adapter_tuning import fileio
from adapter_tuning.errors import RunFailure
from adapter_tuning.interop import artifact
from helpers import DEMO_CHECKPOINTED, ROOT, _env, final_eval, run_train

ARGS = DEMO_CHECKPOINTED  # the config of conftest's demo_checkpointed_run

DRIVER = '''
import errno, sys
import orbax.checkpoint as ocp
from adapter_tuning import fileio
target, n = sys.argv[1], int(sys.argv[2])
calls = [0]
def failing(original):
  def call(*args, **kwargs):
    calls[0] += 1
    if calls[0] == n:
      raise OSError(errno.ENOSPC, 'No space left on device')
    return original(*args, **kwargs)
  return call
if target == 'checkpoint':
  ocp.CheckpointManager.save = failing(ocp.CheckpointManager.save)
else:
  fileio._write = failing(fileio._write)
from adapter_tuning.train import main
sys.exit(main(['train', *sys.argv[3:]]))
'''


def _train_with_full_disk(target, n, workdir):
  return subprocess.run([sys.executable, '-c', DRIVER, target, str(n), *ARGS, '--workdir',
                         str(workdir)], cwd=ROOT, env=_env(1), capture_output=True, text=True,
                        timeout=600)


@pytest.fixture
def clean(demo_checkpointed_run):
  """The same run, never interrupted (shared with other files; only read here)."""
  return demo_checkpointed_run


def _same_weights(a, b):
  wa, wb = (load_file(str(pathlib.Path(w) / 'adapter' / 'weights.safetensors')) for w in (a, b))
  assert wa.keys() == wb.keys()
  for k in wa:
    np.testing.assert_array_equal(wa[k], wb[k], err_msg=k)


@pytest.mark.parametrize('target,n,where', [
    ('checkpoint', 3, r'checkpoints: no space left on device \(needs about [\d.]+ [KM]iB, '
                      r'[\d.]+ [KM]iB free\); the checkpoint of step 12 is intact'),
    ('write', 4, r'metrics\.jsonl: no space left on device'),
])
def test_full_disk_is_one_line_then_a_rerun_resumes_bit_identically(clean, tmp_path, target,
                                                                   n, where):
  import re
  failed = _train_with_full_disk(target, n, tmp_path)
  assert failed.returncode == 1, failed.stderr[-3000:]
  lines = failed.stderr.strip().splitlines()
  assert len(lines) == 1 and re.search(where, lines[0]), failed.stderr[-3000:]
  assert 'free some space and rerun the same command' in lines[0]
  assert not (tmp_path / 'adapter').exists()
  rerun = run_train(*ARGS, '--workdir', tmp_path)
  assert rerun.returncode == 0, rerun.stderr[-2000:]
  assert 'resumed from the checkpoint' in rerun.stdout
  _same_weights(clean, tmp_path)
  assert final_eval(clean)['eval/accuracy'] == final_eval(tmp_path)['eval/accuracy']


PARAMS = {'head': {'kernel': np.ones((4, 2), np.float32), 'bias': np.zeros(2, np.float32)}}
META = {'task': 'demo', 'head': 'classification', 'label_names': ['a', 'b'], 'num_outputs': 2,
        'trainable_rules': [['.*', 'train']], 'base': {'name': 'b', 'sha256': 'a' * 64}}


def test_full_disk_while_replacing_an_artifact_keeps_the_old_one(tmp_path, monkeypatch):
  artifact.save(tmp_path / 'adapter', PARAMS, META)
  before = {f.name: f.read_bytes() for f in (tmp_path / 'adapter').iterdir()}

  def full(fh, data):
    raise OSError(errno.ENOSPC, 'No space left on device')
  monkeypatch.setattr(fileio, '_write', full)
  with pytest.raises(RunFailure, match=r'adapter: no space left on device \(needs about'):
    artifact.save(tmp_path / 'adapter', {'head': {'bias': np.ones(2)}}, {**META, 'step': 9})
  assert {f.name: f.read_bytes() for f in (tmp_path / 'adapter').iterdir()} == before
  assert sorted(p.name for p in tmp_path.iterdir()) == ['adapter']  # no temporary folder


def test_a_failed_metrics_line_leaves_no_half_line(tmp_path, monkeypatch):
  path = tmp_path / 'metrics.jsonl'
  with fileio.open_append(path) as fh:
    fileio.append_line(fh, path, '{"step": 1}')

    def half(fh, data):
      fh.write(data[:5])
      raise OSError(errno.ENOSPC, 'No space left on device')
    monkeypatch.setattr(fileio, '_write', half)
    with pytest.raises(RunFailure, match='metrics.jsonl: no space left'):
      fileio.append_line(fh, path, '{"step": 2}')
  assert path.read_text() == '{"step": 1}\n'
