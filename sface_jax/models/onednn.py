"""Dense 2-D convolutions and matmuls through XLA:CPU's own oneDNN calls, on the CPU.

Why: on the CPU, XLA runs convolutions with Eigen's kernels and PyTorch runs them with
oneDNN's, and that difference was the whole gap between our IResNet training step and
PyTorch's (BENCHMARKS.md § Where the step's time goes: IR-50's convolutions 4.27 s per step
against 3.79 s, everything else 1.20 s against 1.18 s). MobileFaceNet's 1×1 convolutions are
matmuls with a long, thin operand ((B·H·W) × C, C = 64-512), which XLA's own dot runs at a
third to a half of oneDNN's speed (BENCHMARKS.md § What we tried). jaxlib ships oneDNN, and
XLA:CPU executes custom calls named `__onednn$convolution` and `__onednn$matmul` with
oneDNN's primitives (`OneDnnOpThunk`), but the pass that would rewrite convolutions and dots
into those calls is switched off in the pip wheels (it needs XLA built with
ENABLE_ONEDNN_ASYNC), and the `xla_cpu_use_onednn` options change nothing (BENCHMARKS.md
§ What we tried). So `conv` and `matmul` emit the custom calls themselves.

What runs on oneDNN: `conv`'s forward convolution and the input gradient of stride-1
convolutions (the same forward convolution of dy, with the kernel flipped in space, its
input and output channels swapped, and padding k − 1 − p). The thunk offers only oneDNN's
forward convolution, so the input gradient of strided convolutions stays XLA's (`jax.vjp` of
`lax.conv_general_dilated`), and the kernel gradient is our compiled kernel
(`cpu_kernels.conv_kernel_grad`) where it runs, else XLA's. `matmul`'s product and both its gradients
(dy·bᵀ and aᵀ·dy, oneDNN's transposed-operand flags). `forward_conv`, a grouped forward
convolution with no gradient rule of its own: MobileFaceNet's depthwise layers run their
forward pass and stride-1 input gradient on oneDNN's depthwise kernels and take their kernel
gradient elsewhere (mobilefacenet.grouped_conv_taps).

The calls' configurations are XLA's `OneDnnConvolutionConfig` and `OneDnnMatMulConfig`
(xla/service/cpu/onednn_config.proto) in their JSON form. Their conventions have changed
between XLA versions (older ones stored dimensions and window sizes plus one), so the path is
taken only with the jaxlib versions it was tested with (TESTED_JAXLIB); any other version,
platform or dtype, any convolution that is not plain (grouped, dilated, not NHWC/HWIO), a
mesh of several devices or a trace inside `custom_calls.disabled()` (`available`; the
`custom_calls` module says why) gets XLA's `lax.conv_general_dilated` and `jnp.dot`
unchanged. tests/test_onednn.py compares both with XLA's and with float64 NumPy.
The lowering uses `jax._src.interpreters.mlir.custom_call`: `jax.ffi.ffi_call` emits typed-FFI
calls whose attributes XLA would not read as this BackendConfig.
"""

import functools
import json
from typing import Optional, Sequence, Tuple, Union

import jax
from jax._src.interpreters import mlir  # private: see the module docstring's last lines
from jax.extend import core as jax_core
import jax.numpy as jnp
import jaxlib

from sface_jax.models import cpu_kernels
from sface_jax.models import custom_calls

Array = jax.Array
Padding = Tuple[Tuple[int, int], Tuple[int, int]]

# jaxlib versions whose XLA reads the configuration as written here (see the module
# docstring); anything else falls back to XLA's convolution. 0.10.2 is CI's (Python 3.11);
# 0.11.2 (the lent GPU image's) and 0.12.0.1 passed the whole suite on Python 3.13 on
# 2026-12-05 (CONTRIBUTING.md § Newer JAX releases says how).
TESTED_JAXLIB = ('0.10.2', '0.11.2', '0.12.0.1')
_NHWC_HWIO = ('NHWC', 'HWIO', 'NHWC')

_conv_p = jax_core.Primitive('onednn_conv2d')


def _xla_conv(x, kernel, strides, padding, groups=1):
  return jax.lax.conv_general_dilated(x, kernel, strides, padding,
                                      dimension_numbers=_NHWC_HWIO, feature_group_count=groups)


def _abstract_eval_like(xla_fn):
  """An abstract evaluation rule: the same output as `xla_fn`, XLA's form of the call."""
  def abstract_eval(*avals, **params):
    out = jax.eval_shape(functools.partial(xla_fn, **params), *avals)
    return jax.core.ShapedArray(out.shape, out.dtype)
  return abstract_eval


