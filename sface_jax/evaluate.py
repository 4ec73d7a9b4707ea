"""Face verification on pair sets (LFW, CFP-FP, AgeDB-30, ...): the protocol, in JAX.

The numbers are insightface `arcface_torch` `eval/verification.py`'s, on the same embeddings:

* embedding: each image and its horizontal flip go through the model; the two raw embeddings
  are added; XNorm is the mean L2 norm of the raw embeddings *before* that sum (insightface
  averages over both the images and their flips: 2 x 2N norms for N pairs);
* distance: squared Euclidean between the L2-normalised sums, in [0, 4], in float64 (insightface
  copies the model's outputs into float64 arrays before it adds, normalises and subtracts);
* accuracy: 10 folds in order (scikit-learn `KFold(shuffle=False)`: contiguous, the first
  N % 10 folds one pair longer); on the 9 training folds the threshold in 0, 0.01, ..., 3.99
  with the most correct pairs (`dist < threshold` means "same"; ties go to the smallest
  threshold), measured on the 10th; mean and population std over the folds, and the mean of
  the 10 chosen thresholds;
* ROC: TPR and FPR of the test folds at those 400 thresholds, averaged over the folds;
* TAR at FAR (insightface's `calculate_val`): per fold, the training folds' FAR at thresholds
  0, 0.001, ..., 3.999, and the threshold where it reaches the target by `interp1d(far,
  thresholds, kind='slinear')` (0.0 when the FAR never gets there); TAR and FAR are then
  measured on the test fold. insightface stops there for FAR = 1e-3; we also do 1e-4.

`interp1d(kind='slinear')` on a FAR curve with repeated values (it always has some: FAR = 0
below the smallest impostor distance) raises in SciPy >= 1.9 ("Expect x to not have
duplicates": insightface issues #2152, #2290, answered "use scipy 1.8.1"). We reproduce SciPy
1.8's result: its linear B-spline with knots (x0, x0, x1, ..., xn, xn) evaluated at the
target uses the segment from the *last* FAR value <= target to the next one (always a larger
one below the top of the curve); a zero-length segment at the top gives 0.0.

`verification_metrics` is one jitted function, vectorised over thresholds and folds: one sort
of the distances and a running count per (fold, same/different) turn "pairs with dist < t" into
a `searchsorted` for every threshold at once, so the cost is O(N log N + T log N) after the
O(N D) distances, rather than the reference loop's O(N T). It runs on the host's CPU backend
in float64 (under `jax.enable_x64`), wherever the model runs: the decision `dist < t` is then
the float64 decision insightface makes, so accuracies and thresholds are identical, not merely
close (distances agree with NumPy's to ~1e-16; a pair would have to sit that close to a
threshold to differ). The per-fold numbers come back to NumPy, which takes their mean and std
in insightface's order, bit for bit. The interpolated TAR thresholds may differ from SciPy's in
the last bit (XLA fuses multiply-adds), which moves a TAR only for a test pair within ~1e-16 of
the threshold. A fold without positive (negative) pairs gives a NaN TAR (FAR) where insightface
raises ZeroDivisionError. bench/evaluate.py times it against insightface's loop.

Command line (prints the table, writes DIR/eval/verification.json and DIR/eval/roc.png):

  python -m sface_jax.evaluate --workdir DIR --sets lfw cfp_fp agedb_30 calfw cplfw
  python -m sface_jax.evaluate --checkpoint DIR/checkpoints/20000 --sets path/to/lfw.bin
"""

import argparse
import dataclasses
import functools
import json
import math
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

# insightface `evaluate()`: thresholds of the ROC and of the accuracy.
ACCURACY_THRESHOLDS = np.arange(0, 4, 0.01)
# insightface `evaluate()` -> `calculate_val()`: the finer grid of the FAR curve.
VAL_THRESHOLDS = np.arange(0, 4, 0.001)
FAR_TARGETS = (1e-3, 1e-4)
PIXEL_MEAN, PIXEL_SCALE = 127.5, 128.0  # the model's input: (x - 127.5) / 128
DATA_AXIS = 'data'
EVAL_SUBDIR = 'eval'


