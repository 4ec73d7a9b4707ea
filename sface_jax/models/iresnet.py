"""IResNet ("improved" ResNet), the ArcFace backbone, in Flax Linen.

Architecture (Deng et al., "ArcFace", CVPR 2019, §3.2 / insightface `arcface_torch`
`backbones/iresnet.py`):

  stem:   conv3×3(64, stride 1) - BN - PReLU
  stages: widths 64/128/256/512, each starting with stride 2; a block is
          BN - conv3×3 - BN - PReLU - conv3×3(stride) - BN  (+ shortcut)
          with a conv1×1(stride) - BN shortcut where the shape changes
  output: BN - flatten - dropout - dense(D) - BN  ("E" output of the ArcFace paper)

112×112 input → 7×7×512 feature map → 512-d embedding. The spatial size is divided by
16 overall (four stride-2 stages), so any square input whose side is divisible by 16
works; the dense layer's input size follows from the feature map (64×64 → 4×4×512).

Naming mirrors `arcface_torch` state_dict keys (`layer1.0.bn1` ↔ `layer1_0/bn1`), which
keeps `sface_jax.tools.import_torch` a table of renames plus layout changes.

dtype policy: parameters are float32; convolutions, batch norm outputs and PReLU run in
`dtype` (bfloat16 on GPU/TPU); the flatten-dense-BN output head runs in float32 (as
arcface_torch does under autocast), so the embedding and its norm are float32.
"""

import functools
from typing import Any, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
Dtype = Any

# torch.nn.BatchNorm's running-average momentum is 0.1 (new = 0.9·old + 0.1·batch);
# Flax's `momentum` is the weight of the old value, so the same decay is 0.9.
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5  # arcface_torch: eps=1e-05 everywhere, `features` BatchNorm1d included.

# arcface_torch initialises every Conv2d from N(0, 0.1²) (iresnet.py, after __init__).
conv_init = nn.initializers.normal(stddev=0.1)


class PReLU(nn.Module):
  """Parametric ReLU with one slope per channel (torch.nn.PReLU(num_parameters=C)).

  y = x if x ≥ 0 else alpha_c · x; alpha starts at 0.25 as in torch. (flax.linen.PReLU
  has a single scalar slope, which would not match the published models.)
  """
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    alpha = self.param('alpha', nn.initializers.constant(0.25), (x.shape[-1],), jnp.float32)
    alpha = alpha.astype(self.dtype)
    x = x.astype(self.dtype)
    return jnp.where(x >= 0, x, alpha * x)


BN_RUNNING_VARS = ('biased', 'unbiased')  # config.model.bn_running_var


