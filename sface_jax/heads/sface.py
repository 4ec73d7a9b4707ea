"""SFace (Zhong et al. 2021): sigmoid-constrained hypersphere loss, and a quality-aware variant.

No softmax. For sample i with label y and θ_j = arccos(cos θ_ij):

  L_i = −r_intra(θ_y)·s·cos θ_y + Σ_{j≠y} r_inter(θ_j)·s·cos θ_j,
  r_intra(θ) = 1 / (1 + e^{−k(θ − a)}),   r_inter(θ) = 1 / (1 + e^{k(θ − b)}),

L = mean_i L_i (defaults s = 64, k = 80, a = 0.8, b = 1.23). The r are gradient *scales*, not
part of what is differentiated: the sample moves towards its centre at a speed r_intra(θ_y)
that fades once θ_y < a (good enough: no over-fitting of noisy labels), and away from another
centre at a speed r_inter(θ_j) that fades once θ_j > b (far enough). So the backward pass is,
by definition (a `jax.custom_vjp`),

  ∂L/∂cos θ_iy = −s·r_intra(θ_iy)/B,    ∂L/∂cos θ_ij = s·r_inter(θ_ij)/B  (j ≠ y),

the same as `jax.grad` of the formula with `stop_gradient` around both r. Writing G for that
(B, C) matrix, the forward value is simply L = Σ_ij G_ij·cos θ_ij, and G is the only residual.

Quality-aware SFace (the seed reproduction report's proposal: "encourage high-quality hard
samples, discourage low-quality hard ones"). SFace slows down the hard samples' pull to their
centre only through θ_y, blind to *why* θ_y is large: a clean but difficult face (profile,
age gap) and a mislabelled or unrecognisable one look alike. We add the feature norm as a
quality signal, batch-normalised as in AdaFace (`adaface.norm_quality`): ẑ_i ∈ [−1, 1], with
running statistics as state and no gradient through the norm, and move the centre of the
intra-class sigmoid per sample:

  a_i = a − shift·ẑ_i,    r_intra(θ_y; ẑ_i) = 1 / (1 + e^{−k(θ_y − a + shift·ẑ_i)}).

Direction. r_intra is small for θ_y < a (easy, left alone) and close to 1 for θ_y > a (hard,
pulled in). A high-quality sample (ẑ > 0) gets a smaller centre a_i < a: the sigmoid moves to
the left, so its hard angles keep (and reach earlier) the full pulling weight — it is
learned. A low-quality sample (ẑ < 0) gets a larger centre a_i > a: a hard θ_y now sits
lower on the sigmoid and is pulled more weakly — a likely-noisy sample is not forced onto its
label. ∂r_intra/∂ẑ = k·shift·r(1 − r) > 0: the weight is increasing in quality at every θ.
The inter-class weight r_inter is unchanged (quality says how trustworthy the sample's own
label is, not how far other identities must be). With ẑ ≡ 0 (or shift = 0) this is SFace.
Gradient: ∂L/∂cos θ_iy = −s·r_intra(θ_iy; ẑ_i)/B, ∂L/∂cos θ_ij = s·r_inter(θ_ij)/B.
"""

import functools
from typing import Optional, Tuple

import jax
import jax.numpy as jnp

from sface_jax.heads import common

Array = jax.Array


def _gradient_matrices(cos_theta, labels, intra_center, valid, scale, k, b):
  """G_intra (target entries only) and G_inter (off-target real classes), each (B, C)."""
  batch = cos_theta.shape[0]
  mask = common.target_mask(labels, cos_theta.shape[-1])
  theta = common.arccos(cos_theta)
  theta_target = common.arccos(common.take_target(cos_theta, labels))
  r_intra = jax.nn.sigmoid(k * (theta_target - intra_center))
  r_inter = jax.nn.sigmoid(-k * (theta - b))
  g_intra = jnp.where(mask, (-scale / batch) * r_intra[:, None], 0.0)
  g_inter = jnp.where(mask | ~valid, 0.0, (scale / batch) * r_inter)
  return mask, g_intra, g_inter


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _sface_terms(cos_theta, labels, intra_center, valid, scale, k, b):
  _, g_intra, g_inter = _gradient_matrices(cos_theta, labels, intra_center, valid, scale, k, b)
  return jnp.sum(g_intra * cos_theta), jnp.sum(g_inter * cos_theta)


