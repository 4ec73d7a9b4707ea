"""Loss heads against independent NumPy float64 references.

Each reference below is written from the paper's formula (arccos, explicit k, loops), not from
the implementation's tricks (sin/cos identities, Chebyshev polynomials, masks). Forward values
must agree to 1e-5 relative, gradients to 1e-4 relative (normwise: max |error| / max |ref|),
the gradients being central finite differences of the float64 reference (or its closed form).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from references import assert_close, fd_grad, np_ce, rel_error
from sface_jax.configs import base
from sface_jax import heads
from sface_jax.heads import adaface as adaface_lib

FORWARD_TOL = 1e-5
GRAD_TOL = 1e-4


# ---------------------------------------------------------------------------------------
# Helpers and NumPy float64 references.


def np_cos(x, w):
  x = x / np.linalg.norm(x, axis=1, keepdims=True)
  w = w / np.linalg.norm(w, axis=0, keepdims=True)
  return x @ w


def np_margin_target(c, m1, m2, m3, easy_margin=False, fallback=True):
  theta = np.arccos(np.clip(c, -1.0, 1.0))
  margined = np.cos(m1 * theta + m2) - m3
  if easy_margin:
    return np.where(c > 0, margined, c)
  if not fallback:  # arcface_torch: the bare formula everywhere
    return margined
  limit = (np.pi - m2) / m1
  if m1 == 1.0:
    fallback = c - m2 * np.sin(m2) - m3  # Deng et al.'s reference fallback
  else:
    fallback = c - (1.0 + np.cos(limit)) - m3  # continuous at the limit
  return np.where(theta <= limit, margined, fallback)


def np_with_target(cos, labels, target_fn):
  out = np.array(cos, np.float64)
  rows = np.arange(len(labels))
  out[rows, labels] = target_fn(out[rows, labels])
  return out


def np_psi(c, m):
  theta = np.arccos(np.clip(c, -1.0, 1.0))
  k = np.minimum(np.floor(m * theta / np.pi), m - 1)
  return (-1.0) ** k * np.cos(m * theta) - 2.0 * k


def np_sphereface_lambda(step, base_, gamma, power, lambda_min):
  """The reference codes' λ: their iteration counter is incremented before λ is computed, so
  the step that follows `step` completed steps uses iteration = step + 1."""
  iteration = step + 1
  return max(lambda_min, base_ * (1.0 + gamma * iteration) ** (-power))


def np_sface_weights(cos, labels, s, k, a, b, a_per_sample=None, height=None):
  """(B, C) gradient matrix G; loss = Σ G ⊙ cos. Quality-aware SFace: v1 gives each sample
  its own sigmoid centre (`a_per_sample`), v2 its own height (`height`)."""
  batch = cos.shape[0]
  theta = np.arccos(np.clip(cos, -1.0, 1.0))
  centers = np.full(batch, a) if a_per_sample is None else a_per_sample
  heights = np.ones(batch) if height is None else height
  g = s / batch / (1.0 + np.exp(k * (theta - b)))  # r_inter
  for i, y in enumerate(labels):
    g[i, y] = -s / batch * heights[i] / (1.0 + np.exp(-k * (theta[i, y] - centers[i])))
  return g


def np_sface_terms(cos, labels, s, k, a, b, a_per_sample=None, height=None):
  g = np_sface_weights(cos, labels, s, k, a, b, a_per_sample, height)
  mask = np.zeros(cos.shape, bool)
  mask[np.arange(len(labels)), labels] = True
  return float(np.sum((g * cos)[mask])), float(np.sum((g * cos)[~mask]))


def np_norm_stats(norms, mean, std, momentum):
  norms = np.clip(norms, 0.001, 100.0)
  batch_std = np.std(norms, ddof=0)  # our choice (adaface.py): global batch, ddof = 0
  return (momentum * norms.mean() + (1 - momentum) * mean,
          momentum * batch_std + (1 - momentum) * std)


def np_quality(norms, mean, std, h):
  return np.clip((np.clip(norms, 0.001, 100.0) - mean) / (std + 1e-3) * h, -1.0, 1.0)


def np_adaface_target(c, z, m, official_clamp=True):
  """mk-minchul/AdaFace head.py: cos clamped to ±(1 − eps), θ + g to [eps, π − eps]."""
  eps = 1e-3 if official_clamp else 0.0
  theta = np.arccos(np.clip(c, -1.0 + eps, 1.0 - eps))
  return np.cos(np.clip(theta - m * z, eps, np.pi - eps)) - (m * z + m)


def np_adaface_logits(cos, labels, z, m, scale, official_clamp=True):
  eps = 1e-3 if official_clamp else 0.0
  out = np.clip(np.array(cos, np.float64), -1.0 + eps, 1.0 - eps)  # every class clamped
  rows = np.arange(len(labels))
  out[rows, labels] = np_adaface_target(np.asarray(cos, np.float64)[rows, labels], z, m,
                                        official_clamp)
  return scale * out


def np_triplet(x, labels, margin):
  x = x / np.linalg.norm(x, axis=1, keepdims=True)
  losses = []
  for i in range(len(labels)):
    pos = [np.sum((x[i] - x[j]) ** 2) for j in range(len(labels))
           if j != i and labels[j] == labels[i]]
    neg = [np.sum((x[i] - x[j]) ** 2) for j in range(len(labels)) if labels[j] != labels[i]]
    if pos and neg:
      losses.append(max(0.0, max(pos) - min(neg) + margin))
  return float(np.mean(losses)) if losses else 0.0


def head_config(name):
  config = base.get_config().head
  config.name = name
  return config


HEAD_NAMES = ('softmax', 'normface', 'sphereface', 'cosface', 'arcface', 'combined', 'sface',
              'quality_sface', 'quality_sface_v2', 'adaface', 'center', 'triplet')

# Margin settings for `margin_logits`: (name, kwargs).
MARGIN_CASES = {
    'normface': dict(),
    'cosface': dict(m3=0.35),
    'arcface': dict(m2=0.5),
    'arcface_easy': dict(m2=0.5, easy_margin=True),
    'combined': dict(m1=1.0, m2=0.3, m3=0.2),
    'combined_m1': dict(m1=2.0, m2=0.1, m3=0.05),
}


def random_cos(rng, batch, num_classes, labels):
  cos = rng.uniform(-0.98, 0.98, size=(batch, num_classes))
  # Targets spread over the whole range, including ArcFace's fallback region (θ > π − m).
  cos[np.arange(batch), labels] = np.linspace(-0.97, 0.97, batch)
  return cos.astype(np.float32)


def test_fast_arccos_against_float64():
  from sface_jax.heads import common
  c = np.concatenate([np.linspace(-1.0, 1.0, 400_001), [-0.5, 0.5, -1e-30, 0.0]])
  c = c.astype(np.float32)
  expected = np.arccos(c.astype(np.float64))
  actual = np.asarray(jax.jit(common.arccos)(c), np.float64)
  assert np.max(np.abs(actual - expected)) <= 5e-7
  assert np.max(np.abs(actual - expected) / np.maximum(expected, 1e-30)) <= 1e-6
  np.testing.assert_array_equal(np.asarray(common.arccos(np.float32([1.0, 1.5]))), 0.0)
  np.testing.assert_allclose(np.asarray(common.arccos(np.float32([-1.0, -2.0]))), np.pi,
                             rtol=1e-7)


# ---------------------------------------------------------------------------------------
# Margin family (NormFace, CosFace, ArcFace, combined).


@pytest.mark.parametrize('case', sorted(MARGIN_CASES))
def test_margin_logits_against_reference(case):
  kwargs = MARGIN_CASES[case]
  m1, m2, m3 = kwargs.get('m1', 1.0), kwargs.get('m2', 0.0), kwargs.get('m3', 0.0)
  easy = kwargs.get('easy_margin', False)
  rng = np.random.default_rng(1)
  labels = np.array([0, 6, 3, 6, 1, 0, 5, 2], np.int32)
  cos = random_cos(rng, len(labels), 7, labels)
  scale = 64.0

  def reference_logits(c):
    return scale * np_with_target(c, labels, lambda t: np_margin_target(t, m1, m2, m3, easy))

  logits = heads.margin_logits(cos, labels, scale=scale, **kwargs)
  assert logits.dtype == jnp.float32
  assert_close(logits, reference_logits(cos.astype(np.float64)), FORWARD_TOL, case)

  loss_fn = lambda c: heads.cross_entropy(heads.margin_logits(c, labels, scale=scale,
                                                               **kwargs), labels)
  assert_close(loss_fn(cos), np_ce(reference_logits(cos.astype(np.float64)), labels),
               FORWARD_TOL, case)
  expected = fd_grad(lambda c: np_ce(reference_logits(c), labels), cos)
  assert_close(jax.jit(jax.grad(loss_fn))(cos), expected, GRAD_TOL, case)


def dense_target_logits(m1, m2, m3, insightface_grad, num=200_001):
  theta = np.linspace(0.0, np.pi, num)
  cos = np.cos(theta).astype(np.float32)[:, None]
  labels = np.zeros(num, np.int32)
  logits = heads.margin_logits(cos, labels, scale=64.0, m1=m1, m2=m2, m3=m3,
                               insightface_grad=insightface_grad)
  return np.asarray(logits[:, 0], np.float64)


def is_non_increasing(values, tol=1e-4):
  """tol absorbs float32 rounding of s·cos (s = 64): ~1e-5; real violations are ≥ 1."""
  return bool(np.all(np.diff(values) <= tol))


@pytest.mark.parametrize('margins', [(1.0, 0.5, 0.0), (1.0, 0.3, 0.2), (2.0, 0.1, 0.05),
                                     (1.0, 0.0, 0.35)])
def test_target_logit_non_increasing_in_theta(margins):
  values = dense_target_logits(*margins, False)
  assert np.all(np.isfinite(values))
  assert is_non_increasing(values), np.max(np.diff(values))


@pytest.mark.parametrize('margins', [(1.0, 0.5, 0.0), (1.0, 0.3, 0.2), (2.0, 0.1, 0.05),
                                     (1.0, 0.0, 0.35)])
def test_insightface_mode_value_is_the_bare_formula(margins):
  """arcface_torch's value: cos(m1·θ + m2) − m3 everywhere, rising again past θ* (no
  fallback); equal to our default below θ*."""
  m1, m2, m3 = margins
  # θ of the float32 cosines the heads see (float32 rounds cos θ to 1 for θ < 3e-4).
  theta = np.arccos(np.cos(np.linspace(0.0, np.pi, 20_001)).astype(np.float32).astype(
      np.float64))
  values = dense_target_logits(*margins, True, num=20_001)
  assert_close(values, 64.0 * (np.cos(m1 * theta + m2) - m3), FORWARD_TOL, 'bare formula')
  default = dense_target_logits(*margins, False, num=20_001)
  below = theta <= (np.pi - m2) / m1 - 1e-3
  np.testing.assert_allclose(values[below], default[below], rtol=0, atol=1e-4)
  if m1 * np.pi + m2 > np.pi + 1e-2:  # the bare curve passes π: it is not monotonic
    assert not is_non_increasing(values)


def test_monotonicity_check_catches_the_naive_arcface_curve():
  theta = np.linspace(0.0, np.pi, 200_001)
  assert not is_non_increasing(64.0 * np.cos(theta + 0.5))
  assert is_non_increasing(64.0 * np_margin_target(np.cos(theta), 1.0, 0.5, 0.0))


def test_insightface_grad_mode_is_plain_cos_gradient_on_target():
  rng = np.random.default_rng(2)
  labels = np.array([0, 4, 2, 4], np.int32)
  cos = random_cos(rng, 4, 5, labels)
  cotangent = rng.normal(size=cos.shape).astype(np.float32)
  scale, m = 64.0, 0.5

  def value_and_vjp(c, t, insightface_grad):
    value, vjp = jax.vjp(lambda c_: heads.margin_logits(
        c_, labels, scale=scale, m2=m, insightface_grad=insightface_grad), c)
    return value, vjp(t)[0]

  value_and_vjp = jax.jit(value_and_vjp, static_argnums=2)
  exact_value, exact_grad = value_and_vjp(cos, cotangent, False)
  insight_value, insight_grad = value_and_vjp(cos, cotangent, True)
  # Values: the default's below π − m (c + stop_gradient(t − c) rounds to t within an ulp or
  # two of s·t), the bare s·cos(θ + m) past it.
  c64 = cos.astype(np.float64)
  rows = np.arange(4)
  past = np.zeros(cos.shape, bool)
  past[rows, labels] = np.arccos(c64[rows, labels]) + m > np.pi
  assert past.any()  # the target at cos θ = −0.97 is past π − m
  np.testing.assert_allclose(np.asarray(insight_value)[~past], np.asarray(exact_value)[~past],
                             rtol=1e-6, atol=1e-5)
  bare = scale * np.cos(np.arccos(c64) + m)
  assert_close(np.asarray(insight_value)[past], bare[past], FORWARD_TOL, 'bare past pi - m')
  assert np.all(np.asarray(insight_value)[past] > np.asarray(exact_value)[past])
  # insightface mode: d logit / d cos = s everywhere, target included.
  np.testing.assert_allclose(insight_grad, scale * cotangent, rtol=1e-6)
  # exact mode: on the target, s·d cos(θ+m)/d cos θ = s·(cos m + sin m·cos θ / sin θ).
  c = c64
  factor = np.ones_like(c)
  in_margin = np.arccos(c[rows, labels]) + m <= np.pi
  factor[rows, labels] = np.where(
      in_margin, np.cos(m) + np.sin(m) * c[rows, labels] / np.sqrt(1 - c[rows, labels] ** 2),
      1.0)
  exact_grad = np.asarray(exact_grad)
  assert_close(exact_grad, scale * factor * cotangent, GRAD_TOL, 'exact arcface vjp')
  assert rel_error(exact_grad, scale * cotangent) > 1e-2  # the two modes differ
  # Through the loss: insightface gives s·(softmax(margined logits) − onehot)/B.
  loss_grad = jax.jit(jax.grad(lambda c, ig: heads.cross_entropy(
      heads.margin_logits(c, labels, scale=scale, m2=m, insightface_grad=ig), labels)),
                      static_argnums=1)
  probs = np.asarray(jax.nn.softmax(insight_value), np.float64)
  onehot = np.eye(5)[labels]
  assert_close(loss_grad(cos, True), scale * (probs - onehot) / 4, GRAD_TOL, 'insight')
  assert rel_error(loss_grad(cos, False), loss_grad(cos, True)) > 1e-2


def test_logits_with_target_hand_over_the_target_column():
  """`*_with_target` returns logits[i, y_i]; CE with it handed over == CE reading it back."""
  rng = np.random.default_rng(12)
  labels = np.array([0, 4, 2, 4], np.int32)
  cos = random_cos(rng, 4, 5, labels)
  quality = np.array([-1.0, 0.5, 0.0, 1.0], np.float32)
  pairs = {
      'arcface': lambda c: heads.margin_logits_with_target(c, labels, scale=64.0, m2=0.5),
      'normface': lambda c: heads.margin_logits_with_target(c, labels, scale=64.0),
      'sphereface': lambda c: heads.sphereface_logits_with_target(
          c, jnp.full(4, 7.0), labels, m=4, lambda_=5.0),
      'adaface': lambda c: heads.adaface_logits_with_target(c, labels, quality),
  }

  @jax.jit
  def both(c):
    out = {}
    for name, fn in pairs.items():
      handed = lambda c_: heads.cross_entropy(*fn(c_)[:1], labels, target_logits=fn(c_)[1])
      read_back = lambda c_: heads.cross_entropy(fn(c_)[0], labels)
      out[name] = (fn(c), jax.value_and_grad(handed)(c), jax.value_and_grad(read_back)(c))
    return out

  for name, ((logits, target), handed, read_back) in both(cos).items():
    np.testing.assert_allclose(np.asarray(logits)[np.arange(4), labels], target, rtol=1e-6)
    assert_close(handed[0], read_back[0], 1e-6, name)
    assert_close(handed[1], read_back[1], 1e-6, name)


def test_margin_logits_rejects_bad_margins():
  with pytest.raises(ValueError, match='m2'):
    heads.margin_logits(jnp.zeros((1, 2)), jnp.zeros(1, jnp.int32), scale=64.0, m2=-0.1)


# ---------------------------------------------------------------------------------------
# SphereFace.


def test_sphereface_psi_and_lambda():
  theta = np.linspace(0.0, np.pi, 20_001)
  c = np.cos(theta).astype(np.float32)
  for m in (1, 2, 3, 4):
    psi = np.asarray(heads.sphereface_psi(c, m), np.float64)
    assert_close(psi, np_psi(c.astype(np.float64), m), FORWARD_TOL, f'psi m={m}')
    assert np.all(np.diff(psi) <= 1e-5), m  # ψ is decreasing: 1 → 1 − 2m
    np.testing.assert_allclose([psi[0], psi[-1]], [1.0, 1.0 - 2 * m], atol=1e-5)
  for step in (0, 1, 100, 10_000, 10**7):
    expected = np_sphereface_lambda(step, 1000.0, 0.12, 1.0, 5.0)
    actual = heads.sphereface_lambda(jnp.int32(step), base=1000.0, gamma=0.12, power=1.0,
                                     lambda_min=5.0)
    assert actual.dtype == jnp.float32
    assert_close(actual, expected, FORWARD_TOL, f'lambda step={step}')


@pytest.mark.parametrize('lambda_', [0.0, 5.0])
def test_sphereface_logits_against_reference(lambda_):
  rng = np.random.default_rng(3)
  labels = np.array([0, 5, 2, 5, 1, 3], np.int32)
  cos = random_cos(rng, 6, 6, labels)
  norms = rng.uniform(0.5, 30.0, size=6).astype(np.float32)

  def reference(c, n):
    target = lambda t: (lambda_ * t + np_psi(t, 4)) / (1 + lambda_)
    return n[:, None] * np_with_target(c, labels, target)

  logits_fn = lambda c, n: heads.sphereface_logits(c, n, labels, m=4, lambda_=lambda_)
  loss = lambda c, n: heads.cross_entropy(logits_fn(c, n), labels)
  logits, (grad_cos, grad_norms) = jax.jit(
      lambda c, n: (logits_fn(c, n), jax.grad(loss, argnums=(0, 1))(c, n)))(cos, norms)
  assert_close(logits, reference(cos.astype(np.float64), norms.astype(np.float64)),
               FORWARD_TOL, 'sphereface logits')
  n64 = norms.astype(np.float64)
  c64 = cos.astype(np.float64)
  assert_close(grad_cos, fd_grad(lambda c: np_ce(reference(c, n64), labels), c64), GRAD_TOL,
               'd/dcos')
  assert_close(grad_norms, fd_grad(lambda n: np_ce(reference(c64, n), labels), n64),
               GRAD_TOL, 'd/dnorm')


# ---------------------------------------------------------------------------------------
# SFace and quality-aware SFace.


def naive_sface_loss(cos, labels, scale, k, a, b, a_per_sample=None):
  """The formula with stop_gradient around the sigmoid weights (what custom_vjp must match)."""
  cos = jnp.asarray(cos, jnp.float32)
  theta = jnp.arccos(jnp.clip(cos, -1.0, 1.0))
  onehot = jax.nn.one_hot(labels, cos.shape[1], dtype=jnp.float32)
  centers = a if a_per_sample is None else a_per_sample[:, None]
  r_intra = jax.lax.stop_gradient(jax.nn.sigmoid(k * (theta - centers)))
  r_inter = jax.lax.stop_gradient(jax.nn.sigmoid(-k * (theta - b)))
  per_sample = (-scale * jnp.sum(onehot * r_intra * cos, axis=1)
                + scale * jnp.sum((1 - onehot) * r_inter * cos, axis=1))
  return jnp.mean(per_sample)


def sface_inputs(seed=4):
  rng = np.random.default_rng(seed)
  labels = np.array([0, 9, 3, 9, 1, 0, 7, 2], np.int32)
  cos = rng.uniform(-0.6, 0.8, size=(8, 10))
  # Angles around a and b, where the sigmoids change, so the weights are not all 0 or 1.
  cos[:, :5] = np.cos(rng.uniform(1.1, 1.35, size=(8, 5)))
  cos[np.arange(8), labels] = np.cos(np.linspace(0.6, 1.0, 8))
  return cos.astype(np.float32), labels


def test_sface_custom_vjp_equals_closed_form_and_stop_gradient_formula():
  cos, labels = sface_inputs()
  params = dict(scale=64.0, k=80.0, a=0.8, b=1.23)
  c64 = cos.astype(np.float64)
  intra, inter = np_sface_terms(c64, labels, 64.0, 80.0, 0.8, 1.23)
  assert_close(heads.sface_loss(cos, labels, **params), intra + inter, FORWARD_TOL, 'loss')
  terms = heads.sface_loss_terms(cos, labels, **params)
  assert_close(np.array(terms), np.array([intra, inter]), FORWARD_TOL, 'terms')

  grad = np.asarray(jax.grad(heads.sface_loss)(cos, labels, **params))
  closed_form = np_sface_weights(c64, labels, 64.0, 80.0, 0.8, 1.23)
  assert_close(grad, closed_form, GRAD_TOL, 'custom vjp vs closed form')
  naive = jax.grad(naive_sface_loss)(cos, labels, 64.0, 80.0, 0.8, 1.23)
  assert_close(grad, naive, GRAD_TOL, 'custom vjp vs stop_gradient formula')
  # The weights are constants by definition: the true derivative of the value differs.
  true_derivative = fd_grad(lambda c: sum(np_sface_terms(c, labels, 64.0, 80.0, 0.8, 1.23)),
                            c64)
  assert rel_error(grad, true_derivative) > 1e-1
  # Each term carries its own part of the gradient.
  intra_grad = jax.grad(lambda c: heads.sface_loss_terms(c, labels, **params)[0])(cos)
  mask = np.zeros(cos.shape, bool)
  mask[np.arange(8), labels] = True
  assert_close(intra_grad, np.where(mask, closed_form, 0.0), GRAD_TOL, 'intra part')


def test_angle_stats_against_reference():
  cos, labels = sface_inputs()
  c64 = cos.astype(np.float64)
  rows = np.arange(len(labels))
  theta = np.degrees(np.arccos(c64))
  nearest = np.where(np.eye(10, dtype=bool)[labels], np.inf, theta).min(axis=1)
  stats = heads.angle_stats(cos, labels)
  assert_close(stats['theta_target'], theta[rows, labels].mean(), FORWARD_TOL, 'theta_y')
  assert_close(stats['theta_nearest_negative'], nearest.mean(), FORWARD_TOL, 'min theta_j')


def test_quality_sface_weight_increases_with_quality():
  """High quality (ẑ > 0): hard samples keep the full pull; low quality: weaker pull."""
  qualities = np.linspace(-1.0, 1.0, 21).astype(np.float32)
  for theta_y in (0.6, 0.75, 0.8, 0.85, 0.95, 1.2):  # easy, at a, hard, very hard
    cos = np.full((21, 3), 0.0, np.float32)
    cos[:, 0] = math.cos(theta_y)
    labels = np.zeros(21, np.int32)
    grad = jax.grad(heads.quality_sface_loss)(cos, labels, qualities, scale=64.0, k=80.0,
                                              a=0.8, b=1.23, shift=0.1)
    weight = -np.asarray(grad[:, 0], np.float64) * 21 / 64.0  # r_intra(θ_y; ẑ)
    expected = 1.0 / (1.0 + np.exp(-80.0 * (theta_y - 0.8 + 0.1 * qualities)))
    assert_close(weight, expected, GRAD_TOL, f'r_intra at theta={theta_y}')
    assert np.all(np.diff(weight) >= 0), (theta_y, weight)  # float32 saturates near 0, 1
    if theta_y < 1.0:
      assert weight[-1] > weight[0], (theta_y, weight)
  np.testing.assert_allclose(heads.quality_intra_center(jnp.array([-1.0, 0.0, 1.0]), a=0.8,
                                                        shift=0.1), [0.9, 0.8, 0.7], rtol=1e-6)


def test_quality_sface_against_closed_form():
  cos, labels = sface_inputs(5)
  quality = np.linspace(-1.0, 1.0, 8).astype(np.float32)
  a_i = 0.8 - 0.1 * quality.astype(np.float64)
  c64 = cos.astype(np.float64)
  params = dict(scale=64.0, k=80.0, a=0.8, b=1.23, shift=0.1)
  value, (grad, grad_quality) = jax.value_and_grad(heads.quality_sface_loss,
                                                   argnums=(0, 2))(cos, labels, quality,
                                                                   **params)
  assert_close(value, sum(np_sface_terms(c64, labels, 64.0, 80.0, 0.8, 1.23, a_i)),
               FORWARD_TOL, 'quality sface loss')
  assert_close(grad, np_sface_weights(c64, labels, 64.0, 80.0, 0.8, 1.23, a_i), GRAD_TOL,
               'quality sface grad')
  naive = jax.grad(naive_sface_loss)(cos, labels, 64.0, 80.0, 0.8, 1.23, jnp.asarray(a_i))
  assert_close(grad, naive, GRAD_TOL, 'quality vs stop_gradient formula')
  np.testing.assert_array_equal(grad_quality, 0.0)  # quality is not back-propagated
  # ẑ = 0 is SFace.
  assert_close(heads.quality_sface_loss(cos, labels, np.zeros(8, np.float32), **params),
               heads.sface_loss(cos, labels, scale=64.0, k=80.0, a=0.8, b=1.23), 1e-6, 'z=0')


def test_quality_sface_v2_against_closed_form():
  cos, labels = sface_inputs(5)
  quality = np.linspace(-1.0, 1.0, 8).astype(np.float32)
  height = 1.0 + 0.7 * quality.astype(np.float64)
  c64 = cos.astype(np.float64)
  params = dict(scale=64.0, k=80.0, a=0.8, b=1.23, gamma=0.7)
  value, (grad, grad_quality) = jax.value_and_grad(heads.quality_sface_v2_loss,
                                                   argnums=(0, 2))(cos, labels, quality,
                                                                   **params)
  assert_close(value, sum(np_sface_terms(c64, labels, 64.0, 80.0, 0.8, 1.23, height=height)),
               FORWARD_TOL, 'v2 loss')
  assert_close(grad, np_sface_weights(c64, labels, 64.0, 80.0, 0.8, 1.23, height=height),
               GRAD_TOL, 'v2 grad')
  np.testing.assert_array_equal(grad_quality, 0.0)  # quality is not back-propagated
  # ẑ = 0 (or γ = 0) is SFace.
  sface = heads.sface_loss(cos, labels, scale=64.0, k=80.0, a=0.8, b=1.23)
  assert_close(heads.quality_sface_v2_loss(cos, labels, np.zeros(8, np.float32), **params),
               sface, 1e-6, 'z=0')
  assert_close(heads.quality_sface_v2_loss(cos, labels, quality, **{**params, 'gamma': 0.0}),
               sface, 1e-6, 'gamma=0')
  with pytest.raises(ValueError, match='gamma'):
    heads.quality_sface_v2_loss(cos, labels, quality, gamma=1.5)
  with pytest.raises(ValueError, match='quality_sface_v2.gamma'):
    config = head_config('quality_sface_v2')
    config.quality_sface_v2.gamma = -0.1
    heads.get_head(config)


def test_quality_sface_v2_pulls_hard_samples_by_quality_where_v1_cannot():
  """The seed's ask on hard samples (θ_y ≫ a): more pull (|∂L/∂cos θ_y|) than SFace for a
  high-quality sample, less for a low-quality one, SFace's at ẑ = 0; per the float64
  closed form. v1 (centre shift 0.1, k = 80) gives SFace's pull there: the negative result."""
  a, k, s = 0.8, 80.0, 64.0
  qualities = np.array([-1.0, -0.5, -0.1, 0.0, 0.1, 0.5, 1.0], np.float32)
  n = qualities.size
  for theta_y in (a + 0.2, a + 0.5, 1.6):  # hard: 16, 40 and 64 times 1/k above a
    cos = np.zeros((n, 3), np.float32)  # other centres at 90°: r_inter ≈ 0 for b = 1.23
    cos[:, 0] = math.cos(theta_y)
    labels = np.zeros(n, np.int32)
    params = dict(scale=s, k=k, a=a, b=1.23)
    pull = lambda loss, **kw: -np.asarray(jax.grad(loss)(cos, labels, **kw)[:, 0], np.float64)
    sface = pull(lambda c, l: heads.sface_loss(c, l, **params))
    v2 = pull(lambda c, l: heads.quality_sface_v2_loss(c, l, qualities, gamma=1.0, **params))
    v1 = pull(lambda c, l: heads.quality_sface_loss(c, l, qualities, shift=0.1, **params))
    theta64 = math.acos(float(cos[0, 0]))
    r = 1.0 / (1.0 + math.exp(-k * (theta64 - a)))
    expected = s / n * (1.0 + qualities.astype(np.float64)) * r
    assert_close(v2, expected, GRAD_TOL, f'v2 pull at theta={theta_y}')
    high, low, zero = qualities > 0, qualities < 0, qualities == 0
    assert np.all(v2[high] > sface[high] * (1 + 0.05 * qualities[high])), (theta_y, v2, sface)
    assert np.all(v2[low] < sface[low] * (1 + 0.05 * qualities[low])), (theta_y, v2, sface)
    assert_close(v2[zero], sface[zero], 1e-6, 'v2 = SFace at z = 0')
    assert np.all(np.diff(v2) > 0)  # strictly increasing in quality
    assert v2[0] == 0.0  # γ = 1, ẑ = −1: no pull at all
    # v1 on the same hard samples: SFace's pull to float32 round-off, whatever the quality.
    assert_close(v1, sface, 1e-3, f'v1 at theta={theta_y}')


