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
the command once with them (same interpreter, same argv), and only when all of these hold:
Linux with glibc; GLIBC_TUNABLES is not in the environment (set it, even empty, to keep your
own or glibc's defaults); the run will be on the CPU (JAX_PLATFORMS names cpu first, or no
GPU/TPU plugin for JAX is installed). On accelerators a step's buffers live on the device.
"""

import importlib.metadata
import importlib.util
import os
import pkgutil
import platform
import sys
from typing import List

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
  """Whether JAX will compute on the CPU, decided without initialising JAX's backends."""
  platforms = environ.get('JAX_PLATFORMS', '').strip()
  if platforms:
    return platforms.split(',')[0].strip().lower() == 'cpu'
  return not accelerator_plugins()


def should_reexec(environ=os.environ) -> bool:
  return (sys.platform == 'linux' and platform.libc_ver()[0] == 'glibc'
          and 'GLIBC_TUNABLES' not in environ and runs_on_cpu(environ))


def reexec_with_tunables() -> None:
  """Restart this command with `TUNABLES` when `should_reexec()`; otherwise return.

  Call it first thing in a program's `__main__`, before work that would be done twice.
  """
  if should_reexec():
    os.execve(sys.executable, sys.orig_argv, dict(os.environ, GLIBC_TUNABLES=TUNABLES))
