"""The device mesh: data parallelism, and an `fsdp` axis for bases too large to replicate.

One `jax.jit` step over a mesh of every device of every process. With `mesh.fsdp = 1` (the
default) the mesh is 1-D, `('data',)`: params are replicated and batches split along 'data'.
With `mesh.fsdp = N` it is 2-D, `('data', 'fsdp')` with N devices per fsdp group: each
large matrix of the frozen base is split along 'fsdp' (each device holds 1/N of it), XLA
gathers it where the step uses it, and batches are split over both axes, so every device
still gets its own rows. The trainable subtree and its optimizer state stay replicated
unless a leaf is as large as a base matrix (full fine-tuning of a large base), which is
then split the same way. Which dimension is split depends only on a leaf's shape (the
largest one N divides), so the same rule gives the shardings of params, of their Adam
moments and of a checkpoint restored under another mesh.

Each process holds its own rows of the global batch (rows p*b:(p+1)*b for process p, b =
global batch / process count), and `make_array_from_process_local_data` assembles the global
array without any copy between hosts. Devices are laid out in `jax.devices()` order, so an
fsdp group is consecutive devices (one host's, as long as N divides the devices per host).
The same code runs on one CPU, fake CPU devices, GPUs, TPUs and TPU pods.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from adapter_tuning.errors import UsageError

# A frozen leaf is split along 'fsdp' from this many elements on (64 KiB in float32): every
# weight matrix and embedding table of a real base, never a bias or LayerNorm vector (those
# cost more in collectives than they save).
MIN_FROZEN_ELEMENTS = 2 ** 14
# A trained leaf (and its Adam moments) is split only from 16 MiB of float32 on: matrices of a
# large base under full fine-tuning. Adapter, LoRA and head params stay replicated (the
# largest, m = 256 on a 4096-wide base, has 2**20 elements), so their update is local.
MIN_TRAINED_ELEMENTS = 2 ** 22


def make_mesh(fsdp: int = 1) -> Mesh:
  """`('data',)` over every device, or `('data', 'fsdp')` with `fsdp` devices per group."""
  devices = np.asarray(jax.devices())
  if fsdp < 1 or devices.size % fsdp:
    raise UsageError(f'mesh.fsdp={fsdp} does not divide the {devices.size} devices; use a '
                     f'divisor of {devices.size}')
  if fsdp == 1:
    return Mesh(devices, ('data',))
  return Mesh(devices.reshape(-1, fsdp), ('data', 'fsdp'))


def fsdp_size(mesh: Mesh) -> int:
  return dict(mesh.shape).get('fsdp', 1)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  """Rows split over every mesh axis: each device gets batch / device_count rows."""
  names = mesh.axis_names
  return NamedSharding(mesh, P(names if len(names) > 1 else names[0]))


def fsdp_spec(shape, fsdp: int, min_elements: int) -> P:
  """'fsdp' on the largest dimension `fsdp` divides (the first of equals), for leaves of at
  least `min_elements`; P() (replicated) otherwise."""
  if fsdp == 1 or math.prod(shape) < min_elements:
    return P()
  candidates = [(size, -axis) for axis, size in enumerate(shape) if size % fsdp == 0]
  if not candidates:
    return P()
  axis = -max(candidates)[1]
  return P(*([None] * axis), 'fsdp')


def shardings(tree, mesh: Mesh, min_elements: int):
  """A NamedSharding per leaf of `tree` (arrays or ShapeDtypeStructs), by `fsdp_spec`."""
  n = fsdp_size(mesh)
  return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(np.shape(x), n, min_elements)),
                      tree)


def frozen_shardings(tree, mesh: Mesh):
  return shardings(tree, mesh, MIN_FROZEN_ELEMENTS)


def state_shardings(tree, mesh: Mesh):
  """For the train state (trainable params, optimizer state, step, rng) or any part of it."""
  return shardings(tree, mesh, MIN_TRAINED_ELEMENTS)


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
  return put(tree, jax.tree.map(lambda _: replicated(mesh), tree))


def put(tree, shardings_tree):
  """Host arrays (identical on every process) or device arrays -> arrays with these
  shardings. Each device receives only its own shard of a host array (a split leaf is
  never copied whole to any device)."""

  def one(x, sharding):
    if isinstance(x, jax.Array):
      return x if x.sharding == sharding else jax.device_put(x, sharding)
    x = np.asarray(x)
    if jax.process_count() == 1:
      return jax.device_put(x, sharding)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

  return jax.tree.map(one, tree, shardings_tree)


def abstract(tree, shardings_tree):
  """ShapeDtypeStructs of `tree` carrying these shardings (for lowering and restoring)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s),
                      tree, shardings_tree)


def bytes_per_device(abstract_tree) -> int:
  """Bytes one device holds of a tree of sharded ShapeDtypeStructs (or arrays)."""
  return sum(math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
             for x in jax.tree.leaves(abstract_tree))


def to_host(tree):
  """Device arrays -> numpy on every process (gathers across processes when needed)."""
  if jax.process_count() == 1:
    return jax.device_get(tree)
  return multihost_utils.process_allgather(tree, tiled=True)
