"""Numerics every head shares: float32 casts, safe unit-interval maths, targets, reductions.

Why these exist:
- `jnp.clip(x, -1, 1)` has gradient 0.5 at exactly ±1 (`max`/`min` split ties), so a cosine
  of exactly 1 would lose half its gradient: `clip_unit` uses `where` (gradient 1 inside and
  on the boundary, 0 outside).
- sin θ = sqrt(1 − cos²θ) has an infinite derivative at |cos θ| = 1, which becomes NaN in the
  backward pass; `sin_from_cos` is the "double where" square root: exact value, finite
  gradient everywhere (0 at exactly ±1, large but finite next to it).
- A head may see only a block of the classes (sharded over devices, or sampled by Partial
  FC). Labels are then *block labels*: the column of the sample's class in this block, or −1
  when the class lives elsewhere; `take_target` reads 0 there, and the reductions over the
  class axis (`device_sum`, `device_max`) add the other blocks' parts with a `psum`/`pmax` over
  `axis_name`. With `axis_name=None` (one device, every class here) they are plain sums.
"""

import math
from typing import Dict

import jax
import jax.numpy as jnp

Array = jax.Array


def as_float32(x: Array) -> Array:
  """Losses and logits are float32 whatever the backbone dtype: bfloat16 has float32's range
  but an 8-bit mantissa, so s·cos θ would be coarse (64 × 0.987 rounds to 63.25)."""
  return jnp.asarray(x).astype(jnp.float32)


def clip_unit(cos_theta: Array) -> Array:
  """Clamps to [−1, 1] with gradient 1 on the boundary (unlike `jnp.clip`)."""
  return jnp.where(cos_theta > 1.0, 1.0, jnp.where(cos_theta < -1.0, -1.0, cos_theta))


def clamp(x: Array, low: float, high: float) -> Array:
  """x clamped to [low, high] with torch.clamp's gradient: 1 inside and on the bounds, 0
  outside (`where`, not `jnp.clip`, whose gradient is ½ on a bound). The official PyTorch
  heads clamp this way (AdaFace's ±(1 − 1e-3), MagFace's norm range)."""
  return jnp.where(x > high, high, jnp.where(x < low, low, x))


def sin_from_cos(cos_theta: Array) -> Array:
  """sin θ for θ = arccos(cos θ) ∈ [0, π]: sqrt((1 − c)(1 + c)), NaN-free gradient.

  (1 − c)(1 + c) rather than 1 − c² keeps relative accuracy near c = ±1 in float32.
  """
  c = clip_unit(cos_theta)
  square = (1.0 - c) * (1.0 + c)
  positive = square > 0.0
  root = jnp.sqrt(jnp.where(positive, square, 1.0))
  return jnp.where(positive, root, 0.0)


def safe_angle(cos_theta: Array) -> Array:
  """θ = arccos(c) as atan2(sin θ, c): same value, finite gradient (−1/sin θ) even at ±1."""
  c = clip_unit(cos_theta)
  return jnp.arctan2(sin_from_cos(c), c)


# asin(x) = x + x·z·P(z), z = x² ∈ [0, 1/4]: P of degree 4 fitted by us (least squares with
# Lawson re-weighting towards minimax, relative error, float64) to (asin √z − √z)/z^{3/2}.
_ASIN_COEFFICIENTS = (0.16666752, 0.07495298, 0.04547038, 0.02417951, 0.04216631)


def polynomial_arccos(cos_theta: Array) -> Array:
  """θ = arccos(c) in float32 from a polynomial asin, which XLA:CPU vectorises.

  XLA:CPU evaluates `acos` element by element, which made SFace's weights the most expensive
  part of its step on the CPU (BENCHMARKS.md § Heads). Here: clamp c, then for |c| ≤ ½
  acos|c| = π/2 − asin|c|, else acos|c| = 2·asin √((1 − |c|)/2), with asin the polynomial
  above, and acos(−|c|) = π − acos|c|. Maximum error over a 2·10⁶-point grid of [−1, 1]:
  3.0e-7 absolute, 1.4e-7 relative (NumPy's float32 arccos: 3.3e-7, 1.7e-7). For values
  only (SFace's weights, logging): the derivative is infinite at |c| = 1.
  """
  c = jnp.clip(as_float32(cos_theta), -1.0, 1.0)  # values only: min/max, no selects
  magnitude = jnp.abs(c)
  small = magnitude <= 0.5
  z = jnp.where(small, magnitude * magnitude, 0.5 * (1.0 - magnitude))
  x = jnp.where(small, magnitude, jnp.sqrt(z))
  polynomial = jnp.zeros_like(z)
  for coefficient in reversed(_ASIN_COEFFICIENTS):
    polynomial = polynomial * z + coefficient
  asin = x + x * z * polynomial
  acos_magnitude = jnp.where(small, 0.5 * math.pi - asin, 2.0 * asin)
  return jnp.where(c < 0.0, math.pi - acos_magnitude, acos_magnitude)


