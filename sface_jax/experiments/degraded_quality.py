"""Degraded-quality study: does quality-aware SFace learn clean hard faces, spare degraded ones?

  python -m sface_jax.experiments.degraded_quality --workdir runs/degraded_quality

The seed report's proposal for SFace is a classifier that "encourages high-quality hard samples
and discourages low-quality hard samples". This study makes both kinds exist and asks whether
quality-aware SFace (v1, v2; sface_jax/heads/sface.py) helps. On people s1–s30 of the ORL faces
(the demo's data, as in the label-noise study), 0 %, 20 % or 40 % of the 300 training images
are degraded (below), while the others stay clean; ORL's own pose and expression changes keep
plenty of clean images hard (θ_y far above SFace's a). Six heads, ArcFace, CosFace, AdaFace
(the quality-aware softmax anchor), SFace, quality SFace v1 and v2, five seeds each (6 × 3 × 5
= 90 runs, plus nothing: the clean ArcFace run of the first seed is also the run that sets
SFace's a, b), evaluated on two pair sets of the held-out people s31–s40:

  orl_val            the demo's 900 clean pairs
  orl_val_degraded   the same 900 pairs with the second image of each degraded (one of the five
                     degradations, balanced, seeded: `pairs/orl_val_degraded.json` lists them)

It writes, under `--workdir`:

  data/, data_degraded{00,20,40}/   the clean conversion and its copies with images degraded,
                                    each with `degraded.json` (which records, which
                                    degradation, its parameters)
  pairs/orl_val_degraded.{npz,json} the degraded held-out pairs
  runs/<head>/degraded<pct>/seed<s>/ each run: `result.json` (its presence means "done", with
                                    the weight trajectory below), `theta.npz`
  sface_ab.json                     SFace's a, b and the rule that chose them
  quality_sface_table.md, quality_sface_results.json, quality_sface_accuracy.png,
  quality_sface_weights.png         the tables, the accuracy plot and the weight plot;
                                    `--docs DIR` also copies them to DIR (the committed ones
                                    are in docs/: `--docs docs` replaces them)

Resuming, the recipe (r18_small, 32 px, 300 steps: the label-noise study's), SFace's a and b
(the same written rule), the held-out metrics and the statistics (bootstrap 95 % intervals
over seeds; paired per-seed differences against SFace and against ArcFace, a difference called
only when its interval excludes 0) are shared: `sface_jax.experiments.study`.

Decisions (nobody to ask; written here):

* Degradations, applied to the stored 92×112 greyscale image, strong enough to survive the
  resize to the 32×32 input (checked by eye at 32 px): Gaussian blur (σ = 4 px); low
  resolution (box-downsampled by 10 to 9×11 px, bilinear back); JPEG quality 5 (at a third of
  the size, about the network's input, then bilinear back: at full size its 8×8 blocks vanish
  in the resize); heavy noise (Gaussian, σ = 80 grey levels, clipped); occlusion (a black
  rectangle over 45 % of the image, width 50–90 % of the image, placed uniformly). Which images
  are degraded: one fixed permutation (`--degraded-seed`, default 0) whose first round(p·N)
  records are degraded, so the 20 % set is part of the 40 % set, the kinds dealt in turn over
  that order (balanced); the same for every head and seed (paired). Labels are never changed.
* Heads. Every head keeps its `sface_jax/configs/base.py` defaults (scale s = 32 for all, the demo's),
  SFace's a, b set by the rule, with one exception: AdaFace starts its norm statistics from
  the first batch (`first_batch_stats`, its opt-in), as quality SFace v1 and v2 do by default:
  with the official start (σ = 100, momentum 0.01) its quality signal would still be near 0
  at the end of a 300-step run and the anchor would not be quality-aware.
* The weight each head gives a sample (the plot). Per training image i, the pull towards its
  own centre, w_i = −(N/s)·∂L/∂cos θ_iy: SFace's r_intra (∈ [0, 1]), v2's (1 + γẑ_i)·r_intra,
  and (1 − p_y)·∂ψ/∂cos θ_y for a softmax head with target logit s·ψ(θ_y) (CosFace: 1 − p_y),
  all on one scale. It is measured after training from checkpoints every 50 steps (the
  cheaper honest way: the head cannot tell which images are degraded), as a training step
  would see the un-augmented training images: the backbone in training mode (batch norm over
  batches of 30, not its running statistics, which give other norms), un-flipped, and the
  checkpoint's own running norm statistics for ẑ. An image is *hard* at a checkpoint when
  θ_y > a (SFace's a: where r_intra is ≈ 1). The plot and table give the mean weight of
  clean-hard and degraded-hard images; `result.json` also has their counts, θ, norms and ẑ
  (does the norm flag the degraded images at all?).
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import math
import os
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from sface_jax import files
from sface_jax.experiments import study

HeadSpec = study.HeadSpec
Recipe = study.Recipe
HEADS = {
    'arcface': HeadSpec('arcface', 'ArcFace (m=0.5)'),
    'cosface': HeadSpec('cosface', 'CosFace (m=0.35)'),
    'adaface': HeadSpec('adaface', 'AdaFace (m=0.4)',
                        overrides=(('first_batch_stats', True),)),
    'sface': HeadSpec('sface', 'SFace'),
    'quality_sface': HeadSpec('quality_sface', 'quality SFace v1 (centre shift)'),
    'quality_sface_v2': HeadSpec('quality_sface_v2', 'quality SFace v2 (height 1 + γẑ)'),
}
DEFAULT_DEGRADED = (0.0, 0.2, 0.4)
DEGRADATIONS = ('blur', 'low_resolution', 'jpeg', 'noise', 'occlusion')
SEVERITY = dict(blur_sigma=4.0, low_resolution_factor=10, jpeg_quality=5, jpeg_scale=3,
                noise_sigma=80.0, occlusion_area=0.45, occlusion_width=(0.5, 0.9))
MANIFEST = 'degraded.json'
DEGRADED_PAIR_SET = 'orl_val_degraded'
TRAJECTORY_POINTS = 6  # checkpoints a run is measured at (every steps / 6)
OUTPUTS = ('quality_sface_table.md', 'quality_sface_results.json', 'quality_sface_accuracy.png',
           'quality_sface_weights.png')

# The smallest study (the CI test and the notebook's smoke mode), plus the calibration run.
SMOKE = dict(heads=('arcface', 'quality_sface_v2'), degraded=(0.4,), seeds=(0,),
             recipe=study.SMOKE_RECIPE)


# ---- degradations ----------------------------------------------------------------------------


def draw_degradations(count: int, seed: int) -> list[dict[str, Any]]:
  """`count` degradation specs {kind, parameters}: kinds dealt in turn (balanced), then the
  per-image draws (noise seed, occlusion box as fractions of the image) with `seed`."""
  rng = np.random.default_rng(seed)
  specs = []
  for i in range(count):
    kind = DEGRADATIONS[i % len(DEGRADATIONS)]
    spec = {'kind': kind}
    if kind == 'noise':
      spec['noise_seed'] = int(rng.integers(0, 2**31))
    elif kind == 'occlusion':
      width = float(rng.uniform(*SEVERITY['occlusion_width']))
      height = min(1.0, SEVERITY['occlusion_area'] / width)
      spec.update(width=width, height=height, left=float(rng.uniform(0, 1 - width)),
                  top=float(rng.uniform(0, 1 - height)))
    specs.append(spec)
  return specs


def degrade(data: bytes, spec: dict[str, Any]) -> bytes:
  """The image file `data` degraded by `spec` (`draw_degradations`), as PNG bytes."""
  from PIL import Image, ImageFilter  # pylint: disable=g-import-not-at-top
  with Image.open(io.BytesIO(data)) as source:
    img = source.convert('L') if source.mode != 'RGB' else source.convert('RGB')
  width, height = img.size
  kind = spec['kind']
  if kind == 'blur':
    out = img.filter(ImageFilter.GaussianBlur(SEVERITY['blur_sigma']))
  elif kind == 'low_resolution':
    factor = SEVERITY['low_resolution_factor']
    small = img.resize((max(1, round(width / factor)), max(1, round(height / factor))),
                       Image.BOX)
    out = small.resize((width, height), Image.BILINEAR)
  elif kind == 'jpeg':
    scale = SEVERITY['jpeg_scale']
    small = img.resize((max(8, round(width / scale)), max(8, round(height / scale))),
                       Image.BOX)
    buffer = io.BytesIO()
    small.save(buffer, 'JPEG', quality=SEVERITY['jpeg_quality'])
    with Image.open(io.BytesIO(buffer.getvalue())) as compressed:
      out = compressed.convert(img.mode).resize((width, height), Image.BILINEAR)
  elif kind == 'noise':
    pixels = np.asarray(img, np.float64)
    noise = np.random.default_rng(spec['noise_seed']).normal(0.0, SEVERITY['noise_sigma'],
                                                             pixels.shape)
    out = Image.fromarray(np.clip(np.rint(pixels + noise), 0, 255).astype(np.uint8), img.mode)
  elif kind == 'occlusion':
    pixels = np.array(img)
    top, left = round(spec['top'] * height), round(spec['left'] * width)
    pixels[top:top + round(spec['height'] * height), left:left + round(spec['width'] * width)] = 0
    out = Image.fromarray(pixels, img.mode)
  else:
    raise ValueError(f'unknown degradation {kind!r}; known: {", ".join(DEGRADATIONS)}')
  buffer = io.BytesIO()
  out.save(buffer, 'PNG')
  return buffer.getvalue()


def degraded_dir(workdir: str, fraction: float) -> str:
  return os.path.join(workdir, f'data_degraded{study.pct(fraction):02d}')


def write_degraded_dataset(clean_dir: str, output: str, fraction: float, seed: int) -> dict:
  """A copy of the converted dataset with round(fraction·N) images degraded (module doc) and
  `degraded.json`: {'degraded': [record indices], 'specs': [one per index], ...}. A complete
  copy made with the same settings is reused; one made otherwise is refused."""
  wanted = {'fraction': fraction, 'seed': seed, 'severity': _json(SEVERITY)}
  manifest = study.existing_copy(output, MANIFEST, wanted)
  if manifest is not None:
    return manifest
  images, labels = study.read_records(clean_dir)
  order = np.random.default_rng(seed).permutation(len(images))
  chosen = order[:int(round(fraction * len(images)))]
  # Drawn in turn from one generator: the first k specs are the same for any total, so the
  # degraded sets of the fractions are nested.
  specs = draw_degradations(chosen.size, seed + 1)
  images = list(images)
  for index, spec in zip(chosen, specs):
    images[index] = degrade(images[index], spec)
  return study.write_dataset_copy(
      clean_dir, output, images, labels, MANIFEST,
      {**wanted, 'kinds': list(DEGRADATIONS), 'num_degraded': int(chosen.size),
       'degraded': chosen.tolist(), 'specs': specs}, 'images degraded')


def write_degraded_pairs(clean_dir: str, directory: str, seed: int) -> str:
  """`orl_val` with the second image of every pair degraded (kinds balanced over the pairs,
  in a seeded order), as `<directory>/orl_val_degraded.npz` and `.json`; returns the npz path
  (an existing pair made with the same settings is reused)."""
  from sface_jax.data import pair_sets  # pylint: disable=g-import-not-at-top
  path = os.path.join(directory, f'{DEGRADED_PAIR_SET}.npz')
  manifest_path = os.path.join(directory, f'{DEGRADED_PAIR_SET}.json')
  wanted = {'seed': seed, 'severity': _json(SEVERITY)}
  if study.existing_copy(directory, os.path.basename(manifest_path), wanted,
                         marker=os.path.basename(path)) is not None:
    return path
  clean = pair_sets.read_pairs(pair_sets.resolve(study.PAIR_SET, clean_dir))
  specs = draw_degradations(clean.num_pairs, seed + 2)
  order = np.random.default_rng(seed + 3).permutation(clean.num_pairs)
  specs = [specs[i] for i in order]  # kinds balanced over the pairs, not in pair order
  images = list(clean.images)
  for pair, spec in enumerate(specs):
    images[2 * pair + 1] = degrade(images[2 * pair + 1], spec)
  os.makedirs(directory, exist_ok=True)
  if os.path.exists(manifest_path):
    os.remove(manifest_path)
  pair_sets.write_npz(pair_sets.PairSet(DEGRADED_PAIR_SET, images, clean.issame), path)
  with files.atomic_write(manifest_path) as f:
    json.dump({**wanted, 'source': study.PAIR_SET, 'degraded_image': 'second of each pair',
               'specs': specs}, f)
  return path


def _json(value):
  return json.loads(json.dumps(value))  # tuples → lists: comparable with a read manifest


# ---- the weight a head gives a sample --------------------------------------------------------


def pull_weights(head_config, cos_theta: np.ndarray, labels: np.ndarray,
                 quality: np.ndarray | None) -> np.ndarray:
  """w_i = −(N/s)·∂L/∂cos θ_iy of each sample under the head of `head_config` (module doc).

  The loss as a function of the cosines, from the heads' own pure functions with the config's
  hyper-parameters (the same loss `heads.get_head` trains with: tests/test_degraded_quality.py
  checks the values agree); `quality` is ẑ for the heads that use it.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  loss = cosine_loss(head_config, labels, quality)
  grad = np.asarray(jax.grad(loss)(jnp.asarray(cos_theta, jnp.float32)), np.float64)
  return -grad[np.arange(len(labels)), labels] * len(labels) / head_config.scale


