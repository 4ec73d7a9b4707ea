"""Runs Python in a subprocess with N forced CPU devices (XLA_FLAGS must be set before jax is
imported, so multi-device checks cannot run in the test process itself)."""

import os
import pathlib
import subprocess
import sys

from sface_jax import cpu_memory

REPO = pathlib.Path(__file__).resolve().parents[1]


def run_python(*args: str, devices: int = 8, timeout: int = 600) -> subprocess.CompletedProcess:
  """`python *args` from the repository root on `devices` CPU devices, with the CLI's host
  memory tunables (`sface_jax.cpu_memory`) unless the environment sets its own; fails the
  test with its stderr unless it exits 0."""
  env = dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}',
             JAX_PLATFORMS='cpu')
  env.setdefault('GLIBC_TUNABLES', cpu_memory.TUNABLES)
  env['PYTHONPATH'] = os.pathsep.join(filter(None, [str(REPO), env.get('PYTHONPATH', '')]))
  done = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=timeout, check=False)
  assert done.returncode == 0, done.stderr[-4000:]
  return done
