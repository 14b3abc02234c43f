"""Sharding helpers on 4 fake CPU devices: batch checks, global batches, replication, gathers."""

import subprocess
import sys

from helpers import ROOT, _env

SCRIPT = r'''
import jax, numpy as np
from adapter_tuning.errors import UsageError
from adapter_tuning.training import parallel
assert jax.device_count() == 4
mesh = parallel.make_mesh()
assert mesh.axis_names == ('data',) and mesh.devices.size == 4
parallel.check_batch_size(8)
try:
  parallel.check_batch_size(6, 'eval_batch_size')
  raise SystemExit('6 rows on 4 devices was accepted')
except UsageError as e:
  assert 'eval_batch_size=6' in str(e) and 'multiple of 4' in str(e), e
assert parallel.local_rows(8) == slice(0, 8)  # one process feeds every row
batch = parallel.to_global({'x': np.arange(16).reshape(8, 2)}, parallel.batch_sharded(mesh))
assert batch['x'].shape == (8, 2)
assert [s.data.shape for s in batch['x'].addressable_shards] == [(2, 2)] * 4  # split on rows
rep = parallel.put_replicated({'w': np.ones((3, 3))}, mesh)
assert rep['w'].sharding.is_fully_replicated
back = parallel.to_host({'x': batch['x'] * 1})
assert isinstance(back['x'], np.ndarray) and (back['x'] == np.arange(16).reshape(8, 2)).all()
print('ok')
'''


def test_sharding_helpers_on_four_devices():
  proc = subprocess.run([sys.executable, '-c', SCRIPT], cwd=ROOT, env=_env(4),
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0 and proc.stdout.strip() == 'ok', proc.stderr[-3000:]
