"""1:N search: sface_jax's sharded top-k against NumPy brute force, queries per second.

Both sides search the same random unit vectors (float32, D = 512) for the k best gallery
rows of each query by cosine similarity:

* NumPy (the baseline every face-recognition repository ships in some form): per batch of
  queries, the score matrix `queries @ gallery.T`, `np.argpartition` for the k best, and a
  sort of those k.
* sface_jax: `evaluation.identification.Gallery` (rows split over every device, scored
  chunk by chunk with a running top-k under `shard_map`, candidates all-gathered and merged),
  built once; its build (host to device, normalisation) and its first search (trace +
  compile) are reported apart from the steady state, which is what a deployed index costs.

The time is the whole public call, host arrays in and host arrays out. The top-k rows of
the two sides are compared (they agree exactly unless two scores tie to float32 rounding).

  python bench/search.py                               # 100 k and 1 M gallery rows
  python bench/search.py --gallery 100000 --queries 2000 --batch 500
"""

import argparse
import os
import platform
import time

import jax
import numpy as np

from sface_jax.evaluation import identification


def unit_rows(rng, rows: int, dim: int) -> np.ndarray:
  x = rng.standard_normal((rows, dim), dtype=np.float32)
  x /= np.linalg.norm(x, axis=1, keepdims=True)
  return x


def numpy_search(gallery: np.ndarray, queries: np.ndarray, k: int, batch: int):
  """Brute force: matrix product, argpartition, sort of the k."""
  rows = np.empty((queries.shape[0], k), np.int64)
  for start in range(0, queries.shape[0], batch):
    scores = queries[start:start + batch] @ gallery.T
    best = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(scores, best, axis=1), axis=1, kind='stable')
    rows[start:start + batch] = np.take_along_axis(best, order, axis=1)
  return rows


def run(gallery_rows: int, num_queries: int, dim: int, k: int, batch: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  gallery = unit_rows(rng, gallery_rows, dim)
  queries = unit_rows(rng, num_queries, dim)

  numpy_search(gallery, queries[:batch], k, batch)  # warm the BLAS threads and caches
  start = time.perf_counter()
  want = numpy_search(gallery, queries, k, batch)
  numpy_seconds = time.perf_counter() - start

  start = time.perf_counter()
  index = identification.Gallery(gallery)
  jax.block_until_ready(index.rows)
  build_seconds = time.perf_counter() - start
  start = time.perf_counter()
  index.search(queries[:batch], k, batch_size=batch)
  first_seconds = time.perf_counter() - start
  start = time.perf_counter()
  _, got = index.search(queries, k, batch_size=batch)
  jax_seconds = time.perf_counter() - start
  agreement = float(np.mean(got == want))
  del index, gallery
  return dict(gallery=gallery_rows, queries=num_queries, numpy=num_queries / numpy_seconds,
              jax=num_queries / jax_seconds, build=build_seconds, first=first_seconds,
              agreement=agreement)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--gallery', type=int, nargs='+', default=[100_000, 1_000_000])
  parser.add_argument('--queries', type=int, default=1000)
  parser.add_argument('--batch', type=int, default=250)
  parser.add_argument('--dim', type=int, default=512)
  parser.add_argument('-k', type=int, default=5)
  args = parser.parse_args()
  results = []
  for rows in args.gallery:
    result = run(rows, args.queries, args.dim, args.k, args.batch)
    print(f'{rows:,} rows: NumPy {result["numpy"]:,.1f} q/s, sface_jax {result["jax"]:,.1f} '
          f'q/s (build {result["build"]:.2f} s, first search {result["first"]:.2f} s), '
          f'top-{args.k} rows agree {100 * result["agreement"]:.3f}%', flush=True)
    results.append(result)
  print(f'\n{platform.processor() or platform.machine()}, {os.cpu_count()} CPU(s), '
        f'jax {jax.__version__} on {jax.device_count()} {jax.devices()[0].platform} '
        f'device(s), numpy {np.__version__}; D = {args.dim}, top-{args.k}, '
        f'{args.queries:,} queries in batches of {args.batch}\n')
  print('| gallery rows | NumPy brute force (q/s) | sface_jax sharded top-k (q/s) | ratio | '
        'sface_jax build | sface_jax first search (compile) | same top-k rows |')
  print('|---:|---:|---:|---:|---:|---:|---:|')
  for r in results:
    print(f'| {r["gallery"]:,} | {r["numpy"]:,.1f} | {r["jax"]:,.1f} | '
          f'{r["jax"] / r["numpy"]:.2f}× | {r["build"]:.2f} s | {r["first"]:.2f} s | '
          f'{100 * r["agreement"]:.2f}% |')


if __name__ == '__main__':
  main()
