"""Size arguments (batch sizes, worker counts, k, shard counts) checked where they enter.

On the command line, `positive_int` / `non_negative_int` are argparse types: a bad value
ends the command at once with argparse's usage line and `argument --batch-size: ...`, exit
status 2. At the API, `check_positive` raises a ValueError naming the
argument. Either way, before any work: a zero or negative size otherwise surfaces much later
as a bare `range()` error, an empty result, or uninitialised memory returned as results.
"""

import argparse
import numbers


def _integer(text: str) -> int:
  try:
    return int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f'{text!r} is not an integer') from None


def positive_int(text: str) -> int:
  """argparse type: an integer ≥ 1."""
  value = _integer(text)
  if value < 1:
    raise argparse.ArgumentTypeError(f'{value} is not a positive integer (1 or more)')
  return value


def non_negative_int(text: str) -> int:
  """argparse type: an integer ≥ 0."""
  value = _integer(text)
  if value < 0:
    raise argparse.ArgumentTypeError(f'{value} is negative (0 or more expected)')
  return value


def _check(values: dict, minimum: int) -> None:
  for name, value in values.items():
    if value is None:
      continue
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
      raise ValueError(f'{name} must be an integer; got {value!r}')
    if value < minimum:
      raise ValueError(f'{name} must be {minimum} or more; got {value}')


def check_positive(**values) -> None:
  """ValueError naming the first argument that is not an integer ≥ 1 (None is allowed:
  "use the default")."""
  _check(values, 1)

