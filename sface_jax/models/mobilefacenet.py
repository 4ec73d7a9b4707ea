"""MobileFaceNet as trained by insightface `arcface_torch` ("mbf", "mobilefacenet-0.45G").

Chen et al., "MobileFaceNets" (CCBR 2018, arXiv:1804.07573), in the variant arcface_torch
ships (`backbones/mobilefacenet.py`, width `scale=2`, blocks (1, 4, 6, 2)): wider than the
paper's 128-d model (0.99 M parameters, 221 M MAdds) but the same plan:

  conv3×3(128, s2) - BN - PReLU
  grouped conv3×3(128, 64 groups) - BN - PReLU
  DepthWise(128→128, s2), 4 × residual DepthWise(128)
  DepthWise(128→256, s2), 6 × residual DepthWise(256)
  DepthWise(256→256, s2), 2 × residual DepthWise(256)
  conv1×1(512) - BN - PReLU
  GDC: depthwise conv over the whole 7×7 map - BN - flatten - dense(D, no bias) - BN

where DepthWise(c_in→c_out, expand g) = conv1×1(g)-BN-PReLU, depthwise3×3(g, stride)-BN-
PReLU, conv1×1(c_out)-BN (linear bottleneck). The total stride is 16; the GDC kernel is
the size of the final feature map (7×7 at 112×112, 4×4 at 64×64), so any square input
with side divisible by 16 works. Same dtype policy and outputs as `iresnet.IResNet`.

Grouped and depthwise convolutions on the CPU: XLA:CPU runs `feature_group_count`
convolutions through a slow generic loop, many times slower than the same arithmetic
written as nine shifted multiply-adds (`python bench/backbone.py --models mbf
--grouped_conv taps|xla` compares the two).
`grouped_conv='taps'` computes them as that sum of shifted slices, which XLA fuses, with a
hand-written backward (`grouped_conv_taps`). 'xla' uses `lax.conv_general_dilated` (cuDNN
and TPUs have fast depthwise kernels); 'auto' (default) picks 'taps' only when tracing for
the CPU backend, where it was measured to help. Same result, same parameters. The 1×1
convolutions are matmuls on the CPU (`pointwise_as_matmul`). All of it is XLA's own
operations through JAX's public API: the same program compiles on every platform and
exports (`jax.export`, SavedModel, ONNX) as it is.
"""

import functools
from typing import Any, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from sface_jax.models.iresnet import PReLU, batch_norm, check_images, embedding_outputs

Array = jax.Array
Dtype = Any


def _tap_windows(x: Array, kh: int, kw: int, stride: int, out_h: int, out_w: int):
  """(i, j, x[:, s·p + i, s·q + j]) for every kernel tap: the strided input slice it sees."""
  for i in range(kh):
    for j in range(kw):
      yield i, j, jax.lax.slice(
          x, (0, i, j) + (0,) * (x.ndim - 3),
          (x.shape[0], i + stride * (out_h - 1) + 1, j + stride * (out_w - 1) + 1) + x.shape[3:],
          (1, stride, stride) + (1,) * (x.ndim - 3))


def _pad(x: Array, padding: Sequence[Tuple[int, int]]) -> Array:
  """Spatial padding of (B, H, W, ...); negative amounts crop (lax.pad's convention)."""
  config = [(0, 0, 0), (*padding[0], 0), (*padding[1], 0)] + [(0, 0, 0)] * (x.ndim - 3)
  return jax.lax.pad(x, jnp.zeros((), x.dtype), config)


