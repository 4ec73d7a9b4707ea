"""sface_jax.compilation_cache: where the CLIs keep compiled programs, the flags, the user's
own setting, and that a CLI's programs are written there and loaded by the next run."""

import argparse
import os
import stat
import subprocess
import sys
import textwrap

import jax
import pytest

from sface_jax import compilation_cache

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize('system,environ,expected', [
    ('linux', {'HOME': '/home/u'}, '/home/u/.cache/sface_jax/jax'),
    ('linux', {'HOME': '/home/u', 'XDG_CACHE_HOME': '/x'}, '/x/sface_jax/jax'),
    ('darwin', {'HOME': '/Users/u'}, '/Users/u/Library/Caches/sface_jax/jax'),
    ('win32', {'LOCALAPPDATA': r'C:\Users\u\AppData\Local'},
     os.path.join(r'C:\Users\u\AppData\Local', 'sface_jax', 'jax')),
    ('win32', {'USERPROFILE': r'C:\Users\u'},
     os.path.join(r'C:\Users\u', 'AppData', 'Local', 'sface_jax', 'jax')),
    ('linux', {}, None),  # no home folder: no default cache
])
def test_default_dir_is_the_users_cache_folder(system, environ, expected):
  assert compilation_cache.default_dir(environ, system) == expected


@pytest.fixture
def jax_cache_settings(monkeypatch):
  """The test's changes to JAX's cache settings and their environment variables, undone."""
  saved = {name: getattr(jax.config, name)
           for name in ('jax_compilation_cache_dir', 'jax_enable_compilation_cache')}
  for name in saved:  # set first, so that monkeypatch restores the variable even if unset
    monkeypatch.setenv(name.upper(), '')
    monkeypatch.delenv(name.upper())
  jax.config.update('jax_compilation_cache_dir', None)
  jax.config.update('jax_enable_compilation_cache', True)
  yield
  for name, value in saved.items():
    jax.config.update(name, value)


def _parse(*argv: str) -> argparse.Namespace:
  parser = argparse.ArgumentParser()
  compilation_cache.add_arguments(parser)
  return parser.parse_args(list(argv))


def test_cli_default_is_the_users_cache_folder(jax_cache_settings, monkeypatch, tmp_path):
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'xdg'))
  monkeypatch.setattr(sys, 'platform', 'linux')
  _parse()
  folder = tmp_path / 'xdg' / 'sface_jax' / 'jax'
  assert jax.config.jax_compilation_cache_dir == str(folder)
  assert os.environ['JAX_COMPILATION_CACHE_DIR'] == str(folder)  # for JAX's child processes
  assert stat.S_IMODE(folder.stat().st_mode) == 0o700  # JAX runs what it loads from here


def test_cli_keeps_the_users_folder_and_the_flags_override(jax_cache_settings, tmp_path):
  jax.config.update('jax_compilation_cache_dir', str(tmp_path / 'mine'))  # JAX_COMPILATION_...
  _parse()
  assert jax.config.jax_compilation_cache_dir == str(tmp_path / 'mine')
  _parse('--compilation-cache-dir', str(tmp_path / 'flag'))
  assert jax.config.jax_compilation_cache_dir == str(tmp_path / 'flag')
  assert jax.config.jax_enable_compilation_cache
  args = _parse('--no-compilation-cache')
  assert args.no_compilation_cache and not jax.config.jax_enable_compilation_cache
  assert os.environ['JAX_ENABLE_COMPILATION_CACHE'] == 'false'
  # JAX's own switch off: the CLI leaves it off
  assert compilation_cache.enable(str(tmp_path / 'other')) is None
  assert jax.config.jax_compilation_cache_dir == str(tmp_path / 'flag')


_CLI = """
import argparse, sys
from sface_jax import compilation_cache
parser = argparse.ArgumentParser()
compilation_cache.add_arguments(parser)
parser.parse_args(sys.argv[1:])
import jax, jax.numpy as jnp  # imported after the parser, as sface_jax.plan does
print(jax.jit(lambda x: jnp.sin(x) @ x.T)(jnp.ones((64, 64))).sum())
"""


def _run_cli(tmp_path, *argv: str) -> list:
  """`_CLI` in a fresh process whose home is `tmp_path`; the files its cache holds after."""
  env = {k: v for k, v in os.environ.items()
         if k not in ('JAX_COMPILATION_CACHE_DIR', 'JAX_ENABLE_COMPILATION_CACHE')}
  env.update(HOME=str(tmp_path), XDG_CACHE_HOME=str(tmp_path / 'cache'), PYTHONPATH=REPO,
             JAX_PLATFORMS='cpu', JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0')
  subprocess.run([sys.executable, '-c', _CLI, *argv], env=env, check=True, timeout=300,
                 capture_output=True)
  folder = tmp_path / 'cache' / 'sface_jax' / 'jax'
  return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def test_a_cli_run_writes_its_programs_and_the_next_run_finds_them(tmp_path):
  """JAX is imported after the CLI's parser (the environment carries the setting): the first
  run writes its compiled program, a second run of the same program adds nothing (it loaded
  it), and --no-compilation-cache writes nothing."""
  assert _run_cli(tmp_path / 'off', '--no-compilation-cache') == []
  first = _run_cli(tmp_path)
  assert any(name.startswith('jit_') for name in first), first
  assert _run_cli(tmp_path) == first


def test_absl_flags(tmp_path):
  program = textwrap.dedent("""
      from absl import app
      from sface_jax import compilation_cache
      compilation_cache.define_absl_flags()
      def main(argv):
        import jax
        print(jax.config.jax_enable_compilation_cache, jax.config.jax_compilation_cache_dir)
      app.run(main)
  """)
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS='cpu')

  def run(*flags):
    return subprocess.run([sys.executable, '-c', program, *flags], env=env, check=True,
                          timeout=120, capture_output=True, text=True).stdout.split()

  assert run(f'--compilation_cache_dir={tmp_path}') == ['True', str(tmp_path)]
  assert run('--nocompilation_cache')[0] == 'False'
