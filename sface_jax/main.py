"""Command line: `python -m sface_jax.main --config configs/<recipe>.py --workdir DIR`.

Any config field can be overridden: `--config.head.name=cosface --config.batch_size=256`,
and a recipe's variant is picked after a colon: `--config configs/ms1mv2_r50_arcface.py:runlocal`
(the recipe shrunk to a minute on a laptop CPU). On several hosts (a TPU pod slice,
multi-node GPUs) add `--multihost`: every host runs the same command and
`jax.distributed.initialize()` finds the others (TPU pods, SLURM, Open MPI); elsewhere name
them: `--multihost --coordinator=host0:1234 --num_processes=2 --process_id=<0 or 1>`.
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

from sface_jax import compilation_cache
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
compilation_cache.define_absl_flags()  # --compilation_cache_dir, --nocompilation_cache
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if not flags.FLAGS['verbosity'].present:  # orbax and clu log every save at INFO
    logging.set_verbosity(logging.WARNING)
  if _MULTIHOST.value:
    import jax  # pylint: disable=g-import-not-at-top
    # CPU hosts (tests, CPU clusters) need a collectives backend; GPUs and TPUs ignore this.
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == '__main__':
  app.run(main)
