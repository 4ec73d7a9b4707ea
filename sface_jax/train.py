"""`train_and_evaluate(config, workdir)`: the one training loop.

Read top to bottom: the dataset (converted on first use) → mesh → model, head, optimiser →
the train state, created already sharded (`jax.eval_shape` → shardings → `jax.jit(init,
out_shardings=…)`) or restored from the newest checkpoint → the jitted `train_step` → the loop
(progress, metrics, evaluation, checkpoints, NaN guard, SIGTERM).
"""

import dataclasses
import functools
import signal
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from clu import metric_writers

from sface_jax import checkpoint
from sface_jax import evaluate
from sface_jax import heads
from sface_jax import models
from sface_jax import optim
from sface_jax import progress
from sface_jax import sharding
from sface_jax import xla_options
from sface_jax.data import convert
from sface_jax.data import pipeline
from sface_jax.data import tfrecord
from sface_jax.evaluation import report

PROGRESS_SECONDS = 10.0  # a progress line at least this often, besides every log step


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
                             dropout=config.model.dropout, dtype=config.model.dtype),
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
      'grad_norm': optax.global_norm(grads),
      'param_norm': optax.global_norm(params['backbone']),
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


class _Preemption:
  """Turns SIGTERM (what preemptible TPU VMs send) into a checkpoint and a clean exit."""

  def __init__(self):
    self.requested = False
    self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning('SIGTERM received: saving a checkpoint and stopping.')
    self.requested = True

  def reached(self, step: int) -> bool:
    if jax.process_count() > 1:  # every host must stop at the same step
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      return self.requested or multihost_utils.reached_preemption_sync_point(step)
    return self.requested

  def restore(self):
    signal.signal(signal.SIGTERM, self._previous)


class NonFiniteLossError(FloatingPointError):
  pass


def _progress_line(step: int, total_steps: int, metrics: dict[str, float], rate: float,
                   left: float, batch_size: int) -> str:
  text = (f'step {step}/{total_steps} | loss {metrics["loss"]:.4f} | '
          f'lr {metrics["learning_rate"]:.4g} | {rate * batch_size:.1f} img/s | '
          f'xnorm {metrics["xnorm"]:.2f}')
  if 'theta_target' in metrics:
    text += f' | θ_y {metrics["theta_target"]:.1f}°'
  return text + f' | ETA {progress.format_duration(left)}'


