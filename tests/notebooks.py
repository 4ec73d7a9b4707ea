"""Runs a colab/ notebook the way a fresh Colab runtime does, for tests/test_colab.py and
tests/test_label_noise.py.

The kernel starts in an empty folder outside any checkout, where `import sface_jax` fails (a
`sitecustomize` hides this interpreter's own, e.g. the venv's editable install), and the
notebook's first cell installs the package through its form field (`SFACE_JAX_SOURCE`, here
from the environment) from a wheel built from this checkout, or any pip source. pip installs
into a folder of the test's own (`PIP_TARGET`, on the kernel's PYTHONPATH) and without
dependencies (`PIP_NO_DEPS`: this interpreter has them) or the package index, so the venv
that parallel test workers share is untouched. Smoke mode (`SFACE_JAX_SMOKE=1`) keeps each
notebook to about a minute on a CPU.
"""

import dataclasses
import pathlib
import shutil
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
COLAB = REPO / 'colab'
INSTALL_TITLE = '#@title Install sface_jax'
CELL_TIMEOUT_S = 600  # a training cell: about a minute on 2 CPU cores

_HIDE_INSTALLED = '''"""This runtime has no sface_jax but the one pip installs under {site!r}."""
import importlib.machinery
import sys


class _OnlyTheInstalledCopy:
  @classmethod
  def find_spec(cls, name, path=None, target=None):
    if name != 'sface_jax':
      return None
    spec = importlib.machinery.PathFinder.find_spec(name, [{site!r}])
    if spec is None:
      raise ModuleNotFoundError("No module named 'sface_jax'", name=name)
    return spec


sys.meta_path.insert(0, _OnlyTheInstalledCopy)
'''


def build_wheel(directory: pathlib.Path) -> pathlib.Path:
  """A wheel of this checkout's working tree (what a user would upload), built in `directory`."""
  source = directory / 'source'
  shutil.copytree(REPO / 'sface_jax', source / 'sface_jax',
                  ignore=shutil.ignore_patterns('__pycache__', '*.pyc'))
  shutil.copy(REPO / 'pyproject.toml', source)
  subprocess.run([sys.executable, '-m', 'pip', 'wheel', '-q', '--no-deps', '--no-index',
                  '--no-build-isolation', '-w', str(directory / 'wheel'), str(source)],
                 check=True, capture_output=True, text=True)
  wheel, = (directory / 'wheel').glob('sface_jax-*.whl')
  return wheel


@pytest.fixture(scope='session')
def sface_jax_wheel(tmp_path_factory) -> pathlib.Path:
  return build_wheel(tmp_path_factory.mktemp('wheel'))


@dataclasses.dataclass
class Run:
  outputs: list  # every code cell's outputs, in order
  text: str  # stream and plain-text outputs, joined
  images: int  # PNG outputs
  site: pathlib.Path  # where the install cell's pip put the package


def fresh_runtime(tmp_path: pathlib.Path, monkeypatch, *, source: str, workdir=None
                  ) -> pathlib.Path:
  """The environment of a fresh runtime for kernels started after this call; returns the
  empty folder the kernel runs in."""
  pytest.importorskip('nbclient')
  pytest.importorskip('ipykernel')
  from ipykernel import kernelspec  # pylint: disable=g-import-not-at-top
  runtime, site, shim = tmp_path / 'content', tmp_path / 'site', tmp_path / 'shim'
  for folder in (runtime, site, shim):
    folder.mkdir()
  (shim / 'sitecustomize.py').write_text(_HIDE_INSTALLED.format(site=str(site)))
  kernelspec.install(kernel_name='python3', prefix=str(tmp_path / 'jupyter'))
  environment = {
      'JUPYTER_PATH': str(tmp_path / 'jupyter' / 'share' / 'jupyter'),
      'PYTHONPATH': f'{shim}:{site}',
      'PIP_TARGET': str(site), 'PIP_NO_DEPS': '1', 'PIP_NO_INDEX': '1',
      'PIP_NO_BUILD_ISOLATION': '0',  # pip reads this one inverted: 0 = no isolation
      'PIP_DISABLE_PIP_VERSION_CHECK': '1',
      'SFACE_JAX_SOURCE': source, 'SFACE_JAX_SMOKE': '1', 'TF_CPP_MIN_LOG_LEVEL': '2'}
  if workdir is not None:
    environment['SFACE_JAX_WORKDIR'] = str(workdir)
  for name, value in environment.items():
    monkeypatch.setenv(name, value)
  return runtime


def execute(notebook, runtime: pathlib.Path, *, allow_errors: bool = False) -> Run:
  """Runs `notebook` (a path or an nbformat node) in `runtime`; raises CellExecutionError,
  naming the cell, if a cell fails (unless `allow_errors`: then it is an output)."""
  import nbclient  # pylint: disable=g-import-not-at-top
  import nbformat  # pylint: disable=g-import-not-at-top
  if not isinstance(notebook, nbformat.NotebookNode):
    notebook = nbformat.read(notebook, as_version=4)
  client = nbclient.NotebookClient(notebook, timeout=CELL_TIMEOUT_S, kernel_name='python3',
                                   allow_errors=allow_errors,
                                   resources={'metadata': {'path': str(runtime)}})
  client.execute()
  outputs = [o for cell in notebook.cells if cell.cell_type == 'code' for o in cell.outputs]
  text = ''.join(o.get('text', '') for o in outputs if o.output_type == 'stream')
  text += ''.join(o.get('data', {}).get('text/plain', '') for o in outputs
                  if o.output_type in ('execute_result', 'display_data'))
  images = sum('image/png' in o.get('data', {}) for o in outputs)
  return Run(outputs, text, images, runtime.parent / 'site')


def install_cell(path):
  """The install cell (the first code cell) of a notebook file."""
  import nbformat  # pylint: disable=g-import-not-at-top
  notebook = nbformat.read(path, as_version=4)
  return next(cell for cell in notebook.cells if cell.cell_type == 'code')
