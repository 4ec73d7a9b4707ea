"""Label-noise study: does SFace resist flipped labels better than ArcFace/CosFace? (issue 17)

  python -m sface_jax.experiments.label_noise --workdir runs/label_noise --docs docs

trains on people s1–s30 of the ORL faces (the demo's data, `sface_jax/configs/demo.py`) with 0 %, 20 %
and 40 % of the 300 training labels replaced by a wrong identity, for ArcFace, CosFace, SFace,
quality-aware SFace, SFace with zhongyy's Xavier centre initialisation and quality-aware SFace
with warmed-up norm statistics (below), three seeds each (6 heads × 3 noise levels × 3 seeds
= 54 runs), and evaluates every run on the held-out people s31–s40 (the demo's 900 pairs,
`orl_val`). It writes, under `--workdir`:

  data/                          the clean conversion (the demo's converter, on first use)
  data_noise{20,40,...}/         the same TFRecords with labels replaced, plus `noise.json`:
                                 which records were flipped, their true and noisy labels
                                 (`data_noise00/` is an identical clean copy, for uniformity)
  runs/<head>/noise<pct>/seed<s>/  each run: the trainer's work directory, `result.json`
                                 (written last: its presence means "done"), `theta.npz`
  sface_ab.json                  SFace's a, b for this data and the rule that chose them
  label_noise_table.md, label_noise_results.json, label_noise_accuracy.png,
  label_noise_theta.png          the table, the accuracy-against-noise plot and the θ
                                 histograms (copied into `--docs` when given)

The study is resumable: a run whose `result.json` exists is skipped, a run killed in training
resumes from its checkpoint (the trainer's own resume), so a killed study continues where it
stopped when the same command is run again. The table and plots are rewritten after every run,
so a partial study always has them. `--steps`, `--seeds`, `--noise`, `--heads`, `--model` and
`--image-size` shrink it (the CI test and the Colab notebook do).

Decisions (nobody to ask; written here):

* Noise. Symmetric ("uniform") label noise: exactly round(p·N) of the N training records,
  drawn without replacement, each given an identity drawn uniformly from the C − 1 *other*
  identities (`flip_labels`). One fixed noise seed (`--noise-seed`, default 0) for every head
  and training seed, so all heads see the same flipped samples: the comparison is paired, and
  the seed spread measures training randomness only. Sample i is the i-th record of the
  dataset read shard by shard in `dataset_info.json` order (`read_records`). The noisy copy
  keeps the shard files and counts, so the input pipeline serves the same images in the same
  order as the clean data; only labels differ.
* Recipe (the same for every head). `sface_jax/configs/demo.py` (r18_small, embedding 128, scale s = 32
  for every head, SGD + cosine schedule with 2 warm-up epochs, batch 32, the demo's
  augmentation) shrunk to 32×32 inputs and 300 steps (32 epochs). Measured on the shared
  2-core machine: the demo's 64×64 × 800 steps takes ~3 min a run (54 runs ≈ 2.7 h); 48×48 ×
  200 steps took 80–86 s (92.7 % held-out, clean ArcFace seed 0) but only 90–120 img/s under
  load; 32×32 × 300 steps took 72 s including a cold compile (270 img/s, 88.6 %). In the
  study a run takes 30–90 s, so 54 runs fit in about an hour. 32 epochs is also long enough
  for a network to start memorising flipped labels, which is what the study is about. Every
  head keeps its own defaults from `sface_jax/configs/base.py` (ArcFace m = 0.5, CosFace m = 0.35,
  SFace k = 80, quality-aware SFace shift = 0.1, h = 0.333) except SFace's a, b (next point);
  nothing is tuned on the held-out pairs, and no head gets any other tuning.
* SFace's a, b (also used by both quality-aware SFace lines and SFace-xavier). The rule, from
  the θ distributions of a clean ArcFace run (ArcFace, 0 % noise, the first seed; trained
  first):
  at the end of its training, embed the 300 (un-augmented, flip-summed) training images, and
  take a = the median angle θ_y between an image and its own class centre, b = the median
  angle between an image and the nearest *other* class centre. So SFace's pull towards the
  label fades where a typical clean sample sits after ArcFace training, and its push away
  from other identities fades at the distance where ArcFace typically leaves the nearest
  other identity. It uses training images only. `--sface-a/--sface-b` bypass the rule.
* Metrics on the held-out pairs: the insightface protocol's 10-fold accuracy
  (`sface_jax.evaluation.verification`) and TAR at FAR = 1e-2 computed by the same in-graph
  protocol (per fold, the threshold reaching FAR 1e-2 on the nine training folds, TAR on the
  tenth; 450 different-person pairs make 1e-2 the lowest FAR with more than a few negatives).
  Tables give mean ± sample std (ddof = 1) over seeds.
* The mechanism (θ histograms). After training, each training image's flip-summed embedding
  (the same embedding evaluation uses; training saw random flips) against the trained class
  centres: θ to its noisy label's centre, split into clean and flipped samples, and θ of the
  flipped samples to their true identity's centre. Per run, `result.json` also records the
  share of flipped samples whose nearest centre is the wrong label (memorised) or the true
  identity; the plot shows ArcFace and SFace at the two highest noise levels, first seed.
* Quality-aware SFace. Its quality ẑ = h·(‖x‖ − μ)/σ uses AdaFace's running statistics,
  which start at μ = 20, σ = 100 and move with momentum 0.01 (`heads/adaface.py`). In a
  300-step run 100·0.99^300 ≈ 4.9 of the start is still in σ, which ends at 7–12 (logged as
  `norm_std`), so |ẑ| stays around 0.1 or less and the sigmoid's centre moves by ~0.01 rad,
  while θ_y of most training samples sits far above a, where the k = 80 sigmoid is saturated
  either way: the head then trains almost exactly as SFace (measured, seed 0: the same
  held-out accuracy to four digits at 20 % and 40 % noise). That is the head as a user gets
  it, so it stays in the study unchanged;
  `quality_sface_warm` adds the same head with momentum 0.1, chosen by the rule that the
  statistics be 99 % warmed up (1 − 0.9^45) within the first 15 % of the 300 steps, so that
  the quality signal is actually on. It is a diagnostic, not tuned on the held-out pairs.
* Checkpoints are deleted once a run's `result.json` is written (`--keep-checkpoints` keeps
  them): `theta.npz` holds what the plots need, and 54 runs of checkpoints waste disk.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from sface_jax import cli
from sface_jax import compilation_cache
from sface_jax import files
from sface_jax import progress

HEADS = {
    'arcface': dict(name='arcface'),
    'cosface': dict(name='cosface'),
    'sface': dict(name='sface'),
    'quality_sface': dict(name='quality_sface'),
    'sface_xavier': dict(name='sface', center_init='xavier'),
    # Diagnostic line (module docstring, "Quality-aware SFace"): the same head with its
    # running norm statistics warmed up within the run.
    'quality_sface_warm': dict(name='quality_sface', overrides=dict(momentum=0.1)),
}
HEAD_LABELS = {
    'arcface': 'ArcFace (m=0.5)',
    'cosface': 'CosFace (m=0.35)',
    'sface': 'SFace',
    'quality_sface': 'quality-aware SFace',
    'sface_xavier': "SFace, xavier centres (zhongyy's)",
    'quality_sface_warm': 'quality-aware SFace, norm stats momentum 0.1',
}
SFACE_HEADS = ('sface', 'quality_sface', 'sface_xavier', 'quality_sface_warm')
DEFAULT_NOISE = (0.0, 0.2, 0.4)
DEFAULT_SEEDS = (0, 1, 2)
DEFAULT_STEPS = 300
DEFAULT_IMAGE_SIZE = 32
DEFAULT_MODEL = 'r18_small'
FAR = 1e-2
PAIR_SET = 'orl_val'
RESULT_FILE = 'result.json'
THETA_FILE = 'theta.npz'
NOISE_FILE = 'noise.json'
AB_FILE = 'sface_ab.json'
OUTPUTS = ('label_noise_table.md', 'label_noise_results.json', 'label_noise_accuracy.png',
           'label_noise_theta.png')


def _log(message: str) -> None:
  print(f'[label_noise] {message}', flush=True)


# ---- label flipping -------------------------------------------------------------------------


def flip_labels(labels: np.ndarray, fraction: float, num_classes: int,
                seed: int) -> tuple[np.ndarray, np.ndarray]:
  """(noisy labels, sorted indices of the flipped samples).

  Exactly round(fraction·N) samples, drawn without replacement with `seed`, get an identity
  drawn uniformly from the num_classes − 1 identities other than their own: label + u mod C
  with u uniform in 1..C−1, so a flipped label never equals the true one.
  """
  labels = np.asarray(labels, np.int64)
  if not 0.0 <= fraction <= 1.0:
    raise ValueError(f'noise fraction {fraction} is not in [0, 1]')
  if num_classes < 2 and fraction > 0:
    raise ValueError('flipping labels needs at least 2 identities')
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise ValueError(f'labels outside [0, {num_classes})')
  rng = np.random.default_rng(seed)
  count = int(round(fraction * labels.size))
  flipped = np.sort(rng.choice(labels.size, size=count, replace=False))
  noisy = labels.copy()
  noisy[flipped] = (labels[flipped] + rng.integers(1, num_classes, size=count)) % num_classes
  return noisy, flipped


def read_records(data_dir: str) -> tuple[list[bytes], np.ndarray]:
  """(image bytes, labels) of every record, shard by shard in `dataset_info.json` order."""
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
    raise ValueError(f'{data_dir}: read {len(images)} records, dataset_info.json says '
                     f'{info.num_examples}')
  return images, np.asarray(labels, np.int64)


def noise_dir(workdir: str, fraction: float) -> str:
  return os.path.join(workdir, f'data_noise{_pct(fraction):02d}')


def _pct(fraction: float) -> int:
  return int(round(100 * fraction))


def write_noisy_dataset(clean_dir: str, output: str, fraction: float, seed: int) -> dict:
  """A copy of the converted dataset in `clean_dir` with labels flipped (`flip_labels`).

  Same shard files and counts, same pair sets (copied into `verification/`), `noise.json`
  with the flipped indices and both label lists, and `dataset_info.json` written last (its
  presence means complete). An existing complete copy made with the same fraction and seed is
  reused; one made otherwise is refused. Returns the contents of `noise.json`.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from sface_jax.data import tfrecord  # pylint: disable=g-import-not-at-top
  info_path = os.path.join(output, tfrecord.INFO_FILE)
  noise_path = os.path.join(output, NOISE_FILE)
  if os.path.exists(info_path) and os.path.exists(noise_path):
    with open(noise_path) as f:
      noise = json.load(f)
    if noise['fraction'] != fraction or noise['seed'] != seed:
      raise ValueError(f'{output} holds labels flipped with fraction {noise["fraction"]}, '
                       f'seed {noise["seed"]}; wanted {fraction}, {seed}: delete it')
    return noise
  info = tfrecord.read_info(clean_dir)
  images, labels = read_records(clean_dir)
  noisy, flipped = flip_labels(labels, fraction, info.num_classes, seed)
  os.makedirs(output, exist_ok=True)
  if os.path.exists(info_path):
    os.remove(info_path)
  position = 0
  for name, count in info.shards:
    with files.atomic_path(os.path.join(output, name)) as tmp, tf.io.TFRecordWriter(tmp) as w:
      for i in range(position, position + count):
        w.write(tfrecord.encode_example(images[i], int(noisy[i])))
    position += count
  for rel in info.verification.values():
    os.makedirs(os.path.dirname(os.path.join(output, rel)), exist_ok=True)
    shutil.copyfile(os.path.join(clean_dir, rel), os.path.join(output, rel))
  noise = {
      'fraction': fraction, 'seed': seed, 'num_examples': int(labels.size),
      'num_flipped': int(flipped.size), 'num_classes': info.num_classes,
      'order': 'records of the shards in dataset_info.json order, each file front to back',
      'flipped': flipped.tolist(), 'original_labels': labels.tolist(),
      'noisy_labels': noisy.tolist(), 'clean_dataset': os.path.abspath(clean_dir)}
  with files.atomic_write(noise_path) as f:
    json.dump(noise, f)
  tfrecord.write_info(dataclasses.replace(info, directory=output,
                                          source=f'{info.source} (labels: {NOISE_FILE})'))
  return noise