# ---------------------------------------------------------------------------------------
# AdaFace.


def test_adaface_norm_statistics_and_quality():
  rng = np.random.default_rng(6)
  norms = rng.uniform(5.0, 40.0, size=16).astype(np.float32)
  norms[0] = 150.0  # clipped to 100
  state = heads.init_norm_stats()
  expected = (20.0, 100.0)
  for _ in range(3):
    state = heads.update_norm_stats(norms, state, momentum=0.01)
    expected = np_norm_stats(norms.astype(np.float64), *expected, 0.01)
  assert state['norm_mean'].dtype == jnp.float32
  assert_close([state['norm_mean'], state['norm_std']], expected, FORWARD_TOL, 'stats')
  big = heads.update_norm_stats(norms, {'norm_mean': jnp.float32(15.0),
                                        'norm_std': jnp.float32(3.0)}, momentum=0.5)
  assert_close([big['norm_mean'], big['norm_std']],
               np_norm_stats(norms.astype(np.float64), 15.0, 3.0, 0.5), FORWARD_TOL, 'a=0.5')
  quality = heads.norm_quality(norms, big, h=0.333)
  expected_quality = np_quality(norms.astype(np.float64), float(big['norm_mean']),
                                float(big['norm_std']), 0.333)
  assert_close(quality, expected_quality, FORWARD_TOL, 'quality')
  assert np.any(np.abs(expected_quality) == 1.0)  # the clip is exercised
  # A batch of one: population std (0), no NaN (torch.std would be NaN here).
  one = heads.update_norm_stats(norms[:1], heads.init_norm_stats(), momentum=0.01)
  assert_close([one['norm_mean'], one['norm_std']],
               np_norm_stats(np.array([100.0]), 20.0, 100.0, 0.01), FORWARD_TOL, 'B=1')