def _config(strides, padding, groups) -> str:
  """BackendConfig.onednn_conv_config for NHWC input and output and an HWIO kernel
  (C_in / groups, C_out)."""
  nhwc = {'batch_dim': 0, 'feature_dim': 3, 'spatial_dims': [1, 2]}
  return json.dumps({'onednn_conv_config': {
      'dims': 4, 'feature_groups': groups,
      'input': {'dims': 4, 'data': nhwc},
      'kernel': {'dims': 4, 'filter': {'input_feature_dim': 2, 'output_feature_dim': 3,
                                       'spatial_dims': [0, 1]}},
      'output': {'dims': 4, 'data': nhwc},
      'window': {'strides': list(strides), 'pad_left': [lo for lo, _ in padding],
                 'pad_right': [hi for _, hi in padding],
                 'window_dilations': [1, 1]},  # stored as dilation, oneDNN's dilation + 1
  }})


def _onednn_call(ctx, target: str, operands, backend_config: str):
  """The custom call `target` on row-major operands and result."""
  row_major = lambda ndim: list(range(ndim - 1, -1, -1))
  return mlir.custom_call(
      target, result_types=[mlir.aval_to_ir_type(ctx.module_context, ctx.avals_out[0])],
      operands=list(operands), backend_config=backend_config, api_version=1,
      operand_layouts=[row_major(len(aval.shape)) for aval in ctx.avals_in],
      result_layouts=[row_major(len(ctx.avals_out[0].shape))]).results


def _lowering(ctx, x, kernel, *, strides, padding, groups):
  return _onednn_call(ctx, '__onednn$convolution', (x, kernel),
                      _config(strides, padding, groups))


_conv_p.def_abstract_eval(_abstract_eval_like(_xla_conv))
_conv_p.def_impl(jax.jit(_conv_p.bind, static_argnames=('strides', 'padding', 'groups')))  # eager
mlir.register_lowering(_conv_p, _lowering, platform='cpu')
# Lowered for another platform (a computation placed on a GPU while the default backend is
# the CPU, or a multi-platform export), the primitive is XLA's convolution.
mlir.register_lowering(_conv_p, mlir.lower_fun(_xla_conv, multiple_results=False))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _onednn_conv(x: Array, kernel: Array, strides: Tuple[int, int], padding: Padding) -> Array:
  return _conv_p.bind(x, kernel, strides=strides, padding=padding, groups=1)


def _forward(x, kernel, strides, padding):
  return _onednn_conv(x, kernel, strides, padding), (x, kernel)


def _backward(strides, padding, residuals, dy):
  x, kernel = residuals
  xla_conv = functools.partial(_xla_conv, strides=strides, padding=padding)
  if strides[0] == strides[1] and cpu_kernels.takes_dense(x, dy):
    dkernel = cpu_kernels.conv_kernel_grad(x, dy, kernel.shape, strides[0], padding)
  else:
    dkernel = jax.vjp(lambda w: xla_conv(x, w), kernel)[1](dy)[0]
  # stride 1: dx is dy convolved with the flipped kernel, padded by k − 1 − p on each side
  dx_padding = tuple((k - 1 - lo, k - 1 - hi) for k, (lo, hi) in zip(kernel.shape[:2], padding))
  if strides == (1, 1) and takes(dy, kernel, padding=dx_padding):
    flipped = jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2)
    dx = _onednn_conv(dy, flipped, (1, 1), dx_padding)
  else:
    dx = jax.vjp(lambda v: xla_conv(v, kernel), x)[1](dy)[0]
  return dx, dkernel


_onednn_conv.defvjp(_forward, _backward)


_matmul_p = jax_core.Primitive('onednn_matmul')


def _xla_matmul(a, b, transpose_a: bool, transpose_b: bool):
  """op(a) · op(b), op(m) = mᵀ where its flag is set."""
  return jax.lax.dot_general(a, b, (((0 if transpose_a else 1,), (1 if transpose_b else 0,)),
                                    ((), ())))


def _matmul_lowering(ctx, a, b, *, transpose_a, transpose_b):
  config = json.dumps({'onednn_matmul_config': {'transpose_a': transpose_a,
                                                'transpose_b': transpose_b}})
  return _onednn_call(ctx, '__onednn$matmul', (a, b), config)


_matmul_p.def_abstract_eval(_abstract_eval_like(_xla_matmul))
_matmul_p.def_impl(jax.jit(_matmul_p.bind, static_argnames=('transpose_a', 'transpose_b')))
mlir.register_lowering(_matmul_p, _matmul_lowering, platform='cpu')
mlir.register_lowering(_matmul_p, mlir.lower_fun(_xla_matmul, multiple_results=False))


