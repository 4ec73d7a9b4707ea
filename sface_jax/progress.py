"""Throughput and time left of long work (training steps, converted images, embedded faces)."""

import math
import time


def format_duration(seconds: float) -> str:
  """'1h02m', '3m07s', or '?' when unknown."""
  if not math.isfinite(seconds):
    return '?'
  seconds = int(seconds)
  if seconds >= 3600:
    return f'{seconds // 3600}h{seconds // 60 % 60:02d}m'
  return f'{seconds // 60}m{seconds % 60:02d}s'


class Progress:
  """Units per second since the last measurement, and the ETA of `total` at that rate.

  The rate covers only the last interval, so start-up (compilation, TensorFlow's import)
  does not dilute it; call `restart(done)` after such a pause to start a clean interval.
  """

  def __init__(self, total: int, done: int = 0):
    self.total = total
    self.started = time.perf_counter()
    self.restart(done)

  def restart(self, done: int) -> None:
    self._time, self._done = time.perf_counter(), done

  def measure(self, done: int) -> tuple[float, float]:
    """(units/s over the interval since the last call, seconds left); starts a new interval."""
    now = time.perf_counter()
    rate = (done - self._done) / max(now - self._time, 1e-9)
    self._time, self._done = now, done
    left = (self.total - done) / rate if rate > 0 else math.inf
    return rate, left

  def elapsed(self) -> float:
    return time.perf_counter() - self.started
