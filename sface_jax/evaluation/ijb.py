r"""IJB-B / IJB-C 1:1 template verification, as insightface's `eval_ijbc.py` computes it.

  python -m sface_jax.evaluation.ijb --workdir runs/r50 --ijb-dir /data/IJB_release/IJBC \
      --target IJBC

prints TAR at FAR = 1e-6 ... 1e-1 and the AUC, and writes `<output>/eval/ijb_<t>.json`,
`eval/ijb_<t>_roc.png` and `eval/ijb_<t>_scores.npy` (one cosine score per template pair,
in the pair file's order), t = ijbb or ijbc. The folder layout and meta files:
`sface_jax.data.ijb`.

What is computed (insightface `recognition/arcface_torch/eval_ijbc.py`, whose defaults are
`use_flip_test`, `use_norm_score` and `use_detector_score` all True; we follow them):

1. each face is aligned from its 5 landmarks onto the ArcFace template with a similarity
   transform and a bilinear warp, black outside the image (`sface_jax.data.align`; eval_ijbc
   does the same with skimage's `SimilarityTransform` and `cv2.warpAffine(borderValue=0)`
   onto the same template), at the model's input size S (`config.data.image_size`; the
   template scaled by S/112, as training's resized crops have it: `align.template`);
2. image feature f_i = e(face) + e(flipped face), the raw embeddings added
   (`sface_jax.evaluation.embedding.embed`; eval_ijbc's "F2"); not normalised, so that the
   feature norm weighs the face in the pooling (eval_ijbc's "N1": `use_norm_score`;
   `--no-norm-score` L2-normalises each f_i first);
3. f_i ← f_i · detector score (the last column of the 5-point file; eval_ijbc's "D1":
   `use_detector_score`; `--no-detector-score` leaves it out);
4. per template (in sorted template id order): the faces of one media (the same video or
   photo) are averaged (`np.mean` over the media's faces; a single face is taken as it is),
   the media features are summed, and the sum is L2-normalised (`sklearn.preprocessing
   .normalize`: a zero vector stays zero). Note: the media step is a mean, not a sum, in
   eval_ijbc; a media id is grouped only within its template, as there;
5. score of a template pair = cosine = dot product of the two normalised template features;
6. ROC: scikit-learn's `roc_curve(labels, scores)` with its default `drop_intermediate=True`
   (re-implemented below: sklearn is not a dependency); TAR at each FAR target is eval_ijbc's
   rule: the ROC point whose FPR is nearest to the target, the highest-TPR one among equally
   near points (eval_ijbc flips the curve and takes the first minimum); AUC by the trapezoid
   rule (`sklearn.metrics.auc`).

Differences, deliberate: pooling is float64 (eval_ijbc pools float32 features and sums
media in float32), which moves scores by ~1e-7; faces are decoded by training's decoder
(`images.decode`: libjpeg's accurate IDCT, as PIL's) rather than `cv2.imread` + BGR→RGB,
which can differ by a grey level where the JPEG decoders differ; the
pixel normalisation is the model's own, (x − 127.5)/128 (arcface_torch's is /127.5); and
meta-data inconsistencies that eval_ijbc passes over are errors (`sface_jax.data.ijb`).
A missing or undecodable image is an error naming the image and its line in the 5-point file.

Faces are decoded and aligned by `--workers` threads a chunk ahead of the model, so the
aligned crops of only two chunks are in memory at once (IJB-C has 469,375 faces; the features
are N × D float32, 0.96 GB at D = 512).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from sface_jax import arguments
from sface_jax import compilation_cache
from sface_jax import files
from sface_jax.data import ijb as ijb_data
from sface_jax.evaluation import far_resolution

FAR_TARGETS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
PAIR_CHUNK = 1 << 16  # template pairs scored at once: 2 × 65,536 × D float64 gathered


# ----------------------------------------------------------------------------- the protocol


def template_features(image_features: np.ndarray, templates: np.ndarray, medias: np.ndarray
                      ) -> tuple[np.ndarray, np.ndarray]:
  """eval_ijbc's `image2template_feature`: (L2-normalised float64 (T, D), sorted ids (T,)).

  Mean over each (template, media) group, sum over a template's media, L2-normalise (zero
  stays zero).
  """
  image_features = np.asarray(image_features, np.float64)
  templates, medias = np.asarray(templates, np.int64), np.asarray(medias, np.int64)
  if not (len(image_features) == len(templates) == len(medias)):
    raise ValueError(f'{len(image_features)} features but {len(templates)} template and '
                     f'{len(medias)} media ids')
  unique_templates, template_index = np.unique(templates, return_inverse=True)
  groups, group_index = np.unique(np.stack([template_index, medias], axis=1), axis=0,
                                  return_inverse=True)
  group_index = group_index.reshape(-1)
  dim = image_features.shape[1]
  media_sums = np.zeros((len(groups), dim))
  np.add.at(media_sums, group_index, image_features)
  counts = np.bincount(group_index, minlength=len(groups)).astype(np.float64)
  media_means = media_sums / counts[:, None]
  pooled = np.zeros((len(unique_templates), dim))
  np.add.at(pooled, groups[:, 0], media_means)
  norms = np.linalg.norm(pooled, axis=1, keepdims=True)
  pooled = np.divide(pooled, norms, out=np.zeros_like(pooled), where=norms > 0)
  return pooled, unique_templates


def pair_scores(template_feats: np.ndarray, unique_templates: np.ndarray,
                pairs: np.ndarray) -> np.ndarray:
  """Cosine score (float64 (P,)) of each template pair; an unknown template is an error."""
  pairs = np.asarray(pairs, np.int64)
  index = np.searchsorted(unique_templates, pairs)
  index = np.minimum(index, len(unique_templates) - 1)
  unknown = unique_templates[index] != pairs
  if unknown.any():
    row, column = map(int, np.argwhere(unknown)[0])
    raise ValueError(f'pair {row}: template {int(pairs[row, column])} has no features')
  scores = np.empty(len(pairs))
  for start in range(0, len(pairs), PAIR_CHUNK):
    block = index[start:start + PAIR_CHUNK]
    scores[start:start + PAIR_CHUNK] = np.einsum(
        'pd,pd->p', template_feats[block[:, 0]], template_feats[block[:, 1]])
  return scores


def roc_curve(labels: np.ndarray, scores: np.ndarray
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(fpr, tpr, thresholds) as `sklearn.metrics.roc_curve(labels, scores)` returns them.

  Thresholds at every distinct score, highest first (a pair is accepted when score ≥
  threshold); points where both the false- and the true-positive count change by the same
  amount as at the neighbours (collinear, `drop_intermediate=True`) are dropped; a first
  point (0, 0) at threshold +inf is prepended.
  """
  labels = np.asarray(labels).astype(bool)
  scores = np.asarray(scores, np.float64)
  if labels.all() or not labels.any():
    raise ValueError('the pairs must include both same-identity and different-identity pairs')
  order = np.argsort(-scores, kind='stable')
  sorted_scores, sorted_labels = scores[order], labels[order]
  last_of_value = np.r_[np.flatnonzero(np.diff(sorted_scores)), len(scores) - 1]
  true_positives = np.cumsum(sorted_labels, dtype=np.int64)[last_of_value]
  false_positives = last_of_value + 1 - true_positives
  thresholds = sorted_scores[last_of_value]
  if len(false_positives) > 2:
    keep = np.r_[True, np.logical_or(np.diff(false_positives, 2) != 0,
                                     np.diff(true_positives, 2) != 0), True]
    true_positives, false_positives = true_positives[keep], false_positives[keep]
    thresholds = thresholds[keep]
  true_positives = np.r_[0, true_positives]
  false_positives = np.r_[0, false_positives]
  thresholds = np.r_[np.inf, thresholds]
  return (false_positives / false_positives[-1], true_positives / true_positives[-1],
          thresholds)


