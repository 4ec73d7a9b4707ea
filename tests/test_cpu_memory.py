"""The host-memory tunables: when the CLI restarts itself with them, and that they take effect."""

import os
import platform
import resource
import subprocess
import sys

import pytest

from sface_jax import cpu_memory

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ON_GLIBC = sys.platform == 'linux' and platform.libc_ver()[0] == 'glibc'


def _environ_without_tunables() -> dict:
  return {k: v for k, v in os.environ.items() if k != 'GLIBC_TUNABLES'}


@pytest.mark.parametrize('environ,expected', [
    ({'JAX_PLATFORMS': 'cpu'}, True),
    ({'JAX_PLATFORMS': 'cuda,cpu'}, False),
    ({'JAX_PLATFORMS': 'tpu'}, False),
    ({'JAX_PLATFORMS': 'cpu', 'GLIBC_TUNABLES': ''}, False),  # the user's own choice stays
    ({'JAX_PLATFORMS': 'cpu', 'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=1'}, False),
])
def test_reexec_only_for_cpu_runs_without_user_tunables(environ, expected):
  assert cpu_memory.should_reexec(environ) == (expected and ON_GLIBC)


def test_without_jax_platforms_the_installed_plugins_decide(monkeypatch):
  monkeypatch.setattr(cpu_memory, 'accelerator_plugins', lambda: ['xla_cuda12'])
  assert not cpu_memory.runs_on_cpu({})
  monkeypatch.setattr(cpu_memory, 'accelerator_plugins', lambda: [])
  assert cpu_memory.runs_on_cpu({})


_CHURN = """
import ctypes, os, resource
libc = ctypes.CDLL('libc.so.6')
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
print(os.environ.get('GLIBC_TUNABLES', '<unset>'))
def churn():  # what a step does to host memory: big temporaries, freed at its end
  for _ in range(3):
    block = libc.malloc(64 << 20)  # 64 MB, above glibc's largest mmap threshold
    ctypes.memset(block, 1, 64 << 20)  # touch every page
    libc.free(block)
churn()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
churn()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not ON_GLIBC, reason='glibc tunables')
@pytest.mark.parametrize('tunables', [None, cpu_memory.TUNABLES])
def test_tunables_stop_the_page_faults_of_freed_buffers(tunables):
  """Under glibc's defaults every 64 MB block is faulted in anew (16 k pages each, so at
  least 3 × 16 k for three); with the tunables the second round reuses the first's pages."""
  env = _environ_without_tunables()
  if tunables is not None:
    env['GLIBC_TUNABLES'] = tunables
  out = subprocess.run([sys.executable, '-c', _CHURN], env=env, capture_output=True, text=True,
                       check=True).stdout.split()
  faults = int(out[-1])
  if tunables is None:
    assert faults >= 3 * (64 << 20) // resource.getpagesize(), out
  else:
    assert out[0] == tunables and faults < 1000, out


@pytest.mark.skipif(not ON_GLIBC, reason='glibc tunables')
def test_the_cli_restarts_itself_once_with_the_tunables():
  env = _environ_without_tunables()
  env.update(JAX_PLATFORMS='cpu', PYTHONPATH=REPO)
  probe = ('from sface_jax import cpu_memory; cpu_memory.reexec_with_tunables(); '
           'import os; print(os.environ["GLIBC_TUNABLES"])')
  out = subprocess.run([sys.executable, '-c', probe], env=env, capture_output=True, text=True,
                       check=True, cwd=REPO).stdout.split()
  assert out == [cpu_memory.TUNABLES]  # restarted once (one line), with the tunables set
