"""Our own CPU kernels, compiled from cpu_kernels.cc on first use, called through XLA's FFI.

Why: the kernel gradient of a depthwise or grouped convolution is a reduction over the batch
and the positions for every (tap, channel). XLA:CPU runs grouped convolutions through a slow
generic loop, and the same gradient written as reductions (mobilefacenet's `_taps_backward`)
compiles to one scalar loop per output element: about 2-3 G multiply-adds/s on two cores,
against 30-40 G/s for PyTorch's kernel, and no way of writing it in XLA beat that (BENCHMARKS.md
§ What we tried). cpu_kernels.cc sums the same products with the channels as its vectorised
inner loop and the images split over XLA's intra-op threads: 3.5-26× faster than the reductions
on MobileFaceNet's layers (BENCHMARKS.md § MobileFaceNet's convolutions one by one).

How: the first call that needs the library compiles cpu_kernels.cc with the C++ compiler
($CXX, else c++ or g++ on the PATH) against jaxlib's XLA FFI headers (`jax.ffi.include_dir()`),
`-O3 -march=native`, into the cache folder ($SFACE_JAX_CACHE, else $XDG_CACHE_HOME/sface_jax
or ~/.cache/sface_jax), under a name that hashes the source, the flags, jaxlib's version, the
compiler's version and the processor; later runs load that file (a few seconds the first time,
nothing after). The file is written under a temporary name and renamed, so processes that
build at once never load a half-written library. Where no compiler is found or the build
fails, a warning says why once, `available()` is false, and callers use XLA's operations.

Where: only where custom calls are allowed (`custom_calls.allowed`: the CPU, one device, not
inside `custom_calls.disabled()`).
"""

import ctypes
import functools
import hashlib
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile
from typing import Optional, Sequence, Tuple
import warnings

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

from sface_jax.models import custom_calls

Array = jax.Array

SOURCE = pathlib.Path(__file__).with_suffix('.cc')
FLAGS = ('-O3', '-march=native', '-std=c++17', '-shared', '-fPIC')
_KERNEL_GRAD = 'sface_grouped_conv_kernel_grad'


def cache_dir() -> pathlib.Path:
  if 'SFACE_JAX_CACHE' in os.environ:
    return pathlib.Path(os.environ['SFACE_JAX_CACHE'])
  cache_home = os.environ.get('XDG_CACHE_HOME') or pathlib.Path.home() / '.cache'
  return pathlib.Path(cache_home) / 'sface_jax'


def compiler() -> Optional[str]:
  """The C++ compiler the kernels are built with: $CXX, else c++ or g++ on the PATH."""
  return os.environ.get('CXX') or shutil.which('c++') or shutil.which('g++')


def _processor() -> str:
  """What `-march=native` compiles for: the machine and its instruction-set flags."""
  try:
    lines = pathlib.Path('/proc/cpuinfo').read_text().splitlines()
  except OSError:
    lines = []
  flags = next((line for line in lines if line.startswith(('flags', 'Features'))), '')
  return f'{platform.machine()} {flags}'


def _library_path(cxx: str) -> pathlib.Path:
  version = subprocess.run([cxx, '--version'], capture_output=True, text=True,
                           check=True).stdout
  key = hashlib.sha256('\0'.join([SOURCE.read_text(), ' '.join(FLAGS), jaxlib.__version__,
                                  version, _processor()]).encode()).hexdigest()[:16]
  return cache_dir() / f'cpu_kernels-{key}.so'


def _build(cxx: str, library: pathlib.Path) -> None:
  library.parent.mkdir(parents=True, exist_ok=True)
  fd, partial = tempfile.mkstemp(suffix='.so.partial', dir=library.parent)
  os.close(fd)
  try:
    subprocess.run([cxx, *FLAGS, '-isystem', jax.ffi.include_dir(), str(SOURCE),
                    '-o', partial], capture_output=True, text=True, check=True)
    os.replace(partial, library)
  finally:
    if os.path.exists(partial):
      os.remove(partial)


@functools.cache
def _load() -> bool:
  """Builds (if not cached), loads and registers the kernels; False, with a warning, if it
  cannot."""
  cxx = compiler()
  if cxx is None:
    warnings.warn('sface_jax.models.cpu_kernels: no C++ compiler (set CXX, or install g++); '
                  "using XLA's slower reductions for grouped convolutions' kernel gradients")
    return False
  try:
    library = _library_path(cxx)
    if not library.exists():
      _build(cxx, library)
    handlers = ctypes.cdll.LoadLibrary(str(library))
  except (OSError, subprocess.CalledProcessError) as error:
    detail = getattr(error, 'stderr', '') or ''
    warnings.warn(f'sface_jax.models.cpu_kernels: could not build or load {SOURCE.name} with '
                  f"{cxx} ({error}); using XLA's reductions instead.\n{detail[-2000:]}")
    return False
  handler = jax.ffi.pycapsule(handlers.SfaceGroupedConvKernelGrad)
  jax.ffi.register_ffi_target(_KERNEL_GRAD, handler, platform='cpu')
  return True


def available() -> bool:
  """Whether the kernels are called when traced now: custom calls allowed, library built."""
  return custom_calls.allowed() and _load()


def grouped_conv_kernel_grad(x: Array, dy: Array, kernel_shape: Sequence[int], stride: int,
                             padding: Sequence[Tuple[int, int]], groups: int) -> Array:
  """d/dkernel of `lax.conv_general_dilated(x, kernel, (stride, stride), padding,
  ('NHWC', 'HWIO', 'NHWC'), feature_group_count=groups)` for the cotangent dy.

  dkernel[i, j, c, o] = Σ_{b,p,q} x_pad[b, s·p + i, s·q + j, g·C_in/groups + c]
                                 · dy[b, p, q, o]
  with g = o // (C_out/groups); negative padding crops. Computed in float32, returned in
  x's dtype. Only where `available()`.
  """
  if not available():
    raise ValueError('cpu_kernels.grouped_conv_kernel_grad: the kernels are not available '
                     'here; check cpu_kernels.available()')
  kh, kw, group_in, out_channels = kernel_shape
  group_out = out_channels // groups

  def groups_innermost(a, per_group):  # (..., groups · per_group) → (..., per_group, groups)
    return a.astype(jnp.float32).reshape(*a.shape[:3], groups, per_group).swapaxes(3, 4)

  dkernel = jax.ffi.ffi_call(
      _KERNEL_GRAD, jax.ShapeDtypeStruct((kh, kw, group_in, group_out, groups), jnp.float32))(
          groups_innermost(x, group_in), groups_innermost(dy, group_out),
          stride=np.int64(stride), pad_top=np.int64(padding[0][0]),
          pad_left=np.int64(padding[1][0]))
  return dkernel.swapaxes(3, 4).reshape(kernel_shape).astype(x.dtype)
