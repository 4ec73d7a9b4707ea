"""SphereFace / A-Softmax (Liu et al. 2017): multiplicative angular margin, annealed.

Class centres are normalised, embeddings are not: logit_j = ‖x‖·cos θ_j. On the target,
cos θ_y is replaced by

  ψ(θ) = (−1)^k·cos(mθ) − 2k   for θ ∈ [kπ/m, (k+1)π/m], k = 0 … m−1,

which is continuous, decreasing from 1 to 1 − 2m over [0, π] (a plain cos(mθ) would not be).
Training starts from the softmax and anneals towards ψ:

  logit_y = ‖x‖·(λ·cos θ_y + ψ(θ_y)) / (1 + λ),
  λ = max(λ_min, base·(1 + γ·iteration)^(−power))      (defaults 1000, 0.12, 1, 5),

with iteration = step + 1, step the optimiser steps already taken (`state.step`, 0 on the
first step). Both reference codes increment their counter *before* computing λ
(wy1iu/sphereface `margin_inner_product_layer.cpp` and wy1iu/LargeMargin_Softmax_Loss
`largemargin_inner_product_layer.cpp`: `iter_ += 1` at the top of Forward; the
face.evoLVe/zhongyy SphereFace port the same), so their first step uses iteration 1:
λ = 1000/1.12 = 892.86, and λ_min = 5 is first reached at step 1658 (iteration 1659).

cos(mθ) is the Chebyshev polynomial T_m(cos θ) (T_4(c) = 8c⁴ − 8c² + 1), so no arccos enters
the value or the gradient; k counts the thresholds cos(jπ/m) that cos θ lies below.
"""

import math
from typing import Tuple

import jax
import jax.numpy as jnp

from sface_jax.heads import common

Array = jax.Array


def sphereface_lambda(step: Array, *, base: float = 1000.0, gamma: float = 0.12,
                      power: float = 1.0, lambda_min: float = 5.0) -> Array:
  """λ = max(λ_min, base·(1 + γ·(step + 1))^(−power)), float32 scalar.

  `step` counts the steps taken before this one (0 on the first); the + 1 is the reference
  codes' pre-incremented iteration counter (module docstring). Shared by L-Softmax.
  """
  iteration = jnp.asarray(step).astype(jnp.float32) + 1.0
  return jnp.maximum(jnp.float32(lambda_min),
                     base * jnp.power(1.0 + gamma * iteration, -float(power)))


def chebyshev(cos_theta: Array, m: int) -> Array:
  """T_m(c) = cos(m·arccos c) by the recurrence T_{n+1} = 2c·T_n − T_{n−1}."""
  previous, current = jnp.ones_like(cos_theta), cos_theta
  if m == 0:
    return previous
  for _ in range(m - 1):
    previous, current = current, 2.0 * cos_theta * current - previous
  return current


def sphereface_psi(cos_theta: Array, m: int = 4) -> Array:
  """ψ(θ) = (−1)^k·cos(mθ) − 2k as a function of cos θ (any shape, float32)."""
  m = int(m)
  if m < 1:
    raise ValueError(f'sphereface: m must be a positive integer, got {m}')
  c = common.clip_unit(common.as_float32(cos_theta))
  k = jnp.zeros(c.shape, jnp.float32)
  for j in range(1, m):
    k = k + (c < math.cos(j * math.pi / m)).astype(jnp.float32)
  sign = 1.0 - 2.0 * jnp.mod(k, 2.0)
  return sign * chebyshev(c, m) - 2.0 * k


def sphereface_logits(cos_theta: Array, norms: Array, labels: Array, *, m: int = 4,
                      lambda_: Array = 0.0) -> Array:
  """(B, C) logits ‖x‖·cos θ_j, with the annealed ‖x‖·(λ cos θ_y + ψ(θ_y))/(1+λ) on target.

  Args:
    cos_theta: (B, C) cosines (normalised embeddings and class centres).
    norms: (B,) ‖x_i‖ of the raw embeddings (differentiated: A-Softmax keeps the norm).
    labels: (B,) integer classes.
    m: the integer angular margin.
    lambda_: the annealing weight λ (a traced scalar is fine); 0 gives pure ψ.
  """
  return sphereface_logits_with_target(cos_theta, norms, labels, m=m, lambda_=lambda_)[0]


def sphereface_logits_with_target(cos_theta: Array, norms: Array, labels: Array, *,
                                  m: int = 4, lambda_: Array = 0.0) -> Tuple[Array, Array]:
  """`sphereface_logits` and its target column (B,), for `cross_entropy(target_logits=)`."""
  cos_theta = common.as_float32(cos_theta)
  norms = common.as_float32(norms)
  mask = common.target_mask(labels, cos_theta.shape[-1])
  cos_target = common.take_target(cos_theta, labels)
  lambda_ = jnp.asarray(lambda_, jnp.float32)
  target = (lambda_ * cos_target + sphereface_psi(cos_target, m)) / (1.0 + lambda_)
  return (norms[:, None] * jnp.where(mask, target[:, None], cos_theta), norms * target)
