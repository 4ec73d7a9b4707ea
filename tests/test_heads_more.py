"""The heads of issue 14 (L-Softmax, CurricularFace, MagFace, ElasticFace) and the fixes to
SphereFace's λ, against independent NumPy float64 references written here from the papers'
formulas and the official codes' conventions (named in each reference).

As in test_heads.py: values within 1e-5 relative, gradients within 1e-4 relative (normwise:
max |error| / max |reference|), gradients being central finite differences of the float64
reference. Each head runs end to end through `get_head` / `head_inputs` / `Head.loss` on
embeddings and class centres, one device; tests/test_scale_out.py compares 8 devices with one.
"""

import json
import math
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import multi_device
from references import assert_close, fd_grad, np_ce, rel_error
from sface_jax.configs import base
from sface_jax import heads
from sface_jax.heads import elasticface as elastic_lib

FORWARD_TOL = 1e-5
GRAD_TOL = 1e-4
NEW_HEADS = ('lsoftmax', 'curricularface', 'magface', 'elasticface_arc', 'elasticface_cos')

B, D, C = 5, 6, 5
LABELS = np.array([0, 4, 2, 4, 0], np.int32)  # the first and the last class


# ---- helpers and references -------------------------------------------------------------


def np_cos(x, w):
  return (x / np.linalg.norm(x, axis=1, keepdims=True)) @ (
      w / np.linalg.norm(w, axis=0, keepdims=True))


def np_psi(c, m):
  """ψ(θ) = (−1)^k cos(mθ) − 2k on [kπ/m, (k+1)π/m], from θ itself."""
  theta = np.arccos(np.clip(c, -1.0, 1.0))
  k = np.minimum(np.floor(m * theta / np.pi), m - 1)
  return (-1.0) ** k * np.cos(m * theta) - 2.0 * k


def np_lambda(step, base_, gamma, power, lambda_min):
  """wy1iu's Caffe layers: `iter_ += 1` before λ, so the step after `step` steps uses
  iteration step + 1."""
  return max(lambda_min, base_ * (1.0 + gamma * (step + 1)) ** (-power))


def np_lsoftmax_logits(x, w, labels, m, lam):
  """Liu et al. 2016, as the official layer: W_jᵀx off target, on target
  ‖W_y‖‖x‖(λ cos θ_y + ψ(θ_y))/(1 + λ)."""
  logits = x @ w
  rows = np.arange(len(labels))
  norms = np.linalg.norm(x, axis=1) * np.linalg.norm(w[:, labels], axis=0)
  c = logits[rows, labels] / norms
  logits[rows, labels] = norms * (lam * c + np_psi(c, m)) / (1.0 + lam)
  return logits


def np_curricular(x, w, labels, t_prev, s, m, alpha, t_fixed=None):
  """HuangYG123/CurricularFace head/metrics.py: t updated first, hard if cos θ_j > cos(θ_y+m)
  (bare), ArcFace target with the cos θ − m·sin m fallback past π − m."""
  cos = np_cos(x, w)
  rows = np.arange(len(labels))
  c_y = cos[rows, labels]
  t = alpha * c_y.mean() + (1 - alpha) * t_prev if t_fixed is None else t_fixed
  theta_y = np.arccos(np.clip(c_y, -1, 1))
  bare = np.cos(theta_y + m)
  target = np.where(theta_y < np.pi - m, bare, c_y - m * np.sin(m))
  hard = cos > bare[:, None]
  logits = np.where(hard, cos * (t + cos), cos)
  logits[rows, labels] = target
  return np_ce(s * logits, labels), t, hard


def np_magface(x, w, labels, s, l_a, u_a, l_margin, u_margin, lambda_g, easy_margin):
  """IrvingMeng/MagFace models/magface.py + run/trainer.py: CE + λ_g·mean g(a)."""
  a = np.clip(np.linalg.norm(x, axis=1), l_a, u_a)
  margin = (u_margin - l_margin) / (u_a - l_a) * (a - l_a) + l_margin
  cos = np_cos(x, w)
  rows = np.arange(len(labels))
  c_y = cos[rows, labels]
  theta_y = np.arccos(np.clip(c_y, -1, 1))
  margined = np.cos(theta_y + margin)
  if easy_margin:
    target = np.where(c_y > 0, margined, c_y)
  else:
    target = np.where(theta_y < np.pi - margin, margined, c_y - np.sin(np.pi - margin) * margin)
  logits = cos.copy()
  logits[rows, labels] = target
  g = a / u_a ** 2 + 1.0 / a
  return np_ce(s * logits, labels) + lambda_g * g.mean(), g.mean()


