"""The 1:1 verification protocol on pair sets (LFW, CFP-FP, AgeDB-30, ...), in JAX.

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
  A target FAR below 1/(impostor pairs of the training folds) cannot be resolved: the
  threshold is then read below the first step of the FAR curve, and the TAR is the one with
  no training impostor accepted. It is computed as insightface computes it, but
  `resolved(far)` is False, the table prints "–" and the JSON null (`far_resolution`).

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
"""

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sface_jax.evaluation import far_resolution

# insightface `evaluate()`: thresholds of the ROC and of the accuracy.
ACCURACY_THRESHOLDS = np.arange(0, 4, 0.01)
# insightface `evaluate()` -> `calculate_val()`: the finer grid of the FAR curve.
VAL_THRESHOLDS = np.arange(0, 4, 0.001)
FAR_TARGETS = (1e-3, 1e-4)


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
  # Impostor (different-identity) pairs the TAR@FAR thresholds are chosen on: those of the
  # training folds, the fewest over the folds (all of them with one fold).
  threshold_impostor_pairs: int
  xnorm: float = math.nan  # mean L2 norm of the raw embeddings (set by the embedding side)

  def resolved(self, far: float) -> bool:
    """Whether TAR@FAR=`far` means what it says here (`far_resolution`)."""
    return far_resolution.resolved(far, self.threshold_impostor_pairs)

  def to_json(self) -> dict[str, Any]:
    """Plain JSON types; NaN (no XNorm, or a fold without negative pairs) becomes null, and
    so does a TAR the set cannot resolve (`resolved`: false beside it)."""
    number = lambda x: None if math.isnan(x) else x
    def tar_entry(far, mean, std):
      ok = self.resolved(far)
      return {'tar': number(mean) if ok else None, 'tar_std': number(std) if ok else None,
              'far': number(self.far_at_far[far]), 'resolved': ok}
    return {
        'num_pairs': self.num_pairs,
        'accuracy': self.accuracy,
        'accuracy_std': self.accuracy_std,
        'best_threshold': self.best_threshold,
        'xnorm': number(self.xnorm),
        'threshold_impostor_pairs': self.threshold_impostor_pairs,
        'tar_at_far': {far_key(far): tar_entry(far, mean, std)
                       for far, (mean, std) in self.tar_at_far.items()},
        'fold_accuracy': self.fold_accuracy.tolist(),
        'fold_threshold': self.fold_threshold.tolist(),
        'roc': {'thresholds': self.thresholds.tolist(), 'tpr': self.tpr.tolist(),
                'fpr': self.fpr.tolist()},
    }


def far_key(far: float) -> str:
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


def verification_metrics(embeddings_a, embeddings_b, issame, num_folds=10,
                         far_targets=FAR_TARGETS) -> VerificationMetrics:
  """insightface's verification protocol on the flip-summed embeddings of N pairs.

  Args:
    embeddings_a: (N, D) first image of each pair: image + flip embedding, not normalised.
    embeddings_b: (N, D) second image of each pair.
    issame: (N,) bool, True where the two images show the same identity.
    num_folds: folds of the cross-validation (insightface: 10).
    far_targets: the FARs to report TAR at (insightface: 1e-3; we add 1e-4).

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
  same = same.astype(bool)
  folds = fold_ids(a.shape[0], num_folds)
  with jax.enable_x64(True):
    cpu = jax.local_devices(backend='cpu')[0]
    args = jax.device_put((a, b, same, folds, ACCURACY_THRESHOLDS, VAL_THRESHOLDS,
                           np.asarray(far_targets, np.float64)), cpu)
    out = jax.device_get(_protocol(*args, num_folds=num_folds))
  # The means over folds in NumPy, in insightface's order, so that they agree to the bit.
  fold_threshold = ACCURACY_THRESHOLDS[out['best_index']]
  impostors = np.bincount(folds[~same], minlength=num_folds)
  training_impostors = impostors if num_folds == 1 else impostors.sum() - impostors
  return VerificationMetrics(
      num_pairs=int(a.shape[0]),
      accuracy=float(np.mean(out['fold_accuracy'])),
      accuracy_std=float(np.std(out['fold_accuracy'])),
      best_threshold=float(np.mean(fold_threshold)),
      tar_at_far={far: (float(np.mean(out['tar'][i])), float(np.std(out['tar'][i])))
                  for i, far in enumerate(far_targets)},
      far_at_far={far: float(np.mean(out['far'][i])) for i, far in enumerate(far_targets)},
      thresholds=ACCURACY_THRESHOLDS.copy(),
      tpr=np.mean(out['tpr'], 0),
      fpr=np.mean(out['fpr'], 0),
      fold_accuracy=np.asarray(out['fold_accuracy']),
      fold_threshold=fold_threshold,
      threshold_impostor_pairs=int(training_impostors.min()))