def _split_groups(x: Array, groups: int) -> Array:
  """(..., C) → (..., groups, C / groups): channel g·(C / groups) + c at [..., g, c]."""
  return x.reshape(*x.shape[:-1], groups, x.shape[-1] // groups)


def _tap_sum(x: Array, kernel: Array, stride: int,
             padding: Sequence[Tuple[int, int]], groups: int) -> Array:
  """y[b, p, q, g, o] = Σ_{i, j, c} x_pad[b, s·p + i, s·q + j, g, c] · kernel[i, j, c, g, o].

  Channels are split as (groups, per group): each term is input channel c of every group,
  broadcast over the group's outputs, times a (groups, group_out) slice of the kernel, so
  the whole sum is one element-wise loop that XLA fuses, reading the input once per tap.
  """
  kh, kw, group_in, features = kernel.shape
  x = _split_groups(_pad(x, padding), groups)
  kernel = kernel.reshape(kh, kw, group_in, groups, features // groups)
  out_h = (x.shape[1] - kh) // stride + 1
  out_w = (x.shape[2] - kw) // stride + 1
  y = None
  for c in range(group_in):
    for i, j, window in _tap_windows(x[..., c:c + 1], kh, kw, stride, out_h, out_w):
      term = window * kernel[i, j, c]
      y = term if y is None else y + term
  return y.reshape(*y.shape[:3], features)


def _taps_forward(x: Array, kernel: Array, stride: int,
                  padding: Sequence[Tuple[int, int]], groups: int) -> Array:
  """`_tap_sum`, written to memory once for all its consumers.

  XLA counts the sum's slices, multiplies and adds as cheap and fuses them into every
  element-wise consumer, so without a boundary a tap sum was computed again in each of
  batch norm's fusions and in the backward: the grouped stem's 18-term sum six times per
  step, every depthwise input gradient twice (a fifth of MobileFaceNet's forward+backward
  time on two cores, BENCHMARKS.md § MobileFaceNet: one tap sum). XLA:CPU removes
  `lax.optimization_barrier` before fusion, but it does not fuse across a conditional, so
  the sum runs inside `lax.cond` whose two branches are the same computation: the result
  is the tap sum whatever the predicate (any value read at run time, so that XLA cannot
  fold the conditional away).
  """
  def tap_sum(x, kernel):
    return _tap_sum(x, kernel, stride, padding, groups)

  any_predicate = kernel.ravel()[0] == kernel.ravel()[0]
  return jax.lax.cond(any_predicate, tap_sum, tap_sum, x, kernel)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def grouped_conv_taps(x: Array, kernel: Array, stride: int,
                      padding: Sequence[Tuple[int, int]], groups: int) -> Array:
  """A grouped convolution as Σ over kernel taps of shifted, strided input slices.

  x (B, H, W, C_in), kernel (kh, kw, C_in/groups, C_out) in Flax's HWIO layout with
  output channel o in group o // (C_out/groups): y[b, p, q, o] =
  Σ_{i, j, c} x_pad[b, s·p + i, s·q + j, g·C_in/groups + c] · kernel[i, j, c, o].

  The gradient is written out (`_taps_backward`) because XLA's own transpose of the sum
  computes the kernel gradient as one reduction per tap, each reading the input and the
  output gradient again (3-4× slower than PyTorch's depthwise backward at stride 1).
  """
  return _taps_forward(x, kernel, stride, padding, groups)


def _forward_with_residuals(x, kernel, stride, padding, groups):
  return _taps_forward(x, kernel, stride, padding, groups), (x, kernel)


def _reduced_kernel_grad(x: Array, dy: Array, kernel_shape: Sequence[int], stride: int,
                         padding: Sequence[Tuple[int, int]], groups: int) -> Array:
  """d/dkernel[i, j, c, g, o] = Σ_{b,p,q} x_pad[b, s·p + i, s·q + j, g, c] · dy[b, p, q, g, o]
  in XLA: all taps in one variadic reduction that reads x and dy once, accumulated in float32
  (over the batch first where that is faster, see below)."""
  kh, kw, group_in, features = kernel_shape
  out_h, out_w = dy.shape[1:3]
  grouped_x = _split_groups(_pad(x, padding), groups).astype(jnp.float32)
  grouped_dy = _split_groups(dy, groups).astype(jnp.float32)
  products = [window * grouped_dy
              for c in range(group_in)
              for _, _, window in _tap_windows(grouped_x[..., c:c + 1], kh, kw, stride,
                                               out_h, out_w)]
  # XLA:CPU runs a reduction as a scalar loop over the reduced elements of each output. Where
  # the tap windows are strided in memory (stride > 1, or several input channels per group),
  # summing over the batch first and then over the positions is 1.55-1.8x faster; with
  # contiguous windows one reduction is (BENCHMARKS.md § What we tried).
  batch_first = stride > 1 or group_in > 1
  sums = jax.lax.reduce(products, [jnp.float32(0)] * len(products),
                        lambda a, b: [u + v for u, v in zip(a, b)],
                        (0,) if batch_first else (0, 1, 2))
  if batch_first:
    sums = [partial.sum((0, 1)) for partial in sums]
  return jnp.stack(sums).reshape(group_in, kh, kw, features).transpose(1, 2, 0, 3)


def _taps_backward(stride, padding, groups, residuals, dy):
  """d/dx: at stride 1, the same tap sum over dy with the kernel flipped and each group's
  (in, out) swapped, padded by k − 1 − p; at stride s > 1, the transpose of the (linear)
  forward in x, without computing the forward again (its strided-slice transposes fuse
  into one loop, and a dilated dy would be s² times larger).
  d/dkernel: all taps in one reduction (`_reduced_kernel_grad`).
  """
  x, kernel = residuals
  kh, kw, group_in, features = kernel.shape
  group_out = features // groups
  if stride == 1:
    flipped = kernel[::-1, ::-1].reshape(kh, kw, group_in, groups, group_out)
    transposed = flipped.transpose(0, 1, 4, 3, 2).reshape(kh, kw, group_out, x.shape[-1])
    dx = _taps_forward(dy, transposed, 1,
                          ((kh - 1 - padding[0][0], kh - 1 - padding[0][1]),
                           (kw - 1 - padding[1][0], kw - 1 - padding[1][1])), groups)
  else:
    transpose = jax.linear_transpose(
        lambda x: _taps_forward(x, kernel, stride, padding, groups), x)
    dx, = transpose(dy)
  dkernel = _reduced_kernel_grad(x, dy, kernel.shape, stride, padding, groups)
  return dx, dkernel.astype(kernel.dtype)


grouped_conv_taps.defvjp(_forward_with_residuals, _taps_backward)


def _is_plain_nhwc(lhs: Array, rhs: Array, lhs_dilation, rhs_dilation, dimension_numbers,
                   feature_group_count: int) -> bool:
  """Whether `lax.conv_general_dilated`'s arguments are a plain 2-D convolution: NHWC input
  and output, HWIO kernel, no dilation, no groups."""
  plain = ('NHWC', 'HWIO', 'NHWC')
  return (lhs.ndim == 4 and feature_group_count == 1
          and all(d == 1 for d in (*(lhs_dilation or ()), *(rhs_dilation or ())))
          and jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
          == jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, plain))


def pointwise_as_matmul(lhs: Array, rhs: Array, window_strides: Sequence[int], padding,
                        lhs_dilation=None, rhs_dilation=None, dimension_numbers=None,
                        feature_group_count: int = 1, precision=None) -> Array:
  """`lax.conv_general_dilated` (nn.Conv's `conv_general_dilated`), with a 1×1, stride-1
  convolution written as the matmul it is when tracing for the CPU.

  Why: XLA:CPU runs a 1×1 convolution's forward pass and input gradient as matmuls already,
  but its kernel gradient as an Eigen convolution; as the transpose of this matmul it is
  the (B·H·W, C_in)ᵀ·(B·H·W, C_out) matmul, 1.3-2.1× faster on MobileFaceNet's shapes
  (BENCHMARKS.md § What we tried). Same parameter, same result to float32 rounding.
  """
  zero_padding = (padding in ('SAME', 'VALID') if isinstance(padding, str)
                  else all(p == 0 for pair in padding for p in pair))
  if (jax.default_backend() == 'cpu' and rhs.shape[:2] == (1, 1) and zero_padding
      and tuple(window_strides) == (1, 1)
      and _is_plain_nhwc(lhs, rhs, lhs_dilation, rhs_dilation, dimension_numbers,
                         feature_group_count)):
    rows = jnp.dot(lhs.reshape(-1, lhs.shape[-1]), rhs.reshape(rhs.shape[2:]),
                   precision=precision)
    return rows.reshape(*lhs.shape[:3], rhs.shape[-1])
  return jax.lax.conv_general_dilated(
      lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
      rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
      feature_group_count=feature_group_count, precision=precision)


class GroupedConv(nn.Module):
  """nn.Conv(feature_group_count=groups, use_bias=False) with a choice of algorithm.

  Same parameter (`kernel`, (k, k, C_in/groups, C_out)) as nn.Conv; see the module
  docstring for `impl`.
  """
  features: int
  kernel_size: int
  stride: int
  padding: Sequence[Tuple[int, int]]
  groups: int
  impl: str = 'auto'
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kernel = self.param('kernel', nn.initializers.variance_scaling(2.0, 'fan_out', 'normal'),
                        (self.kernel_size, self.kernel_size, x.shape[-1] // self.groups,
                         self.features), jnp.float32)
    x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
    impl = self.impl
    if impl == 'auto':
      impl = 'taps' if jax.default_backend() == 'cpu' else 'xla'
    if impl == 'taps':
      return grouped_conv_taps(x, kernel, self.stride, self.padding, self.groups)
    if impl != 'xla':
      raise ValueError(f"grouped_conv must be 'auto', 'taps' or 'xla', got {impl!r}")
    return jax.lax.conv_general_dilated(
        x, kernel, (self.stride, self.stride), self.padding,
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'), feature_group_count=self.groups)


class ConvBN(nn.Module):
  """conv (no bias) - BN [- PReLU]: arcface_torch's ConvBlock / LinearBlock."""
  features: int
  kernel: int = 1
  stride: int = 1
  groups: int = 1
  padding: Any = 'SAME'
  activation: bool = True
  dtype: Dtype = jnp.float32
  grouped_conv: str = 'auto'
  bn_running_var: str = 'biased'

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    padding = self.padding
    if padding == 'SAME':  # torch's symmetric padding k // 2, also for stride 2
      padding = ((self.kernel // 2,) * 2,) * 2
    elif padding == 'VALID':
      padding = ((0, 0), (0, 0))
    if self.groups == 1:
      x = nn.Conv(self.features, (self.kernel, self.kernel), strides=self.stride,
                  padding=padding, use_bias=False, dtype=self.dtype,
                  param_dtype=jnp.float32,
                  kernel_init=nn.initializers.variance_scaling(2.0, 'fan_out', 'normal'),
                  conv_general_dilated=pointwise_as_matmul, name='conv')(x)
    else:
      x = GroupedConv(self.features, self.kernel, self.stride, padding, self.groups,
                      self.grouped_conv, self.dtype, name='conv')(x)
    x = batch_norm(train, self.dtype, 'bn', self.bn_running_var)(x)
    if self.activation:
      x = PReLU(self.dtype, name='prelu')(x)
    return x


class DepthWise(nn.Module):
  """Inverted-residual block: 1×1 expand - depthwise 3×3 (stride) - 1×1 linear project."""
  features: int
  expanded: int
  stride: int = 1
  residual: bool = False
  dtype: Dtype = jnp.float32
  grouped_conv: str = 'auto'
  bn_running_var: str = 'biased'

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    conv = functools.partial(ConvBN, dtype=self.dtype, grouped_conv=self.grouped_conv,
                             bn_running_var=self.bn_running_var)
    y = conv(self.expanded, name='expand')(x, train)
    y = conv(self.expanded, 3, self.stride, groups=self.expanded, name='depthwise')(y, train)
    y = conv(self.features, activation=False, name='project')(y, train)
    return x + y if self.residual else y


class MobileFaceNet(nn.Module):
  """MobileFaceNet: `apply(variables, images, train=...)` → (embeddings, norms).

  stage_sizes: residual blocks after the stem and after each of the three downsampling
  blocks; the first must be 1 (arcface_torch's mbf has one grouped conv there, with
  `stem_groups` groups). stage_widths: output channels of the stem and of stages 1-3.
  down_expansions / residual_expansions: the depthwise width inside each stage's
  downsampling block / residual blocks. The defaults are arcface_torch's `get_mbf`
  (scale 2; there the expansion widths and the 64 stem groups are constants).
  """
  stage_sizes: Sequence[int] = (1, 4, 6, 2)
  stage_widths: Sequence[int] = (128, 128, 256, 256)
  down_expansions: Sequence[int] = (128, 256, 512)
  residual_expansions: Sequence[int] = (128, 256, 256)
  stem_groups: int = 64
  head_width: int = 512
  embedding_dim: int = 512
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  grouped_conv: str = 'auto'  # 'auto' | 'taps' | 'xla': see the module docstring.
  bn_running_var: str = 'biased'  # 'biased' | 'unbiased': iresnet.BatchNorm

  @nn.compact
  def __call__(self, images: Array, train: bool = False) -> Tuple[Array, Array]:
    if (len(self.stage_sizes) != 4 or len(self.stage_widths) != 4 or self.stage_sizes[0] != 1
        or len(self.down_expansions) != 3 or len(self.residual_expansions) != 3):
      raise ValueError('MobileFaceNet needs stage_sizes (1, n1, n2, n3), 4 stage_widths and 3 '
                       f'down/residual expansions, got {self.stage_sizes}, {self.stage_widths}, '
                       f'{self.down_expansions}, {self.residual_expansions}')
    check_images(images, 16)
    layers = dict(dtype=self.dtype, grouped_conv=self.grouped_conv,
                  bn_running_var=self.bn_running_var)
    conv = functools.partial(ConvBN, **layers)
    block = functools.partial(DepthWise, **layers)
    x = images.astype(self.dtype)
    x = conv(self.stage_widths[0], 3, 2, name='stem')(x, train)
    x = conv(self.stage_widths[0], 3, 1, groups=self.stem_groups, name='stem_dw')(x, train)
    for stage in range(1, 4):
      x = block(self.stage_widths[stage], self.down_expansions[stage - 1], stride=2,
                name=f'stage{stage}_down')(x, train)
      for index in range(self.stage_sizes[stage]):
        x = block(self.stage_widths[stage], self.residual_expansions[stage - 1],
                  residual=True, name=f'stage{stage}_{index}')(x, train)
    x = conv(self.head_width, name='conv_sep')(x, train)
    # Global depthwise conv (GDC): one k×k filter per channel over the whole map.
    side = x.shape[1]
    x = conv(self.head_width, side, groups=self.head_width, padding='VALID',
             activation=False, name='gdc')(x, train)
    x = x.reshape(x.shape[0], -1).astype(jnp.float32)
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    x = nn.Dense(self.embedding_dim, use_bias=False, dtype=jnp.float32,
                 param_dtype=jnp.float32, name='fc')(x)
    # arcface_torch's mbf ends in a plain (learnable) BatchNorm1d, unlike IResNet.
    x = batch_norm(train, jnp.float32, 'features', self.bn_running_var)(x)
    return embedding_outputs(x)