def np_elastic(x, w, labels, margins, s, variant):
  """fdbtrs/ElasticFace utils/losses.py: cos(acos(c) + m_i) (no fallback) or c − m_i."""
  cos = np_cos(x, w)
  rows = np.arange(len(labels))
  c_y = cos[rows, labels]
  if variant == 'arc':
    cos[rows, labels] = np.cos(np.arccos(np.clip(c_y, -1, 1)) + margins)
  else:
    cos[rows, labels] = c_y - margins
  return np_ce(s * cos, labels)


def np_plus_assignment(margins, c_y):
  """ElasticFace+ as the paper states it: rank r by decreasing cos θ_y gets the r-th
  smallest margin."""
  out = np.empty_like(margins)
  for rank, sample in enumerate(np.argsort(-c_y, kind='stable')):
    out[sample] = np.sort(margins)[rank]
  return out


def head_config(name, **overrides):
  config = base.get_config().head
  config.name = name
  for key, value in overrides.items():
    config.update_from_flattened_dict({key: value})
  return config


def inputs_for(seed=21, norm_range=(2.0, 30.0)):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(B, D))
  x = x / np.linalg.norm(x, axis=1, keepdims=True) * rng.uniform(*norm_range, size=(B, 1))
  w = rng.normal(size=(D, C))
  return x.astype(np.float32), w.astype(np.float32)


def run_head(head, x, labels, w, state, step, key):
  inputs = heads.head_inputs(x, labels, {'class_centers': w}, num_classes=w.shape[1],
                             sample_rate=1.0, rng=key, axis_name=None)
  return head.loss(inputs, state, step)


def head_value_and_grads(name, x, w, state=None, step=0, key=None, labels=LABELS,
                         **overrides):
  head = heads.get_head(head_config(name, **overrides))
  state = head.init_state(C, D) if state is None else state
  key = jax.random.key(0) if key is None else key

  def loss_fn(x_, w_):
    value, new_state, metrics = run_head(head, x_, labels, w_, state, jnp.int32(step), key)
    return value, (new_state, metrics)

  (value, (new_state, metrics)), grads = jax.jit(jax.value_and_grad(
      loss_fn, argnums=(0, 1), has_aux=True))(x, w)
  assert value.dtype == jnp.float32
  for key_, metric in metrics.items():
    assert metric.shape == () and metric.dtype == jnp.float32, key_
  return float(value), grads, new_state, metrics


def check_gradients(name, grads, reference, x, w):
  x64, w64 = x.astype(np.float64), w.astype(np.float64)
  assert_close(grads[0], fd_grad(lambda v: reference(v, w64), x64), GRAD_TOL, f'{name} d/dx')
  assert_close(grads[1], fd_grad(lambda v: reference(x64, v), w64), GRAD_TOL, f'{name} d/dW')


# ---- SphereFace's λ: iteration = step + 1 ----------------------------------------------------


def test_sphereface_lambda_uses_the_pre_incremented_iteration():
  schedule = dict(base=1000.0, gamma=0.12, power=1.0, lambda_min=5.0)
  for step in range(6):
    actual = heads.sphereface_lambda(jnp.int32(step), **schedule)
    assert_close(actual, np_lambda(step, 1000.0, 0.12, 1.0, 5.0), FORWARD_TOL, f'step {step}')
  assert_close(heads.sphereface_lambda(jnp.int32(0), **schedule), 1000.0 / 1.12, FORWARD_TOL,
               'first step: iteration 1')
  # λ_min is first reached at step 1658 (iteration 1659), not 1659.
  assert float(heads.sphereface_lambda(jnp.int32(1657), **schedule)) > 5.0
  assert float(heads.sphereface_lambda(jnp.int32(1658), **schedule)) == 5.0
  # The head logs the λ it used, the first step's included.
  x, w = inputs_for()
  _, _, _, metrics = head_value_and_grads('sphereface', x, w, step=0)
  assert_close(metrics['lambda'], 1000.0 / 1.12, FORWARD_TOL, 'sphereface head λ at step 0')


