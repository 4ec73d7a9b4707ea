"""Training end to end, through the real command line, on a tiny synthetic dataset (the
multi-host test on the real ORL faces of ../shared/data).

Each run is a subprocess (`python -m sface_jax.main`), as a user runs it; the multi-device
run sets XLA_FLAGS before jax is imported there.
"""

import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

import synthetic_faces

REPO = pathlib.Path(__file__).resolve().parents[1]

TINY = (
    '--config.model.name=tiny',
    '--config.model.embedding_dim=32',
    '--config.data.image_size=32',
    '--config.data.shuffle_buffer=64',
    '--config.batch_size=16',
    '--config.head.name=arcface',
    '--config.head.scale=16.0',
    '--config.schedule.name=constant',
    '--config.schedule.learning_rate=0.05',
    '--config.optimizer.weight_decay=0.0',
    '--config.log_every_steps=1',
    '--config.eval.every_steps=0',
    '--config.eval.batch_size=8',
    "--config.eval.sets=('val',)",
)


@pytest.fixture(scope='module')
def dataset(tmp_path_factory) -> str:
  directory = str(tmp_path_factory.mktemp('synthetic'))
  synthetic_faces.write_dataset(directory)
  return directory


def _command(workdir, data_dir, *overrides):
  return [sys.executable, '-m', 'sface_jax.main', '--config', 'base',
          '--workdir', str(workdir), f'--config.data.dir={data_dir}', *TINY, *overrides]


def _env(devices: int = 1) -> dict:
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2', PYTHONPATH=str(REPO))
  env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={devices}'
  return env


def _run(workdir, data_dir, *overrides, devices=1, check=True):
  result = subprocess.run(_command(workdir, data_dir, *overrides), cwd=REPO, env=_env(devices),
                          capture_output=True, text=True, timeout=600)
  if check and result.returncode != 0:
    raise AssertionError(f'training failed ({result.returncode}):\n{result.stdout[-3000:]}\n'
                         f'{result.stderr[-5000:]}')
  return result


def _final_params(workdir) -> dict[str, np.ndarray]:
  """Every backbone parameter of the newest checkpoint, by path."""
  import jax  # pylint: disable=g-import-not-at-top
  from sface_jax import checkpoint  # pylint: disable=g-import-not-at-top
  _, _, variables = checkpoint.load_for_inference(str(workdir))
  leaves = jax.tree_util.tree_flatten_with_path(variables)[0]
  return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves}


def _losses(stdout: str) -> list[float]:
  return [float(line.split('| loss ')[1].split(' ')[0])
          for line in stdout.splitlines() if line.startswith('step ') and '| loss ' in line]


def test_trains_checkpoints_and_evaluates(dataset, tmp_path):
  result = _run(tmp_path / 'run', dataset, '--config.num_steps=24',
                '--config.checkpoint_every_steps=12')
  losses = _losses(result.stdout)
  assert len(losses) == 24
  assert np.mean(losses[-4:]) < 0.7 * np.mean(losses[:4]), losses
  steps = sorted(int(p.name) for p in (tmp_path / 'run' / 'checkpoints').iterdir()
                 if p.name.isdigit())
  assert steps == [12, 24]
  assert 'val' in result.stdout and 'TAR@FAR' in result.stdout  # the evaluation table
  assert (tmp_path / 'run' / 'config.json').exists()
  assert list((tmp_path / 'run').glob('events.out.tfevents.*'))  # TensorBoard scalars