# ---- one run ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Run:
  head: str
  noise: float
  seed: int

  def directory(self, workdir: str) -> str:
    return os.path.join(workdir, 'runs', self.head, f'noise{_pct(self.noise):02d}',
                        f'seed{self.seed}')

  def __str__(self) -> str:
    return f'{self.head} noise {_pct(self.noise)}% seed {self.seed}'


@dataclasses.dataclass(frozen=True)
class Recipe:
  steps: int = DEFAULT_STEPS
  image_size: int = DEFAULT_IMAGE_SIZE
  model: str = DEFAULT_MODEL


# The smallest study (the CI test and the notebook's smoke mode): run_study(workdir, **SMOKE).
# The clean ArcFace run that calibrates SFace's a, b is added to these: 3 runs.
SMOKE = dict(heads=('arcface', 'sface'), noise=(0.4,), seeds=(0,),
             recipe=Recipe(steps=3, image_size=32, model='tiny'))


def _demo_config():
  """sface_jax/configs/demo.py's get_config."""
  from sface_jax.configs import demo  # pylint: disable=g-import-not-at-top
  return demo.get_config()


def run_config(run: Run, *, data_dir: str, recipe: Recipe, sface_ab: dict | None):
  """The demo config with the study's recipe (module docstring) and this run's head."""
  config = _demo_config()
  config.seed = run.seed
  config.data.dir = data_dir
  config.data.image_size = recipe.image_size
  config.model.name = recipe.model
  config.num_steps = recipe.steps
  config.eval.sets = ()  # evaluated here, from the checkpoint (`analyse`)
  config.eval.every_steps = 0
  config.checkpoint_every_steps = recipe.steps
  config.keep_checkpoints = 1
  config.log_every_steps = max(1, recipe.steps // 3)
  spec = HEADS[run.head]
  config.head.name = spec['name']
  config.head.center_init = spec.get('center_init', 'normal')
  if config.head.name in ('sface', 'quality_sface'):
    getattr(config.head, config.head.name).a = float(sface_ab['a'])
    getattr(config.head, config.head.name).b = float(sface_ab['b'])
  for field, value in spec.get('overrides', {}).items():
    setattr(getattr(config.head, config.head.name), field, value)
  return config


def load_trained(run_dir: str):
  """(config, model, variables, class centres (D, C)) from a run's newest checkpoint."""
  import jax  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from sface_jax import checkpoint, models, sharding  # pylint: disable=g-import-not-at-top
  from sface_jax.data import tfrecord  # pylint: disable=g-import-not-at-top
  config = checkpoint.load_config(run_dir)
  info = tfrecord.read_info(config.data.dir)
  model = models.get_model(config.model.name, embedding_dim=config.model.embedding_dim,
                           dtype=config.model.dtype)
  here = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract = models.abstract_variables(model, config.data.image_size)
  padded = sharding.padded_num_classes(info.num_classes, sharding.make_mesh())
  target = {
      'params': {'backbone': abstract['params'],
                 'classifier': {'class_centers': jax.ShapeDtypeStruct(
                     (config.model.embedding_dim, padded), np.float32)}},
      'batch_stats': abstract.get('batch_stats', {})}
  target = jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype,
                                                          sharding=here), target)
  absl_logger = logging.getLogger('absl')  # orbax warns "read_only=True ..." on every load
  level = absl_logger.level
  absl_logger.setLevel(logging.ERROR)
  manager = ocp.CheckpointManager(os.path.join(run_dir, checkpoint.CHECKPOINT_DIR),
                                  options=ocp.CheckpointManagerOptions(read_only=True))
  try:
    step = manager.latest_step()
    if step is None:
      raise FileNotFoundError(f'{run_dir}: no finished checkpoint')
    state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True))).state
  finally:
    manager.close()
    absl_logger.setLevel(level)
  variables = {'params': state['params']['backbone'], 'batch_stats': state['batch_stats']}
  centers = np.asarray(state['params']['classifier']['class_centers'])[:, :info.num_classes]
  return config, model, variables, centers


