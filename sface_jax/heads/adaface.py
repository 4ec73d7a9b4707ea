"""AdaFace (Kim et al. 2022): a margin that adapts to image quality, read off the feature norm.

Quality proxy. The norm ‖x_i‖ of the raw embedding (not back-propagated), clipped to
[0.001, 100], is standardised by running statistics of the batch norm distribution and
squashed:

  ẑ_i = clip((‖x_i‖ − μ) / (σ + ε) · h, −1, 1),   h = 0.333, ε = 1e-3,
  μ ← (1 − α)·μ + α·mean_B ‖x‖,  σ ← (1 − α)·σ + α·std_B ‖x‖,  α = 0.01,

with μ = 20 and σ = 100 at the start (the values of the authors' code), the statistics updated
with the current batch *before* ẑ is computed, and std_B the unbiased batch standard deviation
(the population one for a batch of one, where the unbiased one is undefined). The running
statistics are state, returned by the head, never touched by the optimiser.

Margin. On the target, with g_angle = −m·ẑ and g_add = m·ẑ + m (m = 0.4):

  logit_y = s·(cos(clip(θ_y + g_angle, 0, π)) − g_add),   logit_j = s·cos θ_j.

A high-norm (good) image gets ẑ → 1: g_angle = −m, g_add = 2m — an additive cosine margin
that emphasises hard samples; a low-norm image gets ẑ → −1: g_angle = m, g_add = 0 — an
angular margin that de-emphasises them. The clip keeps the target non-increasing in θ.
cos(θ + g) is computed as cos θ·cos g − sin θ·sin g with a clamped sin θ (no arccos).
"""

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
  """EMA of the batch mean and (unbiased) std of clip(‖x‖, 0.001, 100); no gradient.

  The batch is the global one: with the batch split over devices, `norms` is this device's
  shard and `axis_name` sums the moments over all shards (every device gets the same stats).
  """
  norms = jnp.clip(jax.lax.stop_gradient(common.as_float32(norms)), NORM_MIN, NORM_MAX)
  count = norms.shape[0] * (1 if axis_name is None else jax.lax.psum(1, axis_name))
  ddof = 1 if count > 1 else 0
  batch_mean = common.device_sum(jnp.sum(norms), axis_name) / count
  squares = common.device_sum(jnp.sum(jnp.square(norms - batch_mean)), axis_name)
  batch_std = jnp.sqrt(squares / (count - ddof))
  return {
      'norm_mean': momentum * batch_mean + (1.0 - momentum) * stats['norm_mean'],
      'norm_std': momentum * batch_std + (1.0 - momentum) * stats['norm_std'],
  }


def norm_quality(norms: Array, stats: Dict[str, Array], *, h: float = 0.333) -> Array:
  """ẑ = clip((clip(‖x‖) − μ)/(σ + ε)·h, −1, 1): (B,) float32, no gradient."""
  norms = jnp.clip(jax.lax.stop_gradient(common.as_float32(norms)), NORM_MIN, NORM_MAX)
  z = (norms - stats['norm_mean']) / (stats['norm_std'] + EPS) * h
  return jax.lax.stop_gradient(jnp.clip(z, -1.0, 1.0))


def adaface_target(cos_target: Array, quality: Array, *, m: float = 0.4) -> Array:
  """cos(clip(θ + g_angle, 0, π)) − g_add per sample; g_angle = −m·ẑ, g_add = m·ẑ + m."""
  c = common.clip_unit(common.as_float32(cos_target))
  quality = jax.lax.stop_gradient(common.as_float32(quality))
  g_angle = -m * quality
  g_add = m * quality + m
  cos_g, sin_g = jnp.cos(g_angle), jnp.sin(g_angle)
  shifted = c * cos_g - common.sin_from_cos(c) * sin_g
  # θ + g < 0  ⇔  g < 0 and θ < −g  ⇔  g < 0 and c > cos g;  θ + g > π ⇔ g > 0 and c < −cos g.
  shifted = jnp.where((g_angle < 0.0) & (c > cos_g), 1.0, shifted)
  shifted = jnp.where((g_angle > 0.0) & (c < -cos_g), -1.0, shifted)
  return shifted - g_add


def adaface_logits(cos_theta: Array, labels: Array, quality: Array, *, scale: float = 64.0,
                   m: float = 0.4) -> Array:
  """(B, C) logits: s·(cos(θ_y − m·ẑ) − m·ẑ − m) on the target, s·cos θ_j elsewhere.

  `quality` is ẑ ∈ [−1, 1] per sample (`norm_quality`), treated as a constant.
  """
  return adaface_logits_with_target(cos_theta, labels, quality, scale=scale, m=m)[0]


def adaface_logits_with_target(cos_theta: Array, labels: Array, quality: Array, *,
                               scale: float = 64.0, m: float = 0.4) -> Tuple[Array, Array]:
  """`adaface_logits` and its target column (B,), for `cross_entropy(target_logits=...)`."""
  cos_theta = common.as_float32(cos_theta)
  mask = common.target_mask(labels, cos_theta.shape[-1])
  target = adaface_target(common.take_target(cos_theta, labels), quality, m=m)
  return scale * jnp.where(mask, target[:, None], cos_theta), scale * target