def test_first_batch_statistics_warm_up_at_once():
  """first_batch_stats: step 0 sets μ, σ to the batch's own (population) mean and std, later
  steps move them by the momentum; off (AdaFace's default, the official rule), step 0 moves
  20 and 100 by the momentum. Opt-in for AdaFace through its config."""
  x, w, _, _ = head_inputs()
  norms = np.linalg.norm(x.astype(np.float64), axis=1)
  batch = (norms.mean(), norms.std())
  for name, opt_in in (('quality_sface', None), ('quality_sface_v2', None), ('adaface', None),
                       ('adaface', True)):
    config = head_config(name)
    if opt_in is not None:
      config[name].first_batch_stats = opt_in
    head = heads.get_head(config)
    state = head.init_state(C, D)
    first = numpy_state(run_head(head, x, LABELS, w, None, state, jnp.int32(0))[1])
    second = numpy_state(run_head(head, x, LABELS, w, None, first, jnp.int32(1))[1])
    momentum = config[name].momentum
    if config[name].first_batch_stats:
      expected_first = batch
    else:
      expected_first = np_norm_stats(norms, 20.0, 100.0, momentum)
      assert name == 'adaface'  # only AdaFace keeps the official start by default
    assert_close([first['norm_mean'], first['norm_std']], expected_first, FORWARD_TOL, name)
    assert_close([second['norm_mean'], second['norm_std']],
                 np_norm_stats(norms, *expected_first, momentum), FORWARD_TOL, name)