def tar_at_far(embeddings_a, embeddings_b, issame, far: float = FAR,
               num_folds: int = 10) -> tuple[float, float, float]:
  """(mean TAR, std TAR, mean measured FAR) at `far`, from the verification protocol."""
  from sface_jax.evaluation import verification  # pylint: disable=g-import-not-at-top
  metrics = verification.verification_metrics(embeddings_a, embeddings_b, issame,
                                               num_folds=num_folds, far_targets=(far,))
  tar, tar_std = metrics.tar_at_far[far]
  return tar, tar_std, metrics.far_at_far[far]


def _angles(embeddings: np.ndarray, centers: np.ndarray) -> np.ndarray:
  """θ (radians) between every embedding (N, D) and every centre column (D, C)."""
  x = embeddings / np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)
  w = centers / np.maximum(np.linalg.norm(centers, axis=0, keepdims=True), 1e-12)
  return np.arccos(np.clip(x @ w, -1.0, 1.0))


def analyse(run: Run, run_dir: str, *, noise: dict, train_images: list[bytes],
            pair_set) -> dict[str, Any]:
  """Held-out metrics and the θ statistics of one trained run; writes `theta.npz`."""
  from sface_jax import evaluate  # pylint: disable=g-import-not-at-top
  from sface_jax.data import images as images_lib  # pylint: disable=g-import-not-at-top
  from sface_jax.evaluation import embedding, report  # pylint: disable=g-import-not-at-top
  config, model, variables, centers = load_trained(run_dir)
  metrics = evaluate.evaluate_sets(model, variables, [pair_set],
                                   batch_size=config.eval.batch_size)[pair_set.name]
  report.write_report({pair_set.name: metrics}, run_dir, source=run_dir)
  pixels = images_lib.decode_all(train_images, config.data.image_size, name='training set')
  embeddings = np.asarray(embedding.embed(model, variables, pixels,
                                          batch_size=config.eval.batch_size), np.float64)
  pair_embeddings = embedding.embed(model, variables, pair_set.images,
                                    batch_size=config.eval.batch_size)
  tar, tar_std, far = tar_at_far(pair_embeddings[0::2], pair_embeddings[1::2], pair_set.issame)

  noisy = np.asarray(noise['noisy_labels'])
  true = np.asarray(noise['original_labels'])
  flipped = np.zeros(noisy.size, bool)
  flipped[np.asarray(noise['flipped'], np.int64)] = True
  theta = _angles(embeddings, centers)  # (N, C)
  rows = np.arange(noisy.size)
  theta_label = theta[rows, noisy]
  theta_true = theta[rows, true]
  others = theta.copy()
  others[rows, noisy] = np.inf
  theta_nearest_other = others.min(axis=1)
  nearest = theta.argmin(axis=1)
  with files.atomic_path(os.path.join(run_dir, THETA_FILE)) as tmp:
    with open(tmp, 'wb') as f:
      np.savez(f, theta_label=theta_label, theta_true=theta_true,
               theta_nearest_other=theta_nearest_other, flipped=flipped, nearest=nearest,
               noisy_labels=noisy, true_labels=true)
  deg = lambda v: float(np.degrees(np.mean(v))) if v.size else None
  share = lambda v: float(np.mean(v)) if v.size else None
  return {
      'head': run.head, 'noise': run.noise, 'seed': run.seed,
      'config': {'head': config.head.name, 'center_init': config.head.center_init,
                 'scale': config.head.scale,
                 'sface': dict(config.head.sface) if config.head.name == 'sface' else None,
                 'quality_sface': (dict(config.head.quality_sface)
                                   if config.head.name == 'quality_sface' else None),
                 'model': config.model.name, 'image_size': config.data.image_size,
                 'steps': config.num_steps, 'batch_size': config.batch_size},
      'accuracy': metrics.accuracy, 'accuracy_std_folds': metrics.accuracy_std,
      'threshold': metrics.best_threshold, 'xnorm': metrics.xnorm,
      'tar_at_far_1e-2': tar, 'tar_at_far_1e-2_std_folds': tar_std,
      'far_measured_1e-2': far,
      'tar_at_far_1e-3': metrics.tar_at_far[1e-3][0],
      'theta_label_clean_deg': deg(theta_label[~flipped]),
      'theta_label_flipped_deg': deg(theta_label[flipped]),
      'theta_true_flipped_deg': deg(theta_true[flipped]),
      'flipped_nearest_is_noisy_label': share(nearest[flipped] == noisy[flipped]),
      'flipped_nearest_is_true_label': share(nearest[flipped] == true[flipped]),
      'clean_train_accuracy': share(nearest[~flipped] == noisy[~flipped]),
      'num_flipped': int(flipped.sum()),
  }


