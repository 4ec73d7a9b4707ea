"""What the ORL studies (`label_noise`, `degraded_quality`) share: runs, resuming, a, b, statistics.

A study trains a few heads at a few *levels* of one treatment of the training set (labels
flipped, images degraded) with several seeds, one recipe for all, and evaluates every run on
held-out pairs of the ten people s31–s40 it never trains on. This module holds everything that
does not depend on the treatment:

* Data: the clean conversion of ORL s1–s30 (the demo's converter, `sface_jax/configs/demo.py`),
  `read_records`, and `write_dataset_copy`, which writes the treated copy of a level (same
  shard files and counts, so the input pipeline serves the same records in the same order;
  a manifest JSON listing what was changed; `sface_jax_dataset.json` last, its presence meaning
  complete).
* Runs: `Run` (head, level, seed) and its directory `runs/<head>/<prefix><pct>/seed<s>`;
  `run_config` (the demo config with the study's recipe and the run's head); `run_study`, the
  loop: a run whose `result.json` exists is done and skipped, a run killed in training resumes
  from its checkpoint (the trainer's own resume), so a killed study continues where it stopped
  when the same command is run again; the outputs are rewritten after every run.
* SFace's a, b (`choose_sface_ab`), one written rule for every study: from the clean ArcFace
  run (level 0, first seed, trained first), at the end of its training, embed the training
  images (un-augmented, flip-summed) and take a = the median angle θ_y between an image and
  its own class centre, b = the median angle between an image and the nearest *other* class
  centre. So SFace's pull fades where a typical clean sample sits after ArcFace training, and
  its push fades at the distance where ArcFace typically leaves the nearest other identity.
  Training images only; nothing is tuned on the held-out pairs.
* Held-out metrics (`evaluate_pairs`): the insightface protocol's 10-fold accuracy and TAR at
  FAR = 1e-2 by the same in-graph protocol (per fold, the threshold reaching FAR 1e-2 on the
  nine training folds, TAR on the tenth; 450 different-person pairs make 1e-2 the lowest FAR
  with more than a few negatives).
* Statistics (`cell_statistics`, `paired_differences`). Ten held-out people make the seed
  spread several points, and float32 kernels differ between CPUs while training is chaotic,
  so the same command on another machine acts as another seed (the label-noise study's 40 %
  cells reversed their order on another CPU, issue 38). So: at least five seeds; each cell
  reports its mean and a bootstrap 95 % interval of the mean over seeds (percentile
  bootstrap, 10 000 resamples of the seeds with replacement, fixed generator); each head is
  compared with a reference head *seed by seed* (same seed, same data: paired), and a
  difference is called only when the bootstrap 95 % interval of the mean paired difference
  excludes 0, and never with fewer than 3 seeds. With five seeds the percentile bootstrap is
  on the narrow side (126 distinct resamples; it under-covers a little against a t interval),
  so a called difference is a minimum requirement, not proof; the per-seed values are in the
  JSON output.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from sface_jax import cli
from sface_jax import compilation_cache
from sface_jax import files
from sface_jax import progress

DEFAULT_SEEDS = (0, 1, 2, 3, 4)
DEFAULT_STEPS = 300
DEFAULT_IMAGE_SIZE = 32
DEFAULT_MODEL = 'r18_small'
FAR = 1e-2
PAIR_SET = 'orl_val'
RESULT_FILE = 'result.json'
THETA_FILE = 'theta.npz'
AB_FILE = 'sface_ab.json'
SFACE_FAMILY = ('sface', 'quality_sface', 'quality_sface_v2')
BOOTSTRAP_RESAMPLES = 10_000
MIN_SEEDS_TO_CALL = 3  # fewer seeds: the interval is (nearly) a point, nothing is called


def pct(fraction: float) -> int:
  return int(round(100 * fraction))


# ---- data ------------------------------------------------------------------------------------


def demo_config():
  """sface_jax/configs/demo.py's get_config."""
  from sface_jax.configs import demo  # pylint: disable=g-import-not-at-top
  return demo.get_config()