def cosine_loss(head_config, labels, quality):
  """The study head's batch-mean loss as a function of the (N, C) cosines."""
  from sface_jax import heads  # pylint: disable=g-import-not-at-top
  name, scale = head_config.name, float(head_config.scale)
  labels = np.asarray(labels, np.int32)
  if name in ('arcface', 'cosface'):
    fields = head_config[name]
    margins = (dict(m2=fields.m, easy_margin=fields.easy_margin,
                    insightface_grad=fields.insightface_grad) if name == 'arcface'
               else dict(m3=fields.m))

    def loss(c):
      logits, target = heads.margin_logits_with_target(c, labels, scale=scale, **margins)
      return heads.cross_entropy(logits, labels, target_logits=target)
  elif name == 'adaface':
    fields = head_config.adaface

    def loss(c):
      logits, target = heads.adaface_logits_with_target(
          c, labels, quality, scale=scale, m=fields.m, official_clamp=fields.official_clamp)
      return heads.cross_entropy(logits, labels, target_logits=target)
  elif name in study.SFACE_FAMILY:
    fields = head_config[name]
    weights = dict(quality=None if name == 'sface' else quality,
                   shift=fields.get('shift', 0.0), gamma=fields.get('gamma', 0.0))

    def loss(c):
      intra, inter = heads.sface_loss_terms(c, labels, scale=scale, k=fields.k, a=fields.a,
                                            b=fields.b, **weights)
      return intra + inter
  else:
    raise ValueError(f'the degraded-quality study has no pull weight for head {name!r}')
  return loss