def _remove_checkpoints(run_dir: str) -> None:
  from sface_jax import checkpoint  # pylint: disable=g-import-not-at-top
  shutil.rmtree(os.path.join(run_dir, checkpoint.CHECKPOINT_DIR), ignore_errors=True)


# ---- SFace's a, b ------------------------------------------------------------------------------


def choose_sface_ab(theta_file: str) -> dict:
  """The rule (module docstring): medians of θ_y and of θ to the nearest other centre, clean
  training images of a clean ArcFace run."""
  with np.load(theta_file) as z:
    clean = ~z['flipped']
    a = float(np.median(z['theta_label'][clean]))
    b = float(np.median(z['theta_nearest_other'][clean]))
  return {'a': round(a, 3), 'b': round(b, 3), 'source': os.path.abspath(theta_file),
          'rule': 'a = median θ(image, own centre), b = median θ(image, nearest other centre), '
                  'training images of the clean ArcFace run (first seed) at the end of training'}


# ---- the study --------------------------------------------------------------------------------


def study_runs(heads: Sequence[str], noise: Sequence[float], seeds: Sequence[int], *,
               calibrate: bool = True) -> list[Run]:
  """Seed-major order (a killed study has whole seeds done); with `calibrate`, the clean
  ArcFace run of the first seed first when an SFace head needs its θ (it sets a, b)."""
  runs = [Run(h, n, s) for s in seeds for n in noise for h in heads]
  if calibrate and any(h in SFACE_HEADS for h in heads):
    calibration = Run('arcface', 0.0, seeds[0])
    runs = [calibration] + [r for r in runs if r != calibration]
  return runs


