"""Runs Python in a subprocess with N forced CPU devices (XLA_FLAGS must be set before jax is
imported, so multi-device checks cannot run in the test process itself)."""

import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]


def run_python(*args: str, devices: int = 8, timeout: int = 600) -> subprocess.CompletedProcess:
  """`python *args` from the repository root on `devices` CPU devices; fails the test with
  its stderr unless it exits 0."""
  env = dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}',
             JAX_PLATFORMS='cpu')
  env['PYTHONPATH'] = os.pathsep.join(filter(None, [str(REPO), env.get('PYTHONPATH', '')]))
  done = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=timeout, check=False)
  assert done.returncode == 0, done.stderr[-4000:]
  return done
