"""JAX's persistent compilation cache for the command-line programs: a warm second run.

Compiling a training step, an embedding or an evaluation program takes seconds to minutes,
and the same program is compiled again by every run of the same recipe (the demo, a resumed
run, each evaluation). JAX can keep compiled programs on disk and load them instead; the
CLIs turn that on with one call:

  argparse CLIs:  `compilation_cache.add_arguments(parser)` while building the parser
                  (flags `--compilation-cache-dir DIR` and `--no-compilation-cache`);
  absl CLI:       `compilation_cache.define_absl_flags()` next to its flags
                  (`--compilation_cache_dir=DIR` and `--nocompilation_cache`).

Where: `default_dir()`, the user's cache folder (`$XDG_CACHE_HOME` or `~/.cache` on Linux,
`~/Library/Caches` on macOS, `%LOCALAPPDATA%` on Windows) + `sface_jax/jax`. A folder the
user already gave JAX (the `JAX_COMPILATION_CACHE_DIR` environment variable, or
`jax.config.update('jax_compilation_cache_dir', ...)`) is kept; the flag overrides both.
Off: the flag, or JAX's own switch `JAX_ENABLE_COMPILATION_CACHE=false`.

Only the CLIs do this: importing sface_jax changes nothing for a notebook or another program
(call `enable()` there to opt in). The folder is created readable and writable by the user
alone, since JAX runs what it loads from it (its `set_cache_dir` warns: the cache is trusted).
JAX keys an entry by the program, the compiler options, jaxlib's version and the devices, so
a new jaxlib or another machine simply misses; the folder grows by a few MB per new program
and can be deleted at any time.
"""

import argparse
import logging
import os
import sys
from typing import Mapping, Optional

_logger = logging.getLogger(__name__)


def default_dir(environ: Mapping[str, str] = os.environ,
                system: str = sys.platform) -> Optional[str]:
  """`<the user's cache folder>/sface_jax/jax` for `system` (a `sys.platform` value); None
  where no home folder is known (then there is no default cache)."""
  if system == 'win32':
    base = environ.get('LOCALAPPDATA') or _under_home(environ, 'AppData', 'Local')
  elif system == 'darwin':
    base = _under_home(environ, 'Library', 'Caches')
  else:
    base = environ.get('XDG_CACHE_HOME') or _under_home(environ, '.cache')
  return os.path.join(base, 'sface_jax', 'jax') if base else None


def _under_home(environ: Mapping[str, str], *parts: str) -> Optional[str]:
  home = environ.get('HOME') or environ.get('USERPROFILE')
  return os.path.join(home, *parts) if home else None


def enable(directory: Optional[str] = None) -> Optional[str]:
  """Turns the persistent cache on in `directory`; None: the folder the user gave JAX if any,
  else `default_dir()`. Returns the folder in use, or None when the cache stays off (JAX's
  `jax_enable_compilation_cache` is False, no folder is known, or it cannot be created:
  then it is logged and compiling goes on without a cache)."""
  if not _enabled():
    return None
  directory = directory or _setting('jax_compilation_cache_dir') or default_dir()
  if not directory:
    _logger.info('no home folder: JAX compilation cache off (--compilation-cache-dir sets one)')
    return None
  try:
    os.makedirs(directory, mode=0o700, exist_ok=True)
  except OSError as error:
    _logger.warning('JAX compilation cache off: cannot create %s (%s)', directory, error)
    return None
  _update('jax_compilation_cache_dir', directory)
  _logger.info('JAX compilation cache: %s', directory)
  return directory


def disable() -> None:
  """Turns the persistent cache off for this process, whatever folder is set."""
  _update('jax_enable_compilation_cache', False)


# JAX reads its settings from the environment when it is imported. The CLIs that choose the
# platform before importing JAX (sface_jax.plan sets JAX_PLATFORMS) must not import it here,
# so a setting goes to the environment, which JAX reads when imported (and child processes
# inherit), and to jax.config if JAX is imported already.


def _setting(name: str):
  jax = sys.modules.get('jax')
  return getattr(jax.config, name) if jax is not None else os.environ.get(name.upper())


def _enabled() -> bool:
  value = _setting('jax_enable_compilation_cache')
  if isinstance(value, str):  # from the environment, read as JAX reads a boolean
    return value.strip().lower() not in ('0', 'false', 'f', 'no', 'n', 'off')
  return value is None or bool(value)


def _update(name: str, value) -> None:
  os.environ[name.upper()] = str(value).lower() if isinstance(value, bool) else value
  jax = sys.modules.get('jax')
  if jax is not None:
    jax.config.update(name, value)


class _CacheDir(argparse.Action):

  def __call__(self, parser, namespace, values, option_string=None):
    setattr(namespace, self.dest, values)
    enable(values)


class _NoCache(argparse.Action):

  def __init__(self, option_strings, dest, **kwargs):
    super().__init__(option_strings, dest, nargs=0, default=False, **kwargs)

  def __call__(self, parser, namespace, values, option_string=None):
    setattr(namespace, self.dest, True)
    disable()


def add_arguments(parser: argparse.ArgumentParser) -> None:
  """Turns the cache on now (`enable()`: a CLI calls this while building its parser, before
  anything compiles) and adds `--compilation-cache-dir DIR` and `--no-compilation-cache`,
  which move it or turn it off as the arguments are read."""
  enable()
  parser.add_argument('--compilation-cache-dir', action=_CacheDir, default=None,
                      help='folder of JAX\'s persistent compilation cache (default: '
                           f'$JAX_COMPILATION_CACHE_DIR, else {default_dir()})')
  parser.add_argument('--no-compilation-cache', action=_NoCache,
                      help='compile everything anew; nothing is read from or written to disk')


def define_absl_flags() -> None:
  """`add_arguments` for an absl program: `--compilation_cache_dir` and
  `--[no]compilation_cache`, applied once absl has parsed them (before `main` runs)."""
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  directory = flags.DEFINE_string(
      'compilation_cache_dir', None, 'Folder of JAX\'s persistent compilation cache '
      f'(default: $JAX_COMPILATION_CACHE_DIR, else {default_dir()}).')
  on = flags.DEFINE_bool('compilation_cache', True, 'Keep compiled programs on disk for the '
                         'next run (--nocompilation_cache: compile everything anew).')
  app.call_after_init(lambda: enable(directory.value) if on.value else disable())