def run_study(workdir: str, *, heads: Sequence[str] = tuple(HEADS),
              noise: Sequence[float] = DEFAULT_NOISE, seeds: Sequence[int] = DEFAULT_SEEDS,
              recipe: Recipe = Recipe(), noise_seed: int = 0, sface_a: float | None = None,
              sface_b: float | None = None, docs: str = '',
              keep_checkpoints: bool = False) -> dict[str, Any]:
  """Trains and evaluates every run not done yet, then writes the table and plots.

  Returns the summary (`label_noise_results.json`'s contents).
  """
  import jax  # pylint: disable=g-import-not-at-top
  from sface_jax import train  # pylint: disable=g-import-not-at-top
  from sface_jax.data import convert, pair_sets  # pylint: disable=g-import-not-at-top
  unknown = sorted(set(heads) - set(HEADS))
  if unknown:
    raise ValueError(f'unknown heads {unknown}; choose from {", ".join(HEADS)}')
  if not seeds or not noise or not heads:
    raise ValueError('--heads, --noise and --seeds need at least one value each')
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  if not jax.config.jax_compilation_cache_dir:  # repeat compiles (same head, shapes) load
    jax.config.update('jax_compilation_cache_dir', os.path.join(workdir, 'xla_cache'))
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)

  clean_dir = os.path.join(workdir, 'data')
  convert.prepare(_demo_config().data.convert, clean_dir)
  runs = study_runs(heads, noise, seeds, calibrate=sface_a is None and sface_b is None)
  noise_info = {n: write_noisy_dataset(clean_dir, noise_dir(workdir, n), n, noise_seed)
                for n in sorted({r.noise for r in runs})}
  train_images, _ = read_records(clean_dir)
  pair_set = pair_sets.load(PAIR_SET, clean_dir, recipe.image_size)

  ab_path = os.path.join(workdir, AB_FILE)
  sface_ab = None
  if sface_a is not None or sface_b is not None:
    if sface_a is None or sface_b is None:
      raise ValueError('give both --sface-a and --sface-b, or neither')
    sface_ab = {'a': sface_a, 'b': sface_b, 'rule': 'given on the command line'}
  elif os.path.exists(ab_path):
    with open(ab_path) as f:
      sface_ab = json.load(f)

  todo = [r for r in runs if not os.path.exists(os.path.join(r.directory(workdir), RESULT_FILE))]
  _log(f'{len(runs)} runs ({len(runs) - len(todo)} already done): heads {", ".join(heads)}; '
       f'noise {", ".join(f"{_pct(n)}%" for n in noise)}; seeds {list(seeds)}; '
       f'{recipe.model} {recipe.image_size}x{recipe.image_size}, {recipe.steps} steps')
  durations = []
  for i, run in enumerate(runs, 1):
    run_dir = run.directory(workdir)
    result_path = os.path.join(run_dir, RESULT_FILE)
    if os.path.exists(result_path):
      _log(f'run {i}/{len(runs)} {run}: done already, skipped')
    else:
      if run.head in SFACE_HEADS and sface_ab is None:
        raise RuntimeError('SFace needs a, b: the clean ArcFace run should have come first')
      left = np.mean(durations) * (len(todo) - len(durations)) if durations else float('nan')
      _log(f'run {i}/{len(runs)} {run}: training '
           f'(ETA of the study {progress.format_duration(left)})')
      start = time.perf_counter()
      config = run_config(run, data_dir=noise_dir(workdir, run.noise), recipe=recipe,
                          sface_ab=sface_ab)
      try:
        train.train_and_evaluate(config, run_dir)
      except train.NonFiniteLossError as e:  # recorded as a finding, not retried
        result = {'head': run.head, 'noise': run.noise, 'seed': run.seed, 'failed': str(e)}
        _log(f'run {i}/{len(runs)} {run}: diverged: {e}')
      else:
        result = analyse(run, run_dir, noise=noise_info[run.noise],
                         train_images=train_images, pair_set=pair_set)
      result['seconds'] = time.perf_counter() - start
      result['sface_ab'] = sface_ab if run.head in SFACE_HEADS else None
      with files.atomic_write(result_path) as f:
        json.dump(result, f, indent=1)
      if not keep_checkpoints:
        _remove_checkpoints(run_dir)
      durations.append(result['seconds'])
      if 'failed' not in result:
        _log(f'run {i}/{len(runs)} {run}: held-out accuracy {100 * result["accuracy"]:.2f}%, '
             f'TAR@FAR=1e-2 {100 * result["tar_at_far_1e-2"]:.2f}% in '
             f'{result["seconds"]:.0f} s')
    if sface_ab is None and run == Run('arcface', 0.0, seeds[0]):
      sface_ab = choose_sface_ab(os.path.join(run_dir, THETA_FILE))
      with files.atomic_write(ab_path) as f:
        json.dump(sface_ab, f, indent=1)
      _log(f'SFace a = {sface_ab["a"]:.3f}, b = {sface_ab["b"]:.3f} ({sface_ab["rule"]})')
    summary = write_outputs(workdir, runs, sface_ab=sface_ab, recipe=recipe,
                            noise_seed=noise_seed)
  if docs:
    os.makedirs(docs, exist_ok=True)
    for name in OUTPUTS:
      if os.path.exists(os.path.join(workdir, name)):
        shutil.copyfile(os.path.join(workdir, name), os.path.join(docs, name))
    _log(f'copied {", ".join(OUTPUTS)} to {docs}')
  _log('done:\n' + summary['table'])
  return summary


