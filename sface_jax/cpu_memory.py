"""Host memory on CPU runs: keep freed buffers in the heap instead of returning them to the OS.

XLA:CPU allocates a step's temporary buffers with malloc and frees them when the step ends.
With glibc's defaults, large blocks come from fresh mmap'd pages (or a heap that is trimmed
on free), so every step faults in gigabytes of new zero-filled pages: 700 k minor page
faults per IR-18 training step at batch 32 (about 2.7 GB), and on our 2-core VM the kernel's
page-fault work took 40% of the process's CPU time. Three glibc tunables keep freed memory
in one heap for the next step to reuse:

  glibc.malloc.mmap_max=0         large blocks from the heap too, not from their own mmap
  glibc.malloc.arena_max=1        one heap for all threads (thread arenas are mmap'd heaps)
  glibc.malloc.trim_threshold=2⁴⁰  never give the heap's top back to the OS

With all three a step faults at most a few hundred pages after warm-up; any two of them
still fault as much as the defaults (BENCHMARKS.md § Host memory has the figures and the
commands). The cost: the process keeps its peak heap until it exits, which a training run
reaches every step anyway.

glibc reads GLIBC_TUNABLES only when a process starts, so `reexec_with_tunables()` restarts
the command once with them (same interpreter, same argv), says so in one line on stderr, and
does that only when all of these hold:
- Linux with glibc, and GLIBC_TUNABLES is not in the environment (set it, even empty, to
  keep your own or glibc's defaults);
- the run will be on the CPU (`runs_on_cpu`): JAX_PLATFORMS names only cpu, or it is unset
  and no accelerator is installed (a JAX GPU/TPU plugin, libtpu, or a TPU_LIBRARY_PATH). On
  accelerators a step's buffers live on the device;
- the program is the process's own command (`started_as_command`): `python -m
  sface_jax.main ...` or `python path/to/main.py ...` typed as such, never a program run
  inside IPython/Jupyter (`%run -m sface_jax.main`: a restart would replace the kernel and
  lose the notebook's state) or under `runpy` from another program (whose command line the
  restart would run instead).
"""

import importlib.metadata
import importlib.util
import os
import pkgutil
import platform
import sys
from typing import List, Optional, Sequence, Tuple

TUNABLES = ':'.join([
    'glibc.malloc.mmap_max=0',
    'glibc.malloc.arena_max=1',
    f'glibc.malloc.trim_threshold={2 ** 40}',
])


def accelerator_plugins() -> List[str]:
  """JAX's GPU/TPU plugins installed here: entry points, `jax_plugins.*` packages, libtpu."""
  names = [entry.name for entry in importlib.metadata.entry_points(group='jax_plugins')]
  if importlib.util.find_spec('jax_plugins') is not None:
    import jax_plugins  # pylint: disable=g-import-not-at-top
    names += [module.name for module in pkgutil.iter_modules(jax_plugins.__path__)]
  if importlib.util.find_spec('libtpu') is not None:
    names.append('libtpu')
  return names


def runs_on_cpu(environ=os.environ) -> bool:
  """Whether JAX will compute on the CPU, decided without initialising JAX's backends: the
  platforms JAX_PLATFORMS names are all cpu; or, where it is unset, nothing points to an
  accelerator (no GPU/TPU plugin installed, no TPU_LIBRARY_PATH)."""
  platforms = [name.strip().lower()
               for name in environ.get('JAX_PLATFORMS', '').split(',') if name.strip()]
  if platforms:
    return all(name == 'cpu' for name in platforms)
  return not environ.get('TPU_LIBRARY_PATH') and not accelerator_plugins()


def _main_program(orig_argv: Sequence[str]) -> Tuple[str, str]:
  """('module', name) for `python [options] -m name ...`, ('script', path) for
  `python [options] path ...`, ('', '') for anything else (-c, stdin)."""
  args = iter(orig_argv[1:])
  for arg in args:
    if arg.startswith('-m'):
      return 'module', arg[2:] or next(args, '')
    if arg in ('-W', '-X', '--check-hash-based-pycs'):  # options that take a value
      next(args, None)
    elif not arg.startswith('-'):
      return 'script', arg
    elif arg == '-' or arg.startswith('-c'):
      break
  return '', ''


def started_as_command(orig_argv: Optional[Sequence[str]] = None, main=None) -> bool:
  """Whether the `__main__` module running now is the program the process was started with
  (module docstring): the `-m` module or the script of the interpreter's own command line
  (`sys.orig_argv`), and not inside IPython."""
  orig_argv = sys.orig_argv if orig_argv is None else orig_argv
  main = sys.modules.get('__main__') if main is None else main
  if _in_ipython():
    return False
  kind, name = _main_program(orig_argv)
  if kind == 'module':
    spec = getattr(main, '__spec__', None)
    return spec is not None and spec.name in (name, f'{name}.__main__')
  if kind == 'script':
    path = getattr(main, '__file__', None)
    return path is not None and os.path.abspath(path) == os.path.abspath(name)
  return False


def _in_ipython() -> bool:
  """Whether an IPython shell or Jupyter kernel is running in this process."""
  ipython = sys.modules.get('IPython')
  get_ipython = getattr(ipython, 'get_ipython', None)
  return get_ipython is not None and get_ipython() is not None


def should_reexec(environ=os.environ) -> bool:
  """The platform and environment conditions of the module docstring."""
  return (sys.platform == 'linux' and platform.libc_ver()[0] == 'glibc'
          and 'GLIBC_TUNABLES' not in environ and runs_on_cpu(environ))


def reexec_with_tunables() -> None:
  """Restart this command with `TUNABLES` when `should_reexec()` and `started_as_command()`;
  otherwise return.

  Call it first thing in a program's `if __name__ == '__main__':`, before work that would be
  done twice.
  """
  if should_reexec() and started_as_command():
    print(f'sface_jax: restarting with GLIBC_TUNABLES={TUNABLES} so that XLA:CPU reuses freed '
          'host memory (sface_jax/cpu_memory.py; set GLIBC_TUNABLES to skip this)',
          file=sys.stderr, flush=True)
    os.execve(sys.executable, sys.orig_argv, dict(os.environ, GLIBC_TUNABLES=TUNABLES))
