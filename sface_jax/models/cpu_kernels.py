"""Our own CPU kernels, compiled from cpu_kernels.cc on first use, called through XLA's FFI.

Why, for grouped convolutions (`grouped_conv_kernel_grad`): the kernel gradient of a
depthwise or grouped convolution is a reduction over the batch and the positions for every
(tap, channel). XLA:CPU runs grouped convolutions through a slow generic loop, and the same
gradient written as reductions (mobilefacenet's `_taps_backward`) compiles to one scalar loop
per output element: about 2-3 G multiply-adds/s on two cores, against 30-40 G/s for
PyTorch's kernel, and no way of writing it in XLA beat that (BENCHMARKS.md § What we tried).
cpu_kernels.cc sums the same products with the channels as its vectorised inner loop and the
images split over XLA's intra-op threads: 3.5-26× faster than the reductions on MobileFaceNet's
layers (BENCHMARKS.md § MobileFaceNet's grouped kernel gradients).

Why, for dense convolutions (`conv_kernel_grad`, IResNet's): XLA:CPU runs their kernel
gradient as an Eigen convolution over batch-minor copies of the activations, and oneDNN's
backward primitive is out of reach (the oneDNN custom call runs only forward convolutions;
as one, the kernel gradient took 1,000× longer: BENCHMARKS.md § What we tried). Eigen
reaches the machine's multiply-add rate on the 14×14 maps but not on the large early maps,
nor on the 1×1 stride-2 shortcuts. cpu_kernels.cc runs the gradient as a blocked matrix
product (a tap's kernel gradient is x_tapᵀ · dy over the positions) on packed panels, with no
copy of the activations per tap: 1.0-1.5× faster than Eigen on IR-50's 3×3 layers, 1.6-5× on
its 1×1 shortcuts (BENCHMARKS.md § IResNet's kernel gradients on our compiled kernel).

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
_DENSE_KERNEL_GRAD = 'sface_conv_kernel_grad'


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
                  "convolutions' kernel gradients use XLA's slower operations")
    return False
  try:
    library = _library_path(cxx)
    if not library.exists():
      _build(cxx, library)
    handlers = ctypes.cdll.LoadLibrary(str(library))
  except (OSError, subprocess.CalledProcessError) as error:
    detail = getattr(error, 'stderr', '') or ''
    warnings.warn(f'sface_jax.models.cpu_kernels: could not build or load {SOURCE.name} with '
                  f"{cxx} ({error}); convolutions' kernel gradients use XLA's slower operations."
                  f'\n{detail[-2000:]}')
    return False
  for target, handler in ((_KERNEL_GRAD, handlers.SfaceGroupedConvKernelGrad),
                          (_DENSE_KERNEL_GRAD, handlers.SfaceConvKernelGrad)):
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(handler), platform='cpu')
  return True


def available() -> bool:
  """Whether the kernels are called when traced now: custom calls allowed, library built."""
  return custom_calls.allowed() and _load()


def _window(stride: int, padding: Sequence[Tuple[int, int]]) -> dict:
  """The kernels' window attributes (the bottom and right padding follow from dy's shape)."""
  return {'stride': np.int64(stride), 'pad_top': np.int64(padding[0][0]),
          'pad_left': np.int64(padding[1][0])}


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
          **_window(stride, padding))
  return dkernel.swapaxes(3, 4).reshape(kernel_shape).astype(x.dtype)


def conv_kernel_grad(x: Array, dy: Array, kernel_shape: Sequence[int], stride: int,
                     padding: Sequence[Tuple[int, int]]) -> Array:
  """d/dkernel of `lax.conv_general_dilated(x, kernel, (stride, stride), padding,
  ('NHWC', 'HWIO', 'NHWC'))` for the cotangent dy: for every tap (i, j),

  dkernel[i, j] = Σ_{b,p,q} x_pad[b, s·p + i, s·q + j, :]ᵀ · dy[b, p, q, :]

  (an outer product of input and output channels per position; negative padding crops), in
  float32. Only where `takes_dense(dy)`: available, float32, C_out a multiple of 8.
  """
  if not takes_dense(x, dy):
    raise ValueError(f'cpu_kernels.conv_kernel_grad: no kernel for x {x.dtype} {x.shape}, '
                     f'dy {dy.dtype} {dy.shape}; check cpu_kernels.takes_dense')
  return jax.ffi.ffi_call(_DENSE_KERNEL_GRAD, jax.ShapeDtypeStruct(kernel_shape, jnp.float32))(
      x, dy, **_window(stride, padding))


def takes_dense(x: Array, dy: Array) -> bool:
  """Whether `conv_kernel_grad` runs for these operands now: `available()`, both float32
  (the dense kernel's only dtype: IResNet's CPU convolutions are float32) and the output
  channels a multiple of 8, the kernel's vector width."""
  return (available() and x.dtype == dy.dtype == jnp.float32 and dy.ndim == 4
          and dy.shape[-1] % 8 == 0)