# ---- table and plots --------------------------------------------------------------------------


def _mean_std(values: list[float]) -> tuple[float, float]:
  values = [v for v in values if v is not None]
  if not values:
    return float('nan'), float('nan')
  return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def summarise(workdir: str, runs: Sequence[Run]) -> dict[tuple[str, float], dict]:
  """(head, noise) → mean ± std over the finished seeds of each metric."""
  found: dict[tuple[str, float], list[dict]] = {}
  for run in runs:
    path = os.path.join(run.directory(workdir), RESULT_FILE)
    if os.path.exists(path):
      with open(path) as f:
        found.setdefault((run.head, run.noise), []).append(json.load(f))
  keys = ('accuracy', 'tar_at_far_1e-2', 'theta_label_clean_deg', 'theta_label_flipped_deg',
          'theta_true_flipped_deg', 'flipped_nearest_is_noisy_label',
          'flipped_nearest_is_true_label', 'clean_train_accuracy')
  summary = {}
  for key, results in found.items():
    ok = [r for r in results if 'failed' not in r]
    summary[key] = {'seeds': [r['seed'] for r in ok],
                    'diverged_seeds': [r['seed'] for r in results if 'failed' in r],
                    **{k: _mean_std([r[k] for r in ok]) for k in keys}}
  return summary