class BatchNorm(nn.Module):
  """Batch norm over every axis but the last (channels), as torch.nn.BatchNorm1d/2d.

  Training: y = (x − μ)·γ/√(σ² + ε) + β with the batch mean μ and the biased batch variance
  σ² = mean(x²) − μ² (one pass over x, float32 whatever `dtype`, clipped at 0: Flax's
  nn.BatchNorm's arithmetic; a two-pass mean((x − μ)²) came no closer to float64 in
  tests/test_parity.py); the running averages move as r ← momentum·r + (1 − momentum)·s
  with s = μ for the mean and, for the variance, s = σ² (`running_var='biased'`, Flax's
  nn.BatchNorm) or s = σ²·n/(n − 1) ('unbiased', torch's), n the number of values each
  statistic is over (B·H·W). Evaluation normalises with the running averages. Flax's
  nn.BatchNorm offers only the biased update.

  Statistics are over the *global* batch when the batch is sharded: under `jax.jit` with the
  batch axis sharded over a mesh axis, `mean(x, axis=(0, 1, 2))` reduces over an axis that
  lives on several devices, so XLA's SPMD partitioner computes per-device partial sums and
  inserts an all-reduce, with no code for it here (and `batch_stats` stay replicated).

  Variables are named as nn.BatchNorm's (params `scale`, `bias`; batch_stats `mean`, `var`,
  float32), which checkpoints, `tools/import_torch.py` and `tools/export.py` read.
  """
  use_running_average: bool
  running_var: str = 'biased'
  dtype: Dtype = jnp.float32
  use_scale: bool = True
  use_bias: bool = True
  momentum: float = BN_MOMENTUM
  epsilon: float = BN_EPSILON

  @nn.compact
  def __call__(self, x: Array) -> Array:
    if self.running_var not in BN_RUNNING_VARS:
      raise ValueError(f'config.model.bn_running_var={self.running_var!r}: choose one of '
                       f'{BN_RUNNING_VARS}')
    features = x.shape[-1]
    axes = tuple(range(x.ndim - 1))
    running_mean = self.variable('batch_stats', 'mean', jnp.zeros, (features,), jnp.float32)
    running_var = self.variable('batch_stats', 'var', jnp.ones, (features,), jnp.float32)
    x = x.astype(jnp.float32)
    if self.use_running_average:
      mean, var = running_mean.value, running_var.value
    else:
      mean = jnp.mean(x, axes)
      var = jnp.maximum(jnp.mean(jnp.square(x), axes) - jnp.square(mean), 0.0)
      if not self.is_initializing():
        count = x.size // features
        sample_var = var * (count / max(count - 1, 1)) if self.running_var == 'unbiased' else var
        running_mean.value = self.momentum * running_mean.value + (1 - self.momentum) * mean
        running_var.value = self.momentum * running_var.value + (1 - self.momentum) * sample_var
    multiplier = jax.lax.rsqrt(var + self.epsilon)
    if self.use_scale:
      multiplier = multiplier * self.param('scale', nn.initializers.ones, (features,),
                                           jnp.float32)
    y = (x - mean) * multiplier
    if self.use_bias:
      y = y + self.param('bias', nn.initializers.zeros, (features,), jnp.float32)
    return y.astype(self.dtype)


def batch_norm(train: bool, dtype: Dtype, name: str, running_var: str = 'biased',
               **kwargs) -> BatchNorm:
  """torch's BatchNorm (eps 1e-5, momentum 0.1) in training or evaluation mode."""
  return BatchNorm(use_running_average=not train, running_var=running_var, dtype=dtype,
                   name=name, **kwargs)


class EmbeddingBatchNorm(nn.Module):
  """The last BatchNorm1d over the embedding, with its scale γ frozen.

  ArcFace fixes this γ at 1 (MXNet `fix_gamma=True`; arcface_torch sets
  `features.weight.requires_grad = False`): a learnable γ would let the network inflate
  or shrink the feature norm per dimension, which margin losses normalise away but
  norm-aware heads (AdaFace, quality SFace) read. `scale` is kept as a parameter (so an
  imported checkpoint round-trips exactly and parameter counts match torch's) and passed
  through `stop_gradient`, so its gradient is zero and it never moves (our no-decay regex
  matches `scale`, so weight decay does not touch it either).
  """
  bn_running_var: str = 'biased'

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    features = x.shape[-1]
    x = batch_norm(train, jnp.float32, 'stats', self.bn_running_var, use_scale=False,
                   use_bias=False)(x)
    scale = self.param('scale', nn.initializers.ones, (features,), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (features,), jnp.float32)
    return x * jax.lax.stop_gradient(scale) + bias


def embedding_outputs(embeddings: Array) -> Tuple[Array, Array]:
  """(embeddings, norms): float32 (B, D) raw embeddings and their L2 norms (B,)."""
  embeddings = embeddings.astype(jnp.float32)
  return embeddings, jnp.linalg.norm(embeddings, axis=-1)


def bias_free_conv(features: int, kernel_size: Tuple[int, int], **kwargs) -> nn.Conv:
  """arcface_torch's bias-free Conv2d: float32 parameters from N(0, 0.1²), computed in
  `dtype`, as XLA's own convolution on every platform."""
  return nn.Conv(features, kernel_size, use_bias=False, param_dtype=jnp.float32,
                 kernel_init=conv_init, **kwargs)


