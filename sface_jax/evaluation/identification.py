"""1:N identification: a gallery split over every device, top-k search, rank-k and TPIR@FPIR.

Search. The gallery's embeddings are L2-normalised and laid out by rows over the one mesh
axis of `sharding.make_mesh` (each device holds a contiguous block of rows; no device ever
holds the whole gallery, so a 1 M × 512 float32 gallery of 2 GB costs each of 8 devices
256 MB). A batch of probes, normalised, is replicated; under `jax.shard_map` each device
scores it against its block chunk by chunk (cosine similarity = dot product of unit vectors,
float32), keeping a running top-k per probe, so the score matrix it materialises is only
batch × chunk; the k candidates of every device are then all-gathered (n × k per probe, not
n × rows) and merged into the global top-k. The gallery is padded with zero rows to
devices × chunks × chunk rows (a multiple of the device count); the padding scores −inf and
is never returned. Ties are broken towards the lower gallery row (`lax.top_k` keeps the
lower index first, and every merge lists lower rows first), i.e. the result is the gallery
sorted by (−score, row): a NumPy `argsort(-scores, kind='stable')` gives the same rows.

Scores are float32 with `Precision.HIGHEST` by default: on TPU the default precision would
multiply in bfloat16 (scores good to ~1e-3, enough to move a near-tie), on GPU in TF32;
pass `precision=jax.lax.Precision.DEFAULT` to trade that for speed.

Metrics (IJB-C 1:N, NIST FRVT 1:N "investigation" and "identification" modes). A probe is
*mated* when its identity is in the gallery, *non-mated* otherwise. Ranks count gallery
*entries*: with one entry (template) per identity, as IJB-C and FRVT enrol, that is the rank
of the identity; with several images per identity, fuse them first (e.g. average the
normalised embeddings per identity) if identity ranks are wanted.

* rank-r identification rate (closed set, mated probes only): the fraction of mated probes
  whose first gallery entry of their own identity is among the r highest-scoring entries.
* TPIR at FPIR = f (open set): the threshold τ is set on the non-mated probes' top-1 scores
  so that the fraction of non-mated probes with top-1 score ≥ τ is at most f, and τ is the
  lowest such threshold (concretely: with m non-mated probes, t = the (⌊f·m⌋ + 1)-th
  highest non-mated top-1 score and τ the next float32 above t, so "≥ τ" is "> t"; if
  ⌊f·m⌋ ≥ m, τ = −inf). TPIR = the fraction of mated probes whose mated gallery entry is at
  rank 1 *and* scores ≥ τ (a rank-1 hit below the threshold, and a top-1 above it of the
  wrong identity, both count as misses). The FPIR actually reached, #{top-1 ≥ τ} / m, is
  reported next to it; with m < 1/f it is 0 and τ sits above every non-mated score.

A rate over an empty set (no mated probes; no non-mated probes for TPIR) is NaN.

Command line, on `python -m sface_jax.embed` outputs (identity = the image's folder):

  python -m sface_jax.evaluation.identification --embeddings emb.npy --non-mated-identities 10
  python -m sface_jax.evaluation.identification --embeddings gallery.npy --probes probes.npy
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from sface_jax import arguments
from sface_jax import compilation_cache
from sface_jax import sharding

RANKS = (1, 5)
FPIR_TARGETS = (1e-2, 1e-1)
CHUNK_ROWS = 32768  # gallery rows scored at once per device: batch × chunk float32 scores


def _normalise_rows(rows: np.ndarray, first_row: int) -> np.ndarray:
  """float32 unit rows (a zero row stays zero); a non-finite row is an error naming it."""
  rows = np.asarray(rows, np.float32)
  finite = np.isfinite(rows).all(axis=1)
  if not finite.all():
    raise ValueError(f'embedding row {first_row + int(np.argmin(finite))} is not finite')
  norms = np.sqrt(np.einsum('ij,ij->i', rows, rows))
  return rows / np.maximum(norms, 1e-12)[:, None]


def _layout(num_rows: int, num_devices: int, chunk_rows: int) -> tuple[int, int]:
  """(chunks per device, rows per chunk): the fewest chunks of at most `chunk_rows` rows,
  evenly sized, so the padding is under one row per chunk and device beyond the multiple of
  the device count."""
  per_device = -(-num_rows // num_devices)
  num_chunks = max(1, -(-per_device // max(1, chunk_rows)))
  return num_chunks, -(-per_device // num_chunks)


@functools.lru_cache(maxsize=32)
def _search_fn(mesh: Mesh, num_rows: int, num_chunks: int, chunk: int, k: int, precision):
  """The jitted sharded search for one gallery layout and k: (gallery, probes) -> top-k."""
  axis = sharding.AXIS
  block_rows = num_chunks * chunk
  local_k = min(k, chunk)

  def local(block, probes):
    probes = probes / jnp.maximum(jnp.linalg.norm(probes, axis=-1, keepdims=True), 1e-12)
    first_row = jax.lax.axis_index(axis) * block_rows
    num_probes = probes.shape[0]

    def scan_chunk(best, chunk_index):
      best_scores, best_rows = best
      rows = jax.lax.dynamic_slice_in_dim(block, chunk_index * chunk, chunk, axis=0)
      scores = jnp.dot(probes, rows.T, precision=precision,
                       preferred_element_type=jnp.float32)
      row_ids = first_row + chunk_index * chunk + jnp.arange(chunk, dtype=jnp.int32)
      scores = jnp.where(row_ids[None, :] < num_rows, scores, -jnp.inf)  # padding never wins
      chunk_scores, positions = jax.lax.top_k(scores, local_k)
      # Earlier (lower) rows first, so a tie keeps the lower row.
      scores = jnp.concatenate([best_scores, chunk_scores], axis=1)
      rows = jnp.concatenate([best_rows, row_ids[positions]], axis=1)
      top, picked = jax.lax.top_k(scores, k)
      return (top, jnp.take_along_axis(rows, picked, axis=1)), None

    init = (jnp.full((num_probes, k), -jnp.inf, jnp.float32),
            jnp.full((num_probes, k), -1, jnp.int32))
    (scores, rows), _ = jax.lax.scan(scan_chunk, init, jnp.arange(num_chunks))
    # k candidates per device, devices in mesh order = lower rows first.
    scores = jax.lax.all_gather(scores, axis, axis=1, tiled=True)  # (probes, devices × k)
    rows = jax.lax.all_gather(rows, axis, axis=1, tiled=True)
    top, picked = jax.lax.top_k(scores, k)
    return top, jnp.take_along_axis(rows, picked, axis=1)

  # The merged top-k is the same on every device, but JAX's replication check cannot infer
  # that from a public all_gather (its output counts as varying), so the check is off; the
  # alternative, a psum of one-hot-placed candidates, would move n times the data.
  sharded = jax.shard_map(local, mesh=mesh, in_specs=(P(axis, None), P()),
                          out_specs=(P(), P()), check_vma=False)
  return jax.jit(sharded)


class Gallery:
  """Normalised gallery embeddings split by rows over the devices, searched by top-k.

  Build it once, search it with any number of probe batches; only probes and k candidates
  per probe cross between host and devices.
  """

  def __init__(self, embeddings: np.ndarray, labels: Sequence[int] | None = None, *,
               mesh: Mesh | None = None, chunk_rows: int = CHUNK_ROWS,
               precision=jax.lax.Precision.HIGHEST):
    """
    Args:
      embeddings: (G, D) gallery embeddings, any scale (normalised here, row by row, on the
        host, one device block at a time: no normalised copy of the whole gallery is made).
      labels: (G,) identity labels, kept for `identification_metrics`.
      mesh: default `sharding.make_mesh()` over all devices (one axis, `devices`).
      chunk_rows: rows per device scored at once (memory: probe batch × chunk_rows × 4 B).
      precision: of the score matrix product (see the module docstring).
    """
    arguments.check_positive(chunk_rows=chunk_rows)
    embeddings = np.asarray(embeddings)
    if embeddings.ndim != 2 or embeddings.shape[0] == 0 or embeddings.shape[1] == 0:
      raise ValueError(f'gallery embeddings must be (G, D) with G, D > 0; got '
                       f'{embeddings.shape}')
    self.num_rows, self.dim = embeddings.shape
    if labels is not None:
      labels = np.asarray(labels)
      if labels.shape != (self.num_rows,):
        raise ValueError(f'gallery labels must be ({self.num_rows},); got {labels.shape}')
    self.labels = labels
    self.mesh = sharding.make_mesh() if mesh is None else mesh
    if self.mesh.axis_names != (sharding.AXIS,):
      raise ValueError(f'the gallery is split over the one-axis mesh of sharding.make_mesh; '
                       f'got axes {self.mesh.axis_names}')
    self.precision = precision
    num_devices = self.mesh.devices.size
    self.num_chunks, self.chunk = _layout(self.num_rows, num_devices, chunk_rows)
    self.block_rows = self.num_chunks * self.chunk
    self.padded_rows = num_devices * self.block_rows

    def block(index):
      rows = range(self.padded_rows)[index[0]]  # a slice; slice(None) on one device
      start, stop = rows.start, min(rows.stop, self.num_rows)
      out = np.zeros((len(rows), self.dim), np.float32)
      if start < stop:
        out[:stop - start] = _normalise_rows(embeddings[start:stop], start)
      return out

    self.rows = jax.make_array_from_callback(
        (self.padded_rows, self.dim), NamedSharding(self.mesh, P(sharding.AXIS, None)), block)

  def search(self, probes: np.ndarray, k: int, *, batch_size: int = 1024
             ) -> tuple[np.ndarray, np.ndarray]:
    """The k best gallery rows per probe: (scores float32 (Q, k), rows int32 (Q, k)),
    best first, ties to the lower row. Probes go in batches of `batch_size` (the last one
    padded, so one compiled shape serves them all), two in flight."""
    arguments.check_positive(batch_size=batch_size)
    probes = np.asarray(probes, np.float32)
    if probes.ndim != 2 or probes.shape[1] != self.dim:
      raise ValueError(f'probes must be (Q, {self.dim}); got {probes.shape}')
    if not 1 <= k <= self.num_rows:
      raise ValueError(f'k must be in [1, {self.num_rows}] (the gallery size); got {k}')
    if not np.isfinite(probes).all():
      bad = int(np.argmin(np.isfinite(probes).all(axis=1)))
      raise ValueError(f'probe embedding row {bad} is not finite')
    num_probes = probes.shape[0]
    if num_probes == 0:
      return np.zeros((0, k), np.float32), np.zeros((0, k), np.int32)
    step = min(batch_size, num_probes)
    fn = _search_fn(self.mesh, self.num_rows, self.num_chunks, self.chunk, k, self.precision)
    replicated = NamedSharding(self.mesh, P())
    scores = np.empty((num_probes, k), np.float32)
    rows = np.empty((num_probes, k), np.int32)
    pending = []

    def fetch():
      start, count, (batch_scores, batch_rows) = pending.pop(0)
      scores[start:start + count] = np.asarray(batch_scores.addressable_data(0))[:count]
      rows[start:start + count] = np.asarray(batch_rows.addressable_data(0))[:count]

    for start in range(0, num_probes, step):
      batch = probes[start:start + step]
      count = batch.shape[0]
      if count < step:
        batch = np.concatenate([batch, np.zeros((step - count, self.dim), np.float32)])
      pending.append((start, count, fn(self.rows, jax.device_put(batch, replicated))))
      if len(pending) > 2:
        fetch()
    while pending:
      fetch()
    return scores, rows


@dataclasses.dataclass(frozen=True)
class IdentificationMetrics:
  """1:N results (fractions, not percent); see the module docstring for the definitions."""
  num_gallery: int
  num_mated: int
  num_non_mated: int
  rank_rate: dict[int, float]  # r -> rank-r identification rate over mated probes
  tpir_at_fpir: dict[float, float]  # FPIR target -> TPIR over mated probes
  threshold: dict[float, float]  # FPIR target -> τ (top-1 score ≥ τ is an alarm)
  fpir: dict[float, float]  # FPIR target -> the FPIR reached at τ
  mated_rank: np.ndarray  # (Q,) int: 1..k for a mated probe found in the top k, else 0
  top_scores: np.ndarray  # (Q, k) float32
  top_rows: np.ndarray  # (Q, k) int32 gallery rows

  def to_json(self) -> dict[str, Any]:
    number = lambda x: None if math.isnan(x) else x
    return {
        'num_gallery': self.num_gallery,
        'num_mated': self.num_mated,
        'num_non_mated': self.num_non_mated,
        'rank_rate': {str(r): number(v) for r, v in self.rank_rate.items()},
        'tpir_at_fpir': {f'{f:g}': number(v) for f, v in self.tpir_at_fpir.items()},
        'threshold': {f'{f:g}': None if not math.isfinite(v) else v
                      for f, v in self.threshold.items()},
        'fpir': {f'{f:g}': number(v) for f, v in self.fpir.items()},
    }


def open_set_threshold(non_mated_top_scores: np.ndarray, fpir: float) -> float:
  """τ: the lowest float32 threshold at which at most ⌊fpir·m⌋ of the m non-mated top-1
  scores are ≥ τ (NaN without non-mated probes; −inf when every one may be an alarm)."""
  scores = np.sort(np.asarray(non_mated_top_scores, np.float32))[::-1]
  m = scores.size
  if m == 0:
    return math.nan
  if not 0 <= fpir <= 1:
    raise ValueError(f'FPIR must be in [0, 1]; got {fpir}')
  allowed = math.floor(fpir * m * (1 + 1e-12))  # 0.29 × 100 = 28.999…: still 29 alarms
  if allowed >= m:
    return -math.inf
  return float(np.nextafter(scores[allowed], np.float32(np.inf)))


def metrics_from_search(top_scores: np.ndarray, top_rows: np.ndarray,
                        gallery_labels: np.ndarray, probe_labels: np.ndarray, *,
                        ranks: Sequence[int] = RANKS,
                        fpir_targets: Sequence[float] = FPIR_TARGETS) -> IdentificationMetrics:
  """Rank-r rates and TPIR@FPIR from a top-k search (k ≥ max(ranks)), in NumPy."""
  top_scores = np.asarray(top_scores, np.float32)
  top_rows = np.asarray(top_rows)
  gallery_labels, probe_labels = np.asarray(gallery_labels), np.asarray(probe_labels)
  num_probes, k = top_rows.shape
  if probe_labels.shape != (num_probes,):
    raise ValueError(f'probe labels must be ({num_probes},); got {probe_labels.shape}')
  if max(ranks) > k:
    raise ValueError(f'rank {max(ranks)} needs a top-{max(ranks)} search; got top-{k}')
  mated = np.isin(probe_labels, gallery_labels)
  hits = gallery_labels[top_rows] == probe_labels[:, None]  # (Q, k)
  found = hits.any(axis=1)
  mated_rank = np.where(found & mated, np.argmax(hits, axis=1) + 1, 0)
  num_mated, num_non_mated = int(mated.sum()), int((~mated).sum())

  def rate(hit):
    return float(np.mean(hit[mated])) if num_mated else math.nan

  rank_rate = {int(r): rate((mated_rank >= 1) & (mated_rank <= r)) for r in ranks}
  non_mated_top = top_scores[~mated, 0]
  thresholds, tpir, reached = {}, {}, {}
  for target in fpir_targets:
    tau = open_set_threshold(non_mated_top, target)
    thresholds[target] = tau
    if math.isnan(tau):
      tpir[target] = reached[target] = math.nan
      continue
    reached[target] = float(np.mean(non_mated_top >= tau))
    tpir[target] = rate((mated_rank == 1) & (top_scores[:, 0] >= tau))
  return IdentificationMetrics(
      num_gallery=int(gallery_labels.size), num_mated=num_mated, num_non_mated=num_non_mated,
      rank_rate=rank_rate, tpir_at_fpir=tpir, threshold=thresholds, fpir=reached,
      mated_rank=mated_rank, top_scores=top_scores, top_rows=top_rows)


def identification_metrics(gallery_embeddings: np.ndarray | Gallery, gallery_labels,
                           probe_embeddings: np.ndarray, probe_labels, *,
                           ranks: Sequence[int] = RANKS,
                           fpir_targets: Sequence[float] = FPIR_TARGETS,
                           mesh: Mesh | None = None, batch_size: int = 1024,
                           chunk_rows: int = CHUNK_ROWS) -> IdentificationMetrics:
  """Sharded top-k search of the probes in the gallery, then `metrics_from_search`.

  `gallery_embeddings` may be a `Gallery` already on the devices (then `mesh` and
  `chunk_rows` are its own). k = max(ranks); ranks beyond the gallery size are clipped.
  """
  arguments.check_positive(batch_size=batch_size, chunk_rows=chunk_rows,
                           **{f'ranks[{i}]': int(r) for i, r in enumerate(ranks)})
  gallery_labels = np.asarray(gallery_labels)
  if isinstance(gallery_embeddings, Gallery):
    gallery = gallery_embeddings
  else:
    gallery = Gallery(gallery_embeddings, gallery_labels, mesh=mesh, chunk_rows=chunk_rows)
  if gallery_labels.shape != (gallery.num_rows,):
    raise ValueError(f'gallery labels must be ({gallery.num_rows},); got '
                     f'{gallery_labels.shape}')
  ranks = sorted({min(int(r), gallery.num_rows) for r in ranks})
  scores, rows = gallery.search(probe_embeddings, max(ranks), batch_size=batch_size)
  return metrics_from_search(scores, rows, gallery_labels, probe_labels, ranks=ranks,
                             fpir_targets=fpir_targets)


def split_gallery_probes(labels, *, gallery_per_identity: int = 1,
                         non_mated_identities: int = 0,
                         seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Indices (gallery, probes) of a labelled set, for an open-set 1:N protocol.

  `non_mated_identities` identities, drawn with `np.random.default_rng(seed)` from the
  sorted distinct labels, are left out of the gallery: all their images are non-mated
  probes. Of every other identity the first `gallery_per_identity` images (in the set's
  order) form the gallery and the rest are mated probes (an identity with no image to spare
  is enrolled and probes nothing). Both index arrays are sorted.
  """
  labels = np.asarray(labels)
  if labels.ndim != 1:
    raise ValueError(f'labels must be (N,); got {labels.shape}')
  if gallery_per_identity < 1:
    raise ValueError(f'gallery_per_identity must be >= 1; got {gallery_per_identity}')
  identities = np.unique(labels)
  if not 0 <= non_mated_identities < identities.size:
    raise ValueError(f'non_mated_identities must be in [0, {identities.size}) (the number '
                     f'of identities); got {non_mated_identities}')
  held_out = np.random.default_rng(seed).permutation(identities)[:non_mated_identities]
  enrolled = ~np.isin(labels, held_out)
  # Position of each image among its identity's images, in order of appearance.
  order = np.argsort(labels, kind='stable')
  sorted_labels = labels[order]
  starts = np.searchsorted(sorted_labels, sorted_labels, side='left')
  occurrence = np.empty(labels.size, np.int64)
  occurrence[order] = np.arange(labels.size) - starts
  in_gallery = enrolled & (occurrence < gallery_per_identity)
  return np.flatnonzero(in_gallery), np.flatnonzero(~in_gallery)


