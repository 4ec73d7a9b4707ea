"""The verification protocol: sface_jax's jitted version next to insightface's NumPy loop.

Both run on the same face-like embeddings (512-d float32, LFW's pair order: each tenth of the
set is half positive pairs, then negatives) and compute the same numbers: 10-fold accuracy
over 400 thresholds, the ROC, and TAR at FAR = 1e-3 and 1e-4 (insightface's `calculate_val`,
4,000 thresholds). The baseline is the loop that insightface `arcface_torch` ships
(`eval/verification.py`), rewritten here: scikit-learn `KFold` and `normalize`, one NumPy pass
over the pairs per threshold and fold, and `interp1d(kind='slinear')` as SciPy 1.8 computed
it (SciPy >= 1.9 rejects the repeated FAR values; see sface_jax/evaluation/verification.py).
It needs scikit-learn, which the package itself never imports (pip install scikit-learn).

sface_jax's time is the whole public call, `verification_metrics(a, b, issame)`: host to
device, the jitted protocol, the per-fold means in NumPy. Its first call (trace + XLA compile
+ run) is reported apart from the steady state (median of the repeats), which is what every
evaluation after the first costs in training.

  python bench/evaluate.py                       # 6,000 and 60,000 pairs, markdown table
  python bench/evaluate.py --pairs 6000 --repeats 10
"""

import argparse
import os
import platform
import statistics
import time

import jax
import numpy as np
from scipy import interpolate
from sklearn import preprocessing
from sklearn.model_selection import KFold

from sface_jax.evaluation import verification

FARS = (1e-3, 1e-4)