def _prepare_data(config: ml_collections.ConfigDict, workdir: str) -> tfrecord.DatasetInfo:
  """The converted dataset (converting `config.data.convert.source` on first use)."""
  data_dir = tfrecord.dataset_dir(config.data.dir, workdir)
  if jax.process_index() == 0:  # the others wait: conversion writes to shared storage
    convert.prepare(config.data.convert, data_dir)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices('dataset converted')
  info = tfrecord.read_info(data_dir)
  if config.data.num_classes not in (-1, info.num_classes):
    raise ValueError(f'config.data.num_classes={config.data.num_classes} but '
                     f'{data_dir}/{tfrecord.INFO_FILE} says {info.num_classes}')
  return info


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains (resuming from `workdir` when it holds a checkpoint), evaluates, checkpoints.

  Returns the last verification results (set name → metrics), or {} without eval sets.
  """
  info = _prepare_data(config, workdir)
  steps_per_epoch = max(info.num_examples // config.batch_size, 1)
  total_steps = (config.num_steps if config.num_steps > 0
                 else int(round(config.num_epochs * steps_per_epoch)))
  mesh = sharding.make_mesh()
  setup = make_setup(config, num_classes=info.num_classes, steps_per_epoch=steps_per_epoch,
                     total_steps=total_steps, mesh=mesh)
  checkpoint.save_config(config, workdir)

  init_fn = functools.partial(create_train_state, config.seed, setup)
  abstract_state = jax.eval_shape(init_fn)
  state_shardings = sharding.tree_shardings(mesh, abstract_state)
  checkpointer = checkpoint.Checkpointer(workdir, keep=config.keep_checkpoints)
  start_step = checkpointer.latest_step()
  meta = {}
  if start_step is None:
    state = jax.jit(init_fn, out_shardings=state_shardings)()
    start_step = 0
  else:
    abstract = jax.tree.map(
        lambda leaf, s: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=s),
        abstract_state, state_shardings)
    state, meta = checkpointer.restore(start_step, abstract)
    logging.info('Resumed from %s/%d', checkpointer.directory, start_step)
    print(f'Resuming from step {start_step} ({checkpointer.directory}/{start_step})')

  batch_sharding = sharding.batch_sharding(mesh)
  step_fn = jit_train_step(setup, state_shardings, mesh)
  batches = pipeline.train_dataset(
      info, batch_size=config.batch_size, image_size=config.data.image_size,
      seed=config.seed, start_step=start_step, random_flip=config.data.random_flip,
      augmentation=pipeline.Augmentation.from_config(config.data),
      shuffle_buffer=config.data.shuffle_buffer, prefetch=config.data.prefetch,
      host_split=config.data.host_split)
  evaluator = (evaluate.Evaluator(config.eval.sets, data_dir=info.directory,
                                  image_size=config.data.image_size,
                                  batch_size=config.eval.batch_size, mesh=mesh)
               if config.eval.sets else None)
  writer = metric_writers.create_default_writer(workdir,
                                                just_logging=jax.process_index() > 0)
  sampled = (f', Partial FC {config.head.sample_rate:g}'
             if config.head.sample_rate < 1 else '')
  print(f'Training {config.model.name} + {config.head.name} on {info.num_examples} images '
        f'of {info.num_classes} identities: {total_steps} steps of {config.batch_size} '
        f'({total_steps / steps_per_epoch:.1f} epochs) on {mesh.size} device(s), '
        f'{setup.padded_classes // mesh.size} class centres each{sampled}')

  if evaluator is not None:  # highest accuracies survive restarts, in the checkpoint
    evaluator.highest_accuracy.update(meta.get('highest_accuracy', {}))
  last_good = start_step if start_step else None
  results: dict[str, Any] = {}
  clock = progress.Progress(total_steps, start_step)
  last_print = time.perf_counter()
  preemption = _Preemption()
  step = start_step
  try:
    while step < total_steps:
      batch = pipeline.global_batch(next(batches), batch_sharding)
      state, metrics = step_fn(state, batch)
      step += 1
      if step == start_step + 1:  # the first step compiles: throughput counts from here
        jax.block_until_ready(metrics)
        clock.restart(step)
      last = step == total_steps
      eval_due = evaluator is not None and (last or (
          config.eval.every_steps > 0 and step % config.eval.every_steps == 0))
      save_due = last or step % config.checkpoint_every_steps == 0
      log_due = (step % config.log_every_steps == 0 or last
                 or time.perf_counter() - last_print >= PROGRESS_SECONDS)
      preempted = preemption.reached(step)
      if not (log_due or eval_due or save_due or preempted):
        continue
      host_metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
      if not (np.isfinite(host_metrics['loss']) and np.isfinite(host_metrics['grad_norm'])):
        where = (f'the last good checkpoint is {checkpointer.directory}/{last_good}'
                 if last_good is not None else 'no checkpoint was written yet')
        raise NonFiniteLossError(
            f'loss {host_metrics["loss"]} / gradient norm {host_metrics["grad_norm"]} by step '
            f'{step}: training stopped; {where} (not overwritten).')
      rate, left = clock.measure(step)
      last_print = time.perf_counter()
      print(_progress_line(step, total_steps, host_metrics, rate, left, config.batch_size),
            flush=True)
      writer.write_scalars(step, {**host_metrics, 'steps_per_sec': rate,
                                  'images_per_sec': rate * config.batch_size})
      if eval_due:
        variables = {'params': state.params['backbone'], 'batch_stats': state.batch_stats}
        results = evaluator.run(setup.model, variables)
        highest = evaluator.highest_accuracy
        writer.write_scalars(step, {f'{name}/{key}': value
                                    for name, result in results.items()
                                    for key, value in (('accuracy', result.accuracy),
                                                       ('highest_accuracy', highest[name]),
                                                       ('xnorm', result.xnorm))})
        print(f'[eval step {step}] ' + ', '.join(
            f'{name} {result.accuracy:.4f} (highest {highest[name]:.4f})'
            for name, result in results.items()))
      if save_due or preempted:
        checkpointer.save(step, state, {
            'highest_accuracy': evaluator.highest_accuracy if evaluator is not None else {},
            'num_classes': info.num_classes, 'total_steps': total_steps})
        last_good = step
      if preempted:
        print(f'Stopped at step {step} on SIGTERM; rerun the same command to resume.')
        break
      if eval_due or save_due:  # the next rate covers training steps only
        clock.restart(step)
    if results and step == total_steps and jax.process_index() == 0:
      report.write_report(results, workdir, step=step)
      print(report.format_table(results))
  finally:
    checkpointer.wait()
    checkpointer.close()
    writer.flush()
    preemption.restore()
  return results