def read_records(data_dir: str) -> tuple[list[bytes], np.ndarray]:
  """(image bytes, labels) of every record, shard by shard in `sface_jax_dataset.json` order."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from sface_jax.data import tfrecord  # pylint: disable=g-import-not-at-top
  info = tfrecord.read_info(data_dir)
  images, labels = [], []
  for path in info.shard_paths:
    for record in tf.data.TFRecordDataset(path):
      example = tfrecord.parse_example(record)
      images.append(example[tfrecord.IMAGE_KEY].numpy())
      labels.append(int(example[tfrecord.LABEL_KEY].numpy()))
  if len(images) != info.num_examples:
    raise ValueError(f'{data_dir}: read {len(images)} records, sface_jax_dataset.json says '
                     f'{info.num_examples}')
  return images, np.asarray(labels, np.int64)


def existing_copy(output: str, manifest_name: str, wanted: dict[str, Any], *,
                  marker: str | None = None) -> dict | None:
  """The manifest of a complete copy in `output` made with the settings `wanted` (a subset
  of the manifest's keys); None when there is no complete copy; an error naming the folder
  when there is one made with other settings. `marker`: the file written last, whose
  presence means complete (default: the dataset's info file)."""
  from sface_jax.data import tfrecord  # pylint: disable=g-import-not-at-top
  manifest_path = os.path.join(output, manifest_name)
  if not (os.path.exists(os.path.join(output, marker or tfrecord.INFO_FILE)) and
          os.path.exists(manifest_path)):
    return None
  with open(manifest_path) as f:
    manifest = json.load(f)
  found = {key: manifest.get(key) for key in wanted}
  if found != wanted:
    raise ValueError(f'{output} was made with {found}; wanted {wanted}: delete it')
  return manifest


def write_dataset_copy(clean_dir: str, output: str, images: Sequence[bytes],
                       labels: Sequence[int], manifest_name: str, manifest: dict[str, Any],
                       what: str) -> dict[str, Any]:
  """Writes `images`/`labels` (record i replacing record i of `clean_dir`) as a dataset.

  Same shard files and counts as the clean conversion, the same pair sets (copied into
  `verification/`), the manifest, and `sface_jax_dataset.json` written last (its presence means
  complete; its `source` says `what` changed). Returns the manifest.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from sface_jax.data import tfrecord  # pylint: disable=g-import-not-at-top
  info = tfrecord.read_info(clean_dir)
  if len(images) != info.num_examples or len(labels) != info.num_examples:
    raise ValueError(f'{output}: {len(images)} images and {len(labels)} labels for '
                     f'{info.num_examples} records of {clean_dir}')
  info_path = os.path.join(output, tfrecord.INFO_FILE)
  os.makedirs(output, exist_ok=True)
  if os.path.exists(info_path):
    os.remove(info_path)
  position = 0
  for name, count in info.shards:
    with files.atomic_path(os.path.join(output, name)) as tmp, tf.io.TFRecordWriter(tmp) as w:
      for i in range(position, position + count):
        w.write(tfrecord.encode_example(images[i], int(labels[i])))
    position += count
  for rel in info.verification.values():
    os.makedirs(os.path.dirname(os.path.join(output, rel)), exist_ok=True)
    shutil.copyfile(os.path.join(clean_dir, rel), os.path.join(output, rel))
  manifest = {**manifest, 'num_examples': info.num_examples,
              'order': 'records of the shards in sface_jax_dataset.json order, each file front to '
                       'back', 'clean_dataset': os.path.abspath(clean_dir)}
  with files.atomic_write(os.path.join(output, manifest_name)) as f:
    json.dump(manifest, f)
  tfrecord.write_info(dataclasses.replace(info, directory=output,
                                          source=f'{info.source} ({what}: {manifest_name})'))
  return manifest


# ---- runs ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Run:
  head: str
  level: float  # the treated fraction of the training set
  seed: int
  prefix: str  # the level's name in the run's directory (Study.prefix)

  def directory(self, workdir: str) -> str:
    return os.path.join(workdir, 'runs', self.head, f'{self.prefix}{pct(self.level):02d}',
                        f'seed{self.seed}')

  def __str__(self) -> str:
    return f'{self.head} {self.prefix} {pct(self.level)}% seed {self.seed}'


@dataclasses.dataclass(frozen=True)
class Recipe:
  steps: int = DEFAULT_STEPS
  image_size: int = DEFAULT_IMAGE_SIZE
  model: str = DEFAULT_MODEL


SMOKE_RECIPE = Recipe(steps=3, image_size=32, model='tiny')


@dataclasses.dataclass(frozen=True)
class HeadSpec:
  """A line of a study: a head of `sface_jax/configs/base.py` with a label and changed fields."""
  name: str
  label: str
  center_init: str = 'normal'
  overrides: tuple[tuple[str, Any], ...] = ()  # (field of config.head.<name>, value)


def run_config(run: Run, spec: HeadSpec, *, data_dir: str, recipe: Recipe,
               sface_ab: dict | None):
  """The demo config with the study's recipe and this run's head (SFace's a, b set)."""
  config = demo_config()
  config.seed = run.seed
  config.data.dir = data_dir
  config.data.image_size = recipe.image_size
  config.model.name = recipe.model
  config.num_steps = recipe.steps
  config.eval.sets = ()  # evaluated by the study, from the checkpoint
  config.eval.every_steps = 0
  config.checkpoint_every_steps = recipe.steps
  config.keep_checkpoints = 1
  config.log_every_steps = max(1, recipe.steps // 3)
  config.head.name = spec.name
  config.head.center_init = spec.center_init
  fields = getattr(config.head, spec.name, None)
  if spec.name in SFACE_FAMILY:
    fields.a = float(sface_ab['a'])
    fields.b = float(sface_ab['b'])
  for field, value in spec.overrides:
    setattr(fields, field, value)
  return config


def checkpoint_steps(run_dir: str) -> list[int]:
  """The steps of a run's finished checkpoints, oldest first."""
  from sface_jax import checkpoint  # pylint: disable=g-import-not-at-top
  directory = os.path.join(run_dir, checkpoint.CHECKPOINT_DIR)
  if not os.path.isdir(directory):
    return []
  return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


@dataclasses.dataclass
class Trained:
  """A run's network at one checkpoint."""
  config: Any
  model: Any
  variables: dict[str, Any]
  centers: np.ndarray  # (D, C) class centres of the real classes
  head_state: dict[str, np.ndarray]  # e.g. the running norm statistics; {} for most heads
  step: int


def load_trained(run_dir: str, step: int | None = None) -> Trained:
  """A run's network at checkpoint `step` (default: the newest)."""
  import jax  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from sface_jax import checkpoint, heads, models, sharding  # pylint: disable=g-import-not-at-top
  from sface_jax.data import tfrecord  # pylint: disable=g-import-not-at-top
  config = checkpoint.load_config(run_dir)
  info = tfrecord.read_info(config.data.dir)
  model = models.get_model(config.model.name, embedding_dim=config.model.embedding_dim,
                           dtype=config.model.dtype)
  here = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract = models.abstract_variables(model, config.data.image_size)
  padded = sharding.padded_num_classes(info.num_classes, sharding.make_mesh())
  head_state = jax.eval_shape(lambda: heads.get_head(config.head).init_state(
      padded, config.model.embedding_dim))
  target = {
      'params': {'backbone': abstract['params'],
                 'classifier': {'class_centers': jax.ShapeDtypeStruct(
                     (config.model.embedding_dim, padded), np.float32)}},
      'batch_stats': abstract.get('batch_stats', {}),
      'head_state': head_state}
  target = jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype,
                                                          sharding=here), target)
  with checkpoint.reader(run_dir) as manager:
    step = manager.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f'{run_dir}: no finished checkpoint')
    state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True))).state
  variables = {'params': state['params']['backbone'], 'batch_stats': state['batch_stats']}
  centers = np.asarray(state['params']['classifier']['class_centers'])[:, :info.num_classes]
  return Trained(config=config, model=model, variables=variables, centers=centers,
                 head_state=jax.tree.map(np.asarray, state['head_state']), step=int(step))