def _bind_matmul(a, b, transpose_a=False, transpose_b=False):
  return _matmul_p.bind(a, b, transpose_a=transpose_a, transpose_b=transpose_b)


@jax.custom_vjp
def _onednn_matmul(a: Array, b: Array) -> Array:
  return _bind_matmul(a, b)


def _matmul_forward(a, b):
  return _bind_matmul(a, b), (a, b)


def _matmul_backward(residuals, dy):
  """d/da = dy·bᵀ, d/db = aᵀ·dy: both oneDNN calls, with no transposed copy."""
  a, b = residuals
  return _bind_matmul(dy, b, transpose_b=True), _bind_matmul(a, dy, transpose_a=True)


_onednn_matmul.defvjp(_matmul_forward, _matmul_backward)


def available() -> bool:
  """Whether oneDNN calls are emitted when traced now: custom calls allowed
  (`custom_calls.allowed`: the CPU, one device, not `custom_calls.disabled()`) and a tested
  jaxlib."""
  return custom_calls.allowed() and jaxlib.__version__ in TESTED_JAXLIB


def takes(*operands: Array, padding: Padding = ()) -> bool:
  """Whether a oneDNN call would be emitted for these operands now: `available()`, all of
  them float32 (the dtype the calls were tested with), and no negative (cropping) padding,
  which oneDNN's convolution does not take."""
  return (available() and all(operand.dtype == jnp.float32 for operand in operands)
          and all(p >= 0 for pair in padding for p in pair))


def forward_conv(x: Array, kernel: Array, strides: Tuple[int, int], padding: Padding,
                 groups: int) -> Array:
  """oneDNN's forward convolution alone, with no gradient rule, for a caller that writes
  its own backward (MobileFaceNet's depthwise convolutions, oneDNN's depthwise kernels).

  x (B, H, W, C_in) and kernel (kh, kw, C_in / groups, C_out), as
  `lax.conv_general_dilated(..., ('NHWC', 'HWIO', 'NHWC'), feature_group_count=groups)`;
  padding explicit. Only where `takes(x, kernel, padding=padding)`.
  """
  if not takes(x, kernel, padding=padding):
    raise ValueError(f'no oneDNN convolution for {x.dtype} {x.shape} * {kernel.dtype} '
                     f'{kernel.shape}, padding {padding}: check onednn.takes')
  return _conv_p.bind(x, kernel, strides=tuple(strides),
                      padding=tuple(tuple(pair) for pair in padding), groups=groups)


def is_plain_nhwc(lhs: Array, rhs: Array, lhs_dilation, rhs_dilation, dimension_numbers,
                  feature_group_count: int) -> bool:
  """Whether `lax.conv_general_dilated`'s arguments are a plain 2-D convolution: NHWC input
  and output, HWIO kernel, no dilation, no groups."""
  return (lhs.ndim == 4 and feature_group_count == 1
          and all(d == 1 for d in (*(lhs_dilation or ()), *(rhs_dilation or ())))
          and jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
          == jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC_HWIO))


def conv(lhs: Array, rhs: Array, window_strides: Sequence[int],
         padding: Union[str, Sequence[Tuple[int, int]]],
         lhs_dilation: Optional[Sequence[int]] = None,
         rhs_dilation: Optional[Sequence[int]] = None,
         dimension_numbers=None, feature_group_count: int = 1,
         precision=None) -> Array:
  """`lax.conv_general_dilated` with the same arguments (what flax.linen.Conv passes as its
  `conv_general_dilated`), on oneDNN where it can be (module docstring)."""
  if not (takes(lhs, rhs)
          and is_plain_nhwc(lhs, rhs, lhs_dilation, rhs_dilation, dimension_numbers,
                            feature_group_count)):
    return jax.lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count, precision=precision)
  if isinstance(padding, str):
    padding = jax.lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], window_strides, padding)
  return _onednn_conv(lhs, rhs, tuple(int(s) for s in window_strides),
                      tuple((int(lo), int(hi)) for lo, hi in padding))


def matmul(a: Array, b: Array, precision=None) -> Array:
  """`jnp.dot(a, b)` of two matrices, on oneDNN where it can be (module docstring).

  `precision` only reaches XLA's dot: on the CPU, float32 products are float32 either way.
  """
  if not (a.ndim == b.ndim == 2 and takes(a, b)):
    return jnp.dot(a, b, precision=precision)
  return _onednn_matmul(a, b)
