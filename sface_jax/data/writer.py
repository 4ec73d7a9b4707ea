"""The sharded TFRecord writer: a plan fixed by the input, shards written in parallel.

Images are dealt to shards by a seeded permutation, so every shard holds a near-uniform
sample of all identities (an insightface `.rec` is sorted by identity: cut into contiguous
shards, a shuffle buffer would see a few identities at a time). Each shard is written by one
process to a temporary name and renamed when complete, so a killed conversion leaves only
complete shards. The plan (`conversion_plan.json`) is a pure function of the input's
fingerprint and the options: a rerun with the same plan writes only the missing shards, a
different plan (another dataset, other options) is refused.

Every image is decoded before it is written, by the decoder training uses
(`images.decode_tf`, `check_decodable`), so an image training could not read stops the
conversion with its file or record named. With `skip_bad` such images are left out instead
and listed: each shard's list goes to `skipped/<shard>.json` before the shard is renamed
(so a resumed conversion knows every shard's true count), and `convert` gathers them into
`skipped.json`.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import glob
import hashlib
import itertools
import json
import multiprocessing
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np

from sface_jax import files
from sface_jax import progress
from sface_jax.data import images as images_lib
from sface_jax.data import sources
from sface_jax.data import tfrecord

PLAN_FILE = 'conversion_plan.json'
PLAN_FORMAT = 'sface_jax.conversion_plan/1'
DEFAULT_SHARD_BYTES = 128 << 20
SKIPPED_DIR = 'skipped'  # one list per shard or pair set that left out bad images
CHECK_BATCH = 64  # images decoded per traced call by `check_decodable`


def shard_bounds(num_images: int, num_shards: int) -> np.ndarray:
  """Shard i holds positions [bounds[i], bounds[i + 1]) of the permutation."""
  return (np.arange(num_shards + 1, dtype=np.int64) * num_images) // num_shards


def default_num_shards(source: sources.Source) -> int:
  return -(-source.total_bytes // DEFAULT_SHARD_BYTES)


def make_plan(source: sources.Source, num_shards: int, seed: int, image_size: int | None,
              **details: Any) -> tuple[dict[str, Any], np.ndarray]:
  """(the plan as JSON, the permutation dealing images to shards)."""
  permutation = np.random.default_rng(seed).permutation(source.num_images)
  bounds = shard_bounds(source.num_images, num_shards)
  plan = {
      'format': PLAN_FORMAT,
      'source_kind': source.kind,
      'source_fingerprint': source.fingerprint,
      'num_images': source.num_images,
      'num_classes': source.num_classes,
      'num_shards': num_shards,
      'seed': seed,
      'image_size': image_size,
      # Guards against a NumPy whose permutation for this seed differs.
      'permutation_sha256': hashlib.sha256(permutation.astype('<i8').tobytes()).hexdigest(),
      'shards': [{'file': tfrecord.shard_name(i, num_shards),
                  'num_examples': int(bounds[i + 1] - bounds[i])} for i in range(num_shards)],
      **details,
  }
  return plan, permutation


def claim_output(output: str, plan: dict[str, Any]) -> bool:
  """Creates or checks the output folder for `plan`; True when resuming the same plan.

  A folder holding another plan, or shards without a plan, is refused (nothing is touched).
  """
  os.makedirs(output, exist_ok=True)
  plan_path = os.path.join(output, PLAN_FILE)
  hint = f'choose another --output, or delete {output} to convert into it afresh'
  if os.path.exists(plan_path):
    try:
      with open(plan_path) as f:
        old = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
      raise sources.SourceError(f'{plan_path}: unreadable ({e}); {hint}') from None
    if old != plan:
      diff = sorted(k for k in set(old) | set(plan) if old.get(k) != plan.get(k))
      raise sources.SourceError(
          f'{output} already holds a different dataset or conversion: {plan_path} differs in '
          f'{", ".join(diff)}; {hint}')
    return True
  leftovers = sorted(glob.glob(os.path.join(output, 'train-*.tfrecord')))
  if os.path.exists(os.path.join(output, tfrecord.INFO_FILE)) or leftovers:
    found = tfrecord.INFO_FILE if not leftovers else os.path.basename(leftovers[0])
    raise sources.SourceError(f'{output} already holds a dataset ({found}) that this '
                              f'conversion did not plan (no {PLAN_FILE}); {hint}')
  with files.atomic_write(plan_path) as f:
    json.dump(plan, f, indent=1)
  return False


def missing_shards(output: str, plan: dict[str, Any]) -> list[int]:
  files.remove_stale(os.path.join(output, 'train-*.tfrecord'))
  files.remove_stale(os.path.join(output, SKIPPED_DIR, '*.json'))
  return [i for i, s in enumerate(plan['shards'])
          if not os.path.exists(os.path.join(output, s['file']))]


# ---------------------------------------------------------------------------------------
# Bad images: found by decoding, then fatal or skipped and listed.


def check_decodable(examples: Iterable[sources.Example]) -> Iterator[sources.Example]:
  """`examples`, in order, with `error` set on each image training's decoder refuses."""
  iterator = iter(examples)
  while chunk := list(itertools.islice(iterator, CHECK_BATCH)):
    good = [i for i, example in enumerate(chunk) if example.error is None]
    refused = images_lib.find_undecodable([chunk[i].image for i in good])
    for j, reason in refused.items():
      example = chunk[good[j]]
      chunk[good[j]] = dataclasses.replace(
          example, image=b'', error=images_lib.ImageError(example.where, reason))
    yield from chunk