@pytest.mark.parametrize('official_clamp', [True, False])
def test_adaface_logits_against_reference(official_clamp):
  rng = np.random.default_rng(7)
  labels = np.array([0, 5, 2, 5, 1, 3, 4, 0], np.int32)
  cos = random_cos(rng, 8, 6, labels)
  cos[1, 5] = 0.99  # θ_y < m: θ + g_angle < 0 is clipped for high quality
  # |cos| > 0.999: the official clamp changes these (non-target and target) logits.
  cos[2, 0], cos[3, 1], cos[6, 4] = 0.9995, -0.9996, 0.9997
  quality = np.array([-1.0, 1.0, 0.3, -0.2, 0.0, 1.0, -1.0, 0.7], np.float32)
  z = quality.astype(np.float64)

  def reference(c):
    return np_adaface_logits(c, labels, z, 0.4, 64.0, official_clamp)

  logits_fn = lambda c: heads.adaface_logits(c, labels, quality, scale=64.0, m=0.4,
                                             official_clamp=official_clamp)
  loss = lambda c: heads.cross_entropy(logits_fn(c), labels)
  logits, grad = jax.jit(lambda c: (logits_fn(c), jax.grad(loss)(c)))(cos)
  assert_close(logits, reference(cos.astype(np.float64)), FORWARD_TOL, 'adaface logits')
  assert_close(grad, fd_grad(lambda c: np_ce(reference(c), labels), cos.astype(np.float64)),
               GRAD_TOL, 'grad')
  # Target non-increasing in θ for every quality.
  theta = np.linspace(0.0, np.pi, 20_001)
  for q in (-1.0, -0.5, 0.0, 0.5, 1.0):
    target = adaface_lib.adaface_target(np.cos(theta).astype(np.float32),
                                        np.full(theta.shape, q, np.float32), m=0.4,
                                        official_clamp=official_clamp)
    assert np.all(np.diff(np.asarray(target, np.float64)) <= 2e-6), q


