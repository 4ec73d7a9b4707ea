"""Command line: `python -m sface_jax.main --config configs/<recipe>.py --workdir DIR`.

Any config field can be overridden: `--config.head.name=cosface --config.batch_size=256`,
and a recipe's variant is picked after a colon: `--config configs/ms1mv2_r50_arcface.py:r100`.
On several hosts (a TPU pod slice, multi-node GPUs) add `--multihost`: every host runs the
same command and `jax.distributed.initialize()` finds the others.
"""

import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')  # tf.data's C++ start-up chatter

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
from absl import logging
from ml_collections import config_flags

from sface_jax import train

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Training recipe (a configs/*.py).',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory: checkpoints, metrics, '
                               'config; an existing one is resumed.')
_MULTIHOST = flags.DEFINE_bool('multihost', False,
                               'Call jax.distributed.initialize() (multi-host runs).')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if not flags.FLAGS['verbosity'].present:  # orbax and clu log every save at INFO
    logging.set_verbosity(logging.WARNING)
  if _MULTIHOST.value:
    import jax  # pylint: disable=g-import-not-at-top
    jax.distributed.initialize()
  train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == '__main__':
  app.run(main)
