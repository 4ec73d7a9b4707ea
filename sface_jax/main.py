"""Command line: `python -m sface_jax.main --config configs/<recipe>.py --workdir DIR`.

Any config field can be overridden: `--config.head.name=cosface --config.batch_size=256`,
and a recipe's variant is picked after a colon: `--config configs/ms1mv2_r50_arcface.py:runlocal`
(the recipe shrunk to a minute on a laptop CPU). On several hosts (a TPU pod slice,
multi-node GPUs) add `--multihost`: every host runs the same command and
`jax.distributed.initialize()` finds the others (TPU pods, SLURM, Open MPI); elsewhere name
them: `--multihost --coordinator=host0:1234 --num_processes=2 --process_id=<0 or 1>`; a process
that is missing or given an id twice stops them all within `--initialization_timeout` seconds,
saying which ids came (`sface_jax.multihost`).

Exit status: 0 when training finished; 2 for a resume whose config does not fit the work
directory (one line, nothing written); 128 + the signal's number (130 for Ctrl-C, 143 for
SIGTERM) when a signal stopped it after saving a checkpoint: rerun the same command.
"""

import os
import sys

if __name__ == '__main__':  # before anything is imported or done twice
  from sface_jax import cpu_memory  # pylint: disable=g-import-not-at-top
  cpu_memory.reexec_with_tunables()  # CPU runs: reuse freed host memory (its docstring)

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')  # tf.data's C++ start-up chatter


def _recipes_importable(argv) -> None:
  """Recipes import `configs.base`; `configs/` is not installed (it is not library code), so
  put the folder above the recipe's on the path, wherever the command is run from."""
  for i, arg in enumerate(argv):
    path = arg.split('=', 1)[1] if arg.startswith('--config=') else (
        argv[i + 1] if arg == '--config' and i + 1 < len(argv) else None)
    if path:
      folder = os.path.dirname(os.path.abspath(path.split(':', 1)[0]))
      sys.path.insert(0, os.path.dirname(folder))


_recipes_importable(sys.argv)

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from sface_jax import checkpoint
from sface_jax import multihost
from sface_jax import train

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Training recipe (a configs/*.py).',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory: checkpoints, metrics, '
                               'config; an existing one is resumed.')
_MULTIHOST = flags.DEFINE_bool('multihost', False,
                               'Call jax.distributed.initialize() (multi-host runs).')
_COORDINATOR = flags.DEFINE_string('coordinator', None, 'With --multihost where the cluster '
                                   'is not detected: host:port of process 0.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'With --coordinator.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'With --coordinator: 0 .. n-1.')
_INITIALIZATION_TIMEOUT = flags.DEFINE_float(
    'initialization_timeout', 120.0, 'With --multihost: seconds for every process to start '
    'and find the others before all stop, saying which are missing.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if not flags.FLAGS['verbosity'].present:  # orbax and clu log every save at INFO
    logging.set_verbosity(logging.WARNING)
  try:
    if _MULTIHOST.value:
      multihost.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                           timeout=_INITIALIZATION_TIMEOUT.value)
    train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except (checkpoint.ConfigMismatchError, multihost.StartupError) as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2 if isinstance(e, checkpoint.ConfigMismatchError) else 1)
  except train.Interrupted as e:
    print(e, flush=True)
    sys.exit(128 + e.signum)


if __name__ == '__main__':
  app.run(main)
