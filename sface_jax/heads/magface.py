"""MagFace (Meng et al., "MagFace: A Universal Representation for Face Recognition and
Quality Assessment", CVPR 2021): an ArcFace margin that grows with the feature magnitude,
and a regulariser that rewards magnitude, so that ‖x‖ becomes a quality score.

With a = clamp(‖x‖, l_a, u_a) the magnitude of the raw embedding (differentiated; zero
gradient outside [l_a, u_a], torch.clamp's):

  m(a) = (u_m − l_m)/(u_a − l_a)·(a − l_a) + l_m          (linear, l_m at l_a, u_m at u_a),
  g(a) = a/u_a² + 1/a                                      (convex, decreasing on [l_a, u_a]),
  L = mean_i CE_i(s·cos(θ_y + m(a_i)) on the target, s·cos θ_j elsewhere) + λ_g·mean_i g(a_i).

Both terms depend on a: the margin pushes a high-magnitude sample harder (a larger margin
is a harder target), the regulariser pulls every magnitude up, and their balance puts easy,
clean faces at large ‖x‖ and hard or poor ones at small ‖x‖. Defaults are the official
training script's (IrvingMeng/MagFace run/run.sh): l_a = 10, u_a = 110, l_m = 0.45,
u_m = 0.8, λ_g = 35, s = 64 — λ_g must exceed s·k·u_a²·l_a²/(u_a² − l_a²) ≈ 22.6 with
k = (u_m − l_m)/(u_a − l_a), the condition under which the paper proves the optimal a is
unique (the official trainer prints this bound).

Margin outside its range. The official `MagLinear` defaults to `easy_margin=True`: the margin
is applied only where cos θ_y > 0, plain cos θ_y elsewhere (not monotonic at θ_y = π/2). With
`easy_margin=False` it uses ArcFace's fallback, per sample: cos θ_y − m(a)·sin m(a) where
θ_y > π − m(a). We follow the official default.

Sharding: m(a_i) is needed for every sample's target, which lives on the device that holds
its class; each device computes m for the whole (gathered) batch and only the owner's
target enters the loss. g is per sample and is counted once: each device sums g over its own
shard of the batch and the shards are added with a `psum`.

cos(θ + m) = cos θ·cos m − sin θ·sin m with a clamped sin θ: NaN-free at cos θ = ±1 (the
official `sqrt(1 − cos²)` has an infinite derivative there).
"""

from typing import Tuple

import jax
import jax.numpy as jnp

from sface_jax.heads import common

Array = jax.Array


def magnitude(norms: Array, *, l_a: float = 10.0, u_a: float = 110.0) -> Array:
  """a = clamp(‖x‖, l_a, u_a), gradient 1 inside (and on the bounds), 0 outside."""
  return common.clamp(common.as_float32(norms), float(l_a), float(u_a))


def magface_margin(a: Array, *, l_a: float = 10.0, u_a: float = 110.0,
                   l_margin: float = 0.45, u_margin: float = 0.8) -> Array:
  """m(a) = (u_m − l_m)/(u_a − l_a)·(a − l_a) + l_m."""
  return (u_margin - l_margin) / (u_a - l_a) * (a - l_a) + l_margin


def magface_regularizer(a: Array, *, u_a: float = 110.0) -> Array:
  """g(a) = a/u_a² + 1/a, per sample."""
  return a / (u_a * u_a) + 1.0 / a


def magface_target(cos_target: Array, margin: Array, *, easy_margin: bool = True) -> Array:
  """cos(θ + m) per sample, `margin` (B,) traced; easy margin or ArcFace's fallback."""
  c = common.clip_unit(common.as_float32(cos_target))
  cos_m, sin_m = jnp.cos(margin), jnp.sin(margin)
  margined = c * cos_m - common.sin_from_cos(c) * sin_m
  if easy_margin:
    return jnp.where(c > 0.0, margined, c)
  # θ ≤ π − m  ⇔  c > cos(π − m) = −cos m; past it cos θ − sin(π − m)·m = cos θ − m·sin m.
  return jnp.where(c > -cos_m, margined, c - margin * sin_m)


def magface_logits_with_target(cos_theta: Array, labels: Array, norms: Array, *,
                               scale: float = 64.0, l_a: float = 10.0, u_a: float = 110.0,
                               l_margin: float = 0.45, u_margin: float = 0.8,
                               easy_margin: bool = True) -> Tuple[Array, Array]:
  """(B, C) logits s·cos(θ_y + m(a)) on the target, s·cos θ_j elsewhere, and the target
  column (B,). `norms` (B,) are ‖x_i‖ of the raw embeddings, differentiated through m(a)."""
  c = common.clip_unit(common.as_float32(cos_theta))
  a = magnitude(norms, l_a=l_a, u_a=u_a)
  margin = magface_margin(a, l_a=l_a, u_a=u_a, l_margin=l_margin, u_margin=u_margin)
  target = magface_target(common.take_target(c, labels), margin, easy_margin=easy_margin)
  mask = common.target_mask(labels, c.shape[-1])
  return scale * jnp.where(mask, target[:, None], c), scale * target


def magface_logits(cos_theta: Array, labels: Array, norms: Array, **kwargs) -> Array:
  """The (B, C) logits of `magface_logits_with_target`."""
  return magface_logits_with_target(cos_theta, labels, norms, **kwargs)[0]