def keep(example: sources.Example, skip_bad: bool, skipped: list[dict[str, str]]) -> bool:
  """Whether to store `example`; a bad one is listed in `skipped` (skip_bad) or raised."""
  if example.error is None:
    return True
  if not skip_bad:
    raise example.error
  skipped.append({'image': example.where, 'reason': example.error.reason})
  return False


def skip_list_path(output: str, unit: str) -> str:
  """Where the list of images skipped in `unit` (a shard or pair-set file) goes."""
  return os.path.join(output, SKIPPED_DIR, unit.replace('/', '-') + '.json')


def write_skip_list(output: str, unit: str, skipped: list[dict[str, str]]) -> None:
  """Records what `unit` left out (nothing: no file), before `unit` itself is renamed."""
  path = skip_list_path(output, unit)
  if os.path.exists(path):
    os.remove(path)
  if skipped:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with files.atomic_write(path) as f:
      json.dump(skipped, f, indent=1)


def read_skip_list(output: str, unit: str) -> list[dict[str, str]]:
  path = skip_list_path(output, unit)
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return json.load(f)


# ---------------------------------------------------------------------------------------
# Writing (in worker processes).


@dataclasses.dataclass(frozen=True)
class _ShardTask:
  path: str
  positions: np.ndarray  # into the source's image list, in writing order


# Set once per worker process by `_init_worker`: the source is pickled once per worker,
# not once per shard (MS1MV2's key and offset tables are ~90 MB).
_SOURCE: sources.Source | None = None
_IMAGE_SIZE: int | None = None
_SKIP_BAD = False
_COUNTERS = None


def _init_worker(source, image_size, skip_bad, counters) -> None:
  global _SOURCE, _IMAGE_SIZE, _SKIP_BAD, _COUNTERS
  _SOURCE, _IMAGE_SIZE, _SKIP_BAD, _COUNTERS = source, image_size, skip_bad, counters
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')


