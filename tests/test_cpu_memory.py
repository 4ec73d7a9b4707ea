"""The host-memory tunables: when the CLI restarts itself with them, and that they take effect."""

import importlib.machinery
import os
import platform
import resource
import subprocess
import sys
import types

import pytest

from sface_jax import cpu_memory

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ON_GLIBC = sys.platform == 'linux' and platform.libc_ver()[0] == 'glibc'


def _environ_without_tunables() -> dict:
  return {k: v for k, v in os.environ.items() if k != 'GLIBC_TUNABLES'}


@pytest.mark.parametrize('environ,expected', [
    ({'JAX_PLATFORMS': 'cpu'}, True),
    ({'JAX_PLATFORMS': 'cuda,cpu'}, False),
    ({'JAX_PLATFORMS': 'cpu,cuda'}, False),  # any accelerator named counts
    ({'JAX_PLATFORMS': 'tpu'}, False),
    ({'JAX_PLATFORMS': 'cpu', 'TPU_LIBRARY_PATH': '/lib/libtpu.so'}, True),  # cpu asked for
    ({'JAX_PLATFORMS': 'cpu', 'GLIBC_TUNABLES': ''}, False),  # the user's own choice stays
    ({'JAX_PLATFORMS': 'cpu', 'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=1'}, False),
])
def test_reexec_only_for_cpu_runs_without_user_tunables(environ, expected):
  assert cpu_memory.should_reexec(environ) == (expected and ON_GLIBC)


def test_without_jax_platforms_the_installed_plugins_and_libtpu_decide(monkeypatch):
  monkeypatch.setattr(cpu_memory, 'accelerator_plugins', lambda: ['xla_cuda12'])
  assert not cpu_memory.runs_on_cpu({})
  monkeypatch.setattr(cpu_memory, 'accelerator_plugins', lambda: [])
  assert cpu_memory.runs_on_cpu({})
  # a TPU VM whose libtpu is not a Python package: JAX finds it through TPU_LIBRARY_PATH
  assert not cpu_memory.runs_on_cpu({'TPU_LIBRARY_PATH': '/usr/lib/libtpu.so'})


def _module(name: str, path: str = '/repo/probe.py'):
  main = types.ModuleType('__main__')
  main.__spec__ = importlib.machinery.ModuleSpec(name, None, origin=path)
  main.__file__ = path
  return main


@pytest.mark.parametrize('orig_argv,main,expected', [
    (['python', '-m', 'sface_jax.main', '--workdir', 'w'], _module('sface_jax.main'), True),
    (['python', '-X', 'dev', '-u', '-msface_jax.main'], _module('sface_jax.main'), True),
    (['python', '/repo/probe.py', '--x'], _module('probe'), True),
    # runpy.run_module('sface_jax.main', run_name='__main__') from another program
    (['python', '-m', 'other_tool'], _module('sface_jax.main'), False),
    (['python', '/repo/other.py'], _module('sface_jax.main', '/repo/sface_jax/main.py'), False),
    # Jupyter's kernel (`%run -m sface_jax.main` in a notebook), `python -c`, the REPL
    (['python', '-m', 'ipykernel_launcher', '-f', 'k.json'], _module('sface_jax.main'), False),
    (['python', '-c', 'import sface_jax.main'], _module('sface_jax.main'), False),
    (['python'], _module('sface_jax.main'), False),
])
def test_started_as_command(orig_argv, main, expected):
  assert cpu_memory.started_as_command(orig_argv, main) == expected


def test_never_started_as_command_inside_ipython(monkeypatch):
  """Even with a command line that matches (`ipython -m sface_jax.main`-like), an IPython
  shell or kernel in the process means no restart."""
  ipython = types.ModuleType('IPython')
  ipython.get_ipython = lambda: None  # imported, no shell running: still a plain command
  monkeypatch.setitem(sys.modules, 'IPython', ipython)
  args = (['python', '-m', 'sface_jax.main'], _module('sface_jax.main'))
  assert cpu_memory.started_as_command(*args)
  ipython.get_ipython = object  # a running shell
  assert not cpu_memory.started_as_command(*args)


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


_PROBE = """
from sface_jax import cpu_memory
cpu_memory.reexec_with_tunables()
import os
print(os.environ.get('GLIBC_TUNABLES', '<unset>'))
"""


def _run_probe(tmp_path, *command: str) -> subprocess.CompletedProcess:
  (tmp_path / 'probe_main.py').write_text(_PROBE)
  env = _environ_without_tunables()
  env.update(JAX_PLATFORMS='cpu', PYTHONPATH=os.pathsep.join([REPO, str(tmp_path)]))
  return subprocess.run([sys.executable, *command], env=env, capture_output=True, text=True,
                        check=True, cwd=tmp_path, timeout=120)


@pytest.mark.skipif(not ON_GLIBC, reason='glibc tunables')
@pytest.mark.parametrize('command', [('-m', 'probe_main'), ('probe_main.py',)])
def test_the_cli_restarts_itself_once_with_the_tunables(tmp_path, command):
  done = _run_probe(tmp_path, *command)
  assert done.stdout.split() == [cpu_memory.TUNABLES]  # restarted once (one line), tunables set
  assert done.stderr.count('restarting with GLIBC_TUNABLES') == 1, done.stderr


@pytest.mark.skipif(not ON_GLIBC, reason='glibc tunables')
@pytest.mark.parametrize('command', [
    # another program running it as its __main__ through runpy
    ('-c', "import runpy; runpy.run_module('probe_main', run_name='__main__', alter_sys=True)"),
    # IPython (a Jupyter kernel is the same shell): `%run -m probe_main`
    ('-m', 'IPython', '--quick', '--no-banner', '-c', '%run -m probe_main'),
])
def test_no_restart_when_run_inside_another_program(tmp_path, command):
  if command[1] == 'IPython':
    pytest.importorskip('IPython')
  done = _run_probe(tmp_path, *command)
  assert done.stdout.split()[-1:] == ['<unset>'], done
  assert 'restarting' not in done.stderr
