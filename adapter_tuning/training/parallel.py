"""Data parallelism with `jax.jit` over a 1-D mesh of every device of every process.

Params are replicated, batches are split along 'data'. Each process holds its own rows of
the global batch (rows p*b:(p+1)*b for process p, b = global batch / process count), and
`make_array_from_process_local_data` assembles the global array without any copy between
hosts. The same code runs on one CPU, fake CPU devices, GPUs, TPUs and TPU pods.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from adapter_tuning.errors import UsageError


def make_mesh() -> Mesh:
  return Mesh(np.asarray(jax.devices()), ('data',))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P('data'))


def check_batch_size(batch_size: int, name: str = 'batch_size'):
  devices, processes = jax.device_count(), jax.process_count()
  if batch_size % devices or batch_size % processes:
    raise UsageError(f'{name}={batch_size} is not divisible by the {devices} devices; use a '
                     f'multiple of {devices}')


def local_rows(global_batch_size: int) -> slice:
  """The rows of a global batch that this process feeds."""
  per_process = global_batch_size // jax.process_count()
  start = jax.process_index() * per_process
  return slice(start, start + per_process)


def to_global(local_batch: dict, sharding: NamedSharding) -> dict:
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local_batch.items()}


def put_replicated(tree, mesh: Mesh):
  """Host arrays (identical on every process) -> replicated device arrays."""
  sharding = replicated(mesh)
  if jax.process_count() == 1:
    return jax.device_put(tree, sharding)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x), np.shape(x)),
      tree)


def to_host(tree):
  """Device arrays -> numpy on every process (gathers across processes when needed)."""
  if jax.process_count() == 1:
    return jax.device_get(tree)
  return multihost_utils.process_allgather(tree, tiled=True)
