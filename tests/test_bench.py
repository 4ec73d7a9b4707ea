"""The benchmark scripts run end to end (smoke tests: they time nothing and assert no speed).

bench/train_step.py's paths that only a GPU session exercises in earnest (the breakdown, feeding
from the real pipeline, the PyTorch side, the profile) are run here on the tiny model so they
cannot rot between GPU sessions.
"""

import importlib.util
import os
import subprocess
import sys
import tarfile

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
  assert forward > 0 and backward > 0, out  # the scopes of sface_jax.step.train_step were found
  if with_torch:  # and PyTorch's step by operator, its convolutions among them
    assert 'PyTorch step: ' in out, out
    convolution_rows = [line for line in out.splitlines() if line.startswith('| aten::')
                        and 'convolution' in line]
    assert convolution_rows and float(convolution_rows[0].split('|')[3]) > 0, out


# Installed as `sitecustomize` ahead of the environment's packages: these imports then fail as
# they do on a GPU image that holds JAX and PyTorch but neither TensorFlow nor clu (a None in
# sys.modules makes `import` raise ModuleNotFoundError and `importlib.util.find_spec` answer
# None, as for a package that is not installed).
WITHOUT_TENSORFLOW = ("import sys\n"
                      "sys.modules.update(dict.fromkeys(('tensorflow', 'tensorflow_datasets', "
                      "'clu')))\n")


def test_gpu_session_runs_without_tensorflow(tmp_path):
  """bench/gpu_session.sh, the one prepared call for a lent GPU, runs its flow on the CPU
  (--smoke) where TensorFlow and clu cannot be imported, as on the GPU image."""
  site = tmp_path / 'site'
  site.mkdir()
  (site / 'sitecustomize.py').write_text(WITHOUT_TENSORFLOW)
  env = dict(os.environ, OUT=str(tmp_path / 'out'), JAX_PLATFORMS='cpu',
             PYTHONPATH=os.pathsep.join(filter(None, [str(site), os.environ.get('PYTHONPATH')])),
             PATH=os.pathsep.join([os.path.dirname(sys.executable), os.environ['PATH']]))
  blocked = subprocess.run(['python3', '-c', 'import tensorflow'], env=env,
                           capture_output=True, text=True, check=False)
  assert 'ModuleNotFoundError' in blocked.stderr  # the blocker works in the script's python3
  done = subprocess.run(['bash', 'bench/gpu_session.sh', '--smoke'], cwd=multi_device.REPO,
                        env=env, capture_output=True, text=True, timeout=600, check=False)
  assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
  rows = (tmp_path / 'out' / 'table.md').read_text().splitlines()
  assert rows[0].startswith('| model |') and len(rows) == 4, done.stdout[-4000:]
  for row, head in zip(rows[2:], ('arcface', 'sface')):
    cells = [cell.strip() for cell in row.strip('|').split('|')]
    assert cells[:3] == ['tiny', head, '8'] and float(cells[3]) > 0, row
  assert 'NOT FINITE' not in done.stdout and 'our loss after' in done.stdout
  with tarfile.open(tmp_path / 'out' / 'profile.tar.gz') as archive:  # the traced row
    assert 'profile/tiny_sface_8/train_step.hlo' in archive.getnames()
  assert 'ended with status' not in (tmp_path / 'out' / 'session.log').read_text()


@pytest.mark.parametrize('model,extra', [('r50', ()), ('mbf', ('--xla-transpose',))])
def test_conv_layers_benchmark_runs(model, extra):
  pytest.importorskip('torch')  # the benchmark is a side-by-side with PyTorch
  out = multi_device.run_python('bench/conv_layers.py', '--model', model, '--batch', '1',
                                '--repeats', '1', *extra, devices=1).stdout
  rows = [line for line in out.splitlines() if line[:3].strip('| ').isdigit()]
  assert len(rows) == 17, out  # every distinct convolution of the model
  assert f'{model} total' in out and 'JAX / PyTorch time' in out, out