def embed(trained: Trained, images: np.ndarray) -> np.ndarray:
  """Flip-summed embeddings (N, D), float64."""
  from sface_jax.evaluation import embedding  # pylint: disable=g-import-not-at-top
  return np.asarray(embedding.embed(trained.model, trained.variables, images,
                                    batch_size=trained.config.eval.batch_size), np.float64)


def evaluate_pairs(trained: Trained, pair_set) -> dict[str, float]:
  """Held-out accuracy (10-fold protocol) and TAR at FAR = 1e-2 and 1e-3 of a decoded set."""
  from sface_jax.evaluation import verification  # pylint: disable=g-import-not-at-top
  embeddings = embed(trained, pair_set.images)
  metrics = verification.verification_metrics(embeddings[0::2], embeddings[1::2],
                                               pair_set.issame, far_targets=(FAR, 1e-3))
  return {'accuracy': metrics.accuracy, 'accuracy_std_folds': metrics.accuracy_std,
          'threshold': metrics.best_threshold,
          'tar_at_far_1e-2': metrics.tar_at_far[FAR][0],
          'tar_at_far_1e-2_std_folds': metrics.tar_at_far[FAR][1],
          'far_measured_1e-2': metrics.far_at_far[FAR],
          'tar_at_far_1e-3': metrics.tar_at_far[1e-3][0]}


def angles(embeddings: np.ndarray, centers: np.ndarray) -> np.ndarray:
  """θ (radians) between every embedding (N, D) and every centre column (D, C)."""
  x = embeddings / np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)
  w = centers / np.maximum(np.linalg.norm(centers, axis=0, keepdims=True), 1e-12)
  return np.arccos(np.clip(x @ w, -1.0, 1.0))


