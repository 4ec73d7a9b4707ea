"""The benchmark scripts run end to end (smoke tests: they time nothing and assert no speed).

bench/train_step.py's paths that only a GPU session exercises in earnest (the breakdown, feeding
from the real pipeline, the PyTorch side, the profile) are run here on the tiny model so they
cannot rot between GPU sessions.
"""

import importlib.util

import pytest

import multi_device
import synthetic_faces


def test_train_step_benchmark_runs(tmp_path):
  data = tmp_path / 'data'
  synthetic_faces.write_dataset(str(data))
  args = ['bench/train_step.py', '--models', 'tiny', '--heads', 'sface', '--batch', '8',
          '--num-classes', '16', '--image-size', '32', '--steps', '1', '--windows', '1',
          '--breakdown', '--data', str(data), '--xla-defaults', '--profile', str(tmp_path / 'p'),
          '--max-warmup', '2']
  with_torch = importlib.util.find_spec('torch') is not None
  if not with_torch:
    args.append('--no-torch')
  out = multi_device.run_python(*args, devices=1).stdout
  rows = [line for line in out.splitlines() if line.startswith('| tiny |')]
  assert len(rows) == 2, out  # printed as measured, and again in the closing table
  for row in rows:
    cells = [cell.strip() for cell in row.strip('|').split('|')]
    assert float(cells[3]) > 0  # ours, img/s
    if with_torch:
      assert float(cells[4]) > 0 and float(cells[5]) > 0  # PyTorch's, and the ratio
    assert float(cells[6]) > 0 and float(cells[7]) > 0  # ours with XLA's options, the ratio
  for piece in ('backbone fwd+bwd', 'head fwd+bwd', 'optimiser update', 'pipeline alone',
                'step fed by it'):
    assert piece in out, out
  # --profile: the trace and the compiled step are written, and where the time went printed
  assert (tmp_path / 'p' / 'tiny_sface_8' / 'train_step.hlo').is_file()
  convolutions = next(line for line in out.splitlines() if line.startswith('| convolution |'))
  forward, backward = (float(cell) for cell in convolutions.split('|')[2:4])
  assert forward > 0 and backward > 0, out  # the scopes of train.train_step were found
  if with_torch:  # and PyTorch's step by operator, its convolutions among them
    assert 'PyTorch step: ' in out, out
    convolution_rows = [line for line in out.splitlines() if line.startswith('| aten::')
                        and 'convolution' in line]
    assert convolution_rows and float(convolution_rows[0].split('|')[3]) > 0, out


@pytest.mark.parametrize('model,extra', [('r50', ()), ('mbf', ('--xla-transpose',))])
def test_conv_layers_benchmark_runs(model, extra):
  pytest.importorskip('torch')  # the benchmark is a side-by-side with PyTorch
  out = multi_device.run_python('bench/conv_layers.py', '--model', model, '--batch', '1',
                                '--repeats', '1', *extra, devices=1).stdout
  rows = [line for line in out.splitlines() if line[:3].strip('| ').isdigit()]
  assert len(rows) == 17, out  # every distinct convolution of the model
  assert f'{model} total' in out and 'JAX / PyTorch time' in out, out
