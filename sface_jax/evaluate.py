"""Verification accuracy of a trained backbone: `Evaluator` (training calls it) and the CLI.

  python -m sface_jax.evaluate --workdir DIR --sets lfw cfp_fp agedb_30 calfw cplfw
  python -m sface_jax.evaluate --checkpoint DIR/checkpoints/20000 --sets path/to/lfw.bin

prints one table (set, pairs, accuracy ± std, threshold, XNorm, TAR@FAR) and writes the
step's report, DIR/eval/verification-step<N>.json and roc-step<N>.png, and also
DIR/eval/verification.json and roc.png unless those hold a later step (`report.write_report`):
evaluating an older checkpoint never replaces the newer one's report. Progress (images/s,
ETA) goes to stderr every 10 s. Two sets of one name are refused (one row would hide the other).

The pieces: `data.pair_sets` finds and decodes the sets, `evaluation.embedding` embeds them
(flip-summed, over all devices), `evaluation.verification` is insightface's protocol,
`evaluation.report` the table and plot.
"""

import argparse
import dataclasses
import os
import sys
from collections.abc import Callable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from sface_jax import arguments
from sface_jax import checkpoint
from sface_jax import cli
from sface_jax import compilation_cache
from sface_jax import progress
from sface_jax import sharding
from sface_jax.data import pair_sets
from sface_jax.evaluation import embedding
from sface_jax.evaluation import report
from sface_jax.evaluation import verification

PROGRESS_SECONDS = 10.0


def evaluate_sets(apply_fn_or_model, variables, sets: Sequence[pair_sets.VerificationSet], *,
                  batch_size: int, mesh: Mesh | None = None, num_folds: int = 10,
                  log: Callable[[str], None] | None = None,
                  ) -> dict[str, verification.VerificationMetrics]:
  """Embeds each set and runs the protocol; {set name: metrics with XNorm}.

  Two sets of one name (`lfw` from the data dir and `other/lfw.bin`) are an error naming
  both, not one result hiding the other. With `log`, a progress line (images/s, ETA over
  all the sets) at most every `PROGRESS_SECONDS`.
  """
  check_unique_names(sets)
  total = sum(len(pair_set.images) for pair_set in sets)
  ticker = (progress.Ticker('evaluate', total, unit='images', seconds=PROGRESS_SECONDS, log=log)
            if log else None)
  results, done = {}, 0
  for pair_set in sets:
    on_batch = None if ticker is None else (lambda count, before=done: ticker(before + count))
    embeddings, norms = embedding.embed(apply_fn_or_model, variables, pair_set.images,
                                        batch_size=batch_size, mesh=mesh, return_norms=True,
                                        on_batch=on_batch)
    done += len(pair_set.images)
    metrics = verification.verification_metrics(embeddings[0::2], embeddings[1::2],
                                                pair_set.issame, num_folds)
    results[pair_set.name] = dataclasses.replace(
        metrics, xnorm=float(np.mean(norms, dtype=np.float64)))
  if ticker is not None:
    ticker.finish()
  return results


def check_unique_names(sets: Sequence[pair_sets.VerificationSet]) -> None:
  """Every set has its own name (the key of its result and of its row), or a ValueError
  naming the files that share one."""
  paths: dict[str, list[str]] = {}
  for pair_set in sets:
    paths.setdefault(pair_set.name, []).append(pair_set.path)
  for name, where in paths.items():
    if len(where) > 1:
      raise ValueError(f'{len(where)} pair sets are named {name!r} ({", ".join(where)}): '
                       'evaluate each once (a .bin and its converted .npz are the same set)')


class Evaluator:
  """The verification sets, decoded once, evaluated whenever training asks.

  `run(model, variables)` returns {set name: VerificationMetrics} and keeps the best accuracy
  seen per set in `highest_accuracy` (insightface's `highest_acc`).
  """

  def __init__(self, sets: Sequence[str], data_dir: str, image_size: int, *,
               batch_size: int = 256, mesh: Mesh | None = None, num_folds: int = 10):
    self.sets = [pair_sets.load(name, data_dir, image_size) for name in sets]
    check_unique_names(self.sets)
    self.batch_size = batch_size
    self.mesh = mesh
    self.num_folds = num_folds
    self.highest_accuracy: dict[str, float] = {}

  def run(self, model, variables) -> dict[str, verification.VerificationMetrics]:
    """`model`: a Flax module or an apply function (see `embed`)."""
    results = evaluate_sets(model, variables, self.sets, batch_size=self.batch_size,
                            mesh=self.mesh, num_folds=self.num_folds)
    for name, metrics in results.items():
      self.highest_accuracy[name] = max(self.highest_accuracy.get(name, 0.0), metrics.accuracy)
    return results


def _parse_args(argv):
  parser = argparse.ArgumentParser(
      prog='python -m sface_jax.evaluate', formatter_class=cli.HelpFormatter,
      description='Verification accuracy (insightface protocol) of a trained backbone.')
  checkpoint.add_source_arguments(parser)
  parser.add_argument('--sets', nargs='+', default=None,
                      help='set names in the data dir (lfw cfp_fp ...) or .bin/.npz paths; '
                           "default: the run's config.eval.sets")
  parser.add_argument('--data-dir', default=None,
                      help="where set names are looked up; default: the run's config.data.dir")
  parser.add_argument('--batch-size', type=arguments.positive_int, default=None,
                      help="images per step; default: the run's config.eval.batch_size")
  parser.add_argument('--model', default=None,
                      help='architecture to load the weights into; default: the trained one')
  parser.add_argument('--output-dir', default=None,
                      help='where eval/verification-step<N>.json and eval/roc-step<N>.png go; '
                           'default: the work directory')
  compilation_cache.add_arguments(parser)  # --compilation-cache-dir, --no-compilation-cache
  return parser.parse_args(argv)


def _log(line: str) -> None:
  print(line, file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
  args = _parse_args(argv)
  source = args.workdir or args.checkpoint
  try:
    _, step = checkpoint.resolve(source)
    config, model, variables = checkpoint.load_for_inference(source, model_name=args.model)
    sets = args.sets or list(config.eval.sets)
    data_dir = config.data.dir if args.data_dir is None else args.data_dir
    loaded = []
    for name in sets:
      loaded.append(pair_sets.load(name, data_dir, config.data.image_size))
      _log(f'{loaded[-1].name}: {loaded[-1].issame.size:,} pairs ({loaded[-1].path})')
    check_unique_names(loaded)
  except (FileNotFoundError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  mesh = sharding.make_mesh() if jax.device_count() > 1 else None
  batch_size = args.batch_size or config.eval.batch_size
  _log(f'evaluating step {step} of {source} on {jax.device_count()} device(s), batches of '
       f'{batch_size}')
  results = evaluate_sets(model, variables, loaded, batch_size=batch_size, mesh=mesh, log=_log)
  print(report.format_table(results))
  if jax.process_index() == 0:
    output_dir = args.output_dir or checkpoint.workdir_of(source)
    paths = report.write_report(results, output_dir, step=step, source=os.path.abspath(source))
    print('wrote ' + ', '.join(paths.values()))
  return 0


if __name__ == '__main__':
  sys.exit(main())
