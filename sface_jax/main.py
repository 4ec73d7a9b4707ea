"""Command line: `python -m sface_jax.main --config <recipe> --workdir DIR`.

A recipe is a packaged one by name (`--config demo`; `sface_jax/configs/` lists them) or a
recipe file of one's own (`--config path/to/mine.py`), its variant after a colon
(`--config ms1mv2_r50_arcface:runlocal`, the recipe shrunk to a minute on a laptop CPU).
Any config field can be overridden: `--config.head.name=cosface --config.batch_size=256`;
`sface_jax/configs/base.py` declares every field with its default. On several hosts (a TPU
pod slice, multi-node GPUs) add `--multihost`: every host runs the same command and
`jax.distributed.initialize()` finds the others (TPU pods, SLURM, Open MPI); elsewhere name
them: `--multihost --coordinator=host0:1234 --num_processes=2 --process_id=<0 or 1>`; a process
that is missing or given an id twice stops them all within `--initialization_timeout` seconds,
saying which ids came (`sface_jax.multihost`).

Flags are absl's, spelled with underscores (`--num_processes`), as the `--config.<field>`
overrides of ml_collections are. A mistake in what was asked (an unknown recipe, field, head
or model, a value of the wrong type, a missing dataset) is one line on stderr and exit
status 2, found before any data is converted; anything else keeps its traceback.

Exit status: 0 when training finished; 2 for a mistake in the command (above) or a resume
whose config does not fit the work directory (one line, nothing written); 1 for a multi-host
start-up that failed; 128 + the signal's number (130 for Ctrl-C, 143 for SIGTERM) when a
signal stopped training after saving a checkpoint: rerun the same command.
"""

import os
import re
import sys

if __name__ == '__main__':  # before anything is imported or done twice
  from sface_jax import cpu_memory  # pylint: disable=g-import-not-at-top
  cpu_memory.reexec_with_tunables()  # CPU runs: reuse freed host memory (its docstring)

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')  # tf.data's C++ start-up chatter

# pylint: disable=g-import-not-at-top,wrong-import-position
# No jax, TensorFlow or training code before the flags are parsed: `--help` and a mistyped
# flag answer at once.
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from sface_jax import compilation_cache
from sface_jax import configs
from sface_jax import multihost

PROG = 'python -m sface_jax.main'
USAGE_ERROR = 2  # exit status of a mistake in the command, as argparse's
_HELP_FLAGS = ('-h', '--help', '-help', '--helpshort', '-?')

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Training recipe: a packaged one by name (demo, ms1mv2_r50_arcface, ...; '
    'sface_jax/configs/) or a recipe file, with an optional :variant (runlocal). Fields are '
    'overridden with --config.<field>=<value>.', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory: checkpoints, metrics, '
                               'config; an existing one is resumed.')
_MULTIHOST = flags.DEFINE_bool('multihost', False,
                               'Call jax.distributed.initialize() (multi-host runs).')
