"""Work directories and checkpoints: one global orbax checkpoint per step, never per process.

Layout of a work directory:
  DIR/config.json                  the run's configuration (written at the start, and again
                                   by a resume that changes what `check_resume` allows)
  DIR/checkpoints/<step>/state     the train state (params, batch_stats, optimiser state,
                                   head state, RNG, step), each array saved by the processes
                                   that hold its shards
  DIR/checkpoints/<step>/meta      JSON: best verification accuracies so far, and the like

Orbax writes a step to a temporary directory and renames it when complete, so a run killed
at any moment (even `kill -9` in the middle of a save) leaves only finished checkpoints, and
a restart resumes from the newest one. Because the input order is a pure function of (seed,
step) and the RNG is folded with the step, (state, step) is all a resume needs.

Any device count resumes any checkpoint. The class-sized arrays (class centres, their
optimiser state, the softmax bias, center-loss centres: the leaves `sharding.class_axis`
names) are saved as trained, C' = C padded to a multiple of the writer's device count; a
restore pads or truncates them along the class axis to this run's C' (orbax's `strict=False`
restore: added columns are zeros, dropped ones are padding, which no loss, metric or gradient
reads, so it stays exactly zero in training). The run then goes on as one on the new device
count would: the float32 sums come in another order (round-off), and Partial FC draws its
negative centres per device, so its draw differs from the old count's. Insightface's
arcface_torch cannot do this: each rank saves its own slice of the class centres and its
optimiser state (`checkpoint_gpu_<rank>.pt`), so it resumes only on as many GPUs as wrote
them.

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
from sface_jax import sharding

CONFIG_FILE = 'config.json'
CHECKPOINT_DIR = 'checkpoints'


class ConfigMismatchError(ValueError):
  """A resume that does not fit its work directory; raised before anything is written."""


# Fields a resume may change (sface_jax/configs/base.py names; a name covers the fields below it).
RESUMABLE_FIELDS = (
    'num_steps', 'num_epochs',  # the run's length
    'log_every_steps', 'checkpoint_every_steps', 'keep_checkpoints', 'eval',  # reporting
    'data.prefetch',  # how far ahead the input pipeline works
    'data.num_classes',  # a check only: the dataset's own count is compared with the checkpoint's
    'head.center_init',  # read only to create the state, at step 0
    'allow_config_change',
)


def _flat_fields(tree: dict[str, Any], prefix: str = '') -> dict[str, Any]:
  """Dotted field name → value of a config as JSON (tuples as lists)."""
  fields = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      fields.update(_flat_fields(value, f'{prefix}{key}.'))
    else:
      fields[f'{prefix}{key}'] = value
  return fields


def _resumable(name: str, heads_used: set[str]) -> bool:
  parts = name.split('.')
  if parts[0] == 'head' and len(parts) > 2 and parts[1] not in heads_used:
    return True  # the settings of a head this run does not use
  return any(name == field or name.startswith(field + '.') for field in RESUMABLE_FIELDS)


def check_resume(config: ml_collections.ConfigDict, workdir: str) -> list[str]:
  """Compares `config` with the `config.json` of a work directory it is about to resume.

  A resume continues the same experiment, so the two configs are compared field by field
  before anything is written (the data, config.json, a checkpoint):

  - Allowed (returned as 'field old → new', for the caller to log; config.json then takes the
    new values): the run's length (`num_steps`, `num_epochs`; a polynomial or cosine schedule
    then decays to the new end), how it reports and saves (`log_every_steps`,
    `checkpoint_every_steps`, `keep_checkpoints`, `eval.*`), `data.prefetch`,
    `data.num_classes` (only a check: the dataset's class count itself must equal the
    checkpoint's, `Checkpointer.check_fits`), `head.center_init` (used at step 0 only), the
    settings of heads the run does not use (`head.cosface.*` in an ArcFace run), and
    `allow_config_change`.
  - Refused unless `config.allow_config_change`: every other field, because it changes what
    the remaining steps compute: the backbone (`model.*`: architecture and embedding size
    change the state's shapes, `dtype` the arithmetic), the loss (`head.name`, `head.scale`,
    the head's own settings, `head.sample_rate`), the optimiser and the learning-rate
    schedule, `batch_size` (the input position is counted in batches, and Partial FC's sample
    size follows it), `seed` and the data (`data.*`: which images, in which order, augmented
    how; a moved dataset is a `data.dir` change to allow explicitly).
  - Fields the stored config lacks (it predates them) are not compared: they keep their
    defaults, which reproduce the code that wrote it.

  With `allow_config_change`, a change that leaves the checkpoint unable to restore (another
  architecture, head state or class count) is still refused, by `Checkpointer.check_fits`.

  Returns the allowed changes ([] when `workdir` holds nothing to resume: no finished
  checkpoint). Raises ConfigMismatchError with one line listing the refused fields.
  """
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path) or latest_step(workdir) is None:
    return []
  with open(path) as f:
    stored = _flat_fields(json.load(f))
  new = _flat_fields(json.loads(config.to_json_best_effort()))
  heads_used = {stored.get('head.name'), new.get('head.name')}
  allowed, refused = [], []
  for name in sorted(stored.keys() & new.keys()):
    if stored[name] != new[name]:
      change = f'{name} {json.dumps(stored[name])} → {json.dumps(new[name])}'
      (allowed if _resumable(name, heads_used) else refused).append(change)
  if refused and not config.allow_config_change:
    raise ConfigMismatchError(
        f'{workdir} holds a run with another config: {"; ".join(refused)}. These change what '
        'the run computes: resume with the config in its config.json, start a new --workdir, '
        'or pass --config.allow_config_change=true to resume anyway')
  return allowed + [f'{change} (allow_config_change)' for change in refused]


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
    self._manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={'state': ocp.StandardCheckpointHandler(),  # typed: metadata reads
                       'meta': ocp.JsonCheckpointHandler()})

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
    """Starts saving (asynchronously where orbax can); `wait()` blocks until it is on disk."""
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)

  def meta(self, step: int) -> dict[str, Any]:
    return dict(self._manager.restore(
        step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta or {})

  def check_fits(self, step: int, abstract_state: Any, num_classes: int) -> None:
    """Raises ConfigMismatchError, naming the arrays, unless `step` restores into
    `abstract_state`: the same arrays, shapes and dtypes, but along class axes, where any
    length ≥ `num_classes` (the writer's padding) fits; and the same class count."""
    where = f'{self.directory}/{step}'
    stored_classes = self.meta(step).get('num_classes', num_classes)
    if stored_classes != num_classes:
      raise ConfigMismatchError(
          f'{where} was trained on {stored_classes} classes, the dataset has {num_classes}: '
          'resume with the data it was trained on, or start a new --workdir')
    stored = _leaves(self._manager.item_metadata(step).state)
    wanted = _leaves(abstract_state)
    problems = []
    for name in sorted(stored.keys() | wanted.keys()):
      if name not in stored or name not in wanted:
        problems.append(f'{name} only in {"this config" if name in wanted else "the checkpoint"}')
        continue
      (old_shape, old_dtype), (shape, dtype) = stored[name], wanted[name]
      axis = sharding.class_axis(name, len(shape))
      fits = [a == b or (i == axis and min(a, b) >= num_classes)
              for i, (a, b) in enumerate(zip(old_shape, shape))]
      if len(old_shape) != len(shape) or not all(fits) or old_dtype != dtype:
        problems.append(f'{name} {old_dtype}{list(old_shape)} stored, {dtype}{list(shape)} here')
    if problems:
      raise ConfigMismatchError(
          f'{where} does not fit this config ({len(problems)} arrays differ): '
          f'{"; ".join(problems[:3])}{"; …" if len(problems) > 3 else ""}')

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
    """Restores `step` into the structure, dtypes and shardings of `abstract_state`, padding
    or truncating the class axes to its class count (see the module docstring); run
    `check_fits` first: nothing else may differ."""
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state, strict=False),
        meta=ocp.args.JsonRestore()))
    return restored.state, dict(restored.meta or {})

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()