# ---------------------------------------------------------------------------------------
# Softmax, classifier, center loss, triplet.


def test_class_centers_and_cosine_logits():
  module = heads.ClassCenters(num_classes=7, embedding_dim=5, use_bias=True)
  variables = module.init(jax.random.key(0))
  params = variables['params']
  assert set(params) == {'class_centers', 'bias'}
  assert params['class_centers'].shape == (5, 7) and params['bias'].shape == (7,)
  assert params['class_centers'].dtype == jnp.float32
  w, b = module.apply(variables)
  assert w.shape == (5, 7) and b.shape == (7,)
  no_bias = heads.ClassCenters(7, 5, False).init(jax.random.key(0))['params']
  assert set(no_bias) == {'class_centers'}

  rng = np.random.default_rng(8)
  x = rng.normal(size=(3, 5)).astype(np.float32)
  cos = heads.cosine_logits(jnp.asarray(x, jnp.bfloat16), w)
  assert cos.dtype == jnp.float32
  expected = np_cos(np.asarray(jnp.asarray(x, jnp.bfloat16), np.float64),
                    np.asarray(w, np.float64))
  assert_close(cos, expected, FORWARD_TOL, 'cosine logits')
  logits = heads.linear_logits(x, w, b)
  assert_close(logits, x.astype(np.float64) @ np.asarray(w, np.float64), FORWARD_TOL, 'Wx+b')