def norm_quality(head_config, head_state, norms: np.ndarray) -> np.ndarray | None:
  """ẑ of each norm from the checkpoint's running statistics (None for heads without)."""
  from sface_jax import heads  # pylint: disable=g-import-not-at-top
  if 'norm_mean' not in head_state:
    return None
  return np.asarray(heads.norm_quality(np.asarray(norms, np.float32), head_state,
                                       h=head_config[head_config.name].h), np.float64)


def _train_mode_apply(model, variables, images, key):
  """Un-flipped embeddings of a batch with batch norm in training mode (updates dropped)."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from sface_jax.data import images as images_lib  # pylint: disable=g-import-not-at-top
  (embeddings, _), _ = model.apply(variables, images_lib.normalize(images.astype(jnp.float32)),
                                   train=True, mutable=['batch_stats'], rngs={'dropout': key})
  return embeddings.astype(jnp.float32)


@functools.lru_cache(maxsize=1)
def _jitted_train_mode_apply():
  """One jitted `_train_mode_apply` for the process: compiled once per model and shape."""
  import jax  # pylint: disable=g-import-not-at-top
  return jax.jit(_train_mode_apply, static_argnums=0)


def train_mode_embeddings(trained: study.Trained, pixels: np.ndarray,
                          seed: int = 0) -> np.ndarray:
  """Un-flipped embeddings (N, D) as a training step computes them: batch norm over batches
  of about the training batch size (a fixed random split of the images), not the running
  statistics, whose norms differ (and so would ẑ against the training-time statistics)."""
  import jax  # pylint: disable=g-import-not-at-top
  apply = _jitted_train_mode_apply()
  key = jax.random.key(seed)
  order = np.random.default_rng(seed).permutation(len(pixels))
  batches = np.array_split(order, max(1, round(len(pixels) / trained.config.batch_size)))
  out = np.empty((len(pixels), trained.config.model.embedding_dim), np.float64)
  for batch in batches:
    out[batch] = np.asarray(apply(trained.model, trained.variables, pixels[batch], key),
                            np.float64)
  return out


def checkpoint_arrays(trained: study.Trained, pixels: np.ndarray,
                      labels: np.ndarray) -> dict[str, np.ndarray]:
  """Per training image at one checkpoint, as a training step sees it
  (`train_mode_embeddings`): θ_y, the pull weight, the norm and ẑ (NaN for heads without)."""
  embeddings = train_mode_embeddings(trained, pixels)
  norms = np.linalg.norm(embeddings, axis=1)
  theta = study.angles(embeddings, trained.centers)
  head_config = trained.config.head
  quality = norm_quality(head_config, trained.head_state, norms)
  return dict(theta_y=theta[np.arange(labels.size), labels],
              weights=pull_weights(head_config, np.cos(theta), labels, quality), norms=norms,
              quality=np.full(labels.size, np.nan) if quality is None else quality)


def trajectory_point(step: int, arrays: dict[str, np.ndarray], degraded: np.ndarray,
                     a: float) -> dict[str, Any]:
  """Mean pull weight, count, θ_y, norm and ẑ of the clean and the degraded images, and of
  their hard ones (θ_y > a), at one checkpoint."""
  hard = arrays['theta_y'] > a
  mean = lambda v, m: float(np.mean(v[m])) if np.any(m) and np.all(np.isfinite(v[m])) else None
  point = {'step': step}
  for group, members in (('clean', ~degraded), ('degraded', degraded)):
    point[f'{group}_hard_weight'] = mean(arrays['weights'], members & hard)
    point[f'{group}_hard_count'] = int(np.sum(members & hard))
    point[f'{group}_weight'] = mean(arrays['weights'], members)
    point[f'{group}_theta_deg'] = mean(np.degrees(arrays['theta_y']), members)
    point[f'{group}_norm'] = mean(arrays['norms'], members)
    point[f'{group}_quality'] = mean(arrays['quality'], members)
  return point


# ---- the study -------------------------------------------------------------------------------


@dataclasses.dataclass
class Context:
  manifests: dict[float, dict]  # level → degraded.json
  train_pixels: dict[float, np.ndarray]  # level → (300, S, S, 3) uint8, as trained on
  labels: np.ndarray
  pair_sets: list[Any]  # clean, degraded


class DegradedQuality(study.Study):
  """The degraded-quality study (module docstring)."""
  name = 'degraded_quality'
  prefix = 'degraded'
  title = 'Degraded-quality study'
  description = ('Degraded-quality study of ArcFace, CosFace, AdaFace, SFace and quality-aware '
                 'SFace v1 and v2 on the ORL faces (see the module docstring of '
                 'sface_jax.experiments.degraded_quality).')
  level_title = 'training images degraded'
  treatment = 'image degraded'
  data = 'ORL s1–s30 train (part degraded), s31–s40 pairs'
  heads = HEADS
  default_levels = DEFAULT_DEGRADED
  columns = (
      study.Column('accuracy', 'accuracy, clean pairs (%)'),
      study.Column('tar_at_far_1e-2', 'TAR@1e-2, clean (%)'),
      study.Column('degraded_accuracy', 'accuracy, one degraded (%)'),
      study.Column('degraded_tar_at_far_1e-2', 'TAR@1e-2, one degraded (%)'),
      study.Column('clean_hard_weight', 'pull, clean-hard', 1.0, 2),
      study.Column('degraded_hard_weight', 'pull, degraded-hard', 1.0, 2, treated_only=True),
      study.Column('norm_ratio_degraded_to_clean', 'norm, degraded / clean', 1.0, 2,
                   treated_only=True),
      study.Column('norm_auc', 'norm AUC, degraded below clean', 1.0, 2, treated_only=True))
  extra_keys = ('degraded_to_clean_hard_weight', 'norm_theta_correlation_clean',
                'norm_theta_correlation_degraded')
  plotted = (('accuracy', 'accuracy, clean pairs'), ('tar_at_far_1e-2', 'TAR@1e-2, clean pairs'),
             ('degraded_accuracy', 'accuracy, one image degraded'),
             ('degraded_tar_at_far_1e-2', 'TAR@1e-2, one image degraded'))
  compared = (('accuracy', 'acc. clean'), ('tar_at_far_1e-2', 'TAR clean'),
              ('degraded_accuracy', 'acc. degraded'),
              ('degraded_tar_at_far_1e-2', 'TAR degraded'))
  table_note = ('"Pull" is −(N/s)·∂L/∂cos θ_y at the end of training, averaged over the hard '
                'training images (θ_y > a), clean or degraded; "norm" the mean feature norm of '
                'the degraded training images over that of the clean ones, and its AUC the '
                'probability that a degraded image has a lower norm than a clean one (0.5: the '
                'norm does not tell them apart; 1: it always does).')
  outputs = OUTPUTS

  def data_dir(self, workdir, level):
    return degraded_dir(workdir, level)

  def configure(self, config, run):
    del run
    config.checkpoint_every_steps = max(1, config.num_steps // TRAJECTORY_POINTS)
    config.keep_checkpoints = math.ceil(config.num_steps / config.checkpoint_every_steps) + 1

  def prepare(self, workdir, clean_dir, levels, recipe):
    from sface_jax.data import images as images_lib  # pylint: disable=g-import-not-at-top
    from sface_jax.data import pair_sets  # pylint: disable=g-import-not-at-top
    manifests, pixels = {}, {}
    _, labels = study.read_records(clean_dir)  # degrading never changes a label
    for level in levels:
      manifests[level] = write_degraded_dataset(clean_dir, degraded_dir(workdir, level), level,
                                                self.treatment_seed)
      images, _ = study.read_records(degraded_dir(workdir, level))
      pixels[level] = images_lib.decode_all(images, recipe.image_size,
                                            name=f'training set, {study.pct(level)}% degraded')
    degraded_pairs = write_degraded_pairs(clean_dir, os.path.join(workdir, 'pairs'),
                                          self.treatment_seed)
    return Context(manifests=manifests, train_pixels=pixels, labels=labels,
                   pair_sets=[pair_sets.load(study.PAIR_SET, clean_dir, recipe.image_size),
                              pair_sets.load(degraded_pairs, '', recipe.image_size)])

  def analyse(self, run, run_dir, context, sface_ab):
    """Held-out metrics on both pair sets and the weight trajectory; writes `theta.npz`."""
    degraded = np.zeros(context.labels.size, bool)
    degraded[np.asarray(context.manifests[run.level]['degraded'], np.int64)] = True
    pixels = context.train_pixels[run.level]
    checkpoints = [study.load_trained(run_dir, step) for step in study.checkpoint_steps(run_dir)]
    arrays = [checkpoint_arrays(trained, pixels, context.labels) for trained in checkpoints]
    trained = checkpoints[-1]
    embeddings = study.embed(trained, pixels)  # the rule's θ: flip-summed, running stats
    geometry = study.label_geometry(study.angles(embeddings, trained.centers), context.labels)
    study.save_arrays(os.path.join(run_dir, study.THETA_FILE), **geometry,
                      **{f'train_mode_{k}': v for k, v in arrays[-1].items()},
                      degraded=degraded, clean=~degraded, labels=context.labels)
    # Hard: θ_y > a. The calibration run (it sets a) applies the rule to its own end.
    a = (sface_ab['a'] if sface_ab is not None else
         round(float(np.median(geometry['theta_label'][~degraded])), 3))
    trajectory = [trajectory_point(t.step, x, degraded, a) for t, x in zip(checkpoints, arrays)]
    clean_pairs, degraded_pairs = (study.evaluate_pairs(trained, s) for s in context.pair_sets)
    end = trajectory[-1]
    ratio = lambda x, y: x / y if x is not None and y else None
    return {**clean_pairs, **{f'degraded_{k}': v for k, v in degraded_pairs.items()},
            'hard_threshold_a': a, 'num_degraded': int(degraded.sum()),
            'clean_hard_weight': end['clean_hard_weight'],
            'degraded_hard_weight': end['degraded_hard_weight'],
            'degraded_to_clean_hard_weight': ratio(end['degraded_hard_weight'],
                                                   end['clean_hard_weight']),
            'norm_ratio_degraded_to_clean': ratio(end['degraded_norm'], end['clean_norm']),
            'trajectory': trajectory}

  def derived(self, run_dir):
    """From the run's `theta.npz` (training mode, end of training): `norm_auc`, the
    probability that a degraded training image has a lower norm than a clean one (ties ½),
    and the correlation of the norm with θ_y over the clean and over the degraded images
    (`norm_theta_correlation_clean`, `_degraded`: negative where the norm tracks how well an
    image is fitted). Without degraded images, only the clean correlation."""
    with np.load(os.path.join(run_dir, study.THETA_FILE)) as z:
      norms, theta_y, degraded = (z['train_mode_norms'], z['train_mode_theta_y'],
                                  z['degraded'])
    correlation = lambda m: float(np.corrcoef(norms[m], theta_y[m])[0, 1])
    out = {'norm_theta_correlation_clean': correlation(~degraded)}
    if degraded.any():
      low, high = norms[degraded][:, None], norms[~degraded][None, :]
      out.update(norm_auc=float(np.mean((low < high) + 0.5 * (low == high))),
                 norm_theta_correlation_degraded=correlation(degraded))
    return out

  def plot(self, workdir, runs, results, path):
    del workdir
    heads = [h for h in HEADS if any(r.head == h for r in runs)]
    plot_weights(results, heads, sorted({r.level for r in runs}), path)


def plot_weights(results, heads: Sequence[str], levels: Sequence[float], path: str) -> bool:
  """Per degraded level > 0 (columns), over training, mean over seeds: the pull on clean-hard
  (solid) and degraded-hard (dashed) training images; their ratio; and the quality ẑ of
  clean (solid) and degraded (dashed) images for the heads that have one. False (nothing
  written) before any such run has finished."""
  levels = [l for l in levels if l > 0]
  curves = {}
  for head in heads:
    for level in levels:
      found = [r['trajectory'] for (h, l, _), r in results.items() if h == head and l == level]
      if found:
        curves[(head, level)] = found
  if not curves:
    return False
  fig = study.figure(6.0 * len(levels), 11.0)
  grid = fig.subplots(3, len(levels), squeeze=False)
  colours = {h: f'C{i}' for i, h in enumerate(HEADS)}
  for column, level in enumerate(levels):
    pull, ratio, quality = (grid[row][column] for row in range(3))
    for head in heads:
      if (head, level) not in curves:
        continue
      seeds = curves[(head, level)]
      steps = [p['step'] for p in seeds[0]]
      mean = lambda key: np.asarray([np.nanmean([np.nan if s[i][key] is None else s[i][key]
                                                 for s in seeds])
                                     for i in range(len(steps))], np.float64)
      style = dict(color=colours[head], markersize=3)
      clean, degraded = mean('clean_hard_weight'), mean('degraded_hard_weight')
      pull.plot(steps, clean, '-o', label=f'{HEADS[head].label} ({len(seeds)} seeds)', **style)
      pull.plot(steps, degraded, '--s', **style)
      with np.errstate(invalid='ignore', divide='ignore'):  # no hard image: no ratio
        ratio.plot(steps, degraded / clean, '-o', **style)
      if seeds[0][-1]['clean_quality'] is not None:
        quality.plot(steps, mean('clean_quality'), '-o', label=HEADS[head].label, **style)
        quality.plot(steps, mean('degraded_quality'), '--s', **style)
    pull.set(title=f'{study.pct(level)}% of training images degraded: pull on hard images '
                   '(θ_y > a)\nsolid: clean, dashed: degraded',
             xlabel='training step', ylabel='−(N/s)·∂L/∂cos θ_y')
    ratio.axhline(1.0, color='k', linewidth=0.8)
    ratio.set(title='degraded-hard pull / clean-hard pull (< 1: degraded spared)',
              xlabel='training step', ylabel='ratio')
    quality.axhline(0.0, color='k', linewidth=0.8)
    quality.set(title='quality ẑ from the feature norm, mean\nsolid: clean, dashed: degraded',
                xlabel='training step', ylabel='ẑ')
    for axes in (pull, ratio, quality):
      axes.grid(alpha=0.3)
  grid[0][0].legend(fontsize=7)
  if grid[2][0].get_legend_handles_labels()[0]:
    grid[2][0].legend(fontsize=7)
  study.save_figure(fig, path)
  return True


def run_study(workdir: str, *, heads: Sequence[str] = tuple(HEADS),
              degraded: Sequence[float] = DEFAULT_DEGRADED,
              seeds: Sequence[int] = study.DEFAULT_SEEDS, recipe: Recipe = Recipe(),
              degraded_seed: int = 0, **options) -> dict[str, Any]:
  """Trains and evaluates every run not done yet, then writes the tables and plots (copied
  into `docs=` when given; `options` as `study.run_study`). Returns the summary
  (`quality_sface_results.json`'s contents)."""
  return study.run_study(DegradedQuality(degraded_seed), workdir, heads=heads, levels=degraded,
                         seeds=seeds, recipe=recipe, **options)


def main(argv: Sequence[str] | None = None) -> int:
  """`python -m sface_jax.experiments.degraded_quality --help`."""
  return study.main(DegradedQuality, argv)


if __name__ == '__main__':
  sys.exit(main())