# ---- the command line ------------------------------------------------------------------------


def load_embeddings(path: str) -> tuple[np.ndarray, list[str]]:
  """An `sface_jax.embed` output: the (N, D) array and its identities, each the folder part
  of the recorded image path ('s1/1.pgm' → 's1'), from the .json beside it."""
  from sface_jax import embed  # pylint: disable=g-import-not-at-top
  array_path, list_path = embed.output_paths(path)
  if not os.path.isfile(list_path):
    raise FileNotFoundError(f'{list_path}: not found (the file list `sface_jax.embed` writes '
                            f'beside {array_path})')
  with open(list_path, encoding='utf-8') as f:
    names = json.load(f)['files']
  embeddings = np.load(array_path, mmap_mode='r')
  if embeddings.ndim != 2 or embeddings.shape[0] != len(names):
    raise ValueError(f'{array_path}: {embeddings.shape} array for {len(names)} files in '
                     f'{list_path}')
  identities = [os.path.dirname(name) for name in names]
  if any(not identity for identity in identities):
    bad = identities.index('')
    raise ValueError(f'{list_path}: {names[bad]!r} is not in an identity folder '
                     '(<identity>/<image>)')
  return embeddings, identities


def format_table(metrics: IdentificationMetrics) -> str:
  """One line: gallery, mated and non-mated probes, rank-r rates and TPIR@FPIR (%)."""
  columns = ([f'rank-{r}' for r in metrics.rank_rate]
             + [f'TPIR@FPIR={f:g}' for f in metrics.tpir_at_fpir])
  header = f'{"gallery":>9}{"mated":>9}{"non-mated":>11}' + ''.join(f'{c:>17}' for c in columns)
  values = list(metrics.rank_rate.values()) + list(metrics.tpir_at_fpir.values())
  line = (f'{metrics.num_gallery:>9,}{metrics.num_mated:>9,}{metrics.num_non_mated:>11,}'
          + ''.join(f'{100 * v:>17.3f}' for v in values))
  return '\n'.join([header, '-' * len(header), line])