def test_killed_run_resumes_to_identical_parameters(dataset, tmp_path):
  """kill -9 mid-run, start again with the same command: same parameters, bitwise (CPU)."""
  overrides = ('--config.num_steps=16', '--config.checkpoint_every_steps=4')
  _run(tmp_path / 'straight', dataset, *overrides)

  workdir = tmp_path / 'killed'
  process = subprocess.Popen(_command(workdir, dataset, *overrides), cwd=REPO, env=_env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  checkpoints = workdir / 'checkpoints'
  while time.time() < deadline and process.poll() is None:
    if checkpoints.is_dir() and any(p.name in ('8', '12') for p in checkpoints.iterdir()):
      break
    time.sleep(0.05)
  assert process.poll() is None, 'the run ended before it could be killed'
  process.send_signal(signal.SIGKILL)
  process.wait()
  finished = [p.name for p in checkpoints.iterdir() if p.name.isdigit()]
  assert '16' not in finished

  resumed = _run(workdir, dataset, *overrides)
  assert 'Resuming from step' in resumed.stdout
  straight, again = _final_params(tmp_path / 'straight'), _final_params(workdir)
  assert straight.keys() == again.keys()
  for name in straight:
    np.testing.assert_array_equal(again[name], straight[name], err_msg=name)


def test_one_device_and_eight_devices_agree(dataset, tmp_path):
  overrides = ('--config.num_steps=3', '--config.checkpoint_every_steps=3')
  _run(tmp_path / 'one', dataset, *overrides, devices=1)
  eight = _run(tmp_path / 'eight', dataset, *overrides, devices=8)
  assert '8 device(s)' in eight.stdout
  one, many = _final_params(tmp_path / 'one'), _final_params(tmp_path / 'eight')
  for name in one:
    np.testing.assert_allclose(many[name], one[name], rtol=0, atol=1e-5, err_msg=name)


def test_non_finite_loss_stops_without_overwriting_the_checkpoint(dataset, tmp_path):
  workdir = tmp_path / 'nan'
  _run(workdir, dataset, '--config.num_steps=2', '--config.checkpoint_every_steps=2')
  before = _final_params(workdir)
  result = _run(workdir, dataset, '--config.num_steps=8', '--config.checkpoint_every_steps=2',
                '--config.schedule.learning_rate=1e30', check=False)
  assert result.returncode != 0
  assert 'NonFiniteLossError' in result.stderr
  assert 'last good checkpoint is' in result.stderr and 'checkpoints/2' in result.stderr
  steps = sorted(int(p.name) for p in (workdir / 'checkpoints').iterdir() if p.name.isdigit())
  assert steps == [2]
  after = _final_params(workdir)
  for name in before:
    np.testing.assert_array_equal(after[name], before[name])


def test_config_override_reaches_the_step(dataset, tmp_path):
  """--config.head.name=cosface: the logged first loss is CosFace's, computed here."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from sface_jax import checkpoint, sharding  # pylint: disable=g-import-not-at-top
  from sface_jax import step as step_lib  # pylint: disable=g-import-not-at-top
  from sface_jax.data import pipeline, tfrecord  # pylint: disable=g-import-not-at-top

  result = _run(tmp_path / 'cos', dataset, '--config.num_steps=1',
                '--config.head.name=cosface')
  logged = _losses(result.stdout)[0]

  config = checkpoint.load_config(str(tmp_path / 'cos'))  # what the run resolved
  info = tfrecord.read_info(dataset)
  expected = {}
  for head in ('cosface', 'arcface'):
    config.head.name = head
    setup = step_lib.make_setup(config, num_classes=info.num_classes, steps_per_epoch=4,
                                total_steps=1, mesh=sharding.make_mesh())
    state = jax.jit(step_lib.create_train_state, static_argnums=(0, 1))(config.seed, setup)
    batch = next(pipeline.train_dataset(
        info, batch_size=config.batch_size, image_size=config.data.image_size,
        seed=config.seed, shuffle_buffer=config.data.shuffle_buffer))
    _, metrics = jax.jit(step_lib.train_step, static_argnames='setup')(
        state, jax.tree.map(jnp.asarray, batch), setup=setup)
    expected[head] = float(metrics['loss'])
  assert abs(expected['cosface'] - expected['arcface']) > 1e-2
  assert logged == pytest.approx(expected['cosface'], abs=1e-3)


@pytest.fixture(scope='module')
def orl_dataset(shared_data, tmp_path_factory) -> str:
  """The real ORL faces of ../shared/data at 32×32 in 4 shards: people s1–s30 to train on,
  s31–s40 as the pair set 'val' (the name the TINY overrides evaluate)."""
  from sface_jax.data import convert  # pylint: disable=g-import-not-at-top
  directory = str(tmp_path_factory.mktemp('orl'))
  convert.convert(str(shared_data / 'orl' / 'faces'), directory, num_shards=4, image_size=32,
                  identities='s1..s30', verification_identities='s31..s40',
                  verification_name='val', file_pattern='*.pgm', log=lambda message: None)
  return directory


def test_two_hosts_equal_one_host(orl_dataset, tmp_path):
  """2 processes × 4 CPU devices (gloo collectives) train on the real ORL faces exactly as
  1 process × 8 devices: with host_split='records' the global batches do not depend on the
  number of hosts."""
  dataset = orl_dataset
  overrides = ('--config.num_steps=3', '--config.checkpoint_every_steps=3')
  single = _run(tmp_path / 'one', dataset, *overrides, devices=8)
  with socket.socket() as probe:  # a free port for the coordinator
    probe.bind(('localhost', 0))
    port = probe.getsockname()[1]
  workdir = tmp_path / 'two'
  hosts = [subprocess.Popen(
      _command(workdir, dataset, *overrides) + [
          '--multihost', f'--coordinator=localhost:{port}', '--num_processes=2',
          f'--process_id={i}'],
      cwd=REPO, env=_env(4), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  outputs = [host.communicate(timeout=600) for host in hosts]
  for host, (_, stderr) in zip(hosts, outputs):
    assert host.returncode == 0, stderr[-5000:]
  assert '8 device(s)' in outputs[0][0]
  assert _losses(outputs[0][0]) == pytest.approx(_losses(single.stdout), abs=1e-5)
  one, two = _final_params(tmp_path / 'one'), _final_params(workdir)
  for name in one:
    np.testing.assert_allclose(two[name], one[name], rtol=0, atol=1e-5, err_msg=name)
