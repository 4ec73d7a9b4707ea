"""Verification results for people: a table, `verification.json` and a ROC plot."""

import json
import os
import shutil
from collections.abc import Mapping

from sface_jax import files
from sface_jax.evaluation import far_resolution
from sface_jax.evaluation.verification import FAR_TARGETS, VerificationMetrics, far_key

EVAL_SUBDIR = 'eval'


def format_table(results: Mapping[str, VerificationMetrics]) -> str:
  """One line per set: pairs, accuracy ± std (%), best threshold, XNorm, TAR@FAR (%).

  A TAR@FAR the set has too few impostor pairs for is printed as "–", and a last line says
  why (`far_resolution`).
  """
  far_columns = [f'TAR@FAR={far_key(far)}' for far in FAR_TARGETS]
  header = (f'{"set":<12}{"pairs":>7}  {"accuracy (%)":<17}{"threshold":>9}{"XNorm":>9}'
            + ''.join(f'{c:>16}' for c in far_columns))
  lines = [header, '-' * len(header)]
  unresolved = {}
  for name, m in results.items():
    accuracy = f'{100 * m.accuracy:.3f} ± {100 * m.accuracy_std:.3f}'
    tars, dashed = far_resolution.table_cells(
        {far: m.tar_at_far[far][0] for far in FAR_TARGETS}, m.threshold_impostor_pairs)
    if dashed:
      unresolved[name] = m.threshold_impostor_pairs
    lines.append(f'{name:<12}{m.num_pairs:>7}  {accuracy:<17}{m.best_threshold:>9.3f}'
                 f'{m.xnorm:>9.3f}' + tars)
  if unresolved:
    lines.append(far_resolution.footnote(unresolved))
  return '\n'.join(lines)


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
  with files.atomic_path(path) as tmp:
    figure.savefig(tmp, format='png')


def write_report(results: Mapping[str, VerificationMetrics], directory: str, *,
                 step: int | None = None, source: str = '') -> dict[str, str]:
  """Writes the report of one checkpoint; returns {what: path} of the files written.

  With a step: DIR/eval/verification-step<step>.json and roc-step<step>.png, and the same
  again as DIR/eval/verification.json and roc.png (the latest report) unless those hold a
  later step; so evaluating step 600 after training evaluated step 800 adds the step-600 files
  and leaves the step-800 report in place. Without a step (a model of no particular step):
  verification.json and roc.png only, unless they hold a step's report.
  """
  out_dir = os.path.join(directory, EVAL_SUBDIR)
  os.makedirs(out_dir, exist_ok=True)
  latest = {'json': os.path.join(out_dir, 'verification.json'),
            'roc': os.path.join(out_dir, 'roc.png')}
  targets = {}
  if step is not None:
    targets['json'] = os.path.join(out_dir, f'verification-step{step}.json')
    targets['roc'] = os.path.join(out_dir, f'roc-step{step}.png')
  latest_step = _report_step(latest['json'])
  if latest_step is None or (step is not None and latest_step <= step):
    targets.update({f'latest_{key}' if step is not None else key: path
                    for key, path in latest.items()})
  report = {'step': step, 'source': source, 'far_targets': list(FAR_TARGETS),
            'sets': {name: m.to_json() for name, m in results.items()}}
  title = 'verification ROC' + (f' at step {step}' if step is not None else '')
  drawn = None  # the ROC is drawn once, then copied
  for key, path in targets.items():
    if key.endswith('json'):
      with files.atomic_write(path) as f:
        json.dump(report, f, indent=1, allow_nan=False)
    elif drawn is None:
      plot_roc(results, path, title=title)
      drawn = path
    else:
      with files.atomic_path(path) as tmp:
        shutil.copyfile(drawn, tmp)
  return targets


def _report_step(path: str) -> int | None:
  """The step of the report at `path`; None when there is none (or it has no step)."""
  try:
    with open(path, encoding='utf-8') as f:
      return json.load(f).get('step')
  except (OSError, ValueError):
    return None
