"""How far two official codes' conventions are from the exact formulas (README § Losses).

  python -m bench.official_conventions

1. SphereFace: wy1iu/sphereface's hand-written Caffe backward (`config.head.sphereface.
   official_backward=True`) against the exact derivative (the default). Relative L2 distance
   ‖g_official − g_exact‖ / ‖g_exact‖ of d/dx and d/dW of the head (m = 4), B = 256,
   D = 512, C = 1000, ‖x‖ ~ U(10, 30), three seeds, at step 0 (λ = 892.86) and at step 1658
   (λ at its floor, 5), for untrained embeddings (random x: c_y ≈ 0) and for target cosines
   c_y ~ U(0.2, 0.9), as later in training.
2. AdaFace: the official clamps (`official_clamp=True`: cosines to ±(1 − 1e-3), θ + g to
   [1e-3, π − 1e-3], zero gradient outside) against the exact formula (`False`), on the
   target term cos(θ + g_angle) − g_add (s = 1) over c ∈ [−1, 1] (a 2·10⁵-point grid plus
   points logarithmically close to ±1) and ẑ ∈ {−1, −½, 0, ½, 1}: the largest value
   difference, and the gradient difference at 1 − 10⁻⁴, 1 − 10⁻⁶ and the float32 number
   next to 1.
"""

import jax
import jax.numpy as jnp
import numpy as np

from sface_jax.configs import base
from sface_jax import heads
from sface_jax.heads import adaface

B, D, C = 256, 512, 1000


def _sphereface_inputs(seed: int, cos_range):
  rng = np.random.default_rng(seed)
  w = rng.normal(size=(D, C)) * 0.01
  labels = rng.integers(0, C, B)
  own = (w / np.linalg.norm(w, axis=0))[:, labels].T  # (B, D) each sample's unit centre
  if cos_range is None:
    x = rng.normal(size=(B, D))
  else:  # a unit vector at cos θ_y = c from its centre
    c = rng.uniform(*cos_range, (B, 1))
    other = rng.normal(size=(B, D))
    other -= np.sum(other * own, axis=1, keepdims=True) * own
    other /= np.linalg.norm(other, axis=1, keepdims=True)
    x = c * own + np.sqrt(1 - c ** 2) * other
  x = x / np.linalg.norm(x, axis=1, keepdims=True) * rng.uniform(10, 30, (B, 1))
  return x.astype(np.float32), w.astype(np.float32), labels.astype(np.int32)


def _sphereface_grads(official: bool, x, w, labels, step: int):
  config = base.get_config().head
  config.name = 'sphereface'
  config.sphereface.official_backward = official
  head = heads.get_head(config)

  def loss(x_, w_):
    inputs = heads.head_inputs(x_, labels, {'class_centers': w_}, num_classes=C,
                               sample_rate=1.0, rng=None, axis_name=None)
    return head.loss(inputs, {}, jnp.int32(step))[0]

  return jax.jit(jax.grad(loss, argnums=(0, 1)))(x, w)


def sphereface_table() -> str:
  def distance(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)

  rows = ['| target cosines | step (λ) | d/dx | d/dW |', '|---|---|---|---|']
  for name, cos_range in (('untrained (random x)', None), ('c_y ~ U(0.2, 0.9)', (0.2, 0.9))):
    for step in (0, 1658):
      gaps = []
      for seed in range(3):
        x, w, labels = _sphereface_inputs(seed, cos_range)
        official = _sphereface_grads(True, x, w, labels, step)
        exact = _sphereface_grads(False, x, w, labels, step)
        gaps.append([distance(o, e) for o, e in zip(official, exact)])
      low, high = 100 * np.min(gaps, axis=0), 100 * np.max(gaps, axis=0)
      lam = float(heads.sphereface_lambda(jnp.int32(step)))
      rows.append(f'| {name} | {step} ({lam:.2f}) | {low[0]:.2g}–{high[0]:.2g} % | '
                  f'{low[1]:.2g}–{high[1]:.2g} % |')
  return '\n'.join(rows)


def adaface_table() -> str:
  near_one = 1.0 - np.logspace(-9, -1, 400)
  c = np.clip(np.concatenate([np.linspace(-1, 1, 200_001), near_one, -near_one]), -1, 1)
  c = c.astype(np.float32)
  below_one = np.nextafter(np.float32(1), np.float32(0))
  probes = {'1 − 1e-4': np.float32(1 - 1e-4), '1 − 1e-6': np.float32(1 - 1e-6),
            'next float32 below 1': below_one}
  rows = ['| ẑ | largest value difference (at c) | value difference inside ±0.999 | '
          + ' | '.join(f'gradient difference at ±({p})' for p in probes) + ' |',
          '|---|---|---|' + '---|' * len(probes)]
  for quality in (-1.0, -0.5, 0.0, 0.5, 1.0):
    def target(official):
      return lambda cos, z: adaface.adaface_target(cos, z, official_clamp=official)
    z = np.full_like(c, quality)
    value = {o: np.asarray(target(o)(c, z), np.float64) for o in (True, False)}
    difference = np.abs(value[True] - value[False])
    inside = np.abs(c) <= 0.999
    worst = int(np.argmax(difference))
    grad = {o: jax.vmap(jax.grad(target(o))) for o in (True, False)}
    cells = []
    for probe in probes.values():  # the side where the margin turns: + for ẑ < 0, − else
      point = np.full(1, probe if quality < 0 else -probe, np.float32)
      zq = np.full(1, quality, np.float32)
      cells.append(f'{abs(float(grad[True](point, zq)[0] - grad[False](point, zq)[0])):.3g}')
    rows.append(f'| {quality:+.1f} | {difference[worst]:.3g} (c = {c[worst]:+.0f}) | '
                f'{difference[inside].max():.2g} | ' + ' | '.join(cells) + ' |')
  non_target = np.abs(np.asarray(adaface.clamp_cosines(c, True), np.float64)
                      - np.asarray(adaface.clamp_cosines(c, False), np.float64)).max()
  rows.append(f'\nNon-target cosines: largest value difference {non_target:.3g}.')
  return '\n'.join(rows)


def main():
  print(f'jax {jax.__version__}, {jax.devices()[0].platform}\n')
  print('SphereFace, official Caffe backward vs exact derivative (relative L2, 3 seeds):\n')
  print(sphereface_table())
  print('\nAdaFace, official clamps vs exact formula (target term, s = 1):\n')
  print(adaface_table())


if __name__ == '__main__':
  main()
