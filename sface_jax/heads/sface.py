"""SFace (Zhong et al. 2021): sigmoid-constrained hypersphere loss, and two quality-aware variants.

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

Quality-aware SFace, v1 (`quality_sface`; kept as a negative result). The seed reproduction
report proposes "encouraging high-quality hard samples and discouraging low-quality hard
ones": SFace slows a hard sample's pull only through θ_y, blind to *why* θ_y is large (a clean
but difficult face, or an unrecognisable one). v1 takes the feature norm as the quality
signal, batch-normalised as in AdaFace (`adaface.norm_quality`): ẑ_i ∈ [−1, 1], running
statistics as state, no gradient through the norm; and it moves the centre of the intra-class
sigmoid per sample:

  a_i = a − shift·ẑ_i,    r_intra(θ_y; ẑ_i) = 1 / (1 + e^{−k(θ_y − a + shift·ẑ_i)}).

∂r_intra/∂ẑ = k·shift·r(1 − r) > 0, but r(1 − r) is only non-negligible within a few 1/k of
a: with k = 80 and shift = 0.1 the weight changes only for θ_y within ~0.06 rad of a, while
hard samples sit far above a, where r_intra = 1 whatever ẑ is. Measured (the label-noise
study, docs/quality_sface.md): v1 trains exactly as SFace. Moving the centre cannot reach
the hard samples.

Quality-aware SFace, v2 (`quality_sface_v2`): quality scales the *height* of the pull, so it
acts where the sigmoid is saturated, i.e. on exactly the hard samples:

  r_intra(θ_y; ẑ_i) = (1 + γ·ẑ_i) · 1 / (1 + e^{−k(θ_y − a)}),   0 ≤ γ ≤ 1.

- ẑ_i = 0 (a typical norm, or γ = 0): SFace.
- Hard (θ_y ≫ a, sigmoid ≈ 1): the pull is s·(1 + γ·ẑ_i)/B. High quality (ẑ → 1) gets up
  to (1 + γ) times SFace's pull: learned harder; low quality (ẑ → −1) gets (1 − γ) times it:
  at γ = 1 an image whose norm is 3σ below the mean (ẑ = −1 at h = 1/3) is not pulled at all.
- Easy (θ_y < a, sigmoid ≈ 0): nearly no pull, as in SFace, whatever ẑ: quality does not
  restart the over-fitting SFace stops.
- γ ≤ 1 keeps the weight ≥ 0: no sample is ever pushed away from its own label.
- Inter-class term: unchanged, r_inter(θ_j) = 1 / (1 + e^{k(θ_j − b)}). Quality says how
  much a sample's own label should move it; keeping every image away from the other
  identities' centres is what b controls, for clean and degraded images alike.
- Over the batch the mean height is 1 + γ·mean(ẑ) ≈ 1: v2 redistributes SFace's pull from
  low-norm to high-norm hard samples rather than changing its overall rate.

Gradient (both versions, by definition: `jax.custom_vjp`, weights held constant):
∂L/∂cos θ_iy = −s·r_intra(θ_iy; ẑ_i)/B,  ∂L/∂cos θ_ij = s·r_inter(θ_ij)/B. Why the norm: the
norm of a margin-loss embedding grows with how recognisable the image is (AdaFace, Kim et
al. 2022, observe it for margin-softmax losses; MagFace trains it in); whether it does for *this* loss and data is what
the degraded-quality study measures (docs/quality_sface.md).
"""

import functools
from typing import Optional, Tuple

import jax
import jax.numpy as jnp

from sface_jax.heads import common

Array = jax.Array


def _gradient_matrices(cos_theta, labels, intra_center, intra_height, valid, scale, k, b):
  """G_intra (target entries only) and G_inter (off-target real classes), each (B, C)."""
  batch = cos_theta.shape[0]
  mask = common.target_mask(labels, cos_theta.shape[-1])
  theta = common.arccos(cos_theta)
  theta_target = common.arccos(common.take_target(cos_theta, labels))
  r_intra = intra_height * jax.nn.sigmoid(k * (theta_target - intra_center))
  r_inter = jax.nn.sigmoid(-k * (theta - b))
  g_intra = jnp.where(mask, (-scale / batch) * r_intra[:, None], 0.0)
  g_inter = jnp.where(mask | ~valid, 0.0, (scale / batch) * r_inter)
  return mask, g_intra, g_inter


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _sface_terms(cos_theta, labels, intra_center, intra_height, valid, scale, k, b):
  _, g_intra, g_inter = _gradient_matrices(cos_theta, labels, intra_center, intra_height,
                                           valid, scale, k, b)
  return jnp.sum(g_intra * cos_theta), jnp.sum(g_inter * cos_theta)