# ---- L-Softmax ------------------------------------------------------------------------------


def np_sphereface_official(x, w, labels, lam):
  """wy1iu/sphereface margin_inner_product_layer.cpp, m = 4 (QUADRUPLE), in float64, with
  the batch-mean softmax cross-entropy on top: (loss, d/dx, d/dW).

  Forward and Backward_cpu as the layer writes them, element by element: sign_0 = sign(c),
  sign_3 = sign_0·sign(2c² − 1), sign_4 = 2·sign_0 + sign_3 − 3; target coefficients
  coeff_w = sign_3(32c³ − 16c), coeff_x = −(sign_3(24c⁴ − 8c² − 1) − sign_4)/‖x‖ rescaled to
  unit length, plus λ/(1 + λ)·(top_diff·ŵ); weight gradient top_diffᵀ·x. The layer's weights
  are the normalised ŵ; ours are raw W normalised in the loss, so d/dW is the layer's ŵ
  gradient through ŵ = W/‖W‖.
  """
  w_norm = np.linalg.norm(w, axis=0)
  w_hat = w / w_norm
  x_norm = np.linalg.norm(x, axis=1)
  rows = np.arange(len(labels))
  top = x @ w_hat
  c = top[rows, labels] / x_norm
  sign_0 = np.sign(c)
  sign_3 = sign_0 * np.sign(2 * c ** 2 - 1)
  sign_4 = 2 * sign_0 + sign_3 - 3
  top[rows, labels] = (x_norm * (sign_3 * (8 * c ** 4 - 8 * c ** 2 + 1) + sign_4)
                       + lam * top[rows, labels]) / (1 + lam)
  z = top - top.max(axis=1, keepdims=True)
  probabilities = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
  loss = float(np.mean(-np.log(probabilities[rows, labels])))
  top_diff = probabilities.copy()
  top_diff[rows, labels] -= 1.0
  top_diff /= len(labels)
  grad_w_hat = x.T @ top_diff
  grad_x = np.zeros_like(x)
  for i, y in enumerate(labels):
    for j in range(w.shape[1]):
      if j != y:
        grad_x[i] += top_diff[i, j] / (1 + lam) * w_hat[:, j]
      else:
        coeff_w = sign_3[i] * (32 * c[i] ** 3 - 16 * c[i])
        coeff_x = -(sign_3[i] * (24 * c[i] ** 4 - 8 * c[i] ** 2 - 1) - sign_4[i]) / x_norm[i]
        length = np.hypot(coeff_w, coeff_x)
        grad_x[i] += top_diff[i, j] / (1 + lam) * (coeff_w / length * w_hat[:, j]
                                                   + coeff_x / length * x[i])
  grad_x += lam / (1 + lam) * top_diff @ w_hat.T
  grad_w = (grad_w_hat - w_hat * np.sum(w_hat * grad_w_hat, axis=0)) / w_norm
  return loss, grad_x, grad_w


def np_sphereface_loss(x, w, labels, lam):
  """The formula itself (‖x‖ cos θ_j; target ‖x‖(λc + ψ(c))/(1 + λ)), for the exact gradient."""
  cos = np_cos(x, w)
  x_norm = np.linalg.norm(x, axis=1)
  rows = np.arange(len(labels))
  logits = x_norm[:, None] * cos
  c = cos[rows, labels]
  logits[rows, labels] = x_norm * (lam * c + np_psi(c, 4)) / (1 + lam)
  return np_ce(logits, labels)