def tar_at_far(fpr: np.ndarray, tpr: np.ndarray,
               far_targets: Sequence[float] = FAR_TARGETS) -> dict[float, float]:
  """eval_ijbc's table: per target, the TPR of the ROC point with the nearest FPR (the
  last such point in sklearn's order, i.e. the highest TPR, when several are as near)."""
  result = {}
  for far in far_targets:
    distance = np.abs(fpr - far)
    result[float(far)] = float(tpr[np.flatnonzero(distance == distance.min())[-1]])
  return result


def auc(fpr: np.ndarray, tpr: np.ndarray) -> float:
  return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))


def far_key(far: float) -> str:
  return f'{far:.0e}'.replace('e-0', 'e-')


# ----------------------------------------------------------------------------- faces


def _default_align() -> Callable[..., np.ndarray]:
  from sface_jax.data import align  # pylint: disable=g-import-not-at-top
  return align.align_face


def aligned_face(meta: ijb_data.IJBMeta, index: int, image_size: int,
                 align_fn: Callable[..., np.ndarray]) -> np.ndarray:
  """Face `index` decoded (RGB uint8) and aligned to (S, S, 3); errors name file and line."""
  from sface_jax.data import images as images_lib  # pylint: disable=g-import-not-at-top
  path = os.path.join(meta.image_dir, meta.names[index])
  where = lambda: f'{meta.landmark_file}, line {ijb_data.landmark_line(meta, index)}'
  try:
    with open(path, 'rb') as f:
      data = f.read()
  except OSError as e:
    raise ijb_data.IJBError(f'{path}: cannot read the image listed at {where()} '
                            f'({e.strerror or e})') from None
  try:
    image = images_lib.decode(data, where=path)
  except images_lib.ImageError as e:
    raise ijb_data.IJBError(f'{e} (listed at {where()})') from None
  try:
    crop = align_fn(image, meta.landmarks[index], image_size)
  except ValueError as e:
    raise ijb_data.IJBError(f'{path} (listed at {where()}): cannot align: {e}') from None
  return np.asarray(crop, np.uint8)


