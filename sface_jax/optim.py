"""The optax optimiser and learning-rate schedule a config asks for.

SGD follows PyTorch's `SGD(momentum, weight_decay)` exactly, as the recipes we reproduce
were tuned with it: the decay is added to the gradient before the momentum,
`g ← g + λ·w` (optax `add_decayed_weights` before `sgd`), and the momentum buffer starts at
the first gradient with no dampening (`v ← μ·v + g`, torch's default dampening 0). AdamW
decays decoupled, `w ← w − lr·λ·w`. Decay is masked off the parameters whose path matches
`config.optimizer.no_decay` (seed 000's second parameter group, weight decay 0).

Gradient clipping comes first, as `torch.nn.utils.clip_grad_norm_` before `optimizer.step()`:
over every trained parameter, or over the backbone's only (arcface_torch). torch divides by
‖g‖ + 1e-6 where optax divides by ‖g‖: a relative difference of 1e-6/‖g‖ ≤ 2e-7 where it
clips (‖g‖ > 5), float32 round-off.
"""

import re

import jax
import jax.numpy as jnp
import optax

from sface_jax import sharding


def learning_rate_schedule(schedule_config, *, steps_per_epoch: int,
                           total_steps: int) -> optax.Schedule:
  """Linear warm-up from 0 to `learning_rate`, then the named decay (steps are optimiser steps).

  piecewise:  lr · decay_factor^(number of boundaries passed)  (face.evoLVe, SFace)
  polynomial: end + (lr − end)·(1 − t/T)^power                 (insightface arcface_torch)
  cosine:     end + (lr − end)·(1 + cos(π t/T))/2
  constant:   lr
  with t, T counted after the warm-up of W steps, whose step s (from 0) runs at lr·s/W.
  `first_step_at_peak` runs step s = 0 at lr instead (arcface_torch's `PolynomialLRWarmup`:
  lr, lr/W, 2·lr/W, …, lr, then the decay).
  """
  lr = schedule_config.learning_rate
  warmup_steps = int(round(schedule_config.warmup_epochs * steps_per_epoch))
  decay_steps = max(total_steps - warmup_steps, 1)
  name = schedule_config.name
  if name == 'piecewise':
    boundaries = [int(round(e * steps_per_epoch)) - warmup_steps
                  for e in schedule_config.boundaries_epochs]
    decay = optax.piecewise_constant_schedule(
        lr, {b: schedule_config.decay_factor for b in boundaries if b > 0})
  elif name == 'polynomial':
    decay = optax.polynomial_schedule(lr, schedule_config.end_learning_rate,
                                      schedule_config.power, decay_steps)
  elif name == 'cosine':
    decay = optax.cosine_decay_schedule(
        lr, decay_steps, alpha=schedule_config.end_learning_rate / lr if lr else 0.0)
  elif name == 'constant':
    decay = optax.constant_schedule(lr)
  else:
    raise ValueError(f'config.schedule.name: unknown schedule {name!r} '
                     '(piecewise | polynomial | cosine | constant)')
  if warmup_steps <= 0:
    return decay
  warmup = optax.linear_schedule(0.0, lr, warmup_steps)
  schedule = optax.join_schedules([warmup, decay], [warmup_steps])
  if not schedule_config.first_step_at_peak:
    return schedule
  return lambda step: jnp.where(step == 0, lr, schedule(step))


def path_matches(params, regex: str):
  """A pytree of bools: does each parameter's '/'-joined path match `regex` ('' matches none)?"""
  pattern = re.compile(regex) if regex else None
  return jax.tree_util.tree_map_with_path(
      lambda path, _: bool(pattern and pattern.fullmatch(sharding.path_name(path))), params)


CLIP_SCOPES = {'all': '.*', 'backbone': 'backbone/.*'}  # name → regex of parameter paths


def make_optimizer(optimizer_config, schedule: optax.Schedule) -> optax.GradientTransformation:
  """clip_by_global_norm over `grad_clip_scope` (if asked) → weight decay (masked) →
  SGD-momentum or AdamW.

  Parameters matching `optimizer.frozen` get a zero update instead (no state kept for them,
  and their gradient does not count towards the clipped norm: torch's `requires_grad=False`).
  """
  config = optimizer_config
  if config.grad_clip_scope not in CLIP_SCOPES:
    raise ValueError(f'config.optimizer.grad_clip_scope={config.grad_clip_scope!r}: choose '
                     f'one of {tuple(CLIP_SCOPES)}')
  mask = lambda params: jax.tree.map(lambda m: not m, path_matches(params, config.no_decay))
  chain = []
  if config.grad_clip_norm > 0:
    chain.append(optax.masked(optax.clip_by_global_norm(config.grad_clip_norm),
                              lambda params: path_matches(params,
                                                          CLIP_SCOPES[config.grad_clip_scope])))
  if config.name == 'sgd':
    if config.weight_decay:
      chain.append(optax.add_decayed_weights(config.weight_decay, mask=mask))
    chain.append(optax.sgd(schedule, momentum=config.momentum or None,
                           nesterov=config.nesterov))
  elif config.name == 'adamw':
    chain.append(optax.adamw(schedule, b1=config.b1, b2=config.b2,
                             weight_decay=config.weight_decay, mask=mask))
  else:
    raise ValueError(f'config.optimizer.name: unknown optimiser {config.name!r} (sgd | adamw)')
  labels = lambda params: jax.tree.map(lambda frozen: 'frozen' if frozen else 'trained',
                                       path_matches(params, config.frozen))
  return optax.multi_transform({'trained': optax.chain(*chain), 'frozen': optax.set_to_zero()},
                               labels)