def _leaves(tree: Any) -> dict[str, tuple[tuple[int, ...], str]]:
  """'/'-joined path → (shape, dtype name) of every array of a state or its metadata."""
  return {sharding.path_name(path): (tuple(leaf.shape), np.dtype(leaf.dtype).name)
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


@contextlib.contextmanager
def reader(workdir: str):
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


def latest_step(workdir: str) -> int | None:
  """The newest finished checkpoint step of a work directory; None when it has none."""
  if not os.path.isdir(os.path.join(workdir, CHECKPOINT_DIR)):
    return None
  with reader(workdir) as manager:
    return manager.latest_step()


def workdir_of(path: str) -> str:
  """The work directory of a work directory or of one of its steps (by the path alone)."""
  path = os.path.abspath(path)
  parent = os.path.dirname(path)
  return os.path.dirname(parent) if os.path.basename(parent) == CHECKPOINT_DIR else path


def resolve(path: str) -> tuple[str, int]:
  """A work directory (its newest step) or one step's directory -> (workdir, step)."""
  path = os.path.abspath(path)
  if os.path.exists(os.path.join(path, CONFIG_FILE)):
    step = latest_step(path)
    if step is None:
      raise FileNotFoundError(f'{path} holds no finished checkpoint under {CHECKPOINT_DIR}/')
    return path, step
  if is_step_path(path) and os.path.exists(os.path.join(workdir_of(path), CONFIG_FILE)):
    return workdir_of(path), int(os.path.basename(path))
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
  with reader(workdir) as manager:
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