def main(argv: Sequence[str] | None = None) -> int:
  """`python -m sface_jax.evaluation.identification --embeddings emb.npy ...`"""
  import argparse  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  from sface_jax import files  # pylint: disable=g-import-not-at-top
  from sface_jax import cli  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(
      prog='python -m sface_jax.evaluation.identification', formatter_class=cli.HelpFormatter,
      description='1:N identification (rank-k, TPIR@FPIR) of `sface_jax.embed` outputs; '
                  'identities are the images\' folders.')
  parser.add_argument('--embeddings', required=True,
                      help='emb.npy (with emb.json): the gallery, or the whole set to split')
  parser.add_argument('--probes', default=None,
                      help='a second emb.npy of probes; without it --embeddings is split: the '
                           'first --gallery-per-identity images of each identity to the '
                           'gallery, --non-mated-identities identities held out')
  parser.add_argument('--gallery-per-identity', type=arguments.positive_int, default=1,
                      help='without --probes: images of each identity enrolled in the gallery')
  parser.add_argument('--non-mated-identities', type=arguments.non_negative_int, default=0,
                      help='without --probes: identities left out of the gallery (their '
                           'images are non-mated probes)')
  parser.add_argument('--seed', type=int, default=0, help='which identities are held out')
  parser.add_argument('--batch-size', type=arguments.positive_int, default=1024,
                      help='probes per search step')
  parser.add_argument('--json', default=None, help='also write the metrics here')
  compilation_cache.add_arguments(parser)  # --compilation-cache-dir, --no-compilation-cache
  args = parser.parse_args(argv)
  try:
    embeddings, identities = load_embeddings(args.embeddings)
    if args.probes is None:
      names, labels = np.unique(identities, return_inverse=True)
      gallery_idx, probe_idx = split_gallery_probes(
          labels, gallery_per_identity=args.gallery_per_identity,
          non_mated_identities=args.non_mated_identities, seed=args.seed)
      gallery, gallery_labels = embeddings[gallery_idx], labels[gallery_idx]
      probes, probe_labels = embeddings[probe_idx], labels[probe_idx]
    else:
      probes, probe_identities = load_embeddings(args.probes)
      names, labels = np.unique(identities + probe_identities, return_inverse=True)
      gallery, gallery_labels = embeddings, labels[:len(identities)]
      probe_labels = labels[len(identities):]
    metrics = identification_metrics(np.asarray(gallery), gallery_labels, np.asarray(probes),
                                     probe_labels, batch_size=args.batch_size)
  except (FileNotFoundError, ValueError, KeyError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  print(format_table(metrics))
  if args.json and jax.process_index() == 0:
    with files.atomic_write(args.json) as f:
      json.dump(dict(metrics.to_json(), embeddings=os.path.abspath(args.embeddings),
                     probes=args.probes and os.path.abspath(args.probes)), f, indent=1)
    print(f'wrote {args.json}')
  return 0


if __name__ == '__main__':
  import sys  # pylint: disable=g-import-not-at-top
  sys.exit(main())
