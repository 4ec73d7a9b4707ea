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

Gradient. By default the exact derivative of the formula above (autodiff). The official Caffe
layer (wy1iu/sphereface `margin_inner_product_layer.cpp`, Backward_cpu) writes its own
backward, which is not that derivative; `official_backward=True`
(`sphereface_logits_official_backward`) reproduces it. With c = cos θ_y, ŵ the normalised
centre and g_y the loss gradient of the target logit, the exact target terms are

  ∂/∂x = g_y·[(λ + ψ'(c))·ŵ_y + (ψ(c) − c·ψ'(c))·x/‖x‖] / (1 + λ),
  ∂/∂ŵ_y = g_y·(λ + ψ'(c))·x / (1 + λ),

and the official layer (a) rescales the pair of coefficients (ψ'(c), (ψ(c) − c·ψ'(c))/‖x‖) to
unit length before using them in ∂/∂x (the λ part, λ·ŵ_y, is left as it is), and (b) takes the
weight gradient as that of a plain inner product, ∂/∂ŵ_y = g_y·x, ignoring the margin and λ.
Off the target both agree (ŵ_j and x). The two gradients are 0.06–0.8 % apart (relative
L2) at λ = 892.86 (step 0) and 10–110 % once λ is 5 (32–38 % with target cosines 0.2–0.9):
`python -m bench.official_conventions`. Where the Caffe layer writes ŵ's gradient to the
normalised weights and re-normalises them at the next forward pass, our centres are raw
parameters normalised in the loss: the official ŵ-gradient then goes through that
normalisation (its tangential part, divided by ‖W_j‖).
"""

import functools
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


def sphereface_logits_official_backward(embeddings: Array, class_centers: Array,
                                        cos_theta: Array, labels: Array, *, m: int = 4,
                                        lambda_: Array = 0.0) -> Tuple[Array, Array]:
  """`sphereface_logits_with_target`'s values, with the official Caffe layer's gradient.

  Args:
    embeddings: (B, D) raw embeddings x (differentiated, by the official formula).
    class_centers: (D, C) centres W (differentiated: the official gradient with respect to
      the normalised ŵ, then through the normalisation).
    cos_theta: (B, C) `cosine_logits(embeddings, class_centers)`, for its value only: the
      gradient reaches x and W through the official formula, never through these cosines.
    labels: (B,) block labels (−1 where the class is on another device).
    m, lambda_: as in `sphereface_logits`.
  """
  x = common.as_float32(embeddings)
  w_hat = common.l2_normalize(common.as_float32(class_centers), axis=0)
  return _official(int(m), x, w_hat, jax.lax.stop_gradient(common.as_float32(cos_theta)),
                   jnp.asarray(labels).astype(jnp.int32), jnp.asarray(lambda_, jnp.float32))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _official(m, x, w_hat, cos_theta, labels, lambda_):
  return sphereface_logits_with_target(cos_theta, common.row_norms(x), labels, m=m,
                                       lambda_=lambda_)


def _official_forward(m, x, w_hat, cos_theta, labels, lambda_):
  out = _official(m, x, w_hat, cos_theta, labels, lambda_)
  return out, (x, w_hat, common.take_target(cos_theta, labels), labels, lambda_)


def _official_backward(m, residuals, cotangents):
  """wy1iu/sphereface Backward_cpu in matrix form (module docstring), for any m."""
  x, w_hat, cos_target, labels, lambda_ = residuals
  g_logits, g_target = cotangents
  mask = common.target_mask(labels, w_hat.shape[1])
  here = common.in_block(labels, w_hat.shape[1])
  g_y = common.take_target(g_logits, labels) + jnp.where(here, g_target, 0.0)
  # Weight: the gradient of a plain inner product x·ŵ_j for every column, the target too.
  grad_w_hat = jnp.dot(x.T, jnp.where(mask, g_y[:, None], g_logits),
                       preferred_element_type=jnp.float32)
  # Data: ψ and ψ' at c (k is piecewise constant, so ψ' = (−1)^k·T_m'(c)).
  c = common.clip_unit(cos_target)
  psi, dpsi = jax.jvp(lambda v: sphereface_psi(v, m), (c,), (jnp.ones_like(c),))
  inverse_norm = 1.0 / jnp.maximum(common.row_norms(x), 1e-12)
  coeff_w, coeff_x = dpsi, (psi - c * dpsi) * inverse_norm
  length = jnp.sqrt(coeff_w * coeff_w + coeff_x * coeff_x)  # > 0: ψ' = 0 only where ψ is odd
  on_w = g_y * (lambda_ + coeff_w / length) / (1.0 + lambda_)
  on_x = jnp.where(here, g_y * coeff_x / (length * (1.0 + lambda_)), 0.0)
  grad_x = (jnp.dot(jnp.where(mask, on_w[:, None], g_logits), w_hat.T,
                    preferred_element_type=jnp.float32) + on_x[:, None] * x)
  return grad_x, grad_w_hat, jnp.zeros_like(g_logits), None, None


_official.defvjp(_official_forward, _official_backward)