def _sface_terms_fwd(cos_theta, labels, intra_center, intra_height, valid, scale, k, b):
  mask, g_intra, g_inter = _gradient_matrices(cos_theta, labels, intra_center, intra_height,
                                              valid, scale, k, b)
  gradient = g_intra + g_inter  # disjoint supports: one (B, C) residual, not two
  terms = (jnp.sum(g_intra * cos_theta), jnp.sum(g_inter * cos_theta))
  return terms, (gradient, labels, intra_center, intra_height, valid)


def _sface_terms_bwd(scale, k, b, residuals, cotangents):
  gradient, labels, intra_center, intra_height, valid = residuals
  d_intra, d_inter = cotangents
  mask = common.target_mask(labels, gradient.shape[-1])
  d_cos = gradient * jnp.where(mask, d_intra, d_inter)
  # Labels and the validity mask are integers/bools (no cotangent); the sigmoid's centre and
  # height are constants by definition.
  return (d_cos, None, jnp.zeros_like(intra_center), jnp.zeros_like(intra_height), None)


_sface_terms.defvjp(_sface_terms_fwd, _sface_terms_bwd)


def quality_intra_center(quality: Array, *, a: float = 0.8, shift: float = 0.1) -> Array:
  """v1: a_i = a − shift·ẑ_i: high quality → earlier full pull, low quality → weaker pull."""
  return a - shift * jax.lax.stop_gradient(common.as_float32(quality))


def check_gamma(gamma: float) -> float:
  """γ of v2, refused outside [0, 1]: above 1 the pull 1 + γ·ẑ turns negative at ẑ = −1."""
  if not 0.0 <= gamma <= 1.0:
    raise ValueError(f'gamma={gamma} (config.head.quality_sface_v2.gamma) is outside [0, 1]: '
                     'the pull weight 1 + gamma * z would turn negative for low-quality samples')
  return float(gamma)


def quality_intra_height(quality: Array, *, gamma: float = 1.0) -> Array:
  """v2: the height 1 + γ·ẑ_i of r_intra (module doc)."""
  return 1.0 + check_gamma(gamma) * jax.lax.stop_gradient(common.as_float32(quality))


def sface_loss_terms(cos_theta: Array, labels: Array, *, scale: float = 64.0,
                     k: float = 80.0, a: float = 0.8, b: float = 1.23,
                     quality: Optional[Array] = None, shift: float = 0.0,
                     gamma: float = 0.0, valid: Optional[Array] = None,
                     axis_name: Optional[str] = None) -> Tuple[Array, Array]:
  """(intra, inter): the batch means of −r_intra·s·cos θ_y and Σ_{j≠y} r_inter·s·cos θ_j.

  Their sum is `sface_loss`, or with `quality` ẑ (B,) quality-aware SFace: v1 moves r_intra's
  centre by −shift·ẑ, v2 scales its height by 1 + gamma·ẑ (module doc); each term carries the
  custom gradient of its own part, so either can be logged or weighted separately.
  On a block of the classes (`labels` block labels, `valid` its real columns), each block
  sums its own part and `axis_name` adds the blocks (the inter-class sum runs over every
  class of every device).
  """
  cos_theta = common.as_float32(cos_theta)
  labels = jnp.asarray(labels).astype(jnp.int32)
  batch = cos_theta.shape[0]
  if quality is None:
    intra_center = jnp.full((batch,), a, jnp.float32)
    intra_height = jnp.ones((batch,), jnp.float32)
  else:
    intra_center = quality_intra_center(quality, a=a, shift=shift)
    intra_height = quality_intra_height(quality, gamma=gamma)
  if valid is None:
    valid = jnp.ones(cos_theta.shape[-1:], bool)
  intra, inter = _sface_terms(cos_theta, labels, intra_center, intra_height, valid,
                              float(scale), float(k), float(b))
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
  """Quality-aware SFace v1: intra-class centre a_i = a − shift·ẑ_i (module doc).

  `quality` is ẑ ∈ [−1, 1] per sample (e.g. `adaface.norm_quality`), never differentiated.
  """
  intra, inter = sface_loss_terms(cos_theta, labels, scale=scale, k=k, a=a, b=b,
                                  quality=quality, shift=shift)
  return intra + inter


def quality_sface_v2_loss(cos_theta: Array, labels: Array, quality: Array, *,
                          scale: float = 64.0, k: float = 80.0, a: float = 0.8,
                          b: float = 1.23, gamma: float = 1.0) -> Array:
  """Quality-aware SFace v2: r_intra's height 1 + γ·ẑ_i (module doc).

  `quality` is ẑ ∈ [−1, 1] per sample (e.g. `adaface.norm_quality`), never differentiated.
  """
  intra, inter = sface_loss_terms(cos_theta, labels, scale=scale, k=k, a=a, b=b,
                                  quality=quality, gamma=gamma)
  return intra + inter
