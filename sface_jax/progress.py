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


class Ticker:
  """Progress lines of long work, at most one every `seconds`:
  'evaluate: 1,200/12,000 images (10.0%)  850 images/s  ETA 0m12s', then a last line with
  the overall rate when `finish()` is called.

  Call it with the units done so far. The first call's interval (compilation, start-up) is
  left out of the rates shown while running, as `Progress` does.
  """

  def __init__(self, label: str, total: int, *, unit: str = 'images', seconds: float = 10.0,
               log=print):
    self.label, self.total, self.unit, self.seconds, self.log = label, total, unit, seconds, log
    self._clock = Progress(total)
    self._started = False
    self._last_line = time.perf_counter()
    self._done = 0

  def __call__(self, done: int) -> None:
    self._done = done
    if not self._started:
      self._started = True
      self._clock.restart(done)
      return
    now = time.perf_counter()
    if now - self._last_line >= self.seconds and done < self.total:
      rate, left = self._clock.measure(done)
      self._last_line = now
      self.log(f'{self.label}: {done:,}/{self.total:,} {self.unit} '
               f'({100 * done / max(self.total, 1):.1f}%)  {rate:,.0f} {self.unit}/s  '
               f'ETA {format_duration(left)}')

  def finish(self) -> None:
    elapsed = max(self._clock.elapsed(), 1e-9)
    self.log(f'{self.label}: {self._done:,} {self.unit} in {elapsed:.1f} s '
             f'({self._done / elapsed:,.0f} {self.unit}/s overall, compilation included)')