def _write_shard(task: _ShardTask) -> int:
  """Writes one shard atomically, with its skip list; returns its example count."""
  tf = images_lib.tensorflow()
  output, name = os.path.split(task.path)
  count = pending_images = pending_bytes = 0
  skipped = []
  with files.atomic_path(task.path) as tmp, tf.io.TFRecordWriter(tmp) as writer:
    for example in check_decodable(_SOURCE.examples(task.positions, _IMAGE_SIZE)):
      if keep(example, _SKIP_BAD, skipped):
        writer.write(tfrecord.encode_example(example.image, example.label))
        count += 1
      pending_images += 1
      pending_bytes += example.nbytes
      if pending_images == CHECK_BATCH:
        _count(pending_images, pending_bytes)
        pending_images = pending_bytes = 0
    write_skip_list(output, name, skipped)
  _count(pending_images, pending_bytes)
  return count


def _count(images: int, nbytes: int) -> None:
  if _COUNTERS is not None and images:
    for counter, value in zip(_COUNTERS, (images, nbytes)):
      with counter.get_lock():
        counter.value += value


def write_shards(source: sources.Source, output: str, plan: dict[str, Any],
                 permutation: np.ndarray, shards: list[int], *, image_size: int | None,
                 workers: int, progress_interval: float, log: Callable[[str], None],
                 skip_bad: bool = False) -> None:
  """Writes `shards` (indices into the plan) with `workers` processes, logging progress.
  A bad image raises its `ImageError`, or with `skip_bad` is left out and listed."""
  if not shards:
    return
  bounds = shard_bounds(source.num_images, plan['num_shards'])
  tasks = [_ShardTask(os.path.join(output, plan['shards'][i]['file']),
                      permutation[bounds[i]:bounds[i + 1]]) for i in shards]
  total_images = sum(len(t.positions) for t in tasks)
  total_bytes = int(source.total_bytes * total_images / max(source.num_images, 1))
  ctx = multiprocessing.get_context('spawn')
  counters = (ctx.Value('q', 0), ctx.Value('q', 0))
  with _Reporter(counters, total_images, total_bytes, progress_interval, log) as reporter:
    if workers <= 1 or len(tasks) == 1:
      _init_worker(source, image_size, skip_bad, counters)
      try:
        for task in tasks:
          _write_shard(task)
      finally:
        _init_worker(None, None, False, None)
    else:
      with concurrent.futures.ProcessPoolExecutor(
          max_workers=min(workers, len(tasks)), mp_context=ctx, initializer=_init_worker,
          initargs=(source, image_size, skip_bad, counters)) as pool:
        futures = [pool.submit(_write_shard, t) for t in tasks]
        try:
          for future in concurrent.futures.as_completed(futures):
            future.result()
        except BaseException:
          for f in futures:
            f.cancel()
          raise
    log(reporter.line(final=True))


class _Reporter:
  """Logs images done, images/s and MB/s over the last interval (so the workers' start-up
  does not dilute them) and the ETA, every `interval` seconds, from a thread."""

  def __init__(self, counters, total_images: int, total_bytes: int, interval: float,
               log: Callable[[str], None]):
    self.counters, self.interval, self.log = counters, interval, log
    self.images = progress.Progress(total_images)
    self.bytes = progress.Progress(total_bytes)
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, daemon=True)

  def __enter__(self) -> '_Reporter':
    if self.interval > 0:
      self._thread.start()
    return self

  def __exit__(self, *exc) -> None:
    self._stop.set()
    if self._thread.is_alive():
      self._thread.join()

  def line(self, final: bool = False) -> str:
    images, nbytes = (c.value for c in self.counters)
    if final:  # the whole run's averages
      elapsed = max(self.images.elapsed(), 1e-9)
      rate, byte_rate = images / elapsed, nbytes / elapsed
    else:
      rate, left = self.images.measure(images)
      byte_rate, _ = self.bytes.measure(nbytes)
    total = self.images.total
    text = (f'convert: {images:,}/{total:,} images ({100 * images / max(total, 1):.1f}%)  '
            f'{rate:,.0f} images/s  {byte_rate / 1e6:,.1f} MB/s')
    if final:
      return text + f'  in {self.images.elapsed():.1f} s overall'
    return text + f'  ETA {progress.format_duration(left)}'

  def _run(self) -> None:
    while not self._stop.wait(self.interval):
      self.log(self.line())
