"""Training end to end, through the real command line, on a tiny synthetic dataset (the
multi-host test on the real ORL faces of ../shared/data).

Each run is a subprocess (`python -m sface_jax.main`), as a user runs it; the multi-device
run sets XLA_FLAGS before jax is imported there.
"""

import json
import os
import pathlib
import shutil
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


@pytest.fixture(scope='module')
def ten_classes(tmp_path_factory) -> str:
  """10 identities: padded to 16 class centres on 8 devices, 12 on 4, none on 1."""
  directory = str(tmp_path_factory.mktemp('synthetic10'))
  synthetic_faces.write_dataset(directory, num_classes=10)
  return directory


def _command(workdir, data_dir, *overrides):
  return [sys.executable, '-m', 'sface_jax.main', '--config', 'base',
          '--workdir', str(workdir), f'--config.data.dir={data_dir}', *TINY, *overrides]


def _free_port() -> int:
  """A port for the multi-host coordinator, taken from the OS (tests run side by side)."""
  with socket.socket() as probe:
    probe.bind(('localhost', 0))
    return probe.getsockname()[1]


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


def _state(workdir, step=None) -> dict[str, np.ndarray]:
  """Every array of a checkpoint (the newest by default): parameters, batch statistics,
  optimiser and head state, by path, read onto this process's one device, class axes cut to
  the dataset's classes (each writer pads them to a multiple of its device count)."""
  import jax  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from sface_jax import sharding  # pylint: disable=g-import-not-at-top
  manager = ocp.CheckpointManager(
      pathlib.Path(workdir, 'checkpoints').resolve(),
      item_handlers={'state': ocp.StandardCheckpointHandler(),
                     'meta': ocp.JsonCheckpointHandler()},
      options=ocp.CheckpointManagerOptions(read_only=True))
  try:
    step = manager.latest_step() if step is None else step
    here = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype,
                                                            sharding=here),
                          manager.item_metadata(step).state)
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
  finally:
    manager.close()
  arrays = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(restored.state)[0]:
    name, leaf = sharding.path_name(path), np.asarray(leaf)
    axis = sharding.class_axis(name, leaf.ndim)
    if axis is not None:
      leaf = np.take(leaf, np.arange(restored.meta['num_classes']), axis=axis)
    arrays[name] = leaf
  return arrays


def _assert_states_close(state, expected, tolerance, what=''):
  """Every array within `tolerance` × max(1, its largest magnitude) of `expected`'s."""
  assert state.keys() == expected.keys()
  for name, value in expected.items():
    scale = max(1.0, float(np.abs(value).max())) if value.size else 1.0
    np.testing.assert_allclose(state[name], value, rtol=0, atol=tolerance * scale,
                               err_msg=f'{what}: {name}')


# One unit in the last printed digit (losses are printed to 4 decimals) and a little more,
# because two runs equal to round-off can round to neighbouring printed values.
PRINTED_LOSS_TOLERANCE = 1.5e-4


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


LONG = ('--config.num_steps=40', '--config.checkpoint_every_steps=4')


@pytest.fixture(scope='module')
def straight(dataset, tmp_path_factory) -> pathlib.Path:
  """An uninterrupted run of LONG: what interrupted runs must end equal to."""
  workdir = tmp_path_factory.mktemp('straight') / 'run'
  _run(workdir, dataset, *LONG)
  return workdir