def arccos(cos_theta: Array) -> Array:
  """θ = arccos(c), values only: `polynomial_arccos` on the CPU, where it is faster;
  `jnp.arccos` elsewhere (GPU/TPU have fast vectorised acos: measure before changing)."""
  if jax.default_backend() == 'cpu':
    return polynomial_arccos(cos_theta)
  return jnp.arccos(jnp.clip(as_float32(cos_theta), -1.0, 1.0))


def l2_normalize(x: Array, axis: int = -1, eps: float = 1e-12) -> Array:
  """x / max(‖x‖, eps) along `axis` (a zero vector maps to zero, not NaN)."""
  squared = jnp.sum(x * x, axis=axis, keepdims=True)
  return x * jax.lax.rsqrt(jnp.maximum(squared, eps * eps))


def row_norms(x: Array, eps: float = 1e-12) -> Array:
  """‖x_i‖ per row, with a gradient that stays finite for a zero row."""
  squared = jnp.sum(x * x, axis=-1)
  positive = squared > eps * eps
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, squared, 1.0)), 0.0)


def target_mask(labels: Array, num_classes: int) -> Array:
  """(B, C) bool, True at (i, labels[i])."""
  classes = jax.lax.broadcasted_iota(jnp.int32, (1, num_classes), 1)
  return jnp.asarray(labels).astype(jnp.int32)[:, None] == classes


def device_sum(x: Array, axis_name: str | None) -> Array:
  """Σ of x over the devices of `axis_name` (their class blocks, or batch shards); x itself
  when `axis_name` is None."""
  return x if axis_name is None else jax.lax.psum(x, axis_name)


def device_max(x: Array, axis_name: str | None) -> Array:
  """max of x over the devices of `axis_name`; x itself when `axis_name` is None."""
  return x if axis_name is None else jax.lax.pmax(x, axis_name)


def in_block(labels: Array, num_columns: int) -> Array:
  """(B,) bool: the sample's class is a column of this block (block label in range)."""
  labels = jnp.asarray(labels).astype(jnp.int32)
  return (labels >= 0) & (labels < num_columns)


def take_target(values: Array, labels: Array) -> Array:
  """values[i, labels[i]] for (B, C) values, 0 where the label is not in this block.

  A gather (O(B); its backward a scatter of B values), not a masked (B, C) row sum.
  """
  labels = jnp.asarray(labels).astype(jnp.int32)
  num_columns = values.shape[-1]
  picked = jnp.take_along_axis(values, jnp.clip(labels, 0, num_columns - 1)[:, None],
                               axis=-1)[:, 0]
  return jnp.where(in_block(labels, num_columns), picked, 0.0)


def mask_invalid(values: Array, valid: Array | None, fill: float) -> Array:
  """`values` with the columns that are not real classes (padding) set to `fill`."""
  return values if valid is None else jnp.where(valid, values, fill)


def accuracy(scores: Array, labels: Array, *, valid: Array | None = None,
             axis_name: str | None = None) -> Array:
  """Top-1 accuracy of the argmax over all classes (every block), float32 scalar.

  A sample is right when the block that holds its class has the global maximum there:
  each block compares its own best score with the `pmax` of all blocks' best scores.
  """
  scores = mask_invalid(jax.lax.stop_gradient(as_float32(scores)), valid, -jnp.inf)
  best_here = jnp.max(scores, axis=-1)
  best = device_max(best_here, axis_name)
  labels = jnp.asarray(labels).astype(jnp.int32)
  hit = in_block(labels, scores.shape[-1]) & (jnp.argmax(scores, axis=-1) == labels) & (
      best_here == best)
  hits = device_sum(hit.astype(jnp.float32), axis_name)
  return jnp.mean(jnp.minimum(hits, 1.0))


def angle_stats(cos_theta: Array, labels: Array, *, valid: Array | None = None,
                axis_name: str | None = None) -> Dict[str, Array]:
  """Batch means, in degrees, of θ_y and of min_{j≠y} θ_j (no gradient), for logging.

  `theta_target` falling and `theta_nearest_negative` staying large is what every head here
  aims for; SFace's a and b are read against these two numbers. (With a single class there
  is no negative: its θ reads 180°.)
  """
  cos_theta = jax.lax.stop_gradient(as_float32(cos_theta))
  cos_target = device_sum(take_target(cos_theta, labels), axis_name)
  others = target_mask(labels, cos_theta.shape[-1])
  if valid is not None:
    others = others | ~valid
  nearest = device_max(jnp.max(jnp.where(others, -1.0, cos_theta), axis=-1), axis_name)
  return {'theta_target': jnp.degrees(jnp.mean(jnp.arccos(clip_unit(cos_target)))),
          'theta_nearest_negative': jnp.degrees(jnp.mean(jnp.arccos(clip_unit(nearest))))}
