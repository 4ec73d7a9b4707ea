"""Which TAR@FAR figures a pair set can back, and how the tables and JSON show the others.

A TAR at FAR = f is read at the threshold where the false-accept rate measured on N
impostor (different-identity) pairs reaches f. That rate moves in steps of 1/N, so where
f·N < 1 the target lies inside the first step: the threshold is an interpolation below the
closest impostor (insightface's `calculate_val`) or the ROC point with FPR 0 (eval_ijbc's
nearest point), and the TAR printed is that of "no impostor accepted", not of FAR = f.
ORL's 450 impostor pairs (405 per set of training folds) cannot back FAR = 1e-3; LFW's
3,000 (2,700) back 1e-3 but not 1e-4; IJB-C's 15.6 M back 1e-6.

Such figures are still computed (they are insightface's numbers, and tests compare them
with insightface's code); tables print `UNRESOLVED` in their place and JSON reports write
null, with the impostor count beside it. Here, so that the verification protocol and IJB
(which imports no JAX) share one rule.
"""

from collections.abc import Mapping

UNRESOLVED = '–'


def resolved(far: float, impostor_pairs: int) -> bool:
  """Whether `impostor_pairs` impostor scores can resolve FAR = `far`: far·N ≥ 1."""
  return far * impostor_pairs >= 1.0 - 1e-9  # 1e-3 × 1000 is 1 up to rounding


def table_cells(tars: Mapping[float, float], impostor_pairs: int, *, width: int = 16,
                decimals: int = 3) -> tuple[str, bool]:
  """{FAR: TAR (fraction)} as right-aligned percent cells, `UNRESOLVED` where the FAR is
  below 1/`impostor_pairs`; and whether any cell is."""
  cells = [f'{100 * tar:>{width}.{decimals}f}' if resolved(far, impostor_pairs)
           else f'{UNRESOLVED:>{width}}' for far, tar in tars.items()]
  return ''.join(cells), any(not resolved(far, impostor_pairs) for far in tars)


def footnote(unresolved: Mapping[str, int]) -> str:
  """The line under a table with dashes: {row name: impostor pairs behind its thresholds}."""
  counts = ', '.join(f'{name}: {count:,}' for name, count in unresolved.items())
  return (f'{UNRESOLVED} = not resolved: FAR × impostor pairs < 1 ({counts} impostor pairs); '
          'it would be the TAR with no impostor accepted')