def image_features(model, variables, meta: ijb_data.IJBMeta, image_size: int, *,
                   batch_size: int = 256, mesh=None, workers: int = 4,
                   chunk_size: int | None = None,
                   align_fn: Callable[..., np.ndarray] | None = None,
                   progress: Callable[[int, int], None] | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
  """Flip-summed raw embeddings float32 (N, D) of every face, and their norms (N, 2).

  Faces are decoded and aligned by `workers` threads, one chunk ahead of the model.
  """
  from sface_jax.evaluation import embedding  # pylint: disable=g-import-not-at-top
  arguments.check_positive(image_size=image_size, batch_size=batch_size, workers=workers,
                           chunk_size=chunk_size)
  align_fn = align_fn or _default_align()
  chunk_size = chunk_size or max(4 * batch_size, 1024)
  num_faces = meta.num_faces
  starts = list(range(0, num_faces, chunk_size))
  features, norms = [], []
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    def submit(start):
      return [pool.submit(aligned_face, meta, i, image_size, align_fn)
              for i in range(start, min(start + chunk_size, num_faces))]
    pending = submit(starts[0])
    for k, start in enumerate(starts):
      try:
        crops = np.stack([future.result() for future in pending])
      except BaseException:
        for future in pending:  # stop the chunk's remaining faces: the run fails anyway
          future.cancel()
        raise
      pending = submit(starts[k + 1]) if k + 1 < len(starts) else []
      chunk_features, chunk_norms = embedding.embed(model, variables, crops,
                                                    batch_size=batch_size, mesh=mesh,
                                                    return_norms=True)
      features.append(chunk_features)
      norms.append(chunk_norms)
      if progress is not None:
        progress(start + len(crops), num_faces)
  return np.concatenate(features), np.concatenate(norms)


# ----------------------------------------------------------------------------- one set


@dataclasses.dataclass
class IJBResult:
  target: str
  num_faces: int
  num_templates: int
  num_pairs: int
  num_positive: int
  tar_at_far: dict[float, float]
  auc: float
  xnorm: float
  fpr: np.ndarray
  tpr: np.ndarray
  scores: np.ndarray
  settings: dict[str, Any]

  @property
  def impostor_pairs(self) -> int:
    return self.num_pairs - self.num_positive

  def resolved(self, far: float) -> bool:
    """Whether TAR@FAR=`far` means what it says here (`far_resolution`)."""
    return far_resolution.resolved(far, self.impostor_pairs)

  def to_json(self) -> dict[str, Any]:
    """A TAR the pairs cannot resolve (FAR·impostor pairs < 1) is written as null."""
    return {'target': self.target, 'faces': self.num_faces, 'templates': self.num_templates,
            'pairs': self.num_pairs, 'positive_pairs': self.num_positive,
            'impostor_pairs': self.impostor_pairs,
            'tar_at_far': {far_key(far): tar if self.resolved(far) else None
                           for far, tar in self.tar_at_far.items()},
            'auc': self.auc, 'xnorm': self.xnorm, 'settings': self.settings}


def verify(features: np.ndarray, meta: ijb_data.IJBMeta, *, detector_score: bool = True,
           norm_score: bool = True, xnorm: float = float('nan'),
           settings: Mapping[str, Any] | None = None) -> IJBResult:
  """Steps 3-6 of the module docstring on flip-summed image features (N, D)."""
  features = np.asarray(features, np.float32)
  if len(features) != meta.num_faces:
    raise ValueError(f'{len(features)} features for {meta.num_faces} faces')
  if not norm_score:
    features = features / np.linalg.norm(features, axis=1, keepdims=True)
  if detector_score:
    features = features * meta.face_scores[:, None]
  pooled, unique_templates = template_features(features, meta.templates, meta.medias)
  scores = pair_scores(pooled, unique_templates, meta.pairs)
  fpr, tpr, _ = roc_curve(meta.labels, scores)
  return IJBResult(
      target=meta.target, num_faces=meta.num_faces, num_templates=len(unique_templates),
      num_pairs=len(scores), num_positive=int(meta.labels.sum()),
      tar_at_far=tar_at_far(fpr, tpr), auc=auc(fpr, tpr), xnorm=xnorm, fpr=fpr, tpr=tpr,
      scores=scores, settings={'flip': 'add', 'norm_score': norm_score,
                               'detector_score': detector_score, **(settings or {})})


def evaluate_ijb(model, variables, ijb_dir: str, target: str, image_size: int, *,
                 batch_size: int = 256, mesh=None, workers: int = 4,
                 detector_score: bool = True, norm_score: bool = True,
                 align_fn: Callable[..., np.ndarray] | None = None,
                 progress: Callable[[int, int], None] | None = None) -> IJBResult:
  """Reads `ijb_dir`'s meta files, embeds every face and runs the 1:1 protocol."""
  arguments.check_positive(image_size=image_size, batch_size=batch_size, workers=workers)
  meta = ijb_data.load_meta(ijb_dir, target)
  features, norms = image_features(model, variables, meta, image_size, batch_size=batch_size,
                                   mesh=mesh, workers=workers, align_fn=align_fn,
                                   progress=progress)
  return verify(features, meta, detector_score=detector_score, norm_score=norm_score,
                xnorm=float(np.mean(norms, dtype=np.float64)),
                settings={'image_size': image_size, 'ijb_dir': os.path.abspath(ijb_dir)})


# ----------------------------------------------------------------------------- report


def format_table(results: Sequence[IJBResult]) -> str:
  """One line per target; a TAR@FAR its impostor pairs cannot resolve is "–" (footnoted)."""
  columns = [f'TAR@FAR={far_key(far)}' for far in FAR_TARGETS]
  header = (f'{"target":<8}{"faces":>9}{"templates":>11}{"pairs":>11}'
            + ''.join(f'{c:>16}' for c in columns) + f'{"AUC":>9}')
  lines = [header, '-' * len(header)]
  unresolved = {}
  for r in results:
    tars, dashed = far_resolution.table_cells(
        {far: r.tar_at_far[far] for far in FAR_TARGETS}, r.impostor_pairs, decimals=2)
    if dashed:
      unresolved[r.target] = r.impostor_pairs
    lines.append(f'{r.target:<8}{r.num_faces:>9}{r.num_templates:>11}{r.num_pairs:>11}'
                 + tars + f'{100 * r.auc:>9.2f}')
  if unresolved:
    lines.append(far_resolution.footnote(unresolved))
  return '\n'.join(lines)


def plot_roc(results: Sequence[IJBResult], path: str, title: str = 'ROC on IJB') -> None:
  """TPR against log FPR from 1e-6 to 0.1, eval_ijbc's axes; PNG via Agg (no pyplot)."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  figure = Figure(figsize=(6, 4.5), dpi=120)
  FigureCanvasAgg(figure)
  axes = figure.add_subplot()
  for r in results:
    keep = r.fpr > 0
    axes.plot(r.fpr[keep], r.tpr[keep], lw=1,
              label=f'{r.target} (AUC = {100 * r.auc:.2f}%)')
  axes.set_xscale('log')
  axes.set_xlim(1e-6, 0.1)
  axes.set_xticks(list(FAR_TARGETS))
  axes.set_ylim(0.0, 1.01)
  axes.set_xlabel('false positive rate')
  axes.set_ylabel('true positive rate')
  axes.grid(True, linestyle='--', alpha=0.5)
  axes.legend(loc='lower right')
  axes.set_title(title)
  figure.tight_layout()
  with files.atomic_path(path) as tmp:
    figure.savefig(tmp, format='png')


def write_report(result: IJBResult, directory: str, *, source: str = '') -> dict[str, str]:
  """DIR/eval/ijb_<t>.json, ijb_<t>_roc.png and ijb_<t>_scores.npy; returns the paths."""
  out_dir = os.path.join(directory, 'eval')
  os.makedirs(out_dir, exist_ok=True)
  stem = os.path.join(out_dir, f'ijb_{result.target.lower()}')
  paths = {'json': f'{stem}.json', 'roc': f'{stem}_roc.png', 'scores': f'{stem}_scores.npy'}
  with files.atomic_write(paths['json']) as f:
    json.dump({'source': source, **result.to_json()}, f, indent=1, allow_nan=True)
  with files.atomic_path(paths['scores']) as tmp:
    with open(tmp, 'wb') as f:
      np.save(f, result.scores)
  plot_roc([result], paths['roc'], title=f'ROC on {result.target}')
  return paths


# ----------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
  from sface_jax import cli  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(
      prog='python -m sface_jax.evaluation.ijb', formatter_class=cli.HelpFormatter,
      description='IJB-B / IJB-C 1:1 template verification (insightface eval_ijbc.py).')
  from sface_jax import checkpoint  # pylint: disable=g-import-not-at-top
  checkpoint.add_source_arguments(parser)
  parser.add_argument('--ijb-dir', required=True,
                      help='the IJBB or IJBC folder: meta/ and loose_crop/')
  parser.add_argument('--target', default='IJBC', type=str.upper, choices=ijb_data.TARGETS,
                      help='which benchmark the folder holds (its meta/ file prefix)')
  parser.add_argument('--batch-size', type=arguments.positive_int, default=None,
                      help="faces per step; default: the run's config.eval.batch_size")
  parser.add_argument('--workers', type=arguments.positive_int,
                      default=min(8, os.cpu_count() or 1),
                      help='threads decoding and aligning faces')
  parser.add_argument('--no-detector-score', action='store_true',
                      help="do not weight faces by the detector score (eval_ijbc's D1 off)")
  parser.add_argument('--no-norm-score', action='store_true',
                      help="L2-normalise each face's feature before pooling (N1 off)")
  parser.add_argument('--model', default=None,
                      help='architecture to load the weights into; default: the trained one')
  parser.add_argument('--output-dir', default=None,
                      help='where eval/ijb_* go; default: the work directory')
  compilation_cache.add_arguments(parser)  # --compilation-cache-dir, --no-compilation-cache
  args = parser.parse_args(argv)
  from sface_jax import checkpoint  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  path = args.workdir or args.checkpoint
  started = time.time()

  def progress(done, total):
    rate = done / max(time.time() - started, 1e-9)
    print(f'embedded {done}/{total} faces ({rate:.0f} faces/s)', file=sys.stderr, flush=True)

  try:
    config, model, variables = checkpoint.load_for_inference(path, model_name=args.model)
    mesh = None
    if jax.device_count() > 1:
      from sface_jax import sharding  # pylint: disable=g-import-not-at-top
      mesh = sharding.make_mesh()
    result = evaluate_ijb(model, variables, args.ijb_dir, args.target,
                          int(config.data.image_size),
                          batch_size=args.batch_size or int(config.eval.batch_size),
                          mesh=mesh, workers=args.workers,
                          detector_score=not args.no_detector_score,
                          norm_score=not args.no_norm_score, progress=progress)
  except (FileNotFoundError, ValueError) as e:  # IJBError is a ValueError
    print(f'ijb: error: {e}', file=sys.stderr, flush=True)
    return 1
  print(format_table([result]))
  if jax.process_index() == 0:
    output_dir = args.output_dir or checkpoint.workdir_of(path)
    paths = write_report(result, output_dir, source=os.path.abspath(path))
    print(f'wrote {paths["json"]}, {paths["roc"]} and {paths["scores"]}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