def test_sphereface_official_backward_on_eight_devices_equals_one():
  """The custom backward under `shard_map`: classes split over 8 devices (37 padded to 40),
  and through Partial FC's sampling path, against one device (test_scale_out's harness)."""
  code = textwrap.dedent("""
      import json, sys
      sys.path.insert(0, 'tests')
      import test_scale_out as scale_out
      official = {'sphereface.official_backward': True}
      print(json.dumps({
          'one': scale_out._head_gradients('sphereface', 1, overrides=official),
          'many': scale_out._head_gradients('sphereface', 8, overrides=official),
          'sampled': scale_out._head_gradients('sphereface', 8, sample_rate=0.999,
                                               overrides=official),
          'exact': scale_out._head_gradients('sphereface', 1)}))
      """)
  out = json.loads(multi_device.run_python('-c', code, devices=8).stdout.splitlines()[-1])
  one = out['one']
  for name in ('many', 'sampled'):
    many = out[name]
    assert_close(many['loss'], one['loss'], 2e-5, f'{name} loss')
    assert_close(many['grad_x'], one['grad_x'], 2e-5, f'{name} d/dx')
    grad_many = np.asarray(many['grad_centers'])
    assert_close(grad_many[:, :37], one['grad_centers'], 2e-5, f'{name} d/dW')
    assert np.all(grad_many[:, 37:] == 0), f'{name}: padding centres moved'
  # and the comparison is not vacuous: the exact gradient is another one
  assert out['exact']['loss'] == one['loss']
  assert rel_error(one['grad_x'], out['exact']['grad_x']) > 1e-3


@pytest.mark.parametrize('step', [0, 5000])  # λ = 892.86, then its floor 5
def test_sphereface_official_backward_is_the_caffe_layers(step):
  x, w = inputs_for(seed=23)
  lam = np_lambda(step, 1000.0, 0.12, 1.0, 5.0)
  value, grads, _, metrics = head_value_and_grads(
      'sphereface', x, w, step=step, **{'sphereface.official_backward': True})
  assert_close(metrics['lambda'], lam, FORWARD_TOL, 'λ')
  x64, w64 = x.astype(np.float64), w.astype(np.float64)
  loss, grad_x, grad_w = np_sphereface_official(x64, w64, LABELS, lam)
  # The value is the formula's (the exact head's); only the gradient is the layer's.
  exact_value, exact_grads, _, _ = head_value_and_grads('sphereface', x, w, step=step)
  assert_close(value, np_sphereface_loss(x64, w64, LABELS, lam), FORWARD_TOL, 'value')
  assert_close(value, loss, FORWARD_TOL, 'value, Caffe forward')
  assert value == exact_value
  assert_close(grads[0], grad_x, GRAD_TOL, 'official d/dx')
  assert_close(grads[1], grad_w, GRAD_TOL, 'official d/dW')
  # A real difference from the exact derivative (which test_heads.py checks), far above the
  # tolerance: the option changes what is trained.
  exact_x = fd_grad(lambda v: np_sphereface_loss(v, w64, LABELS, lam), x64)
  exact_w = fd_grad(lambda v: np_sphereface_loss(x64, v, LABELS, lam), w64)
  assert_close(exact_grads[0], exact_x, GRAD_TOL, 'exact d/dx')
  assert_close(exact_grads[1], exact_w, GRAD_TOL, 'exact d/dW')
  for official, exact in ((grad_x, exact_x), (grad_w, exact_w)):
    assert np.max(np.abs(official - exact)) / np.max(np.abs(exact)) > 5 * GRAD_TOL


@pytest.mark.parametrize('step', [0, 5000, 10**6])
def test_lsoftmax_head_against_reference(step):
  config = head_config('lsoftmax').lsoftmax
  lam = np_lambda(step, config.base, config.gamma, config.power, config.lambda_min)
  x, w = inputs_for(22)
  value, grads, _, metrics = head_value_and_grads('lsoftmax', x, w, step=step)

  def reference(x_, w_):
    return np_ce(np_lsoftmax_logits(x_, w_, LABELS, config.m, lam), LABELS)

  x64, w64 = x.astype(np.float64), w.astype(np.float64)
  assert_close(value, reference(x64, w64), FORWARD_TOL, f'lsoftmax loss, λ={lam:.3g}')
  check_gradients('lsoftmax', grads, reference, x, w)
  assert_close(metrics['lambda'], lam, FORWARD_TOL, 'λ')
  theta = np.degrees(np.arccos(np_cos(x64, w64)[np.arange(B), LABELS]))
  assert_close(metrics['theta_target'], theta.mean(), FORWARD_TOL, 'theta_target')
  assert_close(metrics['accuracy'], np.mean((x64 @ w64).argmax(1) == LABELS), 1e-6, 'acc')