# ---- the protocol ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class VerificationMetrics:
  """One pair set's verification results (fractions, not percent)."""
  num_pairs: int
  accuracy: float  # mean over folds of the test-fold accuracy
  accuracy_std: float  # population std over folds (np.std)
  best_threshold: float  # mean over folds of the chosen squared-distance threshold
  tar_at_far: dict[float, tuple[float, float]]  # FAR target -> (mean, std) TAR over folds
  far_at_far: dict[float, float]  # FAR target -> mean FAR measured on the test folds
  thresholds: np.ndarray  # (400,) the ROC's thresholds
  tpr: np.ndarray  # (400,) mean over folds of the test folds' TPR
  fpr: np.ndarray  # (400,)
  fold_accuracy: np.ndarray  # (num_folds,)
  fold_threshold: np.ndarray  # (num_folds,)
  xnorm: float = math.nan  # mean L2 norm of the raw embeddings (set by the embedding side)

  def to_json(self) -> dict[str, Any]:
    """Plain JSON types; NaN (no XNorm, or a fold without negative pairs) becomes null."""
    number = lambda x: None if math.isnan(x) else x
    return {
        'num_pairs': self.num_pairs,
        'accuracy': self.accuracy,
        'accuracy_std': self.accuracy_std,
        'best_threshold': self.best_threshold,
        'xnorm': number(self.xnorm),
        'tar_at_far': {_far_key(far): {'tar': number(mean), 'tar_std': number(std),
                                       'far': number(self.far_at_far[far])}
                       for far, (mean, std) in self.tar_at_far.items()},
        'fold_accuracy': self.fold_accuracy.tolist(),
        'fold_threshold': self.fold_threshold.tolist(),
        'roc': {'thresholds': self.thresholds.tolist(), 'tpr': self.tpr.tolist(),
                'fpr': self.fpr.tolist()},
    }


def _far_key(far: float) -> str:
  return f'{far:.0e}'  # 1e-03


