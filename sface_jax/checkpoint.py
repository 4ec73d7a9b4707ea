"""Work directories and checkpoints: one global orbax checkpoint per step, never per process.

Layout of a work directory:
  DIR/config.json                  the run's configuration (written once, at the start)
  DIR/checkpoints/<step>/state     the train state (params, batch_stats, optimiser state,
                                   head state, RNG, step), each array saved by the processes
                                   that hold its shards
  DIR/checkpoints/<step>/meta      JSON: best verification accuracies so far, and the like

Orbax writes a step to a temporary directory and renames it when complete, so a run killed
at any moment (even `kill -9` in the middle of a save) leaves only finished checkpoints, and
a restart resumes from the newest one. Because the input order is a pure function of (seed,
step) and the RNG is folded with the step, (state, step) is all a resume needs.

Weights from elsewhere (`python -m sface_jax.tools.import_torch`) are written as a work
directory too, whose one checkpoint holds only `params/backbone` and `batch_stats`: every
consumer of trained weights loads them with `load_for_inference`, whatever made them.
"""

import argparse
import contextlib
import json
import logging as python_logging
import os
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from sface_jax import files

CONFIG_FILE = 'config.json'
CHECKPOINT_DIR = 'checkpoints'


def save_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with files.atomic_write(os.path.join(workdir, CONFIG_FILE)) as f:
      f.write(config.to_json_best_effort(indent=2))


def load_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} not found: {workdir} is not a sface_jax work directory')
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


