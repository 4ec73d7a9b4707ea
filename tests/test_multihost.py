"""Multi-host start-up (sface_jax.multihost): a missing process or an id given twice stops
every process within the start-up timeout, with one line saying who came.

The roll call needs no JAX, so most checks run it alone in subprocesses on localhost (fast);
one runs the real command line with a missing peer. 2 processes × 4 devices training to the
same state as 1 × 8 is tests/test_train.py::test_two_hosts_equal_one_host.
"""

import os
import pathlib
import socket
import subprocess
import sys
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
ROLL_CALL = ('import sys; from sface_jax import multihost\n'
             'try:\n'
             '  multihost.roll_call(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), '
             'timeout=float(sys.argv[4]))\n'
             'except multihost.StartupError as e:\n'
             '  print(e); sys.exit(1)\n'
             'print("all here")\n')


def _free_port() -> int:
  with socket.socket() as probe:
    probe.bind(('localhost', 0))
    return probe.getsockname()[1]


def _roll_call(port: int, num_processes: int, process_id: int, timeout: float):
  return subprocess.Popen(
      [sys.executable, '-c', ROLL_CALL, f'localhost:{port}', str(num_processes),
       str(process_id), str(timeout)],
      cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True)


def _outcomes(processes) -> list[tuple[int, str]]:
  return [(p.returncode, out.strip()) for p in processes
          for out, _ in [p.communicate(timeout=60)]]


def test_every_process_present_passes():
  port = _free_port()
  outcomes = _outcomes([_roll_call(port, 3, i, 20) for i in (2, 0, 1)])
  assert outcomes == [(0, 'all here')] * 3


def test_a_missing_process_is_named_by_every_process_fast():
  port = _free_port()
  start = time.monotonic()
  outcomes = _outcomes([_roll_call(port, 3, i, 2) for i in (0, 2)])
  assert time.monotonic() - start < 30  # JAX alone: an abort after 300 s, naming no one
  for returncode, line in outcomes:
    assert returncode == 1 and '\n' not in line
    assert f'coordinator localhost:{port} expected 3 processes' in line, line
    assert 'heard from ids 0 (' in line and '2 (' in line and 'no process 1 within 2 s' in line


def test_an_id_given_twice_is_named():
  port = _free_port()
  outcomes = _outcomes([_roll_call(port, 3, i, 10) for i in (0, 1, 1)])
  for returncode, line in outcomes:
    assert returncode == 1
    assert 'process id 1 was given to more than one process' in line, line


def test_two_processes_given_id_0():
  """The later one cannot take the coordinator's port: it says so at once; the other then
  waits for process 1 and says that none came."""
  port = _free_port()
  outcomes = _outcomes([_roll_call(port, 2, 0, 3) for _ in range(2)])
  assert [code for code, _ in outcomes] == [1, 1]
  lines = sorted(line for _, line in outcomes)
  assert 'is another process running as --process_id=0' in lines[1], lines
  assert 'no process 1 within 3 s' in lines[0], lines


def test_no_coordinator_is_named_by_the_others():
  outcomes = _outcomes([_roll_call(_free_port(), 2, 1, 2)])
  assert outcomes[0][0] == 1
  assert 'process 1 of 2 had no answer from the coordinator localhost:' in outcomes[0][1]


@pytest.mark.parametrize('process_id, num_processes, coordinator, match', [
    (2, 2, 'localhost:1', 'expected an id in 0..1'),
    (0, 2, 'localhost', 'expected host:port'),
])
def test_bad_arguments(process_id, num_processes, coordinator, match):
  from sface_jax import multihost  # pylint: disable=g-import-not-at-top
  with pytest.raises(multihost.StartupError, match=match):
    multihost.roll_call(coordinator, num_processes, process_id, timeout=1)


def test_command_line_with_a_missing_peer_stops_in_one_line(tmp_path):
  """`python -m sface_jax.main --multihost` as process 0 of 2, process 1 never started,
  `--initialization_timeout=3`: exit 1 with the roll call's line, long before JAX's 300 s."""
  port = _free_port()
  start = time.monotonic()
  result = subprocess.run(
      [sys.executable, '-m', 'sface_jax.main', '--config', 'base:runlocal',
       '--workdir', str(tmp_path / 'run'), '--multihost', f'--coordinator=localhost:{port}',
       '--num_processes=2', '--process_id=0', '--initialization_timeout=3'],
      cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL='3'),
      capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 1, result.stderr[-3000:]
  assert 'Traceback' not in result.stderr, result.stderr[-3000:]
  errors = [line for line in result.stderr.splitlines() if line.startswith('python -m sface_jax.main: error:')]
  assert len(errors) == 1 and 'expected 2 processes' in errors[0], result.stderr[-3000:]
  assert 'no process 1 within 3 s' in errors[0]
  assert time.monotonic() - start < 120
  assert not (tmp_path / 'run').exists()  # nothing converted or written