def test_update_centers_against_running_average_rule():
  rng = np.random.default_rng(9)
  x = rng.normal(size=(6, 3)).astype(np.float32)
  labels = np.array([0, 2, 2, 4, 2, 0], np.int32)
  centers = rng.normal(size=(5, 3)).astype(np.float32)
  expected = centers.astype(np.float64).copy()
  for j in range(5):
    members = [i for i in range(6) if labels[i] == j]
    delta = sum((centers[j].astype(np.float64) - x[i] for i in members), np.zeros(3))
    expected[j] -= 0.5 * delta / (1 + len(members))
  actual = heads.update_centers(x, labels, centers, alpha=0.5)
  assert_close(actual, expected, FORWARD_TOL, 'centres')
  # Absent classes stay put.
  np.testing.assert_array_equal(np.asarray(actual)[[1, 3]], centers[[1, 3]])


def test_triplet_without_valid_anchor_is_zero_not_nan():
  x = np.eye(3, 4, dtype=np.float32)
  for labels in ([0, 1, 2], [1, 1, 1], [0]):
    labels = np.array(labels, np.int32)
    xs = x[:len(labels)]
    loss_fn = lambda e, l: heads.batch_hard_triplet_loss(e, l, margin=0.2)[0]
    value, grad = jax.jit(jax.value_and_grad(loss_fn))(xs, labels)
    assert float(value) == 0.0
    assert np.all(np.asarray(grad) == 0.0)


# ---------------------------------------------------------------------------------------
# get_head: every head end to end, from embeddings and class centres.


B, D, C = 5, 6, 5
LABELS = np.array([0, 4, 2, 4, 0], np.int32)  # first and last class; triplet positives
STEP = 100_000  # SphereFace at λ_min = 5, where ψ matters


def head_inputs(seed=10):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(B, D)) * rng.uniform(2.0, 30.0, size=(B, 1))
  w = rng.normal(size=(D, C))
  bias = rng.normal(size=C) * 0.1
  centers = rng.normal(size=(C, D))
  return x.astype(np.float32), w.astype(np.float32), bias.astype(np.float32), \
      centers.astype(np.float32)


