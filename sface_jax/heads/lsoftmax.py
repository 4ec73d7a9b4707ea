"""L-Softmax (Liu, Wen, Yu & Yang, "Large-Margin Softmax Loss for Convolutional Neural
Networks", ICML 2016): the multiplicative angular margin on *unnormalised* W and x.

Plain softmax writes logit_j = W_jᵀx = ‖W_j‖‖x‖cos θ_j (no bias: the paper drops it). L-Softmax
replaces cos θ_y on the target by SphereFace's ψ (the same function; SphereFace is L-Softmax
with normalised centres):

  ψ(θ) = (−1)^k·cos(mθ) − 2k   for θ ∈ [kπ/m, (k+1)π/m],   k = 0 … m−1,

and anneals from the softmax towards it, as the official Caffe layer does
(wy1iu/LargeMargin_Softmax_Loss, `largemargin_inner_product_layer.cpp`):

  logit_y = ‖W_y‖‖x‖·(λ·cos θ_y + ψ(θ_y)) / (1 + λ),    logit_j = W_jᵀx   (j ≠ y),
  λ = max(λ_min, base·(1 + γ·iteration)^(−power)),    iteration = step + 1

(the layer increments its counter before computing λ: `sphereface.sphereface_lambda`).
Defaults are the official MNIST example's (`myexamples/mnist`): m = 4, base = 1000,
γ = 2.5e-5, power = 35, λ_min = 0 — so λ falls from 999 (first step) to 421 at step 1,000,
16 at 5,000, 1 at 8,727 and 0.4 at 10,000; the ψ part then dominates.

Gradient: the exact derivative of the formula (the Caffe layer's hand-written backward is
the same derivative), through ‖W_y‖, ‖x‖ and cos θ_y. ψ is the Chebyshev polynomial T_m in
cos θ with a piecewise sign and offset, so no arccos enters the value or the gradient, and
cos θ = ±1 is NaN-free.

The centres are the classifier's raw columns, so their initial norm (`config.head.
center_init`) sets the initial logit scale: 'normal' gives ‖W_j‖ ≈ 0.23 at D = 512; the
official layer uses MSRA initialisation (‖W_j‖ ≈ √2).
"""

from typing import Tuple

import jax
import jax.numpy as jnp

from sface_jax.heads import common
from sface_jax.heads import softmax as softmax_lib
from sface_jax.heads import sphereface as sphereface_lib

Array = jax.Array


def target_cosines(embeddings: Array, class_centers: Array, labels: Array) -> Array:
  """cos θ_iy (B,) from the sample and its own centre column only (a B × D gather, not a
  second B × C product); 0 where the label is not a column of `class_centers`."""
  x = common.l2_normalize(common.as_float32(embeddings), axis=-1)
  labels = jnp.asarray(labels).astype(jnp.int32)
  columns = jnp.clip(labels, 0, class_centers.shape[1] - 1)
  w = common.l2_normalize(common.as_float32(class_centers)[:, columns], axis=0)
  cos = jnp.sum(x * w.T, axis=-1)
  return jnp.where(common.in_block(labels, class_centers.shape[1]), cos, 0.0)


def lsoftmax_logits_with_target(embeddings: Array, class_centers: Array, labels: Array, *,
                                m: int = 4, lambda_: Array = 0.0) -> Tuple[Array, Array]:
  """(B, C) logits W_jᵀx with ‖W_y‖‖x‖(λ cos θ_y + ψ(θ_y))/(1 + λ) on the target, and the
  target column (B,), for `cross_entropy(target_logits=...)`.

  Args:
    embeddings: (B, D) raw embeddings (any float dtype; computed in float32).
    class_centers: (D, C) raw class centres (not normalised).
    labels: (B,) class indices (block labels: −1 where the class is elsewhere).
    m: the integer angular margin.
    lambda_: the annealing weight λ (a traced scalar is fine); 0 gives pure ψ.
  """
  x = common.as_float32(embeddings)
  centers = common.as_float32(class_centers)
  logits = softmax_lib.linear_logits(x, centers)
  labels = jnp.asarray(labels).astype(jnp.int32)
  columns = jnp.clip(labels, 0, centers.shape[1] - 1)
  norms = common.row_norms(x) * common.row_norms(centers[:, columns].T)
  cos_target = target_cosines(x, centers, labels)
  lambda_ = jnp.asarray(lambda_, jnp.float32)
  target = norms * (lambda_ * cos_target + sphereface_lib.sphereface_psi(cos_target, m)) / (
      1.0 + lambda_)
  mask = common.target_mask(labels, logits.shape[-1])
  return jnp.where(mask, target[:, None], logits), target


def lsoftmax_logits(embeddings: Array, class_centers: Array, labels: Array, *, m: int = 4,
                    lambda_: Array = 0.0) -> Array:
  """The (B, C) L-Softmax logits of `lsoftmax_logits_with_target`."""
  return lsoftmax_logits_with_target(embeddings, class_centers, labels, m=m,
                                     lambda_=lambda_)[0]
