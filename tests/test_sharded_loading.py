"""Parameters born sharded across processes: two jax.distributed processes on 127.0.0.1, four
fake CPU devices each, one fsdp group of 8 spanning both. Each process reads from MiniLM's
safetensors only the halves of the split matrices that its own devices hold; the trainer on
such a mesh learns what one process on one device learns."""

import json
import socket
import subprocess
import sys

import numpy as np
from safetensors.numpy import load_file

from helpers import DEMO_REFERENCE, ROOT, _env, start_train

SCRIPT = r'''
import json, math, pathlib, sys
import flax.traverse_util as tu
import jax, jax.numpy as jnp, numpy as np
directory, port, pid = pathlib.Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
jax.distributed.initialize(coordinator_address=f'127.0.0.1:{port}', num_processes=2,
                           process_id=pid)
from adapter_tuning.interop import hf_checkpoint
from adapter_tuning.models.encoder import Encoder
from adapter_tuning.training import parallel
assert jax.device_count() == 8 and jax.local_device_count() == 4
config = hf_checkpoint.read_model_config(directory)
ids = jnp.zeros((1, 8), jnp.int32)
shapes = jax.eval_shape(Encoder(config).init, jax.random.PRNGKey(0), ids, ids, ids)['params']
flat_shapes = tu.flatten_dict(shapes)
mesh = parallel.make_mesh(8)
loaded, unused, reader = hf_checkpoint.load_encoder_sharded(
    directory, shapes, config.family, config,
    lambda p: parallel.frozen_shardings(flat_shapes[p], mesh))
reference, _ = hf_checkpoint.convert_encoder_params(
    hf_checkpoint.load_state_dict(directory), shapes, config.family, str(directory), config)
reference = tu.flatten_dict(reference)
expected = total = 0
for path, x in tu.flatten_dict(loaded).items():
  nbytes = math.prod(x.shape) * 4
  total += nbytes
  expected += nbytes if x.sharding.is_fully_replicated else nbytes // 2
  assert len(x.addressable_shards) == 4
  for s in x.addressable_shards:
    assert np.array_equal(np.asarray(s.data), reference[path][s.index]), path
print(json.dumps({'bytes_read': reader.bytes_read, 'expected': expected, 'total': total}))
'''


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _run_both(procs):
  outputs = []
  try:
    for p in procs:
      outputs.append(p.communicate(timeout=300))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()  # jax.distributed traps SIGTERM: SIGKILL is what stops a stuck worker
  for p, (_, err) in zip(procs, outputs):
    assert p.returncode == 0, err[-3000:]
  return outputs


def test_each_process_reads_only_its_slices(minilm_dir):
  port = _free_port()
  procs = [subprocess.Popen([sys.executable, '-c', SCRIPT, str(minilm_dir), str(port), str(i)],
                            cwd=ROOT, env=_env(4), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for i in range(2)]
  for out, _ in _run_both(procs):
    counts = json.loads(out.strip().splitlines()[-1])
    assert counts['bytes_read'] == counts['expected'], counts
    assert counts['bytes_read'] < 0.55 * counts['total'], counts  # ~half of the base


ARGS = DEMO_REFERENCE  # the config of conftest's demo_reference_run


def test_two_processes_on_an_fsdp_mesh_match_one_device(tmp_path, demo_reference_run):
  port = _free_port()
  workdir = tmp_path / 'two'
  procs = [start_train(*ARGS, '--workdir', workdir, '--config.mesh.fsdp=4',
                       f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2',
                       f'--process_id={i}', devices=2) for i in range(2)]
  outputs = _run_both(procs)
  assert '4 cpu device(s)' in outputs[0][0]
  a = load_file(str(demo_reference_run / 'adapter' / 'weights.safetensors'))
  b = load_file(str(workdir / 'adapter' / 'weights.safetensors'))
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_allclose(a[k], b[k], atol=1e-5, rtol=0, err_msg=k)