def test_lsoftmax_margin_functions_for_every_m():
  rng = np.random.default_rng(23)
  x = rng.normal(size=(6, 4)).astype(np.float32)
  w = rng.normal(size=(4, 7)).astype(np.float32) * 3.0
  labels = np.array([0, 6, 3, 6, 1, 2], np.int32)
  for m in (1, 2, 3, 4):
    for lam in (0.0, 2.5):
      logits = heads.lsoftmax_logits(x, w, labels, m=m, lambda_=lam)
      expected = np_lsoftmax_logits(x.astype(np.float64), w.astype(np.float64), labels, m, lam)
      assert_close(logits, expected, FORWARD_TOL, f'm={m} λ={lam}')


# ---- CurricularFace ---------------------------------------------------------------------------


@pytest.mark.parametrize('t_prev', [0.0, 0.6])
def test_curricularface_head_against_reference(t_prev):
  config = head_config('curricularface')
  s, m, alpha = config.scale, config.curricularface.m, config.curricularface.momentum
  x, w = inputs_for(24)
  x64, w64 = x.astype(np.float64), w.astype(np.float64)
  state = {'t': jnp.float32(t_prev)}
  value, grads, new_state, metrics = head_value_and_grads('curricularface', x, w, state=state)
  expected, t, hard = np_curricular(x64, w64, LABELS, t_prev, s, m, alpha)
  off_target = ~np.eye(C, dtype=bool)[LABELS]
  assert (hard & off_target).any() and (~hard & off_target).any()  # both kinds of negative
  assert_close(value, expected, FORWARD_TOL, 'curricularface loss')
  assert_close(new_state['t'], t, FORWARD_TOL, 't updated before use')
  assert_close(metrics['t'], t, FORWARD_TOL, 't metric')
  # t is a constant for the gradient (the official buffer is updated under no_grad).
  check_gradients('curricularface', grads,
                  lambda x_, w_: np_curricular(x_, w_, LABELS, t_prev, s, m, alpha, t)[0], x, w)


def test_curricularface_reweights_hard_negatives_by_t():
  """A hard negative's logit cos θ_j(t + cos θ_j): below cos θ_j early (t ≈ 0), above it
  late (t + cos θ_j > 1); an easy one is left alone; the target is ArcFace's."""
  cos = np.array([[0.5, 0.6, 0.1]], np.float32)  # θ_y = 60°, cos(θ_y + 0.5) = 0.0939
  labels = np.array([0], np.int32)
  early = np.asarray(heads.curricular_logits(cos, labels, 0.0, scale=1.0, m=0.5), np.float64)
  late = np.asarray(heads.curricular_logits(cos, labels, 0.9, scale=1.0, m=0.5), np.float64)
  bare = math.cos(math.acos(0.5) + 0.5)
  np.testing.assert_allclose(early[0], [bare, 0.36, 0.01], rtol=1e-5)
  np.testing.assert_allclose(late[0], [bare, 0.6 * 1.5, 0.1 * 1.0], rtol=1e-5)
  easy = np.array([[0.9, 0.05, -0.2]], np.float32)  # cos(θ_y + m) = 0.5 > every negative
  out = np.asarray(heads.curricular_logits(easy, labels, 0.9, scale=1.0, m=0.5))
  np.testing.assert_allclose(out[0, 1:], [0.05, -0.2], rtol=1e-6)


# ---- MagFace ----------------------------------------------------------------------------------