def label_geometry(theta: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
  """θ to each sample's label centre, to the nearest other centre, and the nearest centre."""
  rows = np.arange(labels.size)
  others = theta.copy()
  others[rows, labels] = np.inf
  return {'theta_label': theta[rows, labels], 'theta_nearest_other': others.min(axis=1),
          'nearest': theta.argmin(axis=1)}


def save_arrays(path: str, **arrays) -> None:
  with files.atomic_write(path, 'wb') as f:
    np.savez(f, **arrays)


def remove_checkpoints(run_dir: str) -> None:
  from sface_jax import checkpoint  # pylint: disable=g-import-not-at-top
  shutil.rmtree(os.path.join(run_dir, checkpoint.CHECKPOINT_DIR), ignore_errors=True)


def choose_sface_ab(theta_file: str) -> dict:
  """The rule (module docstring): medians of θ_y and of θ to the nearest other centre over the
  clean training images (`clean` in the run's θ file) of the clean ArcFace run."""
  with np.load(theta_file) as z:
    clean = z['clean']
    a = float(np.median(z['theta_label'][clean]))
    b = float(np.median(z['theta_nearest_other'][clean]))
  return {'a': round(a, 3), 'b': round(b, 3), 'source': os.path.abspath(theta_file),
          'rule': 'a = median θ(image, own centre), b = median θ(image, nearest other centre), '
                  'training images of the clean ArcFace run (first seed) at the end of training'}


# ---- statistics ------------------------------------------------------------------------------


def bootstrap_interval(values: Sequence[float], *, confidence: float = 0.95,
                       resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0
                       ) -> tuple[float, float]:
  """Percentile bootstrap interval of the mean of `values` (resampled with replacement)."""
  values = np.asarray(values, np.float64)
  if values.size == 0:
    return float('nan'), float('nan')
  rng = np.random.default_rng(seed)
  means = values[rng.integers(0, values.size, size=(resamples, values.size))].mean(axis=1)
  tail = 100 * (1 - confidence) / 2
  low, high = np.percentile(means, [tail, 100 - tail])
  return float(low), float(high)


def cell_statistics(values: Sequence[float | None]) -> dict[str, Any]:
  """Mean, sample std (ddof = 1), bootstrap 95 % interval and the values of one cell."""
  values = [float(v) for v in values if v is not None]
  if not values:
    return {'mean': float('nan'), 'std': float('nan'), 'ci95': [float('nan')] * 2,
            'values': []}
  std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
  return {'mean': float(np.mean(values)), 'std': std, 'ci95': list(bootstrap_interval(values)),
          'values': values}


def paired_differences(results: dict[tuple[str, float, int], dict], head: str, reference: str,
                       level: float, key: str) -> dict[str, Any] | None:
  """`key` of `head` minus `reference`, seed by seed, over the seeds both have at `level`:
  mean, bootstrap 95 % interval, how many seeds favour the head, and whether the interval
  excludes 0 with at least `MIN_SEEDS_TO_CALL` seeds (`called`). None when no seed has
  both."""
  seeds = sorted(s for (h, l, s) in results if h == head and l == level and
                 (reference, level, s) in results)
  pairs = [(results[(head, level, s)].get(key), results[(reference, level, s)].get(key))
           for s in seeds]
  kept = [(s, x - r) for s, (x, r) in zip(seeds, pairs) if x is not None and r is not None]
  if not kept:
    return None
  differences = [d for _, d in kept]
  low, high = bootstrap_interval(differences)
  return {'head': head, 'reference': reference, 'level': level, 'metric': key,
          'seeds': [s for s, _ in kept], 'differences': differences,
          'mean': float(np.mean(differences)), 'ci95': [low, high],
          'positive': int(np.sum(np.asarray(differences) > 0)),
          'called': bool(len(differences) >= MIN_SEEDS_TO_CALL and (low > 0 or high < 0))}


def format_cell(cell: dict[str, Any], scale: float = 100.0, digits: int = 1) -> str:
  """'mean [low, high]' of `cell_statistics`, scaled; '–' when empty."""
  if not cell or not cell['values'] or not np.isfinite(cell['mean']):
    return '–'
  low, high = cell['ci95']
  return (f'{scale * cell["mean"]:.{digits}f} '
          f'[{scale * low:.{digits}f}, {scale * high:.{digits}f}]')


def format_difference(difference: dict[str, Any] | None, scale: float = 100.0) -> str:
  """'+1.2 [−0.3, 2.9] 4/5', bold when called (interval excludes 0)."""
  if difference is None:
    return '–'
  low, high = difference['ci95']
  text = (f'{scale * difference["mean"]:+.1f} [{scale * low:+.1f}, {scale * high:+.1f}] '
          f'{difference["positive"]}/{len(difference["differences"])}')
  return f'**{text}**' if difference['called'] else text


def difference_table(results: dict[tuple[str, float, int], dict], heads: Sequence[str],
                     levels: Sequence[float], references: Sequence[str],
                     metrics: Sequence[tuple[str, str]], labels: dict[str, str],
                     level_title: str) -> tuple[str, list[dict]]:
  """Markdown table of paired differences (points) of each head against each reference, and
  the rows as dicts. `metrics`: (result key, column title)."""
  head_row = ' | '.join(f'{title} − {labels[r]}' for r in references for _, title in metrics)
  lines = [f'| head | {level_title} | {head_row} |',
           '|---|---|' + '---|' * (len(references) * len(metrics))]
  rows = []
  for head in heads:
    for level in levels:
      cells = []
      for reference in references:
        for key, _ in metrics:
          difference = (None if head == reference else
                        paired_differences(results, head, reference, level, key))
          if difference is not None:
            rows.append(difference)
          cells.append('' if head == reference else format_difference(difference))
      if any(cell not in ('', '–') for cell in cells):
        lines.append(f'| {labels[head]} | {pct(level)}% | {" | ".join(cells)} |')
  return '\n'.join(lines), rows


def load_results(workdir: str, runs: Sequence[Run]
                 ) -> tuple[dict[tuple[str, float, int], dict], list[Run]]:
  """((head, level, seed) → result.json of every finished run that did not diverge, the
  runs that diverged)."""
  found, failed = {}, []
  for run in runs:
    path = os.path.join(run.directory(workdir), RESULT_FILE)
    if os.path.exists(path):
      with open(path) as f:
        result = json.load(f)
      if 'failed' in result:
        failed.append(run)
      else:
        found[(run.head, run.level, run.seed)] = result
  return found, failed


def summarise(results: dict[tuple[str, float, int], dict], keys: Sequence[str]
              ) -> dict[tuple[str, float], dict[str, Any]]:
  """(head, level) → {'seeds': [...], key: cell_statistics, ...}."""
  cells: dict[tuple[str, float], list[tuple[int, dict]]] = {}
  for (head, level, seed), result in results.items():
    cells.setdefault((head, level), []).append((seed, result))
  summary = {}
  for cell, found in cells.items():
    found.sort()
    summary[cell] = {'seeds': [s for s, _ in found],
                     **{k: cell_statistics([r.get(k) for _, r in found]) for k in keys}}
  return summary


# ---- plots -----------------------------------------------------------------------------------


def figure(width: float, height: float):
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  fig = Figure(figsize=(width, height), dpi=110)
  FigureCanvasAgg(fig)
  return fig


def save_figure(fig, path: str) -> None:
  fig.tight_layout()
  with files.atomic_path(path) as tmp:
    fig.savefig(tmp, format='png')


def plot_metrics_against_level(summary, heads: Sequence[str], levels: Sequence[float],
                               panels: Sequence[tuple[str, str]], labels: dict[str, str],
                               level_title: str, path: str, subtitle: str) -> None:
  """One panel per (metric, title), two a row: mean and bootstrap 95 % interval against the
  level, one line per head (each shifted by a fraction of a percent on the x axis, so that
  equal results do not hide)."""
  columns = min(len(panels), 2)
  rows = -(-len(panels) // columns)
  fig = figure(5.5 * columns, 4.2 * rows)
  for axes, (key, title) in zip(fig.subplots(rows, columns, squeeze=False).flat, panels):
    for i, head in enumerate(heads):
      points = [(100 * l, summary[(head, l)][key]) for l in levels
                if (head, l) in summary and summary[(head, l)][key]['values']]
      if not points:
        continue
      x = np.asarray([p for p, _ in points]) + 0.5 * (i - (len(heads) - 1) / 2)
      mean = np.asarray([100 * c['mean'] for _, c in points])
      low = np.asarray([100 * c['ci95'][0] for _, c in points])
      high = np.asarray([100 * c['ci95'][1] for _, c in points])
      axes.errorbar(x, mean, yerr=[mean - low, high - mean], marker='o', capsize=3,
                    label=labels[head])
    axes.set(title=title, xlabel=level_title, ylabel='%')
    axes.set_xticks([100 * l for l in levels])
    axes.grid(alpha=0.3)
  fig.axes[0].legend(fontsize=7)
  fig.suptitle(subtitle, fontsize=9)
  save_figure(fig, path)


# ---- the study loop --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Column:
  """A column of a study's table: the mean [95 % interval] of result `key` × `scale`."""
  key: str
  title: str
  scale: float = 100.0
  digits: int = 1
  treated_only: bool = False  # '–' at level 0 (e.g. a statistic of the flipped samples)


class Study:
  """One study: its heads, its treatment of the training data, its analysis and outputs.

  Subclasses set the attributes and implement `prepare`, `data_dir`, `analyse` and `plot`;
  `configure` may change a run's config (e.g. its checkpoints). The table, the paired
  differences, the accuracy plot and the JSON summary are written here (`write_outputs`).
  """
  name: str  # the module (python -m sface_jax.experiments.<name>) and the log prefix
  prefix: str  # the level's name in run directories and flags: --<prefix>, --<prefix>-seed
  title: str  # of the table
  description: str  # --help
  level_title: str  # table column and plot axis, e.g. 'label noise'
  treatment: str  # what the treatment does to a record, e.g. 'label flipped'
  data: str  # what is trained on and evaluated, for the subtitle
  heads: dict[str, HeadSpec]
  default_levels: tuple[float, ...]
  columns: tuple[Column, ...]  # the table, after head, level and seeds
  extra_keys: tuple[str, ...] = ()  # more result keys summarised in the JSON
  plotted: tuple[tuple[str, str], ...]  # (result key, title): the accuracy plot's panels
  compared: tuple[tuple[str, str], ...]  # (result key, title): the paired differences
  references: tuple[str, ...] = ('sface', 'arcface')  # the paired differences are against
  table_note: str = ''
  outputs: tuple[str, ...]  # table, JSON, accuracy plot, the study's own plot

  def __init__(self, treatment_seed: int = 0):
    self.treatment_seed = treatment_seed  # which samples are treated, and how

  def log(self, message: str) -> None:
    print(f'[{self.name}] {message}', flush=True)

  def prepare(self, workdir: str, clean_dir: str, levels: Sequence[float],
              recipe: Recipe) -> Any:
    """Writes the treated datasets of `levels` (reused when done); returns a context (e.g.
    the decoded images the analysis needs, at `recipe.image_size`)."""
    raise NotImplementedError

  def data_dir(self, workdir: str, level: float) -> str:
    raise NotImplementedError

  def configure(self, config, run: Run) -> None:
    del config, run

  def analyse(self, run: Run, run_dir: str, context: Any,
              sface_ab: dict | None) -> dict[str, Any]:
    """The run's result (held-out metrics and more); writes `THETA_FILE` with at least
    `theta_label`, `theta_nearest_other` and `clean` (bool per training image). `sface_ab`
    is None for the run that sets it."""
    raise NotImplementedError

  def derived(self, run_dir: str) -> dict[str, Any]:
    """More numbers of a finished run, computed from its files when the outputs are written
    (so that every finished run gets them); {} by default."""
    del run_dir
    return {}

  def plot(self, workdir: str, runs: Sequence[Run], results: dict, path: str) -> None:
    """The study's own figure (`outputs[3]`), from what has finished."""
    raise NotImplementedError

  def runs(self, heads: Sequence[str], levels: Sequence[float], seeds: Sequence[int], *,
           calibrate: bool = True) -> list[Run]:
    """Seed-major order (a killed study has whole seeds done); with `calibrate`, the clean
    ArcFace run of the first seed first when an SFace head needs its θ (it sets a, b)."""
    runs = [Run(h, l, s, self.prefix) for s in seeds for l in levels for h in heads]
    if calibrate and any(self.heads[h].name in SFACE_FAMILY for h in heads):
      calibration = Run('arcface', 0.0, seeds[0], self.prefix)
      runs = [calibration] + [r for r in runs if r != calibration]
    return runs

  def labels(self) -> dict[str, str]:
    return {key: spec.label for key, spec in self.heads.items()}

  def format_table(self, summary, heads: Sequence[str], levels: Sequence[float],
                   failed: Sequence[Run]) -> str:
    titles = ' | '.join(column.title for column in self.columns)
    lines = [f'| head | {self.level_title} | seeds | {titles} |',
             '|---|---|---|' + '---|' * len(self.columns)]
    for head in heads:
      for level in levels:
        row = summary.get((head, level), {})
        lost = sum(r.head == head and r.level == level for r in failed)
        if not row and not lost:
          continue
        cells = ['–' if column.treated_only and level == 0 else
                 format_cell(row.get(column.key), column.scale, column.digits)
                 for column in self.columns]
        seeds = str(len(row.get('seeds', []))) + (f' (+{lost} diverged)' if lost else '')
        lines.append(f'| {self.heads[head].label} | {pct(level)}% | {seeds} | '
                     f'{" | ".join(cells)} |')
    return '\n'.join(lines)

  def write_outputs(self, workdir: str, runs: Sequence[Run], *, sface_ab,
                    recipe: Recipe) -> dict[str, Any]:
    """Writes the table (with the paired differences), the JSON summary and the plots into
    `workdir`; returns the summary."""
    heads = [h for h in self.heads if any(r.head == h for r in runs)]
    levels = sorted({r.level for r in runs})
    results, failed = load_results(workdir, runs)
    for (head, level, seed), result in results.items():
      result.update(self.derived(Run(head, level, seed, self.prefix).directory(workdir)))
    summary = summarise(results, [c.key for c in self.columns] + list(self.extra_keys))
    table = self.format_table(summary, heads, levels, failed)
    differences, difference_rows = {}, []
    for reference in (r for r in self.references if r in heads):
      differences[reference], rows = difference_table(
          results, heads, levels, [reference], self.compared, self.labels(), self.level_title)
      difference_rows += rows
    done = len(results) + len(failed)
    subtitle = (f'{self.data}; {recipe.model} {recipe.image_size}px, {recipe.steps} steps; '
                f'mean and bootstrap 95 % interval over seeds ({done}/{len(runs)} runs done)')
    plot_metrics_against_level(summary, heads, levels, self.plotted, self.labels(),
                               f'{self.level_title} (%)', os.path.join(workdir, self.outputs[2]),
                               subtitle)
    self.plot(workdir, runs, results, os.path.join(workdir, self.outputs[3]))
    ab = ('' if sface_ab is None else
          f'SFace a = {sface_ab["a"]}, b = {sface_ab["b"]} rad ({sface_ab["rule"]}). ')
    sections = ''.join(f'\n\n### Against {self.heads[r].label}\n\n{text}'
                       for r, text in differences.items())
    text = (f'# {self.title} ({done}/{len(runs)} runs)\n\n{subtitle}. {ab}'
            f'Treatment seed {self.treatment_seed}.\n\n'
            f'Each cell: mean [bootstrap 95 % interval of the mean over seeds]. '
            f'{self.table_note}\n\n{table}\n\n## Paired differences (points), seed by seed\n\n'
            'Mean [bootstrap 95 % interval] of (head − reference) over the seeds both ran, '
            'then how many seeds favour the head; **bold**: the interval excludes 0 (a '
            f'difference we call).{sections}\n')
    with files.atomic_write(os.path.join(workdir, self.outputs[0])) as f:
      f.write(text)
    out = {'runs_done': done, 'runs': len(runs), 'sface_ab': sface_ab,
           'recipe': dataclasses.asdict(recipe), f'{self.prefix}_seed': self.treatment_seed,
           'rows': [{'head': h, self.prefix: l, **v} for (h, l), v in summary.items()],
           'diverged': [str(r) for r in failed], 'paired_differences': difference_rows,
           'table': table, 'differences': differences}
    with files.atomic_write(os.path.join(workdir, self.outputs[1])) as f:
      json.dump(out, f, indent=1, default=float)
    return out


def check_settings(study: Study, *, heads: Sequence[str], levels: Sequence[float],
                   seeds: Sequence[int], sface_a: float | None, sface_b: float | None) -> None:
  """Refuses settings a study cannot run, naming the flag, before anything is written."""
  unknown = sorted(set(heads) - set(study.heads))
  if unknown:
    raise ValueError(f'--heads: unknown {unknown}; choose from {", ".join(study.heads)}')
  if not seeds or not levels or not heads:
    raise ValueError(f'--heads, --{study.prefix} and --seeds need at least one value each')
  if any(not 0.0 <= level <= 1.0 for level in levels):
    raise ValueError(f'--{study.prefix}: {list(levels)} must be fractions in [0, 1] '
                     '(or percentages in [0, 100])')
  if (sface_a is None) != (sface_b is None):
    raise ValueError('give both --sface-a and --sface-b, or neither')


def run_study(study: Study, workdir: str, *, heads: Sequence[str], levels: Sequence[float],
              seeds: Sequence[int], recipe: Recipe, sface_a: float | None = None,
              sface_b: float | None = None, docs: str = '',
              keep_checkpoints: bool = False) -> dict[str, Any]:
  """Trains and evaluates every run not done yet, rewriting the outputs after each; copies
  them into `docs` when given. Returns the summary."""
  import jax  # pylint: disable=g-import-not-at-top
  from sface_jax import train  # pylint: disable=g-import-not-at-top
  from sface_jax.data import convert  # pylint: disable=g-import-not-at-top
  check_settings(study, heads=heads, levels=levels, seeds=seeds, sface_a=sface_a,
                 sface_b=sface_b)
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  if not jax.config.jax_compilation_cache_dir:  # repeat compiles (same head, shapes) load
    compilation_cache.enable(os.path.join(workdir, 'xla_cache'))
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)

  clean_dir = os.path.join(workdir, 'data')
  convert.prepare(demo_config().data.convert, clean_dir)
  runs = study.runs(heads, levels, seeds, calibrate=sface_a is None and sface_b is None)
  context = study.prepare(workdir, clean_dir, sorted({r.level for r in runs}), recipe)

  ab_path = os.path.join(workdir, AB_FILE)
  sface_ab = None
  if sface_a is not None:
    sface_ab = {'a': sface_a, 'b': sface_b, 'rule': 'given on the command line'}
  elif os.path.exists(ab_path):
    with open(ab_path) as f:
      sface_ab = json.load(f)

  done = lambda run: os.path.exists(os.path.join(run.directory(workdir), RESULT_FILE))
  todo = [r for r in runs if not done(r)]
  study.log(f'{len(runs)} runs ({len(runs) - len(todo)} already done): heads '
            f'{", ".join(heads)}; {study.prefix} {", ".join(f"{pct(l)}%" for l in levels)}; '
            f'seeds {list(seeds)}; {recipe.model} {recipe.image_size}x{recipe.image_size}, '
            f'{recipe.steps} steps')
  durations = []
  summary = None
  for i, run in enumerate(runs, 1):
    run_dir = run.directory(workdir)
    result_path = os.path.join(run_dir, RESULT_FILE)
    spec = study.heads[run.head]
    changed = not done(run)  # the outputs are rewritten after each run that adds to them
    if not changed:
      study.log(f'run {i}/{len(runs)} {run}: done already, skipped')
    else:
      if spec.name in SFACE_FAMILY and sface_ab is None:
        raise RuntimeError('SFace needs a, b: the clean ArcFace run should have come first')
      left = np.mean(durations) * (len(todo) - len(durations)) if durations else float('nan')
      study.log(f'run {i}/{len(runs)} {run}: training '
                f'(ETA of the study {progress.format_duration(left)})')
      start = time.perf_counter()
      config = run_config(run, spec, data_dir=study.data_dir(workdir, run.level),
                          recipe=recipe, sface_ab=sface_ab)
      study.configure(config, run)
      try:
        train.train_and_evaluate(config, run_dir)
      except train.NonFiniteLossError as e:  # recorded as a finding, not retried
        result = {'failed': str(e)}
        study.log(f'run {i}/{len(runs)} {run}: diverged: {e}')
      else:
        trained = time.perf_counter()
        result = study.analyse(run, run_dir, context, sface_ab)
        result['seconds_analysis'] = time.perf_counter() - trained
      result = {'head': run.head, study.prefix: run.level, 'seed': run.seed, **result,
                'seconds': time.perf_counter() - start,
                'sface_ab': sface_ab if spec.name in SFACE_FAMILY else None,
                'config': _config_record(config)}
      with files.atomic_write(result_path) as f:
        json.dump(result, f, indent=1)
      if not keep_checkpoints:
        remove_checkpoints(run_dir)
      durations.append(result['seconds'])
      if 'failed' not in result:
        study.log(f'run {i}/{len(runs)} {run}: held-out accuracy '
                  f'{100 * result["accuracy"]:.2f}%, TAR@FAR=1e-2 '
                  f'{100 * result["tar_at_far_1e-2"]:.2f}% in {result["seconds"]:.0f} s')
    if sface_ab is None and run == Run('arcface', 0.0, seeds[0], study.prefix):
      sface_ab = choose_sface_ab(os.path.join(run_dir, THETA_FILE))
      with files.atomic_write(ab_path) as f:
        json.dump(sface_ab, f, indent=1)
      study.log(f'SFace a = {sface_ab["a"]:.3f}, b = {sface_ab["b"]:.3f} ({sface_ab["rule"]})')
      changed = True
    if changed:
      summary = study.write_outputs(workdir, runs, sface_ab=sface_ab, recipe=recipe)
  if summary is None:  # every run was done already: the outputs once, from their files
    summary = study.write_outputs(workdir, runs, sface_ab=sface_ab, recipe=recipe)
  if docs:
    os.makedirs(docs, exist_ok=True)
    for name in study.outputs:
      if os.path.exists(os.path.join(workdir, name)):
        shutil.copyfile(os.path.join(workdir, name), os.path.join(docs, name))
    study.log(f'copied {", ".join(study.outputs)} to {docs}')
  study.log('done:\n' + summary['table'])
  return summary


def _config_record(config) -> dict[str, Any]:
  head = config.head.name
  fields = getattr(config.head, head, None)
  return {'head': head, 'center_init': config.head.center_init, 'scale': config.head.scale,
          head: None if fields is None else dict(fields), 'model': config.model.name,
          'image_size': config.data.image_size, 'steps': config.num_steps,
          'batch_size': config.batch_size}


# ---- command line ----------------------------------------------------------------------------


def fractions(text: str) -> list[float]:
  values = [float(v) for v in text.split(',') if v.strip()]
  return [v / 100 if v > 1 else v for v in values]  # '0,20,40' or '0,0.2,0.4'


def integers(text: str) -> list[int]:
  return [int(v) for v in text.split(',') if v.strip()]


def parse_args(study: Study, argv: Sequence[str] | None = None) -> argparse.Namespace:
  """The study's flags; every default is shown by `cli.HelpFormatter` (list defaults are
  given as the strings a user would type, which argparse parses like typed values)."""
  parser = argparse.ArgumentParser(prog=f'python -m sface_jax.experiments.{study.name}',
                                   description=study.description,
                                   formatter_class=cli.HelpFormatter)
  parser.add_argument('--workdir', required=True,
                      help='where data, runs and outputs (table, plots, JSON) go')
  parser.add_argument('--steps', type=int, default=DEFAULT_STEPS, help='training steps a run')
  parser.add_argument('--seeds', type=integers, default=','.join(map(str, DEFAULT_SEEDS)),
                      help='comma-separated training seeds')
  parser.add_argument(f'--{study.prefix}', dest='levels', type=fractions, metavar='FRACTIONS',
                      default=','.join(str(pct(level)) for level in study.default_levels),
                      help=f'fractions of the training records with their {study.treatment}, '
                           'as percentages (0,20,40) or fractions (0,0.2,0.4)')
  parser.add_argument(f'--{study.prefix}-seed', dest='treatment_seed', type=int, metavar='SEED',
                      default=0, help=f'seed of which records have their {study.treatment}, '
                                      'and how')
  parser.add_argument('--heads', default=','.join(study.heads),
                      help='comma-separated, any of the default (all of them)')
  parser.add_argument('--model', default=DEFAULT_MODEL, help='backbone: r18_small, tiny, ...')
  parser.add_argument('--image-size', type=int, default=DEFAULT_IMAGE_SIZE,
                      help='input pixels per side')
  parser.add_argument('--sface-a', type=float, default=None,
                      help='bypass the a, b rule (give --sface-b too; default: the rule)')
  parser.add_argument('--sface-b', type=float, default=None,
                      help='see --sface-a (default: the rule)')
  parser.add_argument('--docs', default='',
                      help='also copy the outputs into this folder (default: none, they stay '
                           'in --workdir). The committed results are docs/: pass --docs docs '
                           'only to replace them')
  parser.add_argument('--keep-checkpoints', action='store_true',
                      help="keep each run's checkpoints (default: deleted once analysed)")
  compilation_cache.add_arguments(parser)  # --compilation-cache-dir, --no-compilation-cache
  args = parser.parse_args(argv)
  args.heads = [h for h in args.heads.split(',') if h]
  try:  # a mistake in the command: one line and exit status 2, before any work
    check_settings(study, heads=args.heads, levels=args.levels, seeds=args.seeds,
                   sface_a=args.sface_a, sface_b=args.sface_b)
  except ValueError as error:
    parser.error(str(error))
  return args


def main(study_type: type[Study], argv: Sequence[str] | None = None) -> int:
  """The command line of a study (`python -m sface_jax.experiments.<name> --help`)."""
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  args = parse_args(study_type(), argv)
  run_study(study_type(args.treatment_seed), args.workdir,
            heads=args.heads, levels=args.levels,
            seeds=args.seeds, recipe=Recipe(steps=args.steps, image_size=args.image_size,
                                            model=args.model),
            sface_a=args.sface_a, sface_b=args.sface_b, docs=args.docs,
            keep_checkpoints=args.keep_checkpoints)
  return 0