def format_table(summary: dict[tuple[str, float], dict], heads: Sequence[str],
                 noise: Sequence[float]) -> str:
  def pm(value, scale=100.0, digits=1):
    mean, std = value
    if not np.isfinite(mean):
      return '–'
    return f'{scale * mean:.{digits}f} ± {scale * std:.{digits}f}'
  lines = ['| head | label noise | seeds | held-out accuracy (%) | TAR@FAR=1e-2 (%) | '
           'θ to label centre, clean (°) | θ to label centre, flipped (°) | '
           'flipped samples fitted to the wrong label (%) |',
           '|---|---|---|---|---|---|---|---|']
  for head in heads:
    for n in noise:
      row = summary.get((head, n))
      if row is None:
        continue
      flipped = (pm(row['theta_label_flipped_deg'], 1.0) if n > 0 else '–')
      memorised = pm(row['flipped_nearest_is_noisy_label']) if n > 0 else '–'
      seeds = str(len(row['seeds']))
      if row['diverged_seeds']:
        seeds += f' (+{len(row["diverged_seeds"])} diverged)'
      lines.append(f'| {HEAD_LABELS[head]} | {_pct(n)}% | {seeds} | '
                   f'{pm(row["accuracy"])} | {pm(row["tar_at_far_1e-2"])} | '
                   f'{pm(row["theta_label_clean_deg"], 1.0)} | {flipped} | {memorised} |')
  return '\n'.join(lines)


def _figure(width, height):
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  figure = Figure(figsize=(width, height), dpi=110)
  FigureCanvasAgg(figure)
  return figure


def plot_accuracy(summary, heads, noise, path: str, subtitle: str) -> None:
  """Held-out accuracy and TAR@FAR=1e-2 against label noise, one line per head (each head
  shifted by a fraction of a percent on the x axis, so that equal results do not hide)."""
  figure = _figure(11, 4.2)
  for axes, key, title in zip(figure.subplots(1, 2), ('accuracy', 'tar_at_far_1e-2'),
                              ('held-out verification accuracy', 'held-out TAR @ FAR = 1e-2')):
    for i, head in enumerate(heads):
      points = [(100 * n, *summary[(head, n)][key]) for n in noise if (head, n) in summary]
      if not points:
        continue
      x, mean, std = (np.asarray(v) for v in zip(*points))
      x = x + 0.5 * (i - (len(heads) - 1) / 2)  # side by side: coinciding lines stay visible
      axes.errorbar(x, 100 * mean, yerr=100 * std, marker='o', capsize=3,
                    label=HEAD_LABELS[head])
    axes.set(title=title, xlabel='training labels flipped (%)', ylabel='%')
    axes.set_xticks([100 * n for n in noise])
    axes.grid(alpha=0.3)
  figure.axes[0].legend(fontsize=8)
  figure.suptitle(subtitle, fontsize=9)
  figure.tight_layout()
  with files.atomic_path(path) as tmp:
    figure.savefig(tmp, format='png')


def plot_theta(workdir: str, runs: Sequence[Run], path: str) -> bool:
  """θ-to-label histograms of ArcFace and SFace (columns) at each noise level > 0 (rows; the
  two highest), first seed. False (nothing written) when no such run has finished."""
  levels = sorted({r.noise for r in runs if r.noise > 0})[-2:]
  seed = min(r.seed for r in runs)
  grid = [[Run(h, n, seed) for h in ('arcface', 'sface')] for n in levels]
  done = lambda run: os.path.exists(os.path.join(run.directory(workdir), THETA_FILE))
  grid = [[r for r in row if done(r)] for row in grid]
  grid = [row for row in grid if row]
  if not grid:
    return False
  columns = max(len(row) for row in grid)
  figure = _figure(5.5 * columns, 4.0 * len(grid))
  axes_grid = figure.subplots(len(grid), columns, squeeze=False)
  bins = np.linspace(0, 180, 73)  # 2.5° bins over every possible angle
  for row, axes_row in zip(grid, axes_grid):
    for axes, run in zip(axes_row, row):
      with np.load(os.path.join(run.directory(workdir), THETA_FILE)) as z:
        flipped = z['flipped']
        label, true = np.degrees(z['theta_label']), np.degrees(z['theta_true'])
        memorised = np.mean(z['nearest'][flipped] == z['noisy_labels'][flipped])
      axes.hist(label[~flipped], bins=bins, alpha=0.6, color='tab:blue',
                label=f'clean ({(~flipped).sum()}): to their label')
      axes.hist(label[flipped], bins=bins, alpha=0.6, color='tab:red',
                label=f'flipped ({flipped.sum()}): to their wrong label')
      axes.hist(true[flipped], bins=bins, histtype='step', linewidth=1.5, color='k',
                label='flipped: to their true identity')
      axes.set(title=f'{HEAD_LABELS[run.head]}, {_pct(run.noise)}% flipped, seed {seed}: '
                     f'{100 * memorised:.0f}% of flipped\nnearest to their wrong label',
               xlabel='θ between training image and class centre (degrees)',
               ylabel='images')
      axes.legend(fontsize=7, loc='upper left')
      axes.grid(alpha=0.3)
    for axes in axes_row[len(row):]:
      axes.set_visible(False)
  figure.tight_layout()
  with files.atomic_path(path) as tmp:
    figure.savefig(tmp, format='png')
  return True


