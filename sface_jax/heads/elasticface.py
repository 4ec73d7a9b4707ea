"""ElasticFace (Boutros, Damer, Kirchbuchner & Kuijper, "ElasticFace: Elastic Margin Loss for
Deep Face Recognition", CVPRW 2022): ArcFace or CosFace with a margin drawn per sample and per
step from a normal distribution, instead of one fixed m.

  m_i ~ N(m, σ²), drawn afresh for every sample at every step,
  ElasticFace-Arc:  logit_y = s·cos(θ_y + m_i)      (m = 0.5,  σ = 0.05),
  ElasticFace-Cos:  logit_y = s·(cos θ_y − m_i)     (m = 0.35, σ = 0.05),
  logit_j = s·cos θ_j elsewhere, s = 64.

A fixed margin forces every class into the same angular gap; drawing it lets the decision
boundary flex ("elastic"), which the paper shows helps where classes are not equally
separable. The defaults are the official code's (fdbtrs/ElasticFace config/config.py:
m = 0.5 / 0.35, std = 0.05).

ElasticFace+ (`plus=True`). The B drawn margins are sorted and handed out by each sample's
distance to its class centre: the sample with the r-th largest cos θ_y (r-th closest) gets
the r-th smallest margin, so samples still far from their centre get the larger margins —
the assignment the paper describes. The official code writes `margin[idicate_cosie]`, the
sorted margins indexed by the argsort of cos θ_y, which hands sample i the margin whose rank
is the *position of sample i's index in the sort order*, the inverse permutation of the
paper's rule (the two agree only when that permutation is its own inverse); we implement the
paper. The official config uses a smaller σ for the + variants (fdbtrs/ElasticFace
config/config.py: std = 0.0175 for ElasticArcFacePlus, 0.02 for ElasticCosFacePlus): set
`std` with `plus`.

Differences from the official code, on purpose or not:
- ElasticFace-Arc has no fallback past θ_y + m_i > π, as in the official code (it takes
  arccos, adds m_i and takes cos; its target rises again there). Our `arcface` head keeps
  the monotonic fallback; this one reproduces ElasticFace's published recipe.
- The gradient is the exact derivative of the formula (the official in-place acos/cos is
  differentiated by autograd too), but computed as cos θ·cos m_i − sin θ·sin m_i with a
  clamped sin θ, so it stays finite at cos θ = ±1, where acos's derivative is infinite.
- The margins never get a gradient (they are random numbers).

Randomness and sharding. The draw uses the step's key (`HeadInputs.rng`, shared by all
devices and different at every step: `step.train_step` folds the step into the run's key),
folded with the constant `RNG_STREAM`, and draws B margins for the *global* batch: every
device gets the same m_i for sample i whatever the device count, and training stays
deterministic (a restart from a checkpoint redraws the same margins). The official code
differs here: its head is replicated on every GPU (DDP), each GPU draws the margins of its own
samples (`torch.normal` with that process's generator) and ElasticFace+ sorts them within that
GPU's shard (128 samples in the official config), so a sample's margin is ranked among the
shard's B/n samples, not the whole batch's; on one GPU the two are the same rule. Partial FC folds the
device index into the same key; no device index comes near `RNG_STREAM`, so the two streams
never coincide. The + variant
needs every sample's cos θ_y on every device: a `psum` of `take_target`.
"""

from typing import Optional, Tuple

import jax
import jax.numpy as jnp

from sface_jax.heads import common

Array = jax.Array

RNG_STREAM = 0x454C4153  # 'ELAS': folded into the step's key for the margins
VARIANTS = ('arc', 'cos')


def draw_margins(key: Array, batch: int, *, m: float, std: float) -> Array:
  """(batch,) float32 margins m + σ·N(0, 1), from `key` folded with `RNG_STREAM`."""
  noise = jax.random.normal(jax.random.fold_in(key, RNG_STREAM), (batch,), jnp.float32)
  return jnp.float32(m) + jnp.float32(std) * noise


def assign_by_distance(margins: Array, cos_target: Array) -> Array:
  """ElasticFace+: the r-th smallest margin to the sample with the r-th largest cos θ_y."""
  cos_target = jax.lax.stop_gradient(common.as_float32(cos_target))
  order = jnp.argsort(-cos_target)  # sample indices, closest to their centre first
  return jnp.zeros_like(margins).at[order].set(jnp.sort(margins))


def elastic_target(cos_target: Array, margins: Array, *, variant: str = 'arc') -> Array:
  """cos(θ + m_i) ('arc', no fallback) or cos θ − m_i ('cos'), per sample."""
  if variant not in VARIANTS:
    raise ValueError(f'elasticface: variant must be one of {VARIANTS}, got {variant!r}')
  c = common.clip_unit(common.as_float32(cos_target))
  margins = jax.lax.stop_gradient(common.as_float32(margins))
  if variant == 'cos':
    return c - margins
  return c * jnp.cos(margins) - common.sin_from_cos(c) * jnp.sin(margins)


def elastic_logits_with_target(cos_theta: Array, labels: Array, margins: Array, *,
                               scale: float = 64.0,
                               variant: str = 'arc') -> Tuple[Array, Array]:
  """(B, C) ElasticFace logits and the target column (B,), for per-sample `margins` (B,)
  (from `draw_margins`, maybe `assign_by_distance`)."""
  c = common.clip_unit(common.as_float32(cos_theta))
  target = elastic_target(common.take_target(c, labels), margins, variant=variant)
  mask = common.target_mask(labels, c.shape[-1])
  return scale * jnp.where(mask, target[:, None], c), scale * target


def elastic_margins(key: Array, cos_target: Optional[Array], batch: int, *, m: float,
                    std: float, plus: bool = False) -> Array:
  """The step's B margins: drawn, and with `plus` sorted by `cos_target` (B,)."""
  margins = draw_margins(key, batch, m=m, std=std)
  if plus:
    margins = assign_by_distance(margins, cos_target)
  return margins


