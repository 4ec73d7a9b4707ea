"""Optimiser, schedules and partition rules against formulas written here in NumPy."""

import math

import jax
import numpy as np
import optax
import pytest

from sface_jax.configs import base
from sface_jax import optim
from sface_jax import sharding


def _params():
  rng = np.random.default_rng(0)
  return {'backbone': {'conv1': {'kernel': rng.normal(size=(3, 3, 3, 4)).astype(np.float32)},
                       'bn1': {'scale': rng.normal(size=(4,)).astype(np.float32),
                               'bias': rng.normal(size=(4,)).astype(np.float32)},
                       'features': {'scale': np.ones((4,), np.float32),
                                    'bias': np.zeros((4,), np.float32)}},
          'classifier': {'class_centers': rng.normal(size=(4, 10)).astype(np.float32)}}


def test_sgd_matches_pytorch_semantics_with_masked_decay_and_frozen_gamma():
  """torch.optim.SGD: v ← μv + (g + λw) (λ = 0 in the no-decay group); w ← w − lr·v."""
  config = base.get_config().optimizer
  config.weight_decay, config.momentum = 5e-4, 0.9
  lr = 0.1
  params = _params()
  optimizer = optim.make_optimizer(config, optax.constant_schedule(lr))
  state = optimizer.init(params)
  rng = np.random.default_rng(1)
  expected = jax.tree.map(np.float64, params)
  velocity = jax.tree.map(np.zeros_like, expected)
  current = params
  for _ in range(3):
    grads = jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32), params)
    updates, state = optimizer.update(grads, state, current)
    current = optax.apply_updates(current, updates)
    flat_expected = jax.tree_util.tree_flatten_with_path(expected)[0]
    new_expected, new_velocity = {}, {}
    for (path, w), v, g in zip(flat_expected, jax.tree.leaves(velocity), jax.tree.leaves(grads)):
      name = sharding.path_name(path)
      if name.endswith('features/scale'):  # frozen: never moves
        new_velocity[name], new_expected[name] = v, w
        continue
      decay = 0.0 if name.endswith(('scale', 'bias')) else 5e-4
      v = 0.9 * v + (g + decay * w)
      new_velocity[name], new_expected[name] = v, w - lr * v
    treedef = jax.tree.structure(expected)
    names = [sharding.path_name(p) for p, _ in flat_expected]
    expected = jax.tree.unflatten(treedef, [new_expected[n] for n in names])
    velocity = jax.tree.unflatten(treedef, [new_velocity[n] for n in names])
  for (path, got), want in zip(jax.tree_util.tree_flatten_with_path(current)[0],
                               jax.tree.leaves(expected)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6,
                               err_msg=sharding.path_name(path))
  np.testing.assert_array_equal(current['backbone']['features']['scale'], 1.0)


def _schedule(name, **overrides):
  config = base.get_config().schedule
  config.name = name
  config.learning_rate = 0.1
  config.warmup_epochs = 1.0
  for key, value in overrides.items():
    config[key] = value
  return optim.learning_rate_schedule(config, steps_per_epoch=10, total_steps=100)


@pytest.mark.parametrize('name,formula', [
    ('piecewise', lambda t: 0.1 * 0.1 ** sum(t >= b for b in (30, 60))),
    ('polynomial', lambda t: 0.1 * (1 - (t - 10) / 90) ** 2),
    ('cosine', lambda t: 0.1 * 0.5 * (1 + math.cos(math.pi * (t - 10) / 90))),
    ('constant', lambda t: 0.1),
])
def test_schedules_follow_their_formulas_after_a_linear_warmup(name, formula):
  schedule = _schedule(name, boundaries_epochs=(3.0, 6.0))
  for t in range(0, 100):
    want = 0.1 * t / 10 if t < 10 else formula(t)
    assert float(schedule(t)) == pytest.approx(want, rel=1e-5, abs=1e-7), (name, t)


def test_unknown_names_are_errors_naming_the_field():
  with pytest.raises(ValueError, match='config.schedule.name'):
    _schedule('exponential')
  config = base.get_config().optimizer
  config.name = 'lamb'
  with pytest.raises(ValueError, match='config.optimizer.name'):
    optim.make_optimizer(config, optax.constant_schedule(0.1))


@pytest.mark.parametrize('scope', ['all', 'backbone'])
def test_clipping_scales_the_chosen_parameters_gradient_to_the_norm(scope):
  """torch.nn.utils.clip_grad_norm_(parameters, c) then SGD: g ← g·min(1, c/‖g‖) over the
  scope's parameters (arcface_torch: the backbone's), the others untouched; the frozen γ
  counts in neither (torch: requires_grad=False, no gradient)."""
  config = base.get_config().optimizer
  config.weight_decay, config.momentum = 0.0, 0.0
  config.grad_clip_norm, config.grad_clip_scope = 1.0, scope
  params = _params()
  grads = jax.tree.map(lambda p: np.full(p.shape, 3.0, np.float32), params)
  optimizer = optim.make_optimizer(config, optax.constant_schedule(1.0))
  updates, _ = optimizer.update(grads, optimizer.init(params), params)
  clipped = ['backbone/conv1/kernel', 'backbone/bn1/scale', 'backbone/bn1/bias',
             'backbone/features/bias']
  if scope == 'all':
    clipped.append('classifier/class_centers')
  norm = 3.0 * math.sqrt(sum(
      np.size(leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
      if sharding.path_name(path) in clipped))
  for path, update in jax.tree_util.tree_flatten_with_path(updates)[0]:
    name = sharding.path_name(path)
    if name == 'backbone/features/scale':
      want = 0.0
    else:
      want = -3.0 / norm if name in clipped else -3.0
    np.testing.assert_allclose(update, want, rtol=1e-6, err_msg=name)


def test_unknown_clip_scope_is_an_error_naming_the_field():
  config = base.get_config().optimizer
  config.grad_clip_norm, config.grad_clip_scope = 5.0, 'head'
  with pytest.raises(ValueError, match='config.optimizer.grad_clip_scope'):
    optim.make_optimizer(config, optax.constant_schedule(0.1))


@pytest.mark.parametrize('name', ['polynomial', 'cosine', 'constant'])
def test_first_step_at_peak_then_the_linear_warmup_from_step_two(name):
  """arcface_torch's PolynomialLRWarmup: lr, lr·1/W, lr·2/W, …, lr, then the decay."""
  plain, peak = _schedule(name), _schedule(name, first_step_at_peak=True)
  assert float(plain(0)) == 0.0 and float(peak(0)) == pytest.approx(0.1)
  for t in range(1, 100):
    assert float(peak(t)) == float(plain(t)), t
  assert float(peak(5)) == pytest.approx(0.05)