def fold_ids(num_pairs: int, num_folds: int) -> np.ndarray:
  """Fold of each pair as scikit-learn's `KFold(num_folds, shuffle=False)` splits them."""
  sizes = np.full(num_folds, num_pairs // num_folds)
  sizes[:num_pairs % num_folds] += 1
  return np.repeat(np.arange(num_folds, dtype=np.int32), sizes)


def _l2_normalize(x: jax.Array) -> jax.Array:
  # scikit-learn `normalize`: a zero row stays zero (its norm is taken as 1).
  norms = jnp.sqrt(jnp.sum(x * x, axis=1, keepdims=True))
  return x / jnp.where(norms == 0, 1.0, norms)


def _slinear(x: jax.Array, y: jax.Array, x_new: jax.Array) -> jax.Array:
  """SciPy 1.8's `interp1d(x, y, kind='slinear')(x_new)` for sorted `x` with repeats.

  The linear B-spline on knots (x0, x0, x1, ..., xn, xn) at x_new: the segment starts at the
  last x_i <= x_new (never the very last point) and the value is de Boor's
  y_i * w (x_{i+1} - x_new) + y_{i+1} * w (x_new - x_i), w = 1 / (x_{i+1} - x_i); a segment
  of zero length (only possible at the top of the curve) evaluates to 0.
  """
  i = jnp.clip(jnp.searchsorted(x, x_new, side='right') - 1, 0, x.shape[0] - 2)
  x_lo, x_hi = x[i], x[i + 1]
  w = 1.0 / (x_hi - x_lo)
  value = y[i] * (w * (x_hi - x_new)) + y[i + 1] * (w * (x_new - x_lo))
  return jnp.where(x_hi == x_lo, 0.0, value)


@functools.partial(jax.jit, static_argnames=('num_folds',))
def _protocol(embeddings_a, embeddings_b, issame, folds, accuracy_thresholds, val_thresholds,
              far_targets, *, num_folds):
  """Per-fold results of the protocol (see the module docstring); float64 under enable_x64."""
  fold_range = jnp.arange(num_folds)
  a, b = embeddings_a.astype(jnp.float64), embeddings_b.astype(jnp.float64)  # exact
  dist = jnp.sum(jnp.square(_l2_normalize(a) - _l2_normalize(b)), axis=1)
  order = jnp.argsort(dist)
  sorted_dist = dist[order]
  # below[k, f, s]: among the k smallest distances, how many pairs are in fold f with
  # issame == s. "dist < t" counts are then below[searchsorted(sorted_dist, t, 'left')].
  category = (2 * folds + issame.astype(jnp.int32))[order]
  below = jnp.cumsum(jax.nn.one_hot(category, 2 * num_folds, dtype=jnp.int32), axis=0)
  below = jnp.concatenate([jnp.zeros((1, 2 * num_folds), jnp.int32), below])
  below = below.reshape(-1, num_folds, 2)

  def accepted(thresholds):  # (...,) -> (..., fold, [different, same]) with dist < t
    return below[jnp.searchsorted(sorted_dist, thresholds, side='left')]

  def training_folds(counts):  # counts of each test fold -> counts of its training folds
    return counts if num_folds == 1 else counts.sum(-2, keepdims=True) - counts

  totals = below[-1]  # (fold, 2)
  totals_train = training_folds(totals)
  as_float = lambda x: x.astype(jnp.float64)

  # Accuracy: the threshold with the most correct training pairs, measured on the test fold.
  test = accepted(accuracy_thresholds)  # (T, fold, 2)
  train = training_folds(test)
  correct_train = train[..., 1] + totals_train[:, 0] - train[..., 0]
  best = jnp.argmax(correct_train, axis=0)  # first maximum, as np.argmax
  correct_test = test[..., 1] + totals[:, 0] - test[..., 0]
  fold_accuracy = as_float(correct_test[best, fold_range]) / as_float(totals.sum(-1))
  tpr = jnp.where(totals[:, 1] > 0, as_float(test[..., 1]) / as_float(totals[:, 1]), 0.0)
  fpr = jnp.where(totals[:, 0] > 0, as_float(test[..., 0]) / as_float(totals[:, 0]), 0.0)

  # TAR at FAR: per fold, the threshold reaching the target FAR on the training folds.
  far_train = as_float(training_folds(accepted(val_thresholds))[..., 0]) / as_float(
      totals_train[:, 0])  # (T_val, fold), non-decreasing along T_val
  def fold_threshold(far_curve, target):
    return jnp.where(jnp.max(far_curve) >= target,
                     _slinear(far_curve, val_thresholds, target), 0.0)
  val_threshold = jax.vmap(lambda target: jax.vmap(fold_threshold, (1, None))(
      far_train, target))(far_targets)  # (target, fold)
  own = accepted(val_threshold)[:, fold_range, fold_range]  # (target, fold, 2)
  tar = as_float(own[..., 1]) / as_float(totals[:, 1])
  far = as_float(own[..., 0]) / as_float(totals[:, 0])
  return {'fold_accuracy': fold_accuracy, 'best_index': best, 'tpr': tpr.T, 'fpr': fpr.T,
          'tar': tar, 'far': far}


def verification_metrics(embeddings_a, embeddings_b, issame, num_folds=10) -> VerificationMetrics:
  """insightface's verification protocol on the flip-summed embeddings of N pairs.

  Args:
    embeddings_a: (N, D) first image of each pair: image + flip embedding, not normalised.
    embeddings_b: (N, D) second image of each pair.
    issame: (N,) bool, True where the two images show the same identity.
    num_folds: folds of the cross-validation (insightface: 10).

  Returns:
    VerificationMetrics; `xnorm` is left NaN (it needs the embeddings before the flip sum).
  """
  # float32 travels as it is (half the bytes) and widens on the device, exactly.
  a, b = (x if x.dtype in (np.float32, np.float64) else x.astype(np.float64)
          for x in (np.asarray(embeddings_a), np.asarray(embeddings_b)))
  same = np.asarray(issame)
  if a.ndim != 2 or a.shape != b.shape:
    raise ValueError(f'embeddings_a {a.shape} and embeddings_b {b.shape} must both be (N, D)')
  if same.shape != (a.shape[0],):
    raise ValueError(f'issame has shape {same.shape}; expected ({a.shape[0]},), one per pair')
  if not 1 <= num_folds <= a.shape[0]:
    raise ValueError(f'{num_folds} folds need at least as many pairs; got {a.shape[0]}')
  with jax.enable_x64(True):
    cpu = jax.local_devices(backend='cpu')[0]
    args = jax.device_put((a, b, same.astype(bool), fold_ids(a.shape[0], num_folds),
                           ACCURACY_THRESHOLDS, VAL_THRESHOLDS,
                           np.asarray(FAR_TARGETS, np.float64)), cpu)
    out = jax.device_get(_protocol(*args, num_folds=num_folds))
  # The means over folds in NumPy, in insightface's order, so that they agree to the bit.
  fold_threshold = ACCURACY_THRESHOLDS[out['best_index']]
  return VerificationMetrics(
      num_pairs=int(a.shape[0]),
      accuracy=float(np.mean(out['fold_accuracy'])),
      accuracy_std=float(np.std(out['fold_accuracy'])),
      best_threshold=float(np.mean(fold_threshold)),
      tar_at_far={far: (float(np.mean(out['tar'][i])), float(np.std(out['tar'][i])))
                  for i, far in enumerate(FAR_TARGETS)},
      far_at_far={far: float(np.mean(out['far'][i])) for i, far in enumerate(FAR_TARGETS)},
      thresholds=ACCURACY_THRESHOLDS.copy(),
      tpr=np.mean(out['tpr'], 0),
      fpr=np.mean(out['fpr'], 0),
      fold_accuracy=np.asarray(out['fold_accuracy']),
      fold_threshold=fold_threshold)


# ---- embedding -----------------------------------------------------------------------------


def _apply(target, variables, images):
  if isinstance(target, nn.Module):
    outputs = target.apply(variables, images, train=False)
  else:
    outputs = target(variables, images, train=False)
  embeddings = outputs[0] if isinstance(outputs, (tuple, list)) else outputs
  return embeddings.astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=('target', 'out_sharding'))