def face_like_embeddings(num_pairs: int, dim: int = 512, seed: int = 0):
  """Identity centres plus per-pair noise of varied strength; raw norms like a backbone's."""
  rng = np.random.default_rng(seed)
  tenth = max(num_pairs // 10, 2)
  issame = (np.arange(num_pairs) % tenth) < tenth // 2
  centres = rng.standard_normal((num_pairs, dim), np.float32)
  others = rng.standard_normal((num_pairs, dim), np.float32)
  noise = rng.uniform(0.5, 3.0, (num_pairs, 1)).astype(np.float32)
  a = centres + noise * rng.standard_normal((num_pairs, dim), np.float32)
  b = np.where(issame[:, None], centres, others) + noise * rng.standard_normal(
      (num_pairs, dim), np.float32)
  return 30 * a, 30 * b, issame


# ---- the baseline: insightface's loop --------------------------------------------------------


def _rates(threshold, dist, issame):
  accepted = dist < threshold
  tp = np.sum(accepted & issame)
  fp = np.sum(accepted & ~issame)
  tn = np.sum(~accepted & ~issame)
  fn = np.sum(~accepted & issame)
  tpr = 0.0 if tp + fn == 0 else tp / float(tp + fn)
  fpr = 0.0 if fp + tn == 0 else fp / float(fp + tn)
  return tpr, fpr, float(tp + tn) / dist.size


def _tar_far(threshold, dist, issame):
  accepted = dist < threshold
  return (np.sum(accepted & issame) / float(np.sum(issame)),
          np.sum(accepted & ~issame) / float(np.sum(~issame)))


def _slinear_scipy18(x, y):
  order = np.argsort(x, kind='mergesort')
  x, y = x[order], y[order]
  return interpolate.BSpline.construct_fast(np.r_[x[0], x, x[-1]], y, 1)


def insightface_loop(embeddings_a, embeddings_b, issame, num_folds=10):
  a = preprocessing.normalize(np.asarray(embeddings_a, np.float64))
  b = preprocessing.normalize(np.asarray(embeddings_b, np.float64))
  dist = np.sum(np.square(a - b), 1)
  issame = np.asarray(issame, bool)
  folds = list(KFold(n_splits=num_folds, shuffle=False).split(np.arange(len(issame))))

  thresholds = np.arange(0, 4, 0.01)
  accuracy = np.zeros(num_folds)
  chosen = np.zeros(num_folds)
  tprs = np.zeros((num_folds, len(thresholds)))
  fprs = np.zeros((num_folds, len(thresholds)))
  for f, (train, test) in enumerate(folds):
    train_accuracy = [_rates(t, dist[train], issame[train])[2] for t in thresholds]
    best = int(np.argmax(train_accuracy))
    for i, t in enumerate(thresholds):
      tprs[f, i], fprs[f, i], _ = _rates(t, dist[test], issame[test])
    accuracy[f] = _rates(thresholds[best], dist[test], issame[test])[2]
    chosen[f] = thresholds[best]

  fine = np.arange(0, 4, 0.001)
  tar = {}
  for target in FARS:
    vals = np.zeros(num_folds)
    for f, (train, test) in enumerate(folds):
      far_train = np.array([_tar_far(t, dist[train], issame[train])[1] for t in fine])
      threshold = (float(_slinear_scipy18(far_train, fine)(target))
                   if np.max(far_train) >= target else 0.0)
      vals[f] = _tar_far(threshold, dist[test], issame[test])[0]
    tar[target] = (np.mean(vals), np.std(vals))
  return {'accuracy': np.mean(accuracy), 'accuracy_std': np.std(accuracy),
          'best_threshold': np.mean(chosen), 'tpr': np.mean(tprs, 0), 'fpr': np.mean(fprs, 0),
          'tar': tar}


# ---- timing ----------------------------------------------------------------------------------


def _time(fn, repeats):
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    result = fn()
    times.append(time.perf_counter() - start)
  return result, times


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--pairs', type=int, nargs='+', default=[6000, 60000])
  parser.add_argument('--dim', type=int, default=512)
  parser.add_argument('--repeats', type=int, default=5, help='steady-state calls of the JAX one')
  parser.add_argument('--baseline-repeats', type=int, default=1)
  args = parser.parse_args()

  rows = []
  for num_pairs in args.pairs:
    a, b, issame = face_like_embeddings(num_pairs, args.dim)
    start = time.perf_counter()
    ours = verification.verification_metrics(a, b, issame)
    first = time.perf_counter() - start
    _, steady = _time(lambda: verification.verification_metrics(a, b, issame), args.repeats)
    theirs, loop = _time(lambda: insightface_loop(a, b, issame), args.baseline_repeats)
    agree = (ours.accuracy == theirs['accuracy'] and ours.best_threshold ==
             theirs['best_threshold'] and ours.accuracy_std == theirs['accuracy_std']
             and all(abs(ours.tar_at_far[f][0] - theirs['tar'][f][0]) <= 1e-6 for f in FARS)
             and np.allclose(ours.tpr, theirs['tpr'], rtol=0, atol=1e-12))
    rows.append((num_pairs, first, statistics.median(steady), statistics.median(loop), agree,
                 ours))
    print(f'{num_pairs} pairs: first call {first:.3f} s, steady {statistics.median(steady):.4f} s'
          f' (min {min(steady):.4f}), insightface loop {statistics.median(loop):.2f} s, '
          f'identical: {agree}', flush=True)

  print(f'\n{platform.processor() or platform.machine()}, {os.cpu_count()} CPU(s), '
        f'jax {jax.__version__} on {jax.devices("cpu")[0].platform}, '
        f'{args.dim}-d float32 embeddings\n')
  print('| pairs | sface_jax first call (compile + run) | sface_jax steady state | '
        'insightface NumPy loop | speed-up (steady) | same numbers | accuracy | '
        'TAR@FAR=1e-3 | TAR@FAR=1e-4 |')
  print('|---:|---:|---:|---:|---:|:---:|---:|---:|---:|')
  for num_pairs, first, steady, loop, agree, ours in rows:
    print(f'| {num_pairs:,} | {first:.2f} s | {1000 * steady:.1f} ms | {loop:.2f} s | '
          f'{loop / steady:,.0f}x | {"yes" if agree else "NO"} | '
          f'{100 * ours.accuracy:.2f}% | {100 * ours.tar_at_far[1e-3][0]:.2f}% | '
          f'{100 * ours.tar_at_far[1e-4][0]:.2f}% |')


if __name__ == '__main__':
  main()