def test_killed_run_resumes_to_identical_parameters(dataset, straight, tmp_path):
  """kill -9 mid-run, start again with the same command: same parameters, bitwise (CPU)."""
  workdir = tmp_path / 'killed'
  process = subprocess.Popen(_command(workdir, dataset, *LONG), cwd=REPO, env=_env(),
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
  assert '40' not in finished

  resumed = _run(workdir, dataset, *LONG)
  assert 'Resuming from step' in resumed.stdout
  _assert_states_close(_state(workdir), _state(straight), 0)


def test_ctrl_c_saves_the_step_it_reached_and_resumes(dataset, straight, tmp_path):
  """SIGINT (Ctrl-C) mid-run: a checkpoint at the step reached, exit 130 with one line
  saying to rerun; the same command then ends equal to the uninterrupted run, bitwise (CPU).
  The periodic checkpoints are off (every 1000 steps), so the one found is Ctrl-C's."""
  overrides = ('--config.num_steps=40', '--config.checkpoint_every_steps=1000')
  command = _command(tmp_path / 'run', dataset, *overrides)
  process = subprocess.Popen(command, cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
  for line in process.stdout:
    if line.startswith('step 2/40'):
      process.send_signal(signal.SIGINT)
      break
  stdout, stderr = process.communicate(timeout=300)
  assert process.returncode == 130, stderr[-3000:]
  assert 'Traceback' not in stderr and 'SIGINT received' in stderr, stderr[-3000:]
  stopped = [line for line in stdout.splitlines() if line.startswith('Stopped at step')]
  assert len(stopped) == 1 and 'rerun the same command to resume' in stopped[0], stdout
  step = int(stopped[0].split()[3])
  assert 2 <= step < 40, stopped
  saved = [p.name for p in (tmp_path / 'run' / 'checkpoints').iterdir() if p.name.isdigit()]
  assert saved == [str(step)]

  resumed = _run(tmp_path / 'run', dataset, *overrides)
  assert f'Resuming from step {step}' in resumed.stdout
  _assert_states_close(_state(tmp_path / 'run'), _state(straight), 0)


def test_ctrl_c_on_one_host_stops_every_host_at_one_step(dataset, tmp_path):
  """Two processes × 4 devices; Ctrl-C reaches process 1 only (its terminal). Both stop after
  the same step, the next one at which they compare (`log_every_steps`), with one checkpoint
  there, and both exit 130: none is left waiting in a collective for the other."""
  port = _free_port()
  overrides = ('--config.num_steps=200', '--config.checkpoint_every_steps=1000',
               '--config.log_every_steps=2')
  env = dict(_env(4), JAX_ENABLE_COMPILATION_CACHE='false')  # as test_two_hosts_equal_one_host
  hosts = [subprocess.Popen(
      _command(tmp_path / 'run', dataset, *overrides) + [
          '--multihost', f'--coordinator=localhost:{port}', '--num_processes=2',
          f'--process_id={i}'],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  try:
    for line in hosts[1].stdout:
      if line.startswith('step 2/200'):
        hosts[1].send_signal(signal.SIGINT)
        break
    outputs = [host.communicate(timeout=300) for host in hosts]
  finally:  # a host left waiting for the other (the failure this test is for) is ended
    for host in hosts:
      host.kill()
  steps = []
  for host, (stdout, stderr) in zip(hosts, outputs):
    assert host.returncode == 130, stderr[-3000:]
    stopped = [line for line in stdout.splitlines() if line.startswith('Stopped at step')]
    assert len(stopped) == 1, stdout[-3000:]
    steps.append(int(stopped[0].split()[3]))
  assert steps[0] == steps[1] and steps[0] % 2 == 0 and 2 <= steps[0] < 200, steps
  saved = [p.name for p in (tmp_path / 'run' / 'checkpoints').iterdir() if p.name.isdigit()]
  assert saved == [str(steps[0])]


def test_a_second_ctrl_c_stops_at_once():
  """The first SIGINT (or SIGTERM) only asks the loop to stop after the step; a second
  SIGINT raises KeyboardInterrupt at once (no waiting for the save)."""
  from sface_jax import train  # pylint: disable=g-import-not-at-top

  def deliver(signum):
    os.kill(os.getpid(), signum)
    for _ in range(100):  # Python runs the handler between bytecodes, soon after
      time.sleep(0.001)

  previous = signal.getsignal(signal.SIGINT)
  interrupts = train._Interrupts()  # pylint: disable=protected-access
  try:
    assert not interrupts.reached(1)
    deliver(signal.SIGINT)
    assert interrupts.reached(1) and interrupts.received == signal.SIGINT
    deliver(signal.SIGTERM)  # a later SIGTERM changes nothing
    with pytest.raises(KeyboardInterrupt):
      deliver(signal.SIGINT)
  finally:
    interrupts.restore()
  assert signal.getsignal(signal.SIGINT) is previous


def test_resume_with_another_config_touches_nothing(dataset, tmp_path):
  """A resume whose config changes what the run computes is refused before anything is
  written, in one line naming the fields (exit 2); one that changes only the run's length
  goes on and updates config.json; allow_config_change lets a change through, but never one
  the checkpoint cannot be restored into."""
  workdir = tmp_path / 'run'
  _run(workdir, dataset, '--config.num_steps=2', '--config.checkpoint_every_steps=2')
  config_json = (workdir / 'config.json').read_bytes()

  def refused(*overrides, names):
    result = _run(workdir, dataset, '--config.num_steps=3', *overrides, check=False)
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith('python -m sface_jax.main: error:')]
    assert len(errors) == 1 and all(name in errors[0] for name in names), result.stderr
    assert 'Traceback' not in result.stderr, result.stderr[-3000:]
    assert (workdir / 'config.json').read_bytes() == config_json
    assert sorted(p.name for p in (workdir / 'checkpoints').iterdir()) == ['2']
    return errors[0]

  line = refused('--config.model.name=r18', '--config.head.name=cosface',
                 names=('model.name "tiny" → "r18"', 'head.name "arcface" → "cosface"'))
  assert 'num_steps' not in line  # allowed, so not among the refused
  refused('--config.model.embedding_dim=16', '--config.allow_config_change=true',
          names=('does not fit this config', 'float32[32] stored, float32[16] here'))

  resumed = _run(workdir, dataset, '--config.num_steps=3', '--config.checkpoint_every_steps=2')
  assert 'Resuming from step 2' in resumed.stdout
  assert 'Config changes since the last run: num_steps 2 → 3' in resumed.stdout
  assert json.loads((workdir / 'config.json').read_text())['num_steps'] == 3
  assert len(_losses(resumed.stdout)) == 1


@pytest.fixture(scope='module')
def device_runs(ten_classes, tmp_path_factory) -> dict[int, tuple[pathlib.Path, list[float]]]:
  """Uninterrupted 4-step runs on 1, 4 and 8 devices, checkpoints at steps 2 and 4:
  devices → (workdir, logged losses)."""
  runs = {}
  for devices in (1, 4, 8):
    workdir = tmp_path_factory.mktemp(f'devices{devices}') / 'run'
    result = _run(workdir, ten_classes, '--config.num_steps=4',
                  '--config.checkpoint_every_steps=2', devices=devices)
    assert f'{devices} device(s)' in result.stdout
    runs[devices] = workdir, _losses(result.stdout)
  return runs


# Runs on different device counts sum in different orders (the gradient all-reduce, the
# head's psum over classes), so they differ by float32 round-off, amplified by each step.
# After these 4 steps the largest difference measured between uninterrupted 1-, 4- and
# 8-device runs was 2.4e-5 × max(1, |array|) (the backbone's momentum; parameters and
# class centres ≤ 4e-6); the same bound held for every resume across device counts, while
# two steps of training move the arrays by 0.2–1.6 on that scale.
DEVICE_COUNT_TOLERANCE = 1e-4


def test_one_device_and_eight_devices_agree(device_runs):
  one = _state(device_runs[1][0])
  for devices in (4, 8):
    _assert_states_close(_state(device_runs[devices][0]), one, DEVICE_COUNT_TOLERANCE,
                         f'{devices} devices')


@pytest.mark.parametrize('source, destination', [(8, 1), (1, 8), (8, 4)])
def test_resume_on_another_device_count(device_runs, ten_classes, tmp_path, source,
                                        destination):
  """A run checkpointed at step 2 on `source` devices resumes on `destination` devices and
  ends as an uninterrupted run on `destination` devices does, to round-off: the class
  centres, their momentum and every other array (the checkpoint's class axes, padded for
  `source`, are re-padded on restore)."""
  workdir = tmp_path / 'moved'
  shutil.copytree(device_runs[source][0], workdir)
  shutil.rmtree(workdir / 'checkpoints' / '4')
  result = _run(workdir, ten_classes, '--config.num_steps=4',
                '--config.checkpoint_every_steps=2', devices=destination)
  assert 'Resuming from step 2' in result.stdout and f'{destination} device(s)' in result.stdout
  reference, reference_losses = device_runs[destination]
  # Losses are printed to 4 decimals: round-off in the 5th can flip the last printed digit.
  assert _losses(result.stdout) == pytest.approx(reference_losses[2:],
                                                 abs=PRINTED_LOSS_TOLERANCE)
  final, expected = _state(workdir), _state(reference)
  _assert_states_close(final, expected, DEVICE_COUNT_TOLERANCE, f'{source} → {destination}')
  # Not vacuous: the two steps moved the centres, their momentum and the backbone far more.
  before = _state(reference, step=2)
  moved = [name for name in final if name.endswith(('classifier/class_centers', 'fc/kernel'))]
  assert len(moved) == 4  # the centres, the embedding layer and their momentum
  for name in moved:
    assert np.abs(final[name] - before[name]).max() > 100 * DEVICE_COUNT_TOLERANCE, name


def test_non_finite_loss_stops_without_overwriting_the_checkpoint(dataset, tmp_path):
  workdir = tmp_path / 'nan'
  _run(workdir, dataset, '--config.num_steps=2', '--config.checkpoint_every_steps=2')
  before = _state(workdir)
  result = _run(workdir, dataset, '--config.num_steps=8', '--config.checkpoint_every_steps=2',
                '--config.schedule.learning_rate=1e30', '--config.allow_config_change=true',
                check=False)
  assert result.returncode != 0
  assert 'NonFiniteLossError' in result.stderr
  assert 'last good checkpoint is' in result.stderr and 'checkpoints/2' in result.stderr
  steps = sorted(int(p.name) for p in (workdir / 'checkpoints').iterdir() if p.name.isdigit())
  assert steps == [2]
  _assert_states_close(_state(workdir), before, 0)


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
  """2 processes × 4 CPU devices (gloo collectives) train on the real ORL faces as 1 process
  × 8 devices do, to float32 round-off, in every array of the state (backbone, class
  centres, momentum): with host_split='records' the global batches do not depend on the
  number of hosts. Only for a few steps: gloo's all-reduce sums in another order, and
  training amplifies the difference (~1e-6 of an array's scale after 1 step, 7e-6 after 3,
  1e-2 after 8 in the backbone's momentum), as it amplifies a 1-ulp nudge of the parameters
  of a one-host run (1e-2 after 10 steps)."""
  dataset = orl_dataset
  overrides = ('--config.num_steps=3', '--config.checkpoint_every_steps=3')
  single = _run(tmp_path / 'one', dataset, *overrides, devices=8)
  port = _free_port()
  workdir = tmp_path / 'two'
  # Without the persistent compilation cache: JAX writes it from process 0 only, so a later
  # run would load the step there while process 1 compiles it, and on a busy machine the
  # wait at the first collective outlasts gloo's 30 s rendezvous.
  env = dict(_env(4), JAX_ENABLE_COMPILATION_CACHE='false')
  hosts = [subprocess.Popen(
      _command(workdir, dataset, *overrides) + [
          '--multihost', f'--coordinator=localhost:{port}', '--num_processes=2',
          f'--process_id={i}'],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  outputs = [host.communicate(timeout=600) for host in hosts]
  for host, (_, stderr) in zip(hosts, outputs):
    assert host.returncode == 0, stderr[-5000:]
  assert '8 device(s)' in outputs[0][0]
  assert _losses(outputs[0][0]) == pytest.approx(_losses(single.stdout),
                                                 abs=PRINTED_LOSS_TOLERANCE)
  one, two = _state(tmp_path / 'one'), _state(workdir)
  assert any(name.endswith('trace/classifier/class_centers') for name in one)
  _assert_states_close(two, one, DEVICE_COUNT_TOLERANCE, '2 × 4 against 1 × 8')