def _embed_batch(target, variables, images, out_sharding=None):
  """(image + flip embedding, raw norms of both (B, 2)) for one padded batch."""
  if images.dtype == jnp.uint8:
    images = (images.astype(jnp.float32) - PIXEL_MEAN) / PIXEL_SCALE
  # Two passes rather than one of the concatenation: each keeps the batch's sharding.
  embeddings = _apply(target, variables, images)
  flipped = _apply(target, variables, images[:, :, ::-1, :])
  norms = jnp.stack([jnp.linalg.norm(embeddings, axis=-1), jnp.linalg.norm(flipped, axis=-1)],
                    axis=-1)
  outputs = (embeddings + flipped, norms)
  if out_sharding is not None:  # every process gets the whole batch back
    outputs = jax.lax.with_sharding_constraint(outputs, out_sharding)
  return outputs


def _on_mesh(variables: Any, mesh: Mesh) -> Any:
  """Leaves already laid out on `mesh` stay as they are; others are replicated onto it."""
  devices = set(mesh.devices.flat)
  replicated = NamedSharding(mesh, P())
  def place(leaf):
    if isinstance(leaf, jax.Array) and set(leaf.sharding.device_set) == devices:
      return leaf
    return jax.device_put(leaf, replicated)
  return jax.tree.map(place, variables)


