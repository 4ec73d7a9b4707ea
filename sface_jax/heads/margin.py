"""Margin logits: NormFace, CosFace, ArcFace and the combined margin in one function.

On the target class the logit is s·(cos(m1·θ_y + m2) − m3), elsewhere s·cos θ_j:

| head      | (m1, m2, m3) | paper |
|-----------|--------------|-------|
| NormFace  | (1, 0, 0)    | Wang et al. 2017 |
| CosFace   | (1, 0, m)    | Wang et al. 2018 (also AM-Softmax) |
| ArcFace   | (1, m, 0)    | Deng et al. 2019 |
| combined  | (m1, m2, m3) | Deng et al. 2019, §3.3 |

Monotonicity. cos(m1·θ + m2) decreases only while m1·θ + m2 ≤ π, i.e. θ ≤ θ* = (π − m2)/m1.
Past θ* the target logit would rise again and the loss would push hard samples *away* from
their class. Past θ* we therefore use a curve that keeps decreasing:
- m1 = 1 (ArcFace, combined with m1 = 1): cos θ − m2·sin m2 − m3, the fallback of Deng et
  al.'s reference code (it lies below the margined curve at θ*, so the step is downwards);
- m1 ≠ 1: cos θ − (1 + cos θ*) − m3, which meets the margined curve at θ* continuously.
With `easy_margin` the margin is applied only where cos θ > 0 and the target is plain cos θ
elsewhere (not monotonic at θ = π/2 — an option of the reference code, kept for
reproductions).

insightface mode (`insightface_grad=True`) reproduces insightface `arcface_torch`
(losses.py `CombinedMarginLoss`, since December 2022) in value *and* gradient, so that logged
losses can be compared with theirs:
- Value: the target is the bare formula cos(m1·θ_y + m2) − m3 everywhere, with no fallback.
  For ArcFace (1, m, 0) that is cos(θ_y + m), which rises again past θ_y = π − m (their
  code takes arccos, adds m and takes cos, with nothing in between); below π − m it equals
  our default. `easy_margin` still applies if set (arcface_torch fixes it to False).
- Gradient: that of s·cos θ_y, as if the margin were not there: arcface_torch applies the
  margin in place under `torch.no_grad()`, so its backward pass never sees it. The two
  gradients differ by the factor d cos(θ+m)/d cos θ = cos m + sin m·cos θ/sin θ on the
  target.
So with the flag, only θ_y ≤ π − m has the same value as the default, and no θ_y the same
gradient. Note that arcface_torch's `CombinedMarginLoss(64, 1, 0.3, 0.2)` (its "combined"
recipes) takes the `m3 > 0` branch, which ignores m2 entirely: it is CosFace with m = 0.2,
not the combined margin (1, 0.3, 0.2) written here. To reproduce it, use `cosface` with
`--config.head.cosface.m=0.2`.

For m1 = 1 no arccos is taken: cos(θ + m) = cos θ·cos m − sin θ·sin m with sin θ from
`common.sin_from_cos`, so cos θ = ±1 gives finite gradients.
"""

import math
from typing import Tuple

import jax
import jax.numpy as jnp

from sface_jax.heads import common

Array = jax.Array


def margin_target(cos_target: Array, *, m1: float = 1.0, m2: float = 0.0, m3: float = 0.0,
                  easy_margin: bool = False, fallback: bool = True) -> Array:
  """cos(m1·θ + m2) − m3 for θ = arccos(cos_target), with the monotonic fallback above.

  Element-wise on any shape; float32 in, float32 out. Margins are Python numbers (static).
  `fallback=False` gives the bare formula everywhere (arcface_torch's value; not monotonic).
  """
  m1, m2, m3 = float(m1), float(m2), float(m3)
  if m1 <= 0.0 or not 0.0 <= m2 < math.pi:
    raise ValueError(f'margin_logits: need m1 > 0 and 0 <= m2 < pi, got m1={m1}, m2={m2}')
  c = common.clip_unit(common.as_float32(cos_target))
  if m1 == 1.0 and m2 == 0.0:
    margined = c
  elif m1 == 1.0:
    margined = c * math.cos(m2) - common.sin_from_cos(c) * math.sin(m2)
  else:
    margined = jnp.cos(m1 * common.safe_angle(c) + m2)
  margined = margined - m3
  if easy_margin:
    return jnp.where(c > 0.0, margined, c)
  if not fallback:
    return margined
  theta_limit = (math.pi - m2) / m1
  if theta_limit >= math.pi:  # m1·θ + m2 never passes π on [0, π]: already monotonic.
    return margined
  if m1 == 1.0:
    fallback = c - m2 * math.sin(m2) - m3
  else:
    fallback = c - (1.0 + math.cos(theta_limit)) - m3
  return jnp.where(c > math.cos(theta_limit), margined, fallback)


def margin_logits(cos_theta: Array, labels: Array, *, scale: float, m1: float = 1.0,
                  m2: float = 0.0, m3: float = 0.0, easy_margin: bool = False,
                  insightface_grad: bool = False) -> Array:
  """(B, C) float32 logits: s·(cos(m1·θ_y + m2) − m3) on the target, s·cos θ_j elsewhere.

  Args:
    cos_theta: (B, C) cosines between normalised embeddings and class centres (any float
      dtype; computed in float32).
    labels: (B,) integer class indices.
    scale: s.
    m1, m2, m3: multiplicative angular, additive angular and additive cosine margins.
    easy_margin: apply the margin only where cos θ_y > 0 (no fallback).
    insightface_grad: arcface_torch's value (the bare formula, no fallback) and gradient
      (on the target as if the margin were absent, ∂logit_y/∂cos θ_y = s); module doc.
  """
  return margin_logits_with_target(cos_theta, labels, scale=scale, m1=m1, m2=m2, m3=m3,
                                   easy_margin=easy_margin,
                                   insightface_grad=insightface_grad)[0]


def margin_logits_with_target(cos_theta: Array, labels: Array, *, scale: float,
                              m1: float = 1.0, m2: float = 0.0, m3: float = 0.0,
                              easy_margin: bool = False,
                              insightface_grad: bool = False) -> Tuple[Array, Array]:
  """`margin_logits` and its target column (B,), for `cross_entropy(target_logits=...)`."""
  cos_theta = common.as_float32(cos_theta)
  cos_target = common.take_target(cos_theta, labels)
  if float(m1) == 1.0 and float(m2) == 0.0 and float(m3) == 0.0:
    return scale * cos_theta, scale * cos_target
  mask = common.target_mask(labels, cos_theta.shape[-1])
  target = margin_target(cos_target, m1=m1, m2=m2, m3=m3, easy_margin=easy_margin,
                         fallback=not insightface_grad)
  if insightface_grad:
    target = cos_target + jax.lax.stop_gradient(target - cos_target)
  return scale * jnp.where(mask, target[:, None], cos_theta), scale * target
