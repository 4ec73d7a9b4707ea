"""The training step: the state, the pieces it is built from, and `train_step` itself.

`make_setup(config, ...)` turns a config into the model, head, sharded head loss and optax
optimiser; `create_train_state` is the initial state (called under `jax.jit(out_shardings=…)`
so it is born sharded); `train_step` is one pure optimiser step; `jit_train_step` compiles it
on a mesh with donated state. Training (`sface_jax.train`), the memory planner
(`sface_jax.plan`) and the benchmark (`bench/train_step.py`) all build this one step.

Why a module of its own: the step needs JAX, Flax, optax and ml_collections only, not the
input pipeline's TensorFlow or the metric writers, so it imports where those are absent (an
accelerator image with JAX alone, where the benchmark runs).
"""

import dataclasses
import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from sface_jax import heads
from sface_jax import models
from sface_jax import optim
from sface_jax import sharding
from sface_jax import xla_options


@flax.struct.dataclass
class TrainState:
  """Everything a resumed run needs; a plain pytree, saved whole by orbax."""
  step: jax.Array  # int32 scalar: optimiser steps taken
  params: Any  # {'backbone': ..., 'classifier': {'class_centers', ['bias']}}
  batch_stats: Any  # backbone batch-norm running statistics
  opt_state: Any
  head_state: Any  # non-trainable head state (running norm statistics, center-loss centres)
  rng: jax.Array  # uint32 key data; the step's key is fold_in(rng, step)


@dataclasses.dataclass(frozen=True)
class Setup:
  """The static pieces the step is built from (closed over by `jax.jit`)."""
  model: Any
  classifier: heads.ClassCenters
  head: heads.Head
  head_loss: Any  # sharding.shard_head(head, mesh, ...)
  optimizer: optax.GradientTransformation
  schedule: optax.Schedule
  num_classes: int
  padded_classes: int  # num_classes rounded up to a multiple of the device count
  image_size: int
  embedding_dim: int


def check_config(config: ml_collections.ConfigDict, *, num_classes: int,
                 num_devices: int) -> None:
  """Settings that cannot work on this many devices fail here, naming the field."""
  if config.batch_size <= 0 or config.batch_size % num_devices:
    raise ValueError(f'config.batch_size={config.batch_size} is not a positive multiple of '
                     f'the {num_devices} devices (the batch is split over all of them)')
  if num_classes < num_devices:
    raise ValueError(f'the dataset has {num_classes} classes, fewer than the {num_devices} '
                     'devices its class centres are split over; use fewer devices')
  if not 0.0 < config.head.sample_rate <= 1.0:
    raise ValueError(f'config.head.sample_rate={config.head.sample_rate}: expected a fraction '
                     'in (0, 1] (1 = every class, no Partial FC sampling)')
  if config.head.center_init not in heads.classifier.CENTER_INITS:
    raise ValueError(f'config.head.center_init={config.head.center_init!r}: choose one of '
                     f'{heads.classifier.CENTER_INITS}')


def make_setup(config: ml_collections.ConfigDict, *, num_classes: int, steps_per_epoch: int,
               total_steps: int, mesh: jax.sharding.Mesh) -> Setup:
  check_config(config, num_classes=num_classes, num_devices=mesh.size)
  head = heads.get_head(config.head)
  schedule = optim.learning_rate_schedule(config.schedule, steps_per_epoch=steps_per_epoch,
                                          total_steps=total_steps)
  padded_classes = sharding.padded_num_classes(num_classes, mesh)
  return Setup(
      model=models.get_model(config.model.name, embedding_dim=config.model.embedding_dim,
                             dropout=config.model.dropout, dtype=config.model.dtype,
                             bn_running_var=config.model.bn_running_var),
      classifier=heads.ClassCenters(num_classes=num_classes,
                                    embedding_dim=config.model.embedding_dim,
                                    use_bias=head.uses_bias, padded_classes=padded_classes,
                                    center_init=config.head.center_init),
      head=head,
      head_loss=sharding.shard_head(head, mesh, num_classes=num_classes,
                                    sample_rate=config.head.sample_rate),
      optimizer=optim.make_optimizer(config.optimizer, schedule),
      schedule=schedule,
      num_classes=num_classes,
      padded_classes=padded_classes,
      image_size=config.data.image_size,
      embedding_dim=config.model.embedding_dim)


def create_train_state(seed: int, setup: Setup) -> TrainState:
  """The initial state; called under `jax.jit(out_shardings=…)` so it is born sharded."""
  rng = jax.random.key(seed)
  backbone_rng, classifier_rng = jax.random.split(jax.random.fold_in(rng, 1))
  images = jnp.zeros((1, setup.image_size, setup.image_size, 3), jnp.float32)
  variables = setup.model.init(backbone_rng, images, train=False)
  params = {'backbone': variables['params'], 'classifier': {}}
  if setup.head.uses_classifier:
    params['classifier'] = setup.classifier.init(classifier_rng)['params']
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      batch_stats=variables.get('batch_stats', {}),
      opt_state=setup.optimizer.init(params),
      head_state=setup.head.init_state(setup.padded_classes, setup.embedding_dim),
      rng=jax.random.key_data(rng))


def train_step(state: TrainState, batch: dict[str, jax.Array], *,
               setup: Setup) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimiser step: forward, loss, backward, optax update, head-state update. Pure."""
  step_rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
  dropout_rng, head_rng = jax.random.split(step_rng)

  # The named scopes label the compiled operations (and so profiles: bench/profile_summary.py)
  # by part; autodiff wraps them as jvp(...) in the forward and transpose(jvp(...)) backward.
  def loss_fn(params):
    with jax.named_scope('backbone'):
      (embeddings, _), updates = setup.model.apply(
          {'params': params['backbone'], 'batch_stats': state.batch_stats},
          batch['image'], train=True, mutable=['batch_stats'], rngs={'dropout': dropout_rng})
    with jax.named_scope('head'):
      loss, head_state, head_metrics = setup.head_loss(
          embeddings, batch['label'], params['classifier'], state.head_state, state.step,
          jax.random.key_data(head_rng))
    return loss, (updates['batch_stats'], head_state, head_metrics)

  (loss, (batch_stats, head_state, head_metrics)), grads = jax.value_and_grad(
      loss_fn, has_aux=True)(state.params)
  with jax.named_scope('optimiser'):
    updates, opt_state = setup.optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
  metrics = {
      'loss': loss,
      'learning_rate': setup.schedule(state.step),
      'grad_norm': optax.tree.norm(grads),
      'param_norm': optax.tree.norm(params['backbone']),
      **head_metrics,  # xnorm, theta_target, accuracy, ...: see sface_jax.heads.head
  }
  new_state = TrainState(step=state.step + 1, params=params, batch_stats=batch_stats,
                         opt_state=opt_state, head_state=head_state, rng=state.rng)
  return new_state, metrics


def jit_train_step(setup: Setup, state_shardings: Any, mesh: jax.sharding.Mesh,
                   compiler_options: dict[str, str] | None = None):
  """`train_step` under `jax.jit`: state and batch laid out on `mesh`, the state donated
  (updated in place), metrics replicated. Training, the planner and the benchmark all
  compile this one. `compiler_options` default to ours for the mesh's platform
  (`sface_jax.xla_options`); {} gives XLA's own (the benchmark's before/after)."""
  if compiler_options is None:
    compiler_options = xla_options.for_mesh(mesh)
  return jax.jit(functools.partial(train_step, setup=setup),
                 in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
                 out_shardings=(state_shardings, sharding.replicated(mesh)),
                 donate_argnums=(0,), compiler_options=compiler_options)