class IBasicBlock(nn.Module):
  """BN - conv3×3 - BN - PReLU - conv3×3(stride) - BN, plus the (projected) input."""
  width: int
  stride: int
  dtype: Dtype = jnp.float32
  bn_running_var: str = 'biased'

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    conv = functools.partial(bias_free_conv, dtype=self.dtype)
    norm = functools.partial(batch_norm, train, self.dtype,
                             running_var=self.bn_running_var)
    y = norm('bn1')(x)
    y = conv(self.width, (3, 3), padding=((1, 1), (1, 1)), name='conv1')(y)
    y = norm('bn2')(y)
    y = PReLU(self.dtype, name='prelu')(y)
    y = conv(self.width, (3, 3), strides=self.stride, padding=((1, 1), (1, 1)),
             name='conv2')(y)
    y = norm('bn3')(y)
    if self.stride != 1 or x.shape[-1] != self.width:
      x = conv(self.width, (1, 1), strides=self.stride, padding='VALID',
               name='downsample_conv')(x)
      x = norm('downsample_bn')(x)
    return y + x


class IResNet(nn.Module):
  """IResNet backbone: `apply(variables, images, train=...)` → (embeddings, norms).

  images: (B, H, W, 3) float, normalised (x − 127.5) / 128, H = W divisible by 16.
  embeddings: float32 (B, embedding_dim), not L2-normalised; norms: float32 (B,).
  Variables: `params`, `batch_stats`; the `dropout` RNG when training with dropout > 0.
  bn_running_var: 'biased' | 'unbiased', the running-variance update (`BatchNorm`).
  """
  stage_sizes: Sequence[int]
  stage_widths: Sequence[int] = (64, 128, 256, 512)
  stem_width: int = 64
  embedding_dim: int = 512
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  bn_running_var: str = 'biased'

  @nn.compact
  def __call__(self, images: Array, train: bool = False) -> Tuple[Array, Array]:
    if len(self.stage_sizes) != len(self.stage_widths):
      raise ValueError(f'stage_sizes {self.stage_sizes} and stage_widths '
                       f'{self.stage_widths} differ in length')
    check_images(images, 2 ** len(self.stage_sizes))
    norm = functools.partial(batch_norm, train, self.dtype, running_var=self.bn_running_var)
    x = images.astype(self.dtype)
    x = bias_free_conv(self.stem_width, (3, 3), padding=((1, 1), (1, 1)),
                       dtype=self.dtype, name='conv1')(x)
    x = norm('bn1')(x)
    x = PReLU(self.dtype, name='prelu')(x)
    for stage, (num_blocks, width) in enumerate(zip(self.stage_sizes, self.stage_widths)):
      for block in range(num_blocks):
        x = IBasicBlock(width, 2 if block == 0 else 1, self.dtype, self.bn_running_var,
                        name=f'layer{stage + 1}_{block}')(x, train)
    x = norm('bn2')(x)
    # Flattened in (H, W, C) order; torch flattens (C, H, W): import_torch permutes fc.
    x = x.reshape(x.shape[0], -1).astype(jnp.float32)
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    x = nn.Dense(self.embedding_dim, dtype=jnp.float32, param_dtype=jnp.float32,
                 name='fc')(x)
    x = EmbeddingBatchNorm(self.bn_running_var, name='features')(x, train)
    return embedding_outputs(x)


def check_images(images: Array, total_stride: int) -> None:
  """(B, H, W, 3) with H and W divisible by the network's total stride."""
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f'images must be (B, H, W, 3), got shape {images.shape}')
  height, width = images.shape[1:3]
  if height % total_stride or width % total_stride:
    raise ValueError(f'image side must be divisible by {total_stride}, got {height}×{width}')


IResNet18 = functools.partial(IResNet, stage_sizes=(2, 2, 2, 2))
IResNet34 = functools.partial(IResNet, stage_sizes=(3, 4, 6, 3))
IResNet50 = functools.partial(IResNet, stage_sizes=(3, 4, 14, 3))
IResNet100 = functools.partial(IResNet, stage_sizes=(3, 13, 30, 3))
IResNet200 = functools.partial(IResNet, stage_sizes=(6, 26, 60, 6))
# Small variants of the same architecture (not published models): the laptop-CPU demo
# (trains at 64×64 on two cores in minutes) and unit tests.
IResNet18Small = functools.partial(IResNet, stage_sizes=(2, 2, 2, 2),
                                   stage_widths=(16, 32, 64, 128), stem_width=16)
IResNetTiny = functools.partial(IResNet, stage_sizes=(1, 1, 1, 1),
                                stage_widths=(8, 16, 16, 32), stem_width=8)