def _sface_terms_fwd(cos_theta, labels, intra_center, valid, scale, k, b):
  mask, g_intra, g_inter = _gradient_matrices(cos_theta, labels, intra_center, valid, scale,
                                              k, b)
  gradient = g_intra + g_inter  # disjoint supports: one (B, C) residual, not two
  terms = (jnp.sum(g_intra * cos_theta), jnp.sum(g_inter * cos_theta))
  return terms, (gradient, labels, intra_center, valid)


def _sface_terms_bwd(scale, k, b, residuals, cotangents):
  gradient, labels, intra_center, valid = residuals
  d_intra, d_inter = cotangents
  mask = common.target_mask(labels, gradient.shape[-1])
  d_cos = gradient * jnp.where(mask, d_intra, d_inter)
  # Labels and the validity mask are integers/bools (no cotangent); the sigmoid centre is a
  # constant by definition.
  return d_cos, None, jnp.zeros_like(intra_center), None


_sface_terms.defvjp(_sface_terms_fwd, _sface_terms_bwd)


def quality_intra_center(quality: Array, *, a: float = 0.8, shift: float = 0.1) -> Array:
  """a_i = a − shift·ẑ_i: high quality → earlier full pull, low quality → weaker pull."""
  return a - shift * jax.lax.stop_gradient(common.as_float32(quality))


def sface_loss_terms(cos_theta: Array, labels: Array, *, scale: float = 64.0,
                     k: float = 80.0, a: float = 0.8, b: float = 1.23,
                     quality: Optional[Array] = None, shift: float = 0.0,
                     valid: Optional[Array] = None,
                     axis_name: Optional[str] = None) -> Tuple[Array, Array]:
  """(intra, inter): the batch means of −r_intra·s·cos θ_y and Σ_{j≠y} r_inter·s·cos θ_j.

  Their sum is `sface_loss` (or `quality_sface_loss` when `quality` is given); each carries
  the custom gradient of its own part, so either can be logged or weighted separately.
  On a block of the classes (`labels` block labels, `valid` its real columns), each block
  sums its own part and `axis_name` adds the blocks (the inter-class sum runs over every
  class of every device).
  """
  cos_theta = common.as_float32(cos_theta)
  labels = jnp.asarray(labels).astype(jnp.int32)
  batch = cos_theta.shape[0]
  if quality is None:
    intra_center = jnp.full((batch,), a, jnp.float32)
  else:
    intra_center = quality_intra_center(quality, a=a, shift=shift)
  if valid is None:
    valid = jnp.ones(cos_theta.shape[-1:], bool)
  intra, inter = _sface_terms(cos_theta, labels, intra_center, valid, float(scale), float(k),
                              float(b))
  return common.device_sum(intra, axis_name), common.device_sum(inter, axis_name)


def sface_loss(cos_theta: Array, labels: Array, *, scale: float = 64.0, k: float = 80.0,
               a: float = 0.8, b: float = 1.23) -> Array:
  """Batch-mean SFace loss (float32 scalar); gradient by the custom VJP in the module doc.

  For logging, `common.angle_stats(cos_theta, labels)` (exported as
  `sface_jax.heads.angle_stats`) gives the batch means of θ_y and of min_{j≠y} θ_j in degrees,
  and `sface_loss_terms` the intra and inter parts.
  """
  intra, inter = sface_loss_terms(cos_theta, labels, scale=scale, k=k, a=a, b=b)
  return intra + inter


def quality_sface_loss(cos_theta: Array, labels: Array, quality: Array, *,
                       scale: float = 64.0, k: float = 80.0, a: float = 0.8,
                       b: float = 1.23, shift: float = 0.1) -> Array:
  """Quality-aware SFace: SFace with intra-class centre a_i = a − shift·ẑ_i (module doc).

  `quality` is ẑ ∈ [−1, 1] per sample (e.g. `adaface.norm_quality`), never differentiated.
  """
  intra, inter = sface_loss_terms(cos_theta, labels, scale=scale, k=k, a=a, b=b,
                                  quality=quality, shift=shift)
  return intra + inter
