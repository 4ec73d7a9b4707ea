"""Converter throughput (MB/s of `.rec` read) next to `cat` of the same bytes, same run.

  python bench/convert.py [--source ../shared/data/orl/insightface] [--megabytes 300]
                          [--workers 1 2] [--keep DIR]

The shared ORL `train.rec` (300 JPEGs written by MXNet) is replicated into a temporary
insightface dataset of about `--megabytes` MB (same images, same labels, records rewritten with
our MXNet-compatible writer), so the figure is stable and the page cache holds it: both `cat`
and the converter then read from memory, and the comparison is CPU cost, not disk speed.

Rows:
  cat > /dev/null        the floor: bytes through a pipe-less read loop
  reader only            sface_jax.data.recordio: every image record read and unpacked (no TF)
  convert CLI --workers P  the full command in a fresh process: start-up (TensorFlow import in
                         each worker), reading, tf.train.Example encoding, TFRecord writing,
                         rename. "steady" is the median of the progress line's 0.5 s windows
                         once images flow: the rate a 100 GB conversion would run at.
"""

import argparse
import os
import pathlib
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / 'tests'))  # the RecordIO writer is a test fixture

# pylint: disable=g-import-not-at-top,wrong-import-position
import recordio_writer
from sface_jax.data import recordio


def build(source: pathlib.Path, directory: pathlib.Path, megabytes: float) -> int:
  with recordio.InsightFaceRecord(str(source / 'train.rec')) as data:
    images = [(image, label) for _, image, label in data.iter_images()]
  copies = max(1, int(megabytes * 1e6 / sum(len(im) + 40 for im, _ in images)))
  by_label = sorted(((im, label) for im, label in images for _ in range(copies)),
                    key=lambda r: r[1])
  recordio_writer.write_insightface(str(directory), by_label)
  return len(by_label)


def timed(command, **kwargs) -> float:
  start = time.perf_counter()
  subprocess.run(command, check=True, **kwargs)
  return time.perf_counter() - start


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument('--source', default=str(REPO_ROOT.parent / 'shared' / 'data' / 'orl' /
                                              'insightface'))
  parser.add_argument('--megabytes', type=float, default=300)
  parser.add_argument('--workers', type=int, nargs='+', default=[1, 2])
  parser.add_argument('--repeats', type=int, default=2)
  parser.add_argument('--keep', default=None, help='build the dataset here and keep it')
  args = parser.parse_args()

  work = pathlib.Path(args.keep or tempfile.mkdtemp(prefix='bench_convert_'))
  work.mkdir(parents=True, exist_ok=True)
  data_dir = work / 'rec'
  data_dir.mkdir(exist_ok=True)
  if not (data_dir / 'train.rec').exists():
    build(pathlib.Path(args.source), data_dir, args.megabytes)
  rec = data_dir / 'train.rec'
  size = rec.stat().st_size
  with recordio.InsightFaceRecord(str(rec)) as data:
    num_images = data.num_images

  rows = []
  subprocess.run(['cat', str(rec)], stdout=subprocess.DEVNULL, check=True)  # warm the cache
  best = min(timed(['cat', str(rec)], stdout=subprocess.DEVNULL) for _ in range(args.repeats))
  rows.append(('cat > /dev/null', best))

  def read_all():
    start = time.perf_counter()
    with recordio.InsightFaceRecord(str(rec)) as data:
      for _ in data.iter_images():
        pass
    return time.perf_counter() - start
  rows.append(('reader only (recordio, 1 process)', min(read_all() for _ in range(args.repeats))))

  env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), TF_CPP_MIN_LOG_LEVEL='2')
  steady = {}
  for workers in args.workers:
    times, windows = [], []
    for _ in range(args.repeats):
      out = work / f'out_{workers}'
      shutil.rmtree(out, ignore_errors=True)
      start = time.perf_counter()
      result = subprocess.run(
          [sys.executable, '-m', 'sface_jax.tools.convert', '--input', str(data_dir),
           '--output', str(out), '--workers', str(workers), '--progress-interval', '0.5'],
          env=env, stderr=subprocess.PIPE, text=True, check=True)
      times.append(time.perf_counter() - start)
      # Progress lines give the rate over each 0.5 s window; the windows after the first one
      # with images in it are the steady state (start-up excluded).
      rates = [float(m.group(1).replace(',', '')) for m in
               re.finditer(r'images/s +([\d,.]+) MB/s +ETA', result.stderr)]
      rates = [r for r in rates if r > 0][1:-1]
      windows += rates
      num_shards = len(list(out.glob('train-*.tfrecord')))
    name = f'convert CLI --workers {workers} ({num_shards} shards)'
    rows.append((name, min(times)))
    if windows:
      steady[name] = statistics.median(windows)

  print(f'# bench/convert.py  {time.strftime("%Y-%m-%d")}  {platform.node()}  '
        f'nproc={os.cpu_count()}  python {platform.python_version()}  '
        f'load average {os.getloadavg()[0]:.1f}')
  print(f'# input: {rec} {size / 1e6:.1f} MB, {num_images:,} images (best of {args.repeats})')
  print()
  print('| what | wall s | MB/s (wall) | images/s (wall) | MB/s steady (after start-up) |')
  print('|---|---:|---:|---:|---:|')
  for name, seconds in rows:
    extra = f'{steady[name]:,.0f}' if name in steady else ''
    print(f'| {name} | {seconds:.2f} | {size / 1e6 / seconds:,.0f} | '
          f'{num_images / seconds:,.0f} | {extra} |')
  if not args.keep:
    shutil.rmtree(work)


if __name__ == '__main__':
  main()
