"""Label-noise study: does SFace resist flipped labels better than ArcFace/CosFace? (issue 17)

  python -m sface_jax.experiments.label_noise --workdir runs/label_noise

trains on people s1–s30 of the ORL faces (the demo's data, `sface_jax/configs/demo.py`) with 0 %, 20 %
and 40 % of the 300 training labels replaced by a wrong identity, for ArcFace, CosFace, SFace,
quality-aware SFace v1 and v2 and SFace with zhongyy's Xavier centre initialisation, five
seeds each (6 heads × 3 noise levels × 5 seeds = 90 runs), and evaluates every run on the
held-out people s31–s40 (the demo's 900 pairs, `orl_val`). It writes, under `--workdir`:

  data/                          the clean conversion (the demo's converter, on first use)
  data_noise{20,40,...}/         the same TFRecords with labels replaced, plus `noise.json`:
                                 which records were flipped, their true and noisy labels
                                 (`data_noise00/` is an identical clean copy, for uniformity)
  runs/<head>/noise<pct>/seed<s>/  each run: the trainer's work directory, `result.json`
                                 (written last: its presence means "done"), `theta.npz`
  sface_ab.json                  SFace's a, b for this data and the rule that chose them
  label_noise_table.md, label_noise_results.json, label_noise_accuracy.png,
  label_noise_theta.png          the tables, the accuracy-against-noise plot and the θ
                                 histograms; `--docs DIR` also copies them to DIR (the
                                 committed ones are in docs/: `--docs docs` replaces them)

Resuming, the recipe, SFace's a and b, the held-out metrics and the statistics (bootstrap 95 %
intervals over seeds, paired per-seed differences against SFace and ArcFace, a difference
called only when its interval excludes 0) are shared with the degraded-quality study:
`sface_jax.experiments.study`. `--steps`, `--seeds`, `--noise`, `--heads`, `--model` and
`--image-size` shrink the study (the CI test and the Colab notebook do).

Decisions (nobody to ask; written here):

* Noise. Symmetric ("uniform") label noise: exactly round(p·N) of the N training records,
  drawn without replacement, each given an identity drawn uniformly from the C − 1 *other*
  identities (`flip_labels`). One fixed noise seed (`--noise-seed`, default 0) for every head
  and training seed, so all heads see the same flipped samples: the comparison is paired, and
  the seed spread measures training randomness only. Sample i is the i-th record of the
  dataset read shard by shard in `sface_jax_dataset.json` order. The noisy copy keeps the shard
  files and counts, so the input pipeline serves the same images in the same order as the
  clean data; only labels differ.
* Recipe (the same for every head). `sface_jax/configs/demo.py` (r18_small, embedding 128, scale s = 32
  for every head, SGD + cosine schedule with 2 warm-up epochs, batch 32, the demo's
  augmentation) shrunk to 32×32 inputs and 300 steps (32 epochs): 30–90 s a run on two CPU
  cores (the demo's 64×64 × 800 steps takes ~3 min). 32 epochs is also long enough for a
  network to start memorising flipped labels, which is what the study is about. Every head
  keeps its own defaults from `sface_jax/configs/base.py` (ArcFace m = 0.5, CosFace m = 0.35, SFace
  k = 80, quality SFace v1 shift = 0.1, v2 γ = 1, h = 0.333) except SFace's a, b (the shared
  rule, `study.choose_sface_ab`); nothing is tuned on the held-out pairs.
* The mechanism (θ histograms). After training, each training image's flip-summed embedding
  (the same embedding evaluation uses; training saw random flips) against the trained class
  centres: θ to its noisy label's centre, split into clean and flipped samples, and θ of the
  flipped samples to their true identity's centre. Per run, `result.json` also records the
  share of flipped samples whose nearest centre is the wrong label (memorised) or the true
  identity; the plot shows ArcFace and SFace at the two highest noise levels, first seed.
* Quality-aware SFace. v1 (`quality_sface`) moves r_intra's centre with the quality ẑ, v2
  (`quality_sface_v2`) scales its height (sface_jax/heads/sface.py); both start their norm
  statistics from the first batch (`first_batch_stats`). Under AdaFace's start (σ = 100,
  momentum 0.01) σ was still 7–12 after 300 steps and |ẑ| ≲ 0.1: quality was off, and the
  previous version of this study found v1 equal to SFace to every printed digit
  (docs/quality_sface.md).
* Checkpoints are deleted once a run's `result.json` is written (`--keep-checkpoints` keeps
  them): `theta.npz` holds what the plots need.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from sface_jax.experiments import study

HeadSpec = study.HeadSpec
Recipe = study.Recipe
HEADS = {
    'arcface': HeadSpec('arcface', 'ArcFace (m=0.5)'),
    'cosface': HeadSpec('cosface', 'CosFace (m=0.35)'),
    'sface': HeadSpec('sface', 'SFace'),
    'quality_sface': HeadSpec('quality_sface', 'quality SFace v1 (centre shift)'),
    'quality_sface_v2': HeadSpec('quality_sface_v2', 'quality SFace v2 (height 1 + γẑ)'),
    'sface_xavier': HeadSpec('sface', "SFace, xavier centres (zhongyy's)",
                             center_init='xavier'),
}
DEFAULT_NOISE = (0.0, 0.2, 0.4)
NOISE_FILE = 'noise.json'
OUTPUTS = ('label_noise_table.md', 'label_noise_results.json', 'label_noise_accuracy.png',
           'label_noise_theta.png')

# The smallest study (the CI test and the notebook's smoke mode): run_study(workdir, **SMOKE).
# The clean ArcFace run that calibrates SFace's a, b is added to these: 3 runs.
SMOKE = dict(heads=('arcface', 'sface'), noise=(0.4,), seeds=(0,), recipe=study.SMOKE_RECIPE)


# ---- label flipping --------------------------------------------------------------------------


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


def noise_dir(workdir: str, fraction: float) -> str:
  return os.path.join(workdir, f'data_noise{study.pct(fraction):02d}')


def write_noisy_dataset(clean_dir: str, output: str, fraction: float, seed: int) -> dict:
  """A copy of the converted dataset in `clean_dir` with labels flipped (`flip_labels`), and
  `noise.json` (the flipped indices and both label lists). A complete copy made with the same
  fraction and seed is reused; one made otherwise is refused. Returns `noise.json`'s
  contents."""
  from sface_jax.data import tfrecord  # pylint: disable=g-import-not-at-top
  wanted = {'fraction': fraction, 'seed': seed}
  noise = study.existing_copy(output, NOISE_FILE, wanted)
  if noise is not None:
    return noise
  images, labels = study.read_records(clean_dir)
  num_classes = tfrecord.read_info(clean_dir).num_classes
  noisy, flipped = flip_labels(labels, fraction, num_classes, seed)
  return study.write_dataset_copy(
      clean_dir, output, images, noisy, NOISE_FILE,
      {**wanted, 'num_flipped': int(flipped.size), 'num_classes': num_classes,
       'flipped': flipped.tolist(), 'original_labels': labels.tolist(),
       'noisy_labels': noisy.tolist()}, 'labels')


# ---- the study -------------------------------------------------------------------------------


@dataclasses.dataclass
class Context:
  noise: dict[float, dict]  # level → noise.json
  train_pixels: np.ndarray  # (300, S, S, 3) uint8, the clean training images
  pair_set: Any  # the held-out pairs, decoded


class LabelNoise(study.Study):
  """The label-noise study (module docstring)."""
  name = 'label_noise'
  prefix = 'noise'
  title = 'Label-noise study'
  description = ('Label-noise study of ArcFace, CosFace, SFace and quality-aware SFace on the '
                 'ORL faces (see the module docstring of sface_jax.experiments.label_noise).')
  level_title = 'label noise'
  treatment = 'label flipped'
  data = 'ORL s1–s30 train (labels flipped), s31–s40 pairs'
  heads = HEADS
  default_levels = DEFAULT_NOISE
  columns = (
      study.Column('accuracy', 'held-out accuracy (%)'),
      study.Column('tar_at_far_1e-2', 'TAR@FAR=1e-2 (%)'),
      study.Column('theta_label_clean_deg', 'θ to label centre, clean (°)', 1.0),
      study.Column('theta_label_flipped_deg', 'θ to label centre, flipped (°)', 1.0,
                   treated_only=True),
      study.Column('flipped_nearest_is_noisy_label',
                   'flipped samples fitted to the wrong label (%)', treated_only=True))
  extra_keys = ('theta_true_flipped_deg', 'flipped_nearest_is_true_label',
                'clean_train_accuracy')
  plotted = (('accuracy', 'held-out verification accuracy'),
             ('tar_at_far_1e-2', 'held-out TAR @ FAR = 1e-2'))
  compared = (('accuracy', 'accuracy'), ('tar_at_far_1e-2', 'TAR@1e-2'))
  outputs = OUTPUTS

  def data_dir(self, workdir, level):
    return noise_dir(workdir, level)

  def prepare(self, workdir, clean_dir, levels, recipe):
    from sface_jax.data import images as images_lib  # pylint: disable=g-import-not-at-top
    from sface_jax.data import pair_sets  # pylint: disable=g-import-not-at-top
    noise = {level: write_noisy_dataset(clean_dir, noise_dir(workdir, level), level,
                                        self.treatment_seed) for level in levels}
    train_images, _ = study.read_records(clean_dir)
    pixels = images_lib.decode_all(train_images, recipe.image_size, name='training set')
    return Context(noise=noise, train_pixels=pixels,
                   pair_set=pair_sets.load(study.PAIR_SET, clean_dir, recipe.image_size))

  def analyse(self, run, run_dir, context, sface_ab):
    """Held-out metrics and the θ statistics of one trained run; writes `theta.npz`."""
    del sface_ab
    trained = study.load_trained(run_dir)
    metrics = study.evaluate_pairs(trained, context.pair_set)
    embeddings = study.embed(trained, context.train_pixels)
    theta = study.angles(embeddings, trained.centers)
    noise = context.noise[run.level]
    noisy = np.asarray(noise['noisy_labels'])
    true = np.asarray(noise['original_labels'])
    flipped = np.zeros(noisy.size, bool)
    flipped[np.asarray(noise['flipped'], np.int64)] = True
    geometry = study.label_geometry(theta, noisy)
    theta_true = theta[np.arange(noisy.size), true]
    nearest = geometry['nearest']
    study.save_arrays(os.path.join(run_dir, study.THETA_FILE), **geometry,
                      theta_true=theta_true, flipped=flipped, clean=~flipped,
                      noisy_labels=noisy, true_labels=true)
    deg = lambda v: float(np.degrees(np.mean(v))) if v.size else None
    share = lambda v: float(np.mean(v)) if v.size else None
    return {
        **metrics,
        'theta_label_clean_deg': deg(geometry['theta_label'][~flipped]),
        'theta_label_flipped_deg': deg(geometry['theta_label'][flipped]),
        'theta_true_flipped_deg': deg(theta_true[flipped]),
        'flipped_nearest_is_noisy_label': share(nearest[flipped] == noisy[flipped]),
        'flipped_nearest_is_true_label': share(nearest[flipped] == true[flipped]),
        'clean_train_accuracy': share(nearest[~flipped] == noisy[~flipped]),
        'num_flipped': int(flipped.sum()),
    }

  def plot(self, workdir, runs, results, path):
    del results
    plot_theta(workdir, runs, path)


def plot_theta(workdir: str, runs: Sequence[study.Run], path: str) -> bool:
  """θ-to-label histograms of ArcFace and SFace (columns) at each noise level > 0 (rows; the
  two highest), first seed. False (nothing written) when no such run has finished."""
  levels = sorted({r.level for r in runs if r.level > 0})[-2:]
  seed = min(r.seed for r in runs)
  grid = [[study.Run(h, n, seed, LabelNoise.prefix) for h in ('arcface', 'sface')]
          for n in levels]
  done = lambda run: os.path.exists(os.path.join(run.directory(workdir), study.THETA_FILE))
  grid = [[r for r in row if done(r)] for row in grid]
  grid = [row for row in grid if row]
  if not grid:
    return False
  columns = max(len(row) for row in grid)
  fig = study.figure(5.5 * columns, 4.0 * len(grid))
  axes_grid = fig.subplots(len(grid), columns, squeeze=False)
  bins = np.linspace(0, 180, 73)  # 2.5° bins over every possible angle
  for row, axes_row in zip(grid, axes_grid):
    for axes, run in zip(axes_row, row):
      with np.load(os.path.join(run.directory(workdir), study.THETA_FILE)) as z:
        flipped = z['flipped']
        label, true = np.degrees(z['theta_label']), np.degrees(z['theta_true'])
        memorised = np.mean(z['nearest'][flipped] == z['noisy_labels'][flipped])
      axes.hist(label[~flipped], bins=bins, alpha=0.6, color='tab:blue',
                label=f'clean ({(~flipped).sum()}): to their label')
      axes.hist(label[flipped], bins=bins, alpha=0.6, color='tab:red',
                label=f'flipped ({flipped.sum()}): to their wrong label')
      axes.hist(true[flipped], bins=bins, histtype='step', linewidth=1.5, color='k',
                label='flipped: to their true identity')
      axes.set(title=f'{HEADS[run.head].label}, {study.pct(run.level)}% flipped, seed {seed}: '
                     f'{100 * memorised:.0f}% of flipped\nnearest to their wrong label',
               xlabel='θ between training image and class centre (degrees)',
               ylabel='images')
      axes.legend(fontsize=7, loc='upper left')
      axes.grid(alpha=0.3)
    for axes in axes_row[len(row):]:
      axes.set_visible(False)
  study.save_figure(fig, path)
  return True


def run_study(workdir: str, *, heads: Sequence[str] = tuple(HEADS),
              noise: Sequence[float] = DEFAULT_NOISE,
              seeds: Sequence[int] = study.DEFAULT_SEEDS, recipe: Recipe = Recipe(),
              noise_seed: int = 0, **options) -> dict[str, Any]:
  """Trains and evaluates every run not done yet, then writes the tables and plots (copied
  into `docs=` when given; `options` as `study.run_study`). Returns the summary
  (`label_noise_results.json`'s contents)."""
  return study.run_study(LabelNoise(noise_seed), workdir, heads=heads, levels=noise,
                         seeds=seeds, recipe=recipe, **options)


def main(argv: Sequence[str] | None = None) -> int:
  """`python -m sface_jax.experiments.label_noise --help`."""
  return study.main(LabelNoise, argv)


if __name__ == '__main__':
  sys.exit(main())