@pytest.mark.parametrize('easy_margin', [True, False])
def test_magface_head_against_reference(easy_margin):
  config = head_config('magface')
  c = dict(config.magface)
  c['easy_margin'] = easy_margin
  # Norms inside [l_a, u_a] (margin and g have a gradient) and one on each side (clamped).
  x, w = inputs_for(25, norm_range=(15.0, 100.0))
  x[1] *= 5.0 / np.linalg.norm(x[1])
  x[3] *= 140.0 / np.linalg.norm(x[3])
  # One target past π/2 so easy margin and the fallback (θ_y > π − m) are both exercised.
  x[2] = -w[:, 2] / np.linalg.norm(w[:, 2]) * 30.0 + 0.1
  value, grads, _, metrics = head_value_and_grads(
      'magface', x, w, **{'magface.easy_margin': easy_margin})

  def reference(x_, w_):
    return np_magface(x_, w_, LABELS, config.scale, **c)[0]

  x64, w64 = x.astype(np.float64), w.astype(np.float64)
  assert_close(value, reference(x64, w64), FORWARD_TOL, 'magface loss')
  _, g_mean = np_magface(x64, w64, LABELS, config.scale, **c)
  assert_close(metrics['regularizer'], g_mean, FORWARD_TOL, 'g')
  check_gradients('magface', grads, reference, x, w)
  # Outside [l_a, u_a] the norm has no gradient: the sample's gradient is orthogonal to it.
  for row in (1, 3):
    radial = float(np.dot(np.asarray(grads[0][row], np.float64), x64[row]))
    assert abs(radial) <= 1e-5 * np.linalg.norm(grads[0][row]) * np.linalg.norm(x64[row])


def test_magface_margin_and_regularizer_shapes():
  a = np.linspace(10.0, 110.0, 11).astype(np.float32)
  from sface_jax.heads import magface as magface_lib  # pylint: disable=g-import-not-at-top
  margin = np.asarray(magface_lib.magface_margin(a), np.float64)
  np.testing.assert_allclose(margin[[0, -1]], [0.45, 0.8], rtol=1e-6)
  g = np.asarray(magface_lib.magface_regularizer(a), np.float64)
  assert np.all(np.diff(g) < 0)  # g decreases on [l_a, u_a]: magnitude is rewarded


# ---- ElasticFace ------------------------------------------------------------------------------


def expected_margins(key, batch, m, std):
  """The documented draw: m + σ·N(0, 1) from the step key folded with RNG_STREAM."""
  noise = jax.random.normal(jax.random.fold_in(key, elastic_lib.RNG_STREAM), (batch,))
  return m + std * np.asarray(noise, np.float64)


@pytest.mark.parametrize('variant', ['arc', 'cos'])
@pytest.mark.parametrize('plus', [False, True])
def test_elasticface_head_against_reference(variant, plus):
  name = f'elasticface_{variant}'
  config = head_config(name)
  sub = config[name]
  x, w = inputs_for(26)
  key = jax.random.key(7)
  value, grads, _, metrics = head_value_and_grads(name, x, w, key=key,
                                                  **{f'{name}.plus': plus})
  x64, w64 = x.astype(np.float64), w.astype(np.float64)
  margins = expected_margins(key, B, sub.m, sub.std)
  if plus:
    margins = np_plus_assignment(margins, np_cos(x64, w64)[np.arange(B), LABELS])

  def reference(x_, w_):
    return np_elastic(x_, w_, LABELS, margins, config.scale, variant)

  assert_close(value, reference(x64, w64), FORWARD_TOL, f'{name} plus={plus}')
  check_gradients(name, grads, reference, x, w)
  assert_close(metrics['margin'], margins.mean(), FORWARD_TOL, 'mean margin')


def test_elasticface_draw_is_deterministic_per_key_and_distributed_as_stated():
  key = jax.random.key(3)
  first = np.asarray(heads.elastic_margins(key, None, 4096, m=0.5, std=0.05))
  again = np.asarray(heads.elastic_margins(key, None, 4096, m=0.5, std=0.05))
  other = np.asarray(heads.elastic_margins(jax.random.key(4), None, 4096, m=0.5, std=0.05))
  np.testing.assert_array_equal(first, again)
  assert not np.allclose(first, other)
  assert abs(first.mean() - 0.5) < 4 * 0.05 / 64 and abs(first.std() - 0.05) < 0.005
  # The head's margins change with the step's key: the same inputs, two keys, two losses.
  x, w = inputs_for(27)
  losses = {head_value_and_grads('elasticface_arc', x, w, key=jax.random.key(k))[0]
            for k in (0, 1)}
  assert len(losses) == 2