_COORDINATOR = flags.DEFINE_string('coordinator', None, 'With --multihost where the cluster '
                                   'is not detected: host:port of process 0.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'With --coordinator: how many '
                                      'processes.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'With --coordinator: 0 .. n-1.')
_INITIALIZATION_TIMEOUT = flags.DEFINE_float(
    'initialization_timeout', 120.0, 'With --multihost: seconds for every process to start '
    'and find the others before all stop, saying which are missing.')
compilation_cache.define_absl_flags()  # --compilation_cache_dir, --nocompilation_cache
flags.mark_flags_as_required(['config', 'workdir'])


def _user_errors() -> tuple[type[BaseException], ...]:
  """Exceptions that report a mistake in the command or its inputs, each naming the field or
  file: printed as one line, exit status 2. Any other exception keeps its traceback."""
  from sface_jax import checkpoint
  from sface_jax.data import images, pair_sets, recordio, sources
  return (configs.ConfigError, checkpoint.ConfigMismatchError, FileNotFoundError, images.ImageError, pair_sets.PairSetError,
          recordio.RecordIOError, sources.SourceError)


def _fail(message: str):
  """One line on stderr, exit status 2."""
  print(f'{PROG}: error: {" ".join(str(message).split())}', file=sys.stderr, flush=True)
  sys.exit(USAGE_ERROR)


def _override_error(error: Exception, argv) -> str | None:
  """ml_collections' error for an override naming no field (a KeyError, or an AttributeError
  around one: "'heaad'\nDid you mean "head" ...") as one line naming the flag; None for
  any other error."""
  while error.args and isinstance(error.args[0], BaseException):
    error = error.args[0]
  if not isinstance(error, KeyError):
    return None
  text = str(error.args[0]) if error.args else ''
  lookup = re.search(r'lookup: (\S+)', text)  # a field below a value that is no ConfigDict
  key = lookup.group(1).rsplit('.', 1)[-1] if lookup else text.partition('\n')[0].strip('\'"')
  suggestion = re.search(r'Did you mean "([^"]+)"', text)
  overrides = [arg.split('=', 1)[0] for arg in argv if arg.startswith(('--config.', '-config.'))]
  flag = next((o for o in overrides if key in o.split('.')[1:]), '--config.<field>')
  return (f'{flag}: no such config field {key!r}'
          + (f' (did you mean {suggestion.group(1)!r}?)' if suggestion else '')
          + '; sface_jax/configs/base.py declares every field')


def _flag_error(message: str, spec: str) -> str:
  """absl's message for a flag it could not parse (`spec`: --config as given), one line."""
  required = re.search(r'Flag --(\w+) must have a value other than None', message)
  if required:
    return f'--{required.group(1)} is required (see --help)'
  if 'Error whilst parsing config file' in message:  # the recipe's get_config raised
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    where = [m for m in map(re.compile(r'File "(.*)", line (\d+)').search, lines) if m]
    return (f'--config {spec}: {lines[-1]}'
            + (f' ({where[-1].group(1)} line {where[-1].group(2)})' if where else ''))
  return f'{message} (see --help)'


def _resolve_recipe(argv: list[str]) -> str:
  """Rewrites `--config <name or file>` as `--config=<file>` in `argv`, in place (config_flags
  reads its overrides from sys.argv); returns the --config value as given."""
  spec, resolved, args = '', [], iter(argv)
  for arg in args:
    name, equals, value = arg.partition('=')
    if name in ('--config', '-config'):
      spec = value if equals else next(args, '')
      arg = '--config=' + configs.resolve(spec)
    resolved.append(arg)
  argv[:] = resolved
  return spec


def _usage() -> str:
  return (f'usage: {PROG} --config <recipe>[:variant] --workdir DIR [--config.<field>=<value> '
          '...]\n\n' + __doc__ + '\nrecipes: ' + ', '.join(configs.names())
          + '\n\nflags:\n' + flags.FLAGS.main_module_help())


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing (app.run's `flags_parser`), a recipe name resolved to its file,
  `--help` printed with exit status 0 and a mistake printed as one line with status 2."""
  if any(arg in _HELP_FLAGS for arg in argv[1:]):
    print(_usage())
    sys.exit(0)
  spec = ''
  try:
    spec = _resolve_recipe(argv)
    return flags.FLAGS(argv)
  except configs.ConfigError as e:
    _fail(e)
  except flags.Error as e:
    _fail(_flag_error(str(e), spec))
  except (AttributeError, KeyError, TypeError, ValueError) as e:  # a bad override or variant
    _fail(_override_error(e, argv) or e)


def main(argv):
  if len(argv) > 1:
    _fail(f'unexpected arguments {argv[1:]}: flags take the form --name=value')
  if not flags.FLAGS['verbosity'].present:  # orbax and clu log every save at INFO
    logging.set_verbosity(logging.WARNING)
  try:
    if _MULTIHOST.value:
      multihost.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                           timeout=_INITIALIZATION_TIMEOUT.value)
    configs.validate(_CONFIG.value)
    from sface_jax import train  # TensorFlow (tf.data) loads here, after the checks
    try:
      train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    except train.Interrupted as e:  # a checkpoint of the step reached is on disk
      print(e, flush=True)
      sys.exit(128 + e.signum)
  except _user_errors() as e:
    _fail(e)
  except multihost.StartupError as e:
    print(f'{PROG}: error: {e}', file=sys.stderr, flush=True)
    sys.exit(1)


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