def reference_head(name, x, w, bias, state, step=STEP):
  """float64 loss, new state, and the constants the gradient treats as such."""
  config = head_config(name)
  scale = config.scale
  norms = np.linalg.norm(x, axis=1)
  cos = np_cos(x, w)
  if name in ('softmax', 'center'):
    logits = x @ w + bias
    if name == 'softmax':
      return np_ce(logits, LABELS), state, None
    c = config.center
    pull = 0.5 * np.mean(np.sum((x - state['centers'][LABELS]) ** 2, axis=1))
    new_centers = state['centers'].copy()
    for j in range(C):
      members = LABELS == j
      new_centers[j] -= c.alpha * np.sum(state['centers'][j] - x[members], axis=0) / (
          1 + members.sum())
    return np_ce(logits, LABELS) + c.weight * pull, {'centers': new_centers}, None
  if name in ('normface', 'cosface', 'arcface', 'combined'):
    m1, m2, m3 = {'normface': (1.0, 0.0, 0.0), 'cosface': (1.0, 0.0, config.cosface.m),
                  'arcface': (1.0, config.arcface.m, 0.0),
                  'combined': (config.combined.m1, config.combined.m2, config.combined.m3)}[name]
    logits = scale * np_with_target(cos, LABELS, lambda t: np_margin_target(t, m1, m2, m3))
    return np_ce(logits, LABELS), state, None
  if name == 'sphereface':
    c = config.sphereface
    lam = np_sphereface_lambda(STEP, c.base, c.gamma, c.power, c.lambda_min)
    logits = norms[:, None] * np_with_target(
        cos, LABELS, lambda t: (lam * t + np_psi(t, c.m)) / (1 + lam))
    return np_ce(logits, LABELS), state, None
  if name == 'sface':
    c = config.sface
    return sum(np_sface_terms(cos, LABELS, scale, c.k, c.a, c.b)), state, \
        np_sface_weights(cos, LABELS, scale, c.k, c.a, c.b)
  if name in ('adaface', 'quality_sface', 'quality_sface_v2'):
    c = config[name]
    momentum = 1.0 if c.first_batch_stats and step == 0 else c.momentum
    mean, std = np_norm_stats(norms, state['norm_mean'], state['norm_std'], momentum)
    z = np_quality(norms, mean, std, c.h)
    new_state = {'norm_mean': mean, 'norm_std': std}
    if name == 'adaface':
      return np_ce(np_adaface_logits(cos, LABELS, z, c.m, scale), LABELS), new_state, z
    a_i = c.a - c.shift * z if name == 'quality_sface' else None
    height = 1.0 + c.gamma * z if name == 'quality_sface_v2' else None
    return sum(np_sface_terms(cos, LABELS, scale, c.k, c.a, c.b, a_i, height)), new_state, \
        np_sface_weights(cos, LABELS, scale, c.k, c.a, c.b, a_i, height)
  if name == 'triplet':
    return np_triplet(x, LABELS, config.triplet.margin), state, None
  raise AssertionError(name)


def reference_loss_with_constants(name, x, w, bias, state, constants):
  """The reference loss as a function of (x, w, bias) with state-derived terms held fixed."""
  if name in ('sface', 'quality_sface', 'quality_sface_v2'):
    return float(np.sum(constants * np_cos(x, w)))  # sigmoid weights are constants
  if name == 'adaface':
    c = head_config(name)
    logits = np_adaface_logits(np_cos(x, w), LABELS, constants, c.adaface.m, c.scale)
    return np_ce(logits, LABELS)  # ẑ (from the norm) is a constant
  return reference_head(name, x, w, bias, state)[0]


def run_head(head, x, labels, w, b, state, step):
  """`head.loss` on one device, every class here (what `sharding.shard_head` does per
  device), as a function of the classifier parameters."""
  classifier = {}
  if head.uses_classifier:
    classifier['class_centers'] = w
  if head.uses_bias:
    classifier['bias'] = b
  inputs = heads.head_inputs(x, labels, classifier, num_classes=C if w is None else w.shape[1],
                             sample_rate=1.0, rng=jax.random.key(0), axis_name=None)
  return head.loss(inputs, state, step)


def numpy_state(state):
  return jax.tree.map(lambda v: np.array(v, np.float64), state)


# Every head at a late step; the heads with running norm statistics also at step 0, where
# quality SFace sets them from the batch and AdaFace (the official rule) moves 20 and 100.
REFERENCE_CASES = [(name, STEP) for name in HEAD_NAMES] + [
    (name, 0) for name in ('adaface', 'quality_sface', 'quality_sface_v2')]


@pytest.mark.parametrize('name,step', REFERENCE_CASES)
def test_head_against_reference(name, step):
  head = heads.get_head(head_config(name))
  x, w, bias, centers = head_inputs()
  state = head.init_state(C, D)
  if name == 'center':
    state = {'centers': jnp.asarray(centers)}  # non-zero centres exercise the update
  w_in = w if head.uses_classifier else None
  b_in = bias if head.uses_bias else None

  def loss_fn(x_, w_, b_):
    value, new_state, metrics = run_head(head, x_, LABELS, w_, b_, state, jnp.int32(step))
    return value, (new_state, metrics)

  (value, (new_state, metrics)), grads = jax.jit(jax.value_and_grad(
      loss_fn, argnums=(0, 1, 2), has_aux=True))(x, w_in, b_in)
  x64, w64, b64 = (a.astype(np.float64) for a in (x, w, bias))
  state64 = numpy_state(state)
  expected, expected_state, constants = reference_head(name, x64, w64, b64, state64, step)
  assert value.dtype == jnp.float32
  assert_close(value, expected, FORWARD_TOL, f'{name} loss')
  jax.tree.map(lambda a, e: assert_close(a, e, FORWARD_TOL, f'{name} state'),
               numpy_state(new_state), expected_state)

  ref = lambda x_, w_, b_: reference_loss_with_constants(name, x_, w_, b_, state64,
                                                         constants)
  assert_close(grads[0], fd_grad(lambda v: ref(v, w64, b64), x64), GRAD_TOL, f'{name} d/dx')
  if head.uses_classifier:
    assert_close(grads[1], fd_grad(lambda v: ref(x64, v, b64), w64), GRAD_TOL, f'{name} d/dW')
  if head.uses_bias:
    assert_close(grads[2], fd_grad(lambda v: ref(x64, w64, v), b64), GRAD_TOL, f'{name} d/db')

  for key, metric in metrics.items():
    assert metric.shape == () and metric.dtype == jnp.float32, key
  if head.uses_classifier:
    theta = np.degrees(np.arccos(np_cos(x64, w64)[np.arange(B), LABELS]))
    assert_close(metrics['theta_target'], theta.mean(), FORWARD_TOL, f'{name} theta')
    scores = x64 @ w64 if name in ('softmax', 'center') else np_cos(x64, w64)
    assert_close(metrics['accuracy'], np.mean(scores.argmax(1) == LABELS), 1e-6, name)


