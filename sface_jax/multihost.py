"""Start-up of a multi-host run: every process finds the others, or all stop soon, saying who came.

`initialize(...)` wraps `jax.distributed.initialize`. Where JAX's own start-up fails (a process
never started, two given the same id), it aborts from C++ after its timeout (300 s by default)
with `DEADLINE_EXCEEDED … RegisterTask` or `ALREADY_EXISTS`, naming neither the coordinator
nor who was missing, and Python cannot catch it; JAX does not expose which processes
registered. So where the processes are named (`--coordinator`, `--num_processes`,
`--process_id`), a roll call runs first, on the coordinator's own port: process 0 listens
there, every other process connects and says its id and host name; when all `num_processes`
ids have answered, once each, process 0 tells them so, closes the port, and JAX starts on it.
Otherwise every process stops within `timeout` seconds with one line (`StartupError`) naming
the coordinator, the expected number of processes, the ids that answered (with their hosts)
and those that did not, or the id given twice. Where JAX detects the cluster itself (TPU pods,
SLURM, Open MPI: no `--coordinator`), its own start-up runs, with `timeout`.
"""

import os
import socket
import time

ROLL_CALL_OK = 'ok'


class StartupError(RuntimeError):
  """The processes of a multi-host run did not all start: one line saying who came."""


def initialize(coordinator: str | None, num_processes: int | None, process_id: int | None,
               *, timeout: float) -> None:
  """`jax.distributed.initialize`, after a roll call where the processes are named."""
  import jax  # pylint: disable=g-import-not-at-top
  if timeout <= 0:
    raise StartupError(f'--initialization_timeout={timeout:g}: expected seconds > 0')
  # CPU hosts (tests, CPU clusters) need a collectives backend; GPUs and TPUs ignore this.
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  if None not in (coordinator, num_processes, process_id):
    roll_call(coordinator, num_processes, process_id, timeout=timeout)
  jax.distributed.initialize(coordinator, num_processes, process_id,
                             initialization_timeout=max(int(timeout), 1))


def roll_call(coordinator: str, num_processes: int, process_id: int, *,
              timeout: float) -> None:
  """Returns once all `num_processes` processes have called it with the same coordinator
  (host:port of process 0) and distinct ids; otherwise raises StartupError within about
  `timeout` seconds, in every process that is running (module docstring)."""
  if num_processes < 1 or not 0 <= process_id < num_processes:
    raise StartupError(f'--process_id={process_id} with --num_processes={num_processes}: '
                       f'expected an id in 0..{num_processes - 1}')
  host, _, port = coordinator.rpartition(':')
  if not (host and port.isdigit()):
    raise StartupError(f'--coordinator={coordinator}: expected host:port (of process 0)')
  deadline = time.monotonic() + timeout
  if process_id == 0:
    _lead(coordinator, int(port), num_processes, deadline, timeout)
  else:
    _answer(coordinator, host.strip('[]'), int(port), process_id, num_processes, deadline,
            timeout)


def _problem(coordinator: str, num_processes: int, seen: dict[int, list[str]],
             timeout: float) -> str | None:
  """The one-line failure of a roll call that saw `seen` (id → hosts), or None: all came."""
  twice = {i: hosts for i, hosts in seen.items() if len(hosts) > 1}
  missing = [i for i in range(num_processes) if i not in seen]
  if not (twice or missing):
    return None
  came = ', '.join(f'{i} ({", ".join(hosts)})' for i, hosts in sorted(seen.items()))
  what = (f'process id {", ".join(map(str, twice))} was given to more than one process'
          if twice else f'no process {", ".join(map(str, missing))} within {timeout:g} s')
  return (f'multi-host start-up failed: coordinator {coordinator} expected {num_processes} '
          f'processes and heard from ids {came}: {what}. Start each process once, with '
          f'--coordinator={coordinator} --num_processes={num_processes} and its own '
          f'--process_id in 0..{num_processes - 1} (or raise --initialization_timeout)')


def _lead(coordinator: str, port: int, num_processes: int, deadline: float,
          timeout: float) -> None:
  """Process 0: listens on the coordinator's port until every id has answered."""
  dual = socket.has_dualstack_ipv6()
  try:
    server = socket.create_server(('', port), family=socket.AF_INET6 if dual else socket.AF_INET,
                                  dualstack_ipv6=dual)
  except OSError as e:
    raise StartupError(
        f'multi-host start-up failed: process 0 cannot listen on port {port} of the '
        f'coordinator {coordinator} ({os.strerror(e.errno)}): is another process running as '
        '--process_id=0, or another program using the port?') from e
  seen = {0: [socket.gethostname()]}
  answered = []
  with server:
    while len(seen) < num_processes and time.monotonic() < deadline:
      server.settimeout(max(deadline - time.monotonic(), 0.01))
      try:
        connection, address = server.accept()
      except TimeoutError:
        break
      connection.settimeout(max(deadline - time.monotonic(), 0.01))
      try:
        process, _, name = connection.makefile().readline().strip().partition(' ')
      except OSError:
        connection.close()
        continue
      if not process.isdigit():
        connection.close()  # not one of ours
        continue
      seen.setdefault(int(process), []).append(name or address[0])
      answered.append(connection)
      if len(seen[int(process)]) > 1:
        break
    problem = _problem(coordinator, num_processes, seen, timeout)
    for connection in answered:
      with connection:
        connection.sendall(f'{problem or ROLL_CALL_OK}\n'.encode())
  if problem:
    raise StartupError(problem)


def _answer(coordinator: str, host: str, port: int, process_id: int, num_processes: int,
            deadline: float, timeout: float) -> None:
  """Process 1..n-1: tells process 0 its id and waits for the roll call's outcome."""
  while True:
    try:
      connection = socket.create_connection((host, port),
                                            timeout=max(deadline - time.monotonic(), 0.01))
      break
    except OSError as e:
      if time.monotonic() >= deadline:
        raise StartupError(
            f'multi-host start-up failed: process {process_id} of {num_processes} had no '
            f'answer from the coordinator {coordinator} (process 0) within {timeout:g} s '
            f'({e.strerror or e}): start process 0 with --coordinator={coordinator}, or raise '
            '--initialization_timeout') from e
      time.sleep(0.2)
  with connection:
    connection.settimeout(timeout + 5.0)  # process 0 answers within its own timeout
    try:
      connection.sendall(f'{process_id} {socket.gethostname()}\n'.encode())
      reply = connection.makefile().readline().strip()
    except OSError as e:
      reply = f'no answer: {e.strerror or e}'
  if reply != ROLL_CALL_OK:
    raise StartupError(reply if reply.startswith('multi-host start-up failed') else (
        f'multi-host start-up failed: process {process_id} of {num_processes}: the '
        f'coordinator {coordinator} did not finish the roll call ({reply or "closed"}) within '
        f'{timeout:g} s'))
