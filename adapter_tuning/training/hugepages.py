"""Back XLA:CPU's per-step buffers with transparent huge pages: one re-exec at start-up.

XLA:CPU allocates each execution's temporary buffer with malloc and frees it afterwards
(~1 GB for a MiniLM adapter step at batch 32 x 128 tokens, several GB for BERT-base).
glibc serves blocks that large with mmap/munmap, so every step faults in the whole buffer
again as fresh 4 KiB pages: ~250,000 page faults per MiniLM step (`/usr/bin/time -v`,
`strace -k` shows the munmap in xla::CpuDeviceMemory's destructor). The glibc tunable
`glibc.malloc.hugetlb=1` (glibc >= 2.35) makes malloc madvise such blocks for transparent
huge pages, which cuts those faults ~20x without changing what is allocated; see
BENCHMARKS.md for the measured step times.

glibc reads tunables only when a process starts, so the command-line entry points call
`reexec()` first: when the tunable is missing and the kernel allows THP on request, the
process re-executes itself once (same PID, same arguments) with it set. Library users can
export GLIBC_TUNABLES=glibc.malloc.hugetlb=1 themselves; ADAPTER_TUNING_NO_REEXEC=1
turns the re-exec off. It runs only where JAX will use XLA:CPU: not when JAX_PLATFORMS names
another backend first, nor when a GPU/TPU plugin is installed and JAX_PLATFORMS is unset
(device buffers there do not come from malloc, so the re-exec would only cost start-up).
"""

from __future__ import annotations

import importlib.util
import os
import platform
import sys

TUNABLE = 'glibc.malloc.hugetlb=1'
_DONE = 'ADAPTER_TUNING_NO_REEXEC'
_THP_MODE = '/sys/kernel/mm/transparent_hugepage/enabled'


def wanted(environ=os.environ, thp_mode_path: str = _THP_MODE) -> bool:
  """Whether a re-exec would change anything here."""
  if sys.platform != 'linux' or environ.get(_DONE) or not cpu_backend(environ):
    return False
  if 'glibc.malloc.hugetlb' in environ.get('GLIBC_TUNABLES', ''):
    return False
  if platform.libc_ver()[0] != 'glibc':
    return False
  try:
    with open(thp_mode_path) as f:
      mode = f.read()
  except OSError:
    return False
  return '[always]' in mode or '[madvise]' in mode


ACCELERATOR_PLUGINS = ('jax_plugins', 'jax_cuda12_plugin', 'jax_cuda13_plugin', 'libtpu')


def cpu_backend(environ=os.environ, find_spec=importlib.util.find_spec) -> bool:
  """Whether JAX will run on XLA:CPU, decided without importing JAX (this runs first)."""
  first = environ.get('JAX_PLATFORMS', '').split(',')[0].strip().lower()
  if first:
    return first == 'cpu'
  return not any(find_spec(name) is not None for name in ACCELERATOR_PLUGINS)


def environment(environ=os.environ) -> dict:
  """`environ` with the tunable added (other tunables kept) and the re-exec marked done."""
  env = dict(environ)
  env['GLIBC_TUNABLES'] = ':'.join(t for t in (env.get('GLIBC_TUNABLES'), TUNABLE) if t)
  env[_DONE] = '1'
  return env


def reexec():
  """Re-executes this process with the tunable when it helps; returns if it does not."""
  if not wanted():
    return
  sys.stdout.flush()
  sys.stderr.flush()
  try:
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], environment())
  except OSError:
    pass  # could not re-exec: run on with the default allocator
