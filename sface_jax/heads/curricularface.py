"""CurricularFace (Huang et al., "CurricularFace: Adaptive Curriculum Learning Loss for Deep
Face Recognition", CVPR 2020): ArcFace on the target, hard negatives re-weighted by a
curriculum that follows training.

  logit_y = s·T(cos θ_y),   T = ArcFace's cos(θ_y + m) with the fallback cos θ − m·sin m
                                past θ_y = π − m (the official code's threshold and `mm`),
  logit_j = s·N(t, cos θ_j),  N = cos θ_j                 if cos θ_j ≤ cos(θ_y + m) (easy),
                                  cos θ_j·(t + cos θ_j)   otherwise (hard),
  t ← (1 − α)·t + α·mean_B cos θ_y,   α = 0.01, t = 0 at the start.

Early in training cos θ_y is small, t ≈ 0, and a hard negative's logit cos θ_j(t + cos θ_j)
< cos θ_j: hard samples are played down (easy samples first). As the model improves t grows
towards 1 and the same hard negative gets t + cos θ_j > 1: it is emphasised. m = 0.5, s = 64
are the paper's defaults.

Details as in the official code (HuangYG123/CurricularFace, head/metrics.py):
- t is updated with the current batch *before* it is used, and is not differentiated: the
  gradient of a hard negative is s·(t + 2 cos θ_j)·(softmax − 0), t held constant.
- The hard test compares cos θ_j with the bare cos(θ_y + m), not with the fallback target
  (they differ only past θ_y = π − m, where the bare curve rises again).
- mean_B is over the global batch: every device sees the same t (the state is replicated
  and its update does not depend on the device count). Each sample's cos θ_y lives on the
  device that holds its class; the others get it by a `psum` of `take_target` (0 elsewhere),
  as `common.angle_stats` does.
cos(θ_y + m) = cos θ·cos m − sin θ·sin m with a clamped sin θ, so cos θ = ±1 is NaN-free.
"""

import math
from typing import Dict, Optional, Tuple

import jax
import jax.numpy as jnp

from sface_jax.heads import common
from sface_jax.heads import margin as margin_lib

Array = jax.Array


def init_state() -> Dict[str, Array]:
  """{'t': 0.}, the official initial value."""
  return {'t': jnp.float32(0.0)}


def update_t(cos_target: Array, t: Array, *, momentum: float = 0.01) -> Array:
  """t ← (1 − α)·t + α·mean(cos θ_y) over `cos_target`, the whole batch's (B,); no gradient."""
  mean = jnp.mean(jax.lax.stop_gradient(common.as_float32(cos_target)))
  return momentum * mean + (1.0 - momentum) * jnp.asarray(t, jnp.float32)


def curricular_logits_with_target(cos_theta: Array, labels: Array, t: Array, *,
                                  scale: float = 64.0, m: float = 0.5,
                                  cos_target: Optional[Array] = None) -> Tuple[Array, Array]:
  """(B, C) CurricularFace logits and the target column (B,), with t already updated.

  Args:
    cos_theta: (B, C) cosines (a block of the classes is fine).
    labels: (B,) block labels (−1 where the sample's class is on another device).
    t: the curriculum parameter (a constant here).
    scale, m: s and the ArcFace margin.
    cos_target: (B,) every sample's cos θ_y, needed for the hard test when the sample's class
      is not in this block; default: read from `cos_theta` (every class here).
  """
  c = common.clip_unit(common.as_float32(cos_theta))
  if cos_target is None:
    cos_target = common.take_target(c, labels)
  c_y = common.clip_unit(jax.lax.stop_gradient(common.as_float32(cos_target)))
  bare = c_y * math.cos(m) - common.sin_from_cos(c_y) * math.sin(m)  # cos(θ_y + m)
  hard = c > bare[:, None]
  t = jax.lax.stop_gradient(jnp.asarray(t, jnp.float32))
  negatives = jnp.where(hard, c * (t + c), c)
  target = margin_lib.margin_target(common.take_target(c, labels), m2=m)
  mask = common.target_mask(labels, c.shape[-1])
  return scale * jnp.where(mask, target[:, None], negatives), scale * target


def curricular_logits(cos_theta: Array, labels: Array, t: Array, *, scale: float = 64.0,
                      m: float = 0.5) -> Array:
  """The (B, C) logits of `curricular_logits_with_target` (every class in `cos_theta`)."""
  return curricular_logits_with_target(cos_theta, labels, t, scale=scale, m=m)[0]