class Checkpointer:
  """A thin wrapper over `ocp.CheckpointManager` with our two items, `state` and `meta`."""

  def __init__(self, workdir: str, *, keep: int, async_save: bool = True):
    self.directory = os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)
    options = ocp.CheckpointManagerOptions(
        preservation_policy=ocp.checkpoint_managers.LatestN(keep),
        enable_async_checkpointing=async_save,
        create=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
    """Starts saving (asynchronously where orbax can); `wait()` blocks until it is on disk."""
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
    """Restores `step` into the structure, dtypes and shardings of `abstract_state`."""
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    return restored.state, dict(restored.meta or {})

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()


@contextlib.contextmanager
def _reader(workdir: str):
  """A read-only manager of `workdir`'s checkpoints, without orbax's read-only warnings."""
  absl_logger = python_logging.getLogger('absl')
  level = absl_logger.level
  absl_logger.setLevel(python_logging.ERROR)  # "... read_only=True ..." on every load
  try:
    manager = ocp.CheckpointManager(os.path.join(workdir, CHECKPOINT_DIR),
                                    options=ocp.CheckpointManagerOptions(read_only=True))
    try:
      yield manager
    finally:
      manager.close()
  finally:
    absl_logger.setLevel(level)


def workdir_of(path: str) -> str:
  """The work directory of a work directory or of one of its steps (by the path alone)."""
  path = os.path.abspath(path)
  parent = os.path.dirname(path)
  return os.path.dirname(parent) if os.path.basename(parent) == CHECKPOINT_DIR else path


def resolve(path: str) -> tuple[str, int]:
  """A work directory (its newest step) or one step's directory -> (workdir, step)."""
  path = os.path.abspath(path)
  if os.path.exists(os.path.join(path, CONFIG_FILE)):
    step = None
    if os.path.isdir(os.path.join(path, CHECKPOINT_DIR)):
      with _reader(path) as manager:
        step = manager.latest_step()
    if step is None:
      raise FileNotFoundError(f'{path} holds no finished checkpoint under {CHECKPOINT_DIR}/')
    return path, step
  parent = os.path.dirname(path)
  if (os.path.basename(parent) == CHECKPOINT_DIR and os.path.basename(path).isdigit()
      and os.path.exists(os.path.join(os.path.dirname(parent), CONFIG_FILE))):
    return os.path.dirname(parent), int(os.path.basename(path))
  raise FileNotFoundError(
      f'{path} is neither a work directory (with {CONFIG_FILE}) nor a checkpoint '
      f'(<workdir>/{CHECKPOINT_DIR}/<step>)')


def save_backbone(workdir: str, config: ml_collections.ConfigDict, variables: Any) -> None:
  """Writes trained backbone weights as a work directory (config + checkpoint step 0).

  `variables` = {'params': ..., 'batch_stats': ...} of `config.model`. The directory must
  not exist yet; it is written under a temporary name and renamed when complete.
  """
  workdir = os.path.abspath(workdir)
  if os.path.exists(workdir):
    raise FileExistsError(f'{workdir}: exists; choose a new output directory')
  os.makedirs(os.path.dirname(workdir), exist_ok=True)
  with files.atomic_path(workdir) as tmp:
    save_config(config, tmp)
    state = {'params': {'backbone': variables['params']},
             'batch_stats': variables.get('batch_stats', {})}
    checkpointer = Checkpointer(tmp, keep=1, async_save=False)
    try:
      checkpointer.save(0, state, {'source': config.get('source', '')})
      checkpointer.wait()
    finally:
      checkpointer.close()


def is_step_path(path: str) -> bool:
  """Is `path` spelled as one checkpoint, `<workdir>/checkpoints/<step>` (by the path alone)?"""
  path = os.path.normpath(os.path.abspath(path))
  return (os.path.basename(path).isdigit()
          and os.path.basename(os.path.dirname(path)) == CHECKPOINT_DIR)


def _workdir_argument(path: str) -> str:
  if is_step_path(path):
    raise argparse.ArgumentTypeError(f'{path} is one checkpoint: pass it as --checkpoint')
  return path


def _checkpoint_argument(path: str) -> str:
  if not is_step_path(path):
    raise argparse.ArgumentTypeError(
        f'{path} is not one checkpoint (<workdir>/{CHECKPOINT_DIR}/<step>): for a work '
        'directory or an imported model (its newest checkpoint) use --workdir')
  return path


def add_source_arguments(parser) -> None:
  """Adds the required `--workdir | --checkpoint` pair of an argparse parser: the weights
  `load_for_inference` reads (`args.workdir or args.checkpoint`). Each flag takes only its
  own kind of path (sface_jax/cli.py), checked by its spelling."""
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument('--workdir', type=_workdir_argument,
                      help='a training run or an imported model (python -m '
                           'sface_jax.tools.import_torch): its newest checkpoint')
  source.add_argument('--checkpoint', type=_checkpoint_argument,
                      help=f'one checkpoint of a run: <workdir>/{CHECKPOINT_DIR}/<step>')


def load_for_inference(path: str, *, model_name: str | None = None):
  """Backbone and its variables, for embedding, from a work directory (its newest
  checkpoint) or one step's directory (`<workdir>/checkpoints/<step>`).

  Restores only `params/backbone` and `batch_stats` (never the class centres or the optimiser
  state, which can be far larger than the backbone), onto this process's first device
  whatever topology wrote them. `model_name` overrides the architecture the weights were made
  for; weights of another architecture are an error naming both. `config.data.dir` comes back
  resolved ('' → `<workdir>/data`).

  Returns (config, model, variables) with variables = {'params', 'batch_stats'}.
  """
  from sface_jax import models  # pylint: disable=g-import-not-at-top
  from sface_jax.data import tfrecord  # pylint: disable=g-import-not-at-top
  workdir, step = resolve(path)
  where = os.path.join(workdir, CHECKPOINT_DIR, str(step))
  config = load_config(workdir)
  config.data.dir = tfrecord.dataset_dir(config.data.dir, workdir)
  trained_name = config.model.name
  name = model_name or trained_name
  model = models.get_model(name, embedding_dim=config.model.embedding_dim,
                           dtype=config.model.dtype)
  expected = models.abstract_variables(model, config.data.image_size)
  expected = {'params': expected['params'], 'batch_stats': expected.get('batch_stats', {})}
  here = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(
      lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=here),
      {'params': {'backbone': expected['params']}, 'batch_stats': expected['batch_stats']})
  with _reader(workdir) as manager:
    try:
      restored = manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.PyTreeRestore(
              item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
              partial_restore=True))).state
    except (ValueError, KeyError) as e:
      raise ValueError(f'{where} (trained as {trained_name!r}) does not fit model {name!r}: '
                       f'{e}') from e
  variables = {'params': restored['params']['backbone'], 'batch_stats': restored['batch_stats']}
  _check_fits(variables, expected, where, trained_name, name)
  return config, model, variables


def _check_fits(variables, expected, where: str, trained_name: str, name: str) -> None:
  """Every variable `name` expects is there with its shape, or an error naming both models."""
  found = {jax.tree_util.keystr(path): leaf
           for path, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]}
  for path, leaf in jax.tree_util.tree_flatten_with_path(expected)[0]:
    key = jax.tree_util.keystr(path)
    got = found.get(key)
    if got is None or tuple(np.shape(got)) != tuple(leaf.shape):
      raise ValueError(
          f'{where} holds a {trained_name!r} backbone, which does not fit model {name!r}: '
          f'{key} is {None if got is None else tuple(np.shape(got))} there, '
          f'{tuple(leaf.shape)} in {name!r}')
