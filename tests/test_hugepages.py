"""The huge-page re-exec: when it applies, the environment it sets, and that it happens."""

import os
import subprocess
import sys

import pytest

from adapter_tuning.training import hugepages

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _thp(tmp_path, mode):
  path = tmp_path / 'enabled'
  path.write_text(mode)
  return str(path)


@pytest.mark.skipif(sys.platform != 'linux', reason='glibc tunables exist only on Linux')
def test_wanted_only_where_the_kernel_gives_huge_pages_on_request(tmp_path):
  env = {'JAX_PLATFORMS': 'cpu'}
  assert hugepages.wanted(env, _thp(tmp_path, 'always [madvise] never\n'))
  assert hugepages.wanted(env, _thp(tmp_path, '[always] madvise never\n'))
  assert not hugepages.wanted(env, _thp(tmp_path, 'always madvise [never]\n'))
  assert not hugepages.wanted(env, str(tmp_path / 'missing'))
  madvise = _thp(tmp_path, 'always [madvise] never\n')
  assert not hugepages.wanted({**env, 'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=0'}, madvise)
  assert not hugepages.wanted({**env, 'ADAPTER_TUNING_NO_REEXEC': '1'}, madvise)
  assert not hugepages.wanted({'JAX_PLATFORMS': 'cuda,cpu'}, madvise)  # not XLA:CPU


def test_cpu_backend_from_jax_platforms_or_installed_plugins():
  none = lambda name: None
  assert hugepages.cpu_backend({'JAX_PLATFORMS': 'cpu'}, none)
  assert not hugepages.cpu_backend({'JAX_PLATFORMS': 'tpu'}, none)
  assert not hugepages.cpu_backend({'JAX_PLATFORMS': 'cuda,cpu'}, none)
  assert hugepages.cpu_backend({}, none)
  assert not hugepages.cpu_backend({}, lambda name: object() if name == 'libtpu' else None)


def test_environment_keeps_other_tunables_and_marks_the_reexec():
  env = hugepages.environment({'GLIBC_TUNABLES': 'glibc.malloc.arena_max=2', 'X': 'y'})
  assert env['GLIBC_TUNABLES'] == 'glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1'
  assert env['X'] == 'y' and env['ADAPTER_TUNING_NO_REEXEC'] == '1'
  assert hugepages.environment({})['GLIBC_TUNABLES'] == 'glibc.malloc.hugetlb=1'


def test_reexec_restarts_the_process_with_the_tunable():
  """A process calling reexec() comes back (same arguments) with the tunable set."""
  env = {k: v for k, v in os.environ.items()
         if k not in ('GLIBC_TUNABLES', 'ADAPTER_TUNING_NO_REEXEC')}
  env['JAX_PLATFORMS'] = 'cpu'
  if not hugepages.wanted(env):
    pytest.skip('this host gives no transparent huge pages on request: nothing to re-exec for')
  probe = ('import os, sys; from adapter_tuning.training import hugepages; hugepages.reexec(); '
           'print(os.environ.get("GLIBC_TUNABLES", ""), os.getpid(), sys.argv[1:])')
  out = subprocess.run([sys.executable, '-c', probe, 'a', 'b'], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=60, check=True).stdout.split()
  assert out[0] == 'glibc.malloc.hugetlb=1'
  assert out[-2:] == ["['a',", "'b']"]