def edge_inputs():
  """cos θ = +1 exactly (label 0) and −1 exactly (label C − 1), and a plain third sample.

  bf16 embeddings (the values are exact in bf16): the heads must cast to float32.
  """
  w = 2.0 * np.eye(D, C, dtype=np.float32)
  x = np.zeros((3, D), np.float32)
  x[0, 0] = 3.0
  x[1, C - 1] = -2.0
  x[2, :] = 1.0
  return (jnp.asarray(x, jnp.bfloat16), w, np.zeros(C, np.float32),
          np.array([0, C - 1, 0], np.int32))


def test_every_head_jit_bf16_and_edge_cases():
  """All heads in one jitted program (one compile per batch shape) on bf16 embeddings."""
  all_heads = {name: heads.get_head(head_config(name)) for name in HEAD_NAMES}

  @jax.jit
  def step_fn(x_, w_, b_, labels):
    out = {}
    for name, head in all_heads.items():
      state = head.init_state(C, D)

      def loss_fn(x_, w_, b_):
        value, new_state, metrics = run_head(head, x_, labels, w_, b_, state, jnp.int32(3))
        return value, (new_state, metrics)

      out[name] = jax.value_and_grad(loss_fn, argnums=(0, 1, 2), has_aux=True)(
          x_, w_ if head.uses_classifier else None, b_ if head.uses_bias else None)
    return out

  x, w, bias, labels = edge_inputs()
  cases = {
      'cos=+1 and -1, labels 0 and C-1': (x, labels),
      'batch of one, cos=+1': (x[:1], labels[:1]),
      'batch of one, cos=-1': (x[1:2], labels[1:2]),
  }
  for case, (x_, labels_) in cases.items():
    for name, ((value, (new_state, metrics)), grads) in step_fn(x_, w, bias, labels_).items():
      where = (case, name)
      assert value.dtype == jnp.float32 and np.isfinite(float(value)), where
      for key, metric in metrics.items():
        assert metric.dtype == jnp.float32 and np.isfinite(float(metric)), (where, key)
      for leaf in jax.tree.leaves((grads, new_state)):
        assert np.all(np.isfinite(np.asarray(leaf, np.float32))), where
      assert grads[0].dtype == jnp.bfloat16, where
      if all_heads[name].uses_classifier:
        assert 0.0 <= metrics['theta_target'] <= 180.0, where


def test_cosine_level_functions_at_plus_minus_one():
  """Exact ±1 cosines (targets and non-targets): reference values, finite gradients."""
  cos = np.array([[1.0, -1.0, 0.0], [-1.0, 1.0, 1.0], [0.5, -1.0, -1.0]], np.float32)
  labels = np.array([0, 0, 2], np.int32)
  c64 = cos.astype(np.float64)
  quality = np.array([-1.0, 1.0, 0.0], np.float32)

  def margin_ref(m1, m2, m3):
    return lambda: np_ce(64.0 * np_with_target(
        c64, labels, lambda t: np_margin_target(t, m1, m2, m3)), labels)

  def adaface_ref(official_clamp=True):
    return lambda: np_ce(np_adaface_logits(c64, labels, quality.astype(np.float64), 0.4, 64.0,
                                           official_clamp), labels)

  functions = {
      'arcface': (lambda c: heads.cross_entropy(
          heads.margin_logits(c, labels, scale=64.0, m2=0.5), labels),
                  margin_ref(1.0, 0.5, 0.0)),
      'combined_m1': (lambda c: heads.cross_entropy(
          heads.margin_logits(c, labels, scale=64.0, m1=2.0, m2=0.1, m3=0.05), labels),
                      margin_ref(2.0, 0.1, 0.05)),
      'sphereface': (lambda c: heads.cross_entropy(
          heads.sphereface_logits(c, jnp.full(3, 10.0), labels, m=4, lambda_=5.0), labels),
                     lambda: np_ce(10.0 * np_with_target(
                         c64, labels, lambda t: (5.0 * t + np_psi(t, 4)) / 6.0), labels)),
      'sface': (lambda c: heads.sface_loss(c, labels),
                lambda: sum(np_sface_terms(c64, labels, 64.0, 80.0, 0.8, 1.23))),
      'adaface': (lambda c: heads.cross_entropy(
          heads.adaface_logits(c, labels, quality, scale=64.0), labels), adaface_ref()),
      'adaface_ours': (lambda c: heads.cross_entropy(
          heads.adaface_logits(c, labels, quality, scale=64.0, official_clamp=False), labels),
                       adaface_ref(False)),
  }
  for name, (fn, reference) in functions.items():
    value, grad = jax.jit(jax.value_and_grad(fn))(cos)
    assert_close(value, reference(), FORWARD_TOL, name)
    assert np.all(np.isfinite(grad)), name
  # Where the target is linear in cos θ (CosFace), the gradient at exactly ±1 is the full
  # s·(softmax − onehot)/B (jnp.clip would halve it on the boundary).
  cosface = lambda c: heads.cross_entropy(heads.margin_logits(c, labels, scale=64.0, m3=0.35),
                                          labels)
  logits = 64.0 * np_with_target(c64, labels, lambda t: t - 0.35)
  probs = np.exp(logits - logits.max(1, keepdims=True))
  probs /= probs.sum(1, keepdims=True)
  assert_close(jax.jit(jax.grad(cosface))(cos), 64.0 * (probs - np.eye(3)[labels]) / 3,
               GRAD_TOL, 'cosface gradient at ±1')


def test_get_head_flags_state_and_unknown_name():
  flags = {name: (h.uses_classifier, h.uses_bias)
           for name, h in ((n, heads.get_head(head_config(n))) for n in HEAD_NAMES)}
  assert flags['softmax'] == flags['center'] == (True, True)
  assert flags['triplet'] == (False, False)
  assert all(flags[n] == (True, False) for n in HEAD_NAMES
             if n not in ('softmax', 'center', 'triplet'))
  assert heads.get_head(head_config('arcface')).init_state(C, D) == {}
  centers = heads.get_head(head_config('center')).init_state(C, D)['centers']
  assert centers.shape == (C, D) and centers.dtype == jnp.float32
  stats = heads.get_head(head_config('adaface')).init_state(C, D)
  assert float(stats['norm_mean']) == 20.0 and float(stats['norm_std']) == 100.0
  with pytest.raises(ValueError, match='nmae'):
    heads.get_head(head_config('nmae'))
