"""AdaFace (Kim et al. 2022): a margin that adapts to image quality, read off the feature norm.

Quality proxy. The norm ‖x_i‖ of the raw embedding (not back-propagated), clipped to
[0.001, 100] (the authors' "for stability" clip), is standardised by running statistics of
the batch norm distribution and squashed:

  ẑ_i = clip((‖x_i‖ − μ) / (σ + ε) · h, −1, 1),   h = 0.333, ε = 1e-3,
  μ ← (1 − α)·μ + α·mean_B ‖x‖,  σ ← (1 − α)·σ + α·std_B ‖x‖,  α = 0.01,

with μ = 20 and σ = 100 at the start and the statistics updated with the current batch
*before* ẑ is computed (all as in mk-minchul/AdaFace head.py). The running statistics are
state, returned by the head, never touched by the optimiser.

Running statistics: our choice. mean_B and std_B are over the *global* batch (every device's
shard: the state is the same on every device and does not depend on the device count), and
std_B is the population standard deviation (ddof = 0). The official code (PyTorch Lightning
DDP, torch ≤ 1.13) computes them per GPU: each GPU updates μ and σ with the mean and
`torch.std` (unbiased, ddof = 1) of its own shard (B/n samples) and computes ẑ of its own
samples from that; DDP's default `broadcast_buffers=True` then replaces every GPU's
statistics by rank 0's at the start of the next step (since pytorch/pytorch#63916, torch
1.10: before it DDP did not re-read buffers a module reassigns, as this head does, and every
GPU kept its own). So the running statistics follow rank 0's shards, each step's ẑ mixes in
the GPU's own shard, and on one GPU the two codes agree up to ddof. A shard of one sample
gives std = NaN, which then stays in σ. ddof = 0 is defined for any batch, and at the batch
sizes people train with the two differ by the factor √(B/(B−1)) (1.001 at B = 512).

Margin. On the target, with g_angle = −m·ẑ and g_add = m·ẑ + m (m = 0.4):

  logit_y = s·(cos(clip(θ_y + g_angle, ε, π − ε)) − g_add),   logit_j = s·cos θ_j.

A high-norm (good) image gets ẑ → 1: g_angle = −m, g_add = 2m — an additive cosine margin
that emphasises hard samples; a low-norm image gets ẑ → −1: g_angle = m, g_add = 0 — an
angular margin that de-emphasises them. The clip keeps the target non-increasing in θ.
cos(θ + g) is computed as cos θ·cos g − sin θ·sin g with a clamped sin θ (no arccos).

Clamps (`official_clamp`, default True): as the official head, every cosine (targets and
non-targets) is first clamped to [−1 + ε, 1 − ε] and θ_y + g_angle to [ε, π − ε], ε = 1e-3,
each with zero gradient outside the range (torch.clamp's gradient), so that values and
gradients match theirs. They differ from the exact formula where |cos θ| > 0.999 (inside,
by < 5e-7): a non-target cosine by up to 1e-3, the target term by up to 1.8e-2 (at
cos θ_y = ±1 with |ẑ| = 1: cos(0.4) against cos(0.4 + acos 0.999); ×s in the logit), and its
gradient without bound, since the exact d/d cos θ_y = cos g + sin g·cos θ/sin θ grows as
1/sin θ (at |ẑ| = 1: 28 at 1 − 1e-4, 274 at 1 − 1e-6) where the clamp gives 0
(`python -m bench.official_conventions`). With `official_clamp=False` (ours) cosines are
clamped only to [−1, 1] and θ_y + g_angle to [0, π]: the exact formula, still NaN-free (sin θ
from `common.sin_from_cos`), with the gradient kept up to cos θ = ±1. We keep the official clamps
as the default because users reproduce published numbers with them.
"""

import math
from typing import Dict, Optional, Tuple

import jax
import jax.numpy as jnp

from sface_jax.heads import common

Array = jax.Array

INITIAL_NORM_MEAN = 20.0
INITIAL_NORM_STD = 100.0
NORM_MIN, NORM_MAX = 0.001, 100.0
EPS = 1e-3


def init_norm_stats() -> Dict[str, Array]:
  """Running statistics of the feature norm: {'norm_mean': 20., 'norm_std': 100.}."""
  return {'norm_mean': jnp.float32(INITIAL_NORM_MEAN),
          'norm_std': jnp.float32(INITIAL_NORM_STD)}