def write_outputs(workdir: str, runs: Sequence[Run], *, sface_ab, recipe: Recipe,
                  noise_seed: int) -> dict[str, Any]:
  heads = [h for h in HEADS if any(r.head == h for r in runs)]
  noise = sorted({r.noise for r in runs})
  summary = summarise(workdir, runs)
  table = format_table(summary, heads, noise)
  done = sum(os.path.exists(os.path.join(r.directory(workdir), RESULT_FILE)) for r in runs)
  subtitle = (f'ORL s1–s30 train, s31–s40 pairs; {recipe.model} {recipe.image_size}px, '
              f'{recipe.steps} steps; mean ± std over seeds ({done}/{len(runs)} runs done)')
  plot_accuracy(summary, heads, noise, os.path.join(workdir, OUTPUTS[2]), subtitle)
  plot_theta(workdir, runs, os.path.join(workdir, OUTPUTS[3]))
  ab = ('' if sface_ab is None else
        f'SFace a = {sface_ab["a"]}, b = {sface_ab["b"]} rad ({sface_ab["rule"]}). ')
  text = (f'# Label-noise study ({done}/{len(runs)} runs)\n\n{subtitle}. {ab}'
          f'Noise seed {noise_seed}.\n\n{table}\n')
  with files.atomic_write(os.path.join(workdir, OUTPUTS[0])) as f:
    f.write(text)
  out = {'runs_done': done, 'runs': len(runs), 'sface_ab': sface_ab,
         'recipe': dataclasses.asdict(recipe), 'noise_seed': noise_seed,
         'rows': [{'head': h, 'noise': n, **v} for (h, n), v in summary.items()],
         'table': table}
  with files.atomic_write(os.path.join(workdir, OUTPUTS[1])) as f:
    json.dump(out, f, indent=1, default=float)
  return out


# ---- command line -------------------------------------------------------------------------------


def _floats(text: str) -> list[float]:
  values = [float(v) for v in text.split(',') if v.strip()]
  return [v / 100 if v > 1 else v for v in values]  # '0,20,40' or '0,0.2,0.4'


def _ints(text: str) -> list[int]:
  return [int(v) for v in text.split(',') if v.strip()]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog='python -m sface_jax.experiments.label_noise', formatter_class=cli.HelpFormatter,
      description='Label-noise study of ArcFace, CosFace, SFace and quality-aware SFace on '
                  'the ORL faces (see the module docstring).')
  parser.add_argument('--workdir', required=True, help='where data, runs and outputs go')
  parser.add_argument('--steps', type=int, default=DEFAULT_STEPS, help='training steps a run')
  parser.add_argument('--seeds', type=_ints, default=list(DEFAULT_SEEDS), help='e.g. 0,1,2')
  parser.add_argument('--noise', type=_floats, default=list(DEFAULT_NOISE),
                      help='fractions of flipped labels, e.g. 0,0.2,0.4 (or 0,20,40)')
  parser.add_argument('--heads', default=','.join(HEADS),
                      help=f'comma-separated, from {",".join(HEADS)}')
  parser.add_argument('--model', default=DEFAULT_MODEL, help='backbone (r18_small, tiny, ...)')
  parser.add_argument('--image-size', type=int, default=DEFAULT_IMAGE_SIZE,
                      help='input side the faces are resized to')
  parser.add_argument('--noise-seed', type=int, default=0, help='seed of the label flipping')
  parser.add_argument('--sface-a', type=float, default=None,
                      help='bypass the a, b rule (give --sface-b too)')
  parser.add_argument('--sface-b', type=float, default=None, help='with --sface-a')
  parser.add_argument('--docs', default='', help='also copy the table and plots here')
  parser.add_argument('--keep-checkpoints', action='store_true',
                      help="keep each run's checkpoint (deleted once analysed otherwise)")
  compilation_cache.add_arguments(parser)  # --compilation-cache-dir, --no-compilation-cache
  return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  args = parse_args(argv)
  run_study(args.workdir, heads=[h for h in args.heads.split(',') if h],
            noise=args.noise, seeds=args.seeds,
            recipe=Recipe(steps=args.steps, image_size=args.image_size, model=args.model),
            noise_seed=args.noise_seed, sface_a=args.sface_a, sface_b=args.sface_b,
            docs=args.docs, keep_checkpoints=args.keep_checkpoints)
  return 0


if __name__ == '__main__':
  sys.exit(main())