def test_elasticface_plus_gives_far_samples_the_large_margins():
  cos_target = np.array([0.9, 0.1, 0.5, -0.3, 0.7], np.float32)
  margins = np.array([0.55, 0.40, 0.50, 0.60, 0.45], np.float32)
  assigned = np.asarray(elastic_lib.assign_by_distance(jnp.asarray(margins),
                                                       jnp.asarray(cos_target)))
  np.testing.assert_array_equal(assigned, np.float32([0.40, 0.55, 0.50, 0.60, 0.45]))
  np.testing.assert_array_equal(assigned, np_plus_assignment(margins, cos_target))


# ---- every new head: edge cases, bf16, one jitted program --------------------------------------


def edge_inputs():
  """cos θ = +1 exactly (label 0), −1 exactly (label C − 1), and a plain third sample; bf16
  embeddings (exact in bf16)."""
  w = 2.0 * np.eye(D, C, dtype=np.float32)
  x = np.zeros((3, D), np.float32)
  x[0, 0] = 3.0
  x[1, C - 1] = -2.0
  x[2, :] = 1.0
  return jnp.asarray(x, jnp.bfloat16), w, np.array([0, C - 1, 0], np.int32)


def test_new_heads_nan_free_at_plus_minus_one_bf16_and_batch_of_one():
  all_heads = {name: heads.get_head(head_config(name)) for name in NEW_HEADS}
  all_heads['elasticface_arc_plus'] = heads.get_head(
      head_config('elasticface_arc', **{'elasticface_arc.plus': True}))
  all_heads['adaface_ours'] = heads.get_head(
      head_config('adaface', **{'adaface.official_clamp': False}))
  all_heads['magface_fallback'] = heads.get_head(
      head_config('magface', **{'magface.easy_margin': False}))

  @jax.jit
  def step_fn(x_, w_, labels):
    out = {}
    for name, head in all_heads.items():
      state = head.init_state(C, D)

      def loss_fn(x_, w_):
        value, new_state, metrics = run_head(head, x_, labels, w_, state, jnp.int32(0),
                                             jax.random.key(0))
        return value, (new_state, metrics)

      out[name] = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(x_, w_)
    return out

  x, w, labels = edge_inputs()
  cases = {'cos=+1 and -1, labels 0 and C-1': (x, labels),
           'batch of one, cos=+1': (x[:1], labels[:1]),
           'batch of one, cos=-1': (x[1:2], labels[1:2])}
  for case, (x_, labels_) in cases.items():
    for name, ((value, (new_state, metrics)), grads) in step_fn(x_, w, labels_).items():
      where = (case, name)
      assert value.dtype == jnp.float32 and np.isfinite(float(value)), where
      for key, metric in metrics.items():
        assert metric.dtype == jnp.float32 and np.isfinite(float(metric)), (where, key)
      for leaf in jax.tree.leaves((grads, new_state)):
        assert np.all(np.isfinite(np.asarray(leaf, np.float32))), where
      assert grads[0].dtype == jnp.bfloat16, where
      assert 0.0 <= metrics['theta_target'] <= 180.0, where


def test_new_heads_are_registered_with_their_config():
  for name in NEW_HEADS:
    assert name in heads.HEAD_NAMES
    head = heads.get_head(head_config(name))
    assert head.uses_classifier and not head.uses_bias and head.name == name
  assert heads.get_head(head_config('curricularface')).init_state(C, D) == {'t': 0.0}
  assert heads.get_head(head_config('magface')).init_state(C, D) == {}
  inputs = heads.head_inputs(np.ones((2, D), np.float32), np.zeros(2, np.int32),
                             {'class_centers': np.ones((D, C), np.float32)}, num_classes=C,
                             sample_rate=1.0, rng=None, axis_name=None)
  with pytest.raises(ValueError, match='rng'):
    heads.get_head(head_config('elasticface_cos')).loss(inputs, {}, jnp.int32(0))
