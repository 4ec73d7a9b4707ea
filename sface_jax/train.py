"""`train_and_evaluate(config, workdir)`: the one training loop.

Read top to bottom: a resume's config checked against the stored one (before anything is
written) → the dataset (converted on first use) → mesh → model, head, optimiser → the train
state, created already sharded (`jax.eval_shape` → shardings → `jax.jit(init,
out_shardings=…)`) or restored from the newest checkpoint (on any device count) → the jitted
`train_step` → the loop (progress, metrics, evaluation, checkpoints, NaN guard, SIGTERM and
Ctrl-C). The step itself lives in `sface_jax.step`.
"""

import functools
import signal
import sys
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from clu import metric_writers

from sface_jax import checkpoint
from sface_jax import evaluate
from sface_jax import progress
from sface_jax import sharding
from sface_jax import step as step_lib  # `step` is the loop's counter below
from sface_jax.data import convert
from sface_jax.data import pipeline
from sface_jax.data import tfrecord
from sface_jax.evaluation import report

PROGRESS_SECONDS = 10.0  # a progress line at least this often, besides every log step


class Interrupted(Exception):
  """Training stopped early on a signal, after saving a checkpoint at the step it reached."""

  def __init__(self, signum: int, message: str):
    super().__init__(message)
    self.signum = signum


class _Interrupts:
  """SIGTERM (what preemptible TPU VMs send) and SIGINT (Ctrl-C) end the current step, save a
  checkpoint there and stop (`Interrupted`); a second SIGINT stops at once, without saving
  (KeyboardInterrupt).

  On several hosts every process must stop at the same step (the save is collective), whichever
  of them received the signal: they stop at JAX's preemption sync point, and every
  `agree_every` steps they all-gather which signal each has received, so a signal that
  reaches one process (Ctrl-C in one terminal) stops them all at the next such step.
  """

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self, agree_every: int = 1):
    self.received: int | None = None
    self._agree_every = max(agree_every, 1)
    self._previous = {signum: signal.signal(signum, self._handle) for signum in self.SIGNALS}

  def _handle(self, signum, frame):
    del frame
    if self.received is not None:
      if signum == signal.SIGINT:
        raise KeyboardInterrupt
      return
    self.received = signum
    again = ' (Ctrl-C again to quit at once, without saving)' if signum == signal.SIGINT else ''
    print(f'{signal.Signals(signum).name} received: saving a checkpoint at the end of this '
          f'step and stopping{again}.', file=sys.stderr, flush=True)

  def reached(self, step: int) -> bool:
    """Whether to save and stop after `step` (the same answer on every process)."""
    if jax.process_count() == 1:
      return self.received is not None
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    if multihost_utils.reached_preemption_sync_point(step):
      self.received = self.received or signal.SIGTERM
      return True
    if step % self._agree_every:
      return False
    received = multihost_utils.process_allgather(np.asarray(self.received or 0, np.int32))
    if not np.any(received):
      return False
    self.received = self.received or int(np.max(received))
    return True

  def restore(self):
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)


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
  config_changes = checkpoint.check_resume(config, workdir)  # raises before any write
  info = _prepare_data(config, workdir)
  steps_per_epoch = max(info.num_examples // config.batch_size, 1)
  total_steps = (config.num_steps if config.num_steps > 0
                 else int(round(config.num_epochs * steps_per_epoch)))
  mesh = sharding.make_mesh()
  setup = step_lib.make_setup(config, num_classes=info.num_classes,
                              steps_per_epoch=steps_per_epoch, total_steps=total_steps,
                              mesh=mesh)
  # The seed is an argument, not a constant: one compiled program (and one entry of the
  # persistent compilation cache) serves every seed.
  init_fn = functools.partial(step_lib.create_train_state, setup=setup)
  abstract_state = jax.eval_shape(init_fn, config.seed)
  state_shardings = sharding.tree_shardings(mesh, abstract_state)
  checkpointer = checkpoint.Checkpointer(workdir, keep=config.keep_checkpoints)
  start_step = checkpointer.latest_step()
  if start_step is not None:
    checkpointer.check_fits(start_step, abstract_state, info.num_classes)
  checkpoint.save_config(config, workdir)
  meta = {}
  if start_step is None:
    state = jax.jit(init_fn, out_shardings=state_shardings)(config.seed)
    start_step = 0
  else:
    abstract = jax.tree.map(
        lambda leaf, s: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=s),
        abstract_state, state_shardings)
    state, meta = checkpointer.restore(start_step, abstract)
    logging.info('Resumed from %s/%d', checkpointer.directory, start_step)
    print(f'Resuming from step {start_step} ({checkpointer.directory}/{start_step})')
    if config_changes:
      print(f'Config changes since the last run: {"; ".join(config_changes)}')

  batch_sharding = sharding.batch_sharding(mesh)
  step_fn = step_lib.jit_train_step(setup, state_shardings, mesh)
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

  if start_step >= total_steps:
    print(f'{checkpointer.directory}/{start_step} is at or past the last step, {total_steps}: '
          'nothing to train (raise --config.num_steps to go on)')
  if evaluator is not None:  # highest accuracies survive restarts, in the checkpoint
    evaluator.highest_accuracy.update(meta.get('highest_accuracy', {}))
  last_good = start_step if start_step else None
  results: dict[str, Any] = {}
  clock = progress.Progress(total_steps, start_step)
  last_print = time.perf_counter()
  interrupts = _Interrupts(agree_every=config.log_every_steps)
  stop_at_once = False
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
      preempted = interrupts.reached(step)
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
        break
      if eval_due or save_due:  # the next rate covers training steps only
        clock.restart(step)
    if results and step == total_steps and jax.process_index() == 0:
      report.write_report(results, workdir, step=step)
      print(report.format_table(results))
  except KeyboardInterrupt:  # a second Ctrl-C: out now, not waiting for a save in progress
    stop_at_once = True
    raise
  finally:
    if not stop_at_once:
      checkpointer.wait()
      checkpointer.close()
    writer.flush()
    interrupts.restore()
  if interrupts.received is not None and step < total_steps:
    raise Interrupted(interrupts.received,
                      f'Stopped at step {step} on {signal.Signals(interrupts.received).name} '
                      f'(checkpoint {checkpointer.directory}/{step}); rerun the same command '
                      'to resume.')
  return results