def embed(apply_fn_or_model: nn.Module | Callable[..., Any], variables: Any, images: np.ndarray,
          *, batch_size: int, mesh: Mesh | None = None, return_norms: bool = False):
  """Flip-summed embeddings of `images`, batched and (with `mesh`) sharded over all devices.

  Args:
    apply_fn_or_model: a Flax module, or a function with `Module.apply`'s signature; called
      as `(variables, images, train=False)`, returning embeddings or (embeddings, ...).
    variables: the model's variables.
    images: (N, S, S, 3) uint8 pixels, normalised here as (x - 127.5) / 128, or float images
      already normalised that way.
    batch_size: images per step (each also goes through flipped), rounded up to a multiple of
      the mesh's device count; the last batch is padded and the padding dropped.
    mesh: when given, each batch is split over all its devices (every axis, `data` first; the
      variables are replicated onto it unless they already live there).
    return_norms: also return the raw L2 norms of each image's and its flip's embedding.

  Returns:
    float32 (N, D) `embed(x) + embed(flip(x))`, not normalised; with `return_norms`, also
    float32 (N, 2) norms, whose mean is insightface's XNorm. (insightface adds the two in
    float64; the float32 sum differs by at most half an ulp, which moves a pair's distance by
    ~1e-7 -- it changes a decision only for a pair that close to a threshold.)
  """
  images = np.asarray(images)
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f'images must be (N, H, W, 3); got {images.shape}')
  if images.dtype != np.uint8:
    images = images.astype(np.float32)
  num_images = images.shape[0]
  if num_images == 0:
    raise ValueError('no images to embed')
  num_shards = 1 if mesh is None else mesh.devices.size
  step = -(-min(batch_size, num_images) // num_shards) * num_shards
  if mesh is not None:
    in_sharding = NamedSharding(mesh, P(tuple(mesh.axis_names)))
    out_sharding = NamedSharding(mesh, P())
    variables = _on_mesh(variables, mesh)
  else:
    out_sharding = None
  pending, summed, norms = [], [], []
  def fetch():
    (batch_summed, batch_norms), count = pending.pop(0)
    summed.append(np.asarray(batch_summed)[:count])  # the padding is dropped here
    norms.append(np.asarray(batch_norms)[:count])
  for start in range(0, num_images, step):
    batch = images[start:start + step]
    count = batch.shape[0]
    if count < step:
      batch = np.concatenate([batch, np.zeros((step - count,) + batch.shape[1:], batch.dtype)])
    if mesh is not None:
      batch = jax.make_array_from_callback(batch.shape, in_sharding, batch.__getitem__)
    pending.append((_embed_batch(apply_fn_or_model, variables, batch,
                                 out_sharding=out_sharding), count))
    if len(pending) > 2:  # a few batches in flight: transfers overlap compute, memory bounded
      fetch()
  while pending:
    fetch()
  if not return_norms:
    return np.concatenate(summed)
  return np.concatenate(summed), np.concatenate(norms)


# ---- pair sets -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class VerificationSet:
  """A decoded pair set: pair i is images[2i] and images[2i + 1]."""
  name: str
  images: np.ndarray  # uint8 (2N, S, S, 3)
  issame: np.ndarray  # bool (N,)
  path: str = ''

  def __post_init__(self):
    if self.images.ndim != 4 or self.images.shape[0] != 2 * np.shape(self.issame)[0]:
      raise ValueError(f'pair set {self.name!r}: images {self.images.shape} for '
                       f'{np.shape(self.issame)[0]} pairs; expected (2 x pairs, S, S, 3)')


def resolve_pair_set(name_or_path: str, data_dir: str = '') -> str:
  """`<data_dir>/verification/<name>.npz`, `<data_dir>/<name>.bin`, or an explicit path."""
  candidates = [name_or_path] if os.path.splitext(name_or_path)[1] in ('.bin', '.npz') else []
  if data_dir:
    candidates += [os.path.join(data_dir, 'verification', f'{name_or_path}.npz'),
                   os.path.join(data_dir, f'{name_or_path}.bin')]
  for path in candidates:
    if os.path.isfile(path):
      return path
  tried = ', '.join(candidates) or f'nothing (no data dir given and {name_or_path!r} is no path)'
  raise FileNotFoundError(f'pair set {name_or_path!r} not found; tried {tried}')


def load_pair_set(name_or_path: str, data_dir: str, image_size: int) -> VerificationSet:
  """Reads and decodes a pair set once (`sface_jax.data.bin_sets` reads and checks the file:
  an image count other than 2 x pairs, or an undecodable image, is a `PairSetError` naming the
  file, and the index)."""
  from sface_jax.data import bin_sets  # pylint: disable=g-import-not-at-top
  path = resolve_pair_set(name_or_path, data_dir)
  name = (name_or_path if path != name_or_path
          else os.path.splitext(os.path.basename(path))[0])
  pairs = bin_sets.read_pairs(path)
  images = bin_sets.decode_images(pairs.images, image_size, name=f'pair set {name!r} ({path})')
  return VerificationSet(name=name, images=images, issame=pairs.issame, path=path)


def evaluate_sets(apply_fn_or_model, variables, sets: Sequence[VerificationSet], *,
                  batch_size: int, mesh: Mesh | None = None,
                  num_folds: int = 10) -> dict[str, VerificationMetrics]:
  """Embeds each set and runs the protocol; {set name: metrics with XNorm}."""
  results = {}
  for pair_set in sets:
    embeddings, norms = embed(apply_fn_or_model, variables, pair_set.images,
                              batch_size=batch_size, mesh=mesh, return_norms=True)
    metrics = verification_metrics(embeddings[0::2], embeddings[1::2], pair_set.issame,
                                   num_folds)
    results[pair_set.name] = dataclasses.replace(
        metrics, xnorm=float(np.mean(norms, dtype=np.float64)))
  return results


class Evaluator:
  """The verification sets, decoded once, evaluated whenever training asks.

  `run(model, variables)` returns {set name: VerificationMetrics} and keeps the best accuracy
  seen per set in `highest_accuracy` (insightface's `highest_acc`).
  """

  def __init__(self, sets: Sequence[str], data_dir: str, image_size: int, *,
               batch_size: int = 256, mesh: Mesh | None = None, num_folds: int = 10):
    self.sets = [load_pair_set(name, data_dir, image_size) for name in sets]
    self.batch_size = batch_size
    self.mesh = mesh
    self.num_folds = num_folds
    self.highest_accuracy: dict[str, float] = {}

  def run(self, model, variables) -> dict[str, VerificationMetrics]:
    """`model`: a Flax module or an apply function (see `embed`)."""
    results = evaluate_sets(model, variables, self.sets, batch_size=self.batch_size,
                            mesh=self.mesh, num_folds=self.num_folds)
    for name, metrics in results.items():
      self.highest_accuracy[name] = max(self.highest_accuracy.get(name, 0.0), metrics.accuracy)
    return results


# ---- reports -------------------------------------------------------------------------------


def format_table(results: Mapping[str, VerificationMetrics]) -> str:
  """One line per set: pairs, accuracy ± std (%), best threshold, XNorm, TAR@FAR (%)."""
  far_columns = [f'TAR@FAR={_far_key(far)}' for far in FAR_TARGETS]
  header = (f'{"set":<12}{"pairs":>7}  {"accuracy (%)":<17}{"threshold":>9}{"XNorm":>9}'
            + ''.join(f'{c:>16}' for c in far_columns))
  lines = [header, '-' * len(header)]
  for name, m in results.items():
    accuracy = f'{100 * m.accuracy:.3f} ± {100 * m.accuracy_std:.3f}'
    lines.append(f'{name:<12}{m.num_pairs:>7}  {accuracy:<17}{m.best_threshold:>9.3f}'
                 f'{m.xnorm:>9.3f}'
                 + ''.join(f'{100 * m.tar_at_far[far][0]:>16.3f}' for far in FAR_TARGETS))
  return '\n'.join(lines)


def _replace_atomically(path: str, write: Callable[[str], None]) -> None:
  tmp = f'{path}.tmp{os.getpid()}'
  try:
    write(tmp)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def plot_roc(results: Mapping[str, VerificationMetrics], path: str, title: str = '') -> None:
  """ROC curves (TPR against log-scale FAR), one per set, as a PNG (Agg, no pyplot)."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  figure = Figure(figsize=(6, 4.5), dpi=120)
  FigureCanvasAgg(figure)
  axes = figure.add_subplot()
  for name, m in results.items():
    keep = m.fpr > 0  # log scale: FAR = 0 has no place on it
    axes.plot(m.fpr[keep], m.tpr[keep], label=f'{name} ({100 * m.accuracy:.2f}%)')
  axes.set_xscale('log')
  axes.set_xlim(1e-4, 1.0)
  axes.set_ylim(0.0, 1.01)
  axes.set_xlabel('false accept rate')
  axes.set_ylabel('true accept rate')
  axes.grid(True, which='both', alpha=0.3)
  axes.legend(loc='lower right')
  axes.set_title(title or 'verification ROC (test folds, mean over 10)')
  figure.tight_layout()
  _replace_atomically(path, lambda tmp: figure.savefig(tmp, format='png'))


def write_report(results: Mapping[str, VerificationMetrics], directory: str, *,
                 step: int | None = None, source: str = '') -> dict[str, str]:
  """Writes DIR/eval/verification.json and DIR/eval/roc.png; returns their paths."""
  out_dir = os.path.join(directory, EVAL_SUBDIR)
  os.makedirs(out_dir, exist_ok=True)
  paths = {'json': os.path.join(out_dir, 'verification.json'),
           'roc': os.path.join(out_dir, 'roc.png')}
  report = {'step': step, 'source': source, 'far_targets': list(FAR_TARGETS),
            'sets': {name: m.to_json() for name, m in results.items()}}
  def write_json(tmp):
    with open(tmp, 'w') as f:
      json.dump(report, f, indent=1, allow_nan=False)
  _replace_atomically(paths['json'], write_json)
  plot_roc(results, paths['roc'],
           title='verification ROC' + (f' at step {step}' if step is not None else ''))
  return paths


# ---- command line --------------------------------------------------------------------------


def load_model(path: str, model_name: str | None = None):
  """(config, model, variables) from a work directory or a checkpoint step directory."""
  from sface_jax import checkpoint  # pylint: disable=g-import-not-at-top
  return checkpoint.load_for_inference(path, model_name=model_name)


def _parse_args(argv):
  parser = argparse.ArgumentParser(
      prog='python -m sface_jax.evaluate',
      description='Verification accuracy (insightface protocol) of a trained backbone.')
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument('--workdir', help='training run directory (its newest checkpoint)')
  source.add_argument('--checkpoint', help='one checkpoint: <workdir>/checkpoints/<step>')
  parser.add_argument('--sets', nargs='+', default=None,
                      help='set names in the data dir (lfw cfp_fp ...) or .bin/.npz paths; '
                           "default: the run's config.eval.sets")
  parser.add_argument('--data-dir', default=None, help="default: the run's config.data.dir")
  parser.add_argument('--batch-size', type=int, default=None,
                      help="default: the run's config.eval.batch_size")
  parser.add_argument('--model', default=None,
                      help='architecture to load the weights into (default: the trained one)')
  parser.add_argument('--output-dir', default=None,
                      help='where eval/verification.json and eval/roc.png go '
                           '(default: the work directory)')
  return parser.parse_args(argv)


def _default_output_dir(args) -> str:
  if args.workdir:
    return args.workdir
  step_dir = os.path.abspath(args.checkpoint)
  parent = os.path.dirname(step_dir)
  return os.path.dirname(parent) if os.path.basename(parent) == 'checkpoints' else parent


def main(argv: Sequence[str] | None = None) -> int:
  args = _parse_args(argv)
  try:
    config, model, variables = load_model(args.workdir or args.checkpoint, args.model)
    sets = args.sets or list(config.eval.sets)
    data_dir = config.data.dir if args.data_dir is None else args.data_dir
    pair_sets = [load_pair_set(name, data_dir, config.data.image_size) for name in sets]
  except (FileNotFoundError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  mesh = (jax.make_mesh((jax.device_count(),), (DATA_AXIS,)) if jax.device_count() > 1
          else None)
  batch_size = args.batch_size or config.eval.batch_size
  results = evaluate_sets(model, variables, pair_sets, batch_size=batch_size, mesh=mesh)
  print(format_table(results))
  if jax.process_index() == 0:
    paths = write_report(results, args.output_dir or _default_output_dir(args),
                         source=os.path.abspath(args.workdir or args.checkpoint))
    print(f'wrote {paths["json"]} and {paths["roc"]}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