def update_norm_stats(norms: Array, stats: Dict[str, Array], *, momentum: float = 0.01,
                      axis_name: Optional[str] = None) -> Dict[str, Array]:
  """EMA of the batch mean and population std (ddof = 0) of clip(‖x‖, 0.001, 100); no
  gradient.

  The batch is the global one: with the batch split over devices, `norms` is this device's
  shard and `axis_name` sums the moments over all shards (every device gets the same stats).
  """
  norms = jnp.clip(jax.lax.stop_gradient(common.as_float32(norms)), NORM_MIN, NORM_MAX)
  count = norms.shape[0] * (1 if axis_name is None else jax.lax.psum(1, axis_name))
  batch_mean = common.device_sum(jnp.sum(norms), axis_name) / count
  squares = common.device_sum(jnp.sum(jnp.square(norms - batch_mean)), axis_name)
  batch_std = jnp.sqrt(squares / count)
  return {
      'norm_mean': momentum * batch_mean + (1.0 - momentum) * stats['norm_mean'],
      'norm_std': momentum * batch_std + (1.0 - momentum) * stats['norm_std'],
  }


def norm_quality(norms: Array, stats: Dict[str, Array], *, h: float = 0.333) -> Array:
  """ẑ = clip((clip(‖x‖) − μ)/(σ + ε)·h, −1, 1): (B,) float32, no gradient."""
  norms = jnp.clip(jax.lax.stop_gradient(common.as_float32(norms)), NORM_MIN, NORM_MAX)
  z = (norms - stats['norm_mean']) / (stats['norm_std'] + EPS) * h
  return jax.lax.stop_gradient(jnp.clip(z, -1.0, 1.0))


def clamp_cosines(cos_theta: Array, official_clamp: bool = True) -> Array:
  """[−1 + ε, 1 − ε] (official) or [−1, 1], zero gradient outside (module docstring)."""
  eps = EPS if official_clamp else 0.0
  return common.clamp(common.as_float32(cos_theta), -1.0 + eps, 1.0 - eps)


def adaface_target(cos_target: Array, quality: Array, *, m: float = 0.4,
                   official_clamp: bool = True) -> Array:
  """cos(clip(θ + g_angle, ε, π − ε)) − g_add per sample; g_angle = −m·ẑ, g_add = m·ẑ + m.

  ε = 1e-3 with `official_clamp` (cos θ itself clamped to ±(1 − ε) first), else 0.
  """
  eps = EPS if official_clamp else 0.0
  c = clamp_cosines(cos_target, official_clamp)
  quality = jax.lax.stop_gradient(common.as_float32(quality))
  g_angle = -m * quality
  g_add = m * quality + m
  shifted = c * jnp.cos(g_angle) - common.sin_from_cos(c) * jnp.sin(g_angle)
  # θ + g < ε  ⇔  θ < ε − g: possible only when ε − g > 0, and then ⇔ c > cos(ε − g).
  low_edge = eps - g_angle
  shifted = jnp.where((low_edge > 0.0) & (c > jnp.cos(low_edge)), math.cos(eps), shifted)
  # θ + g > π − ε  ⇔  θ > π − ε − g: possible only when π − ε − g < π, then ⇔ c < cos(·).
  high_edge = math.pi - eps - g_angle
  shifted = jnp.where((high_edge < math.pi) & (c < jnp.cos(high_edge)),
                      math.cos(math.pi - eps), shifted)
  return shifted - g_add


def adaface_logits(cos_theta: Array, labels: Array, quality: Array, *, scale: float = 64.0,
                   m: float = 0.4, official_clamp: bool = True) -> Array:
  """(B, C) logits: s·(cos(θ_y − m·ẑ) − m·ẑ − m) on the target, s·cos θ_j elsewhere.

  `quality` is ẑ ∈ [−1, 1] per sample (`norm_quality`), treated as a constant;
  `official_clamp` as in the module docstring (non-targets are clamped too).
  """
  return adaface_logits_with_target(cos_theta, labels, quality, scale=scale, m=m,
                                    official_clamp=official_clamp)[0]


def adaface_logits_with_target(cos_theta: Array, labels: Array, quality: Array, *,
                               scale: float = 64.0, m: float = 0.4,
                               official_clamp: bool = True) -> Tuple[Array, Array]:
  """`adaface_logits` and its target column (B,), for `cross_entropy(target_logits=...)`."""
  cos_theta = clamp_cosines(cos_theta, official_clamp)
  mask = common.target_mask(labels, cos_theta.shape[-1])
  target = adaface_target(common.take_target(cos_theta, labels), quality, m=m,
                          official_clamp=official_clamp)
  return scale * jnp.where(mask, target[:, None], cos_theta), scale * target
