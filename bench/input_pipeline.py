"""Input-pipeline throughput on the CPU: sface_jax.data.pipeline at 1 and 2 threads, next to a
plain Python loop that decodes the same JPEGs with PIL and normalises them the same way.

The data: the AT&T/ORL faces (../shared/data/orl/faces), each turned into several 112 x 112
variants (random crop, mirror, brightness) saved as RGB JPEG quality 90 -- the size and format
of insightface's MS1MV2 images -- written as TFRecord shards in a temporary folder.

Also measures what resuming mid-epoch costs: the records the pipeline skips (read and passed
through the shuffle buffer, not decoded) per second, on a larger copy of the same records.

  python bench/input_pipeline.py  # prints a markdown table
"""

import argparse
import io
import os
import pathlib
import platform
import statistics
import sys
import tempfile
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import numpy as np  # pylint: disable=g-import-not-at-top
from PIL import Image
import tensorflow as tf

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # this checkout's sface_jax
from sface_jax.configs import demo  # pylint: disable=wrong-import-position
from sface_jax.data import pipeline
from sface_jax.data import tfrecord

REPO = pathlib.Path(__file__).resolve().parents[1]
FACES = REPO.parent / 'shared' / 'data' / 'orl' / 'faces'
SIZE = 112


def face_jpegs(faces_dir: pathlib.Path, num_images: int, seed: int = 0):
  """num_images (JPEG bytes, label) pairs: variants of the ORL faces, 112 x 112 RGB q90."""
  people = sorted((p for p in faces_dir.iterdir() if p.is_dir()),
                  key=lambda p: int(p.name[1:]))
  sources = [(Image.open(f).convert('L'), label)
             for label, person in enumerate(people)
             for f in sorted(person.glob('*.pgm'))]
  if not sources:
    sys.exit(f'no .pgm faces under {faces_dir}')
  rng = np.random.default_rng(seed)
  out = []
  for i in range(num_images):
    face, label = sources[i % len(sources)]
    w, h = face.size
    scale = rng.uniform(0.8, 1.0)
    cw, ch = int(w * scale), int(h * scale)
    x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    image = face.crop((x0, y0, x0 + cw, y0 + ch)).resize((SIZE, SIZE), Image.BILINEAR)
    if rng.random() < 0.5:
      image = image.transpose(Image.FLIP_LEFT_RIGHT)
    image = image.point(lambda v, g=rng.uniform(0.8, 1.2): min(255, int(v * g)))
    buf = io.BytesIO()
    image.convert('RGB').save(buf, 'JPEG', quality=90)
    out.append((buf.getvalue(), label))
  return out, len(people)


def write_dataset(directory: str, records, num_classes: int, num_shards: int):
  os.makedirs(directory, exist_ok=True)
  shards = []
  for s in range(num_shards):
    name = tfrecord.shard_name(s, num_shards)
    part = records[s::num_shards]
    with tf.io.TFRecordWriter(os.path.join(directory, name)) as writer:
      for image_bytes, label in part:
        writer.write(tfrecord.encode_example(image_bytes, label))
    shards.append((name, len(part)))
  tfrecord.write_info(tfrecord.DatasetInfo(
      directory=directory, num_classes=num_classes, num_examples=len(records),
      image_size=(SIZE, SIZE), shards=tuple(shards), verification={}, source='bench'))
  return tfrecord.read_info(directory)


# The demo's augmentation, to show what it costs per image.
DEMO_AUGMENTATION = pipeline.Augmentation.from_config(demo.get_config().data)


def time_pipeline(info, *, batch_size, steps, threads, shuffle_buffer,
                  augmentation=pipeline.Augmentation()):
  """images/s over `steps` batches, after one warm-up batch (buffer fill, tracing)."""
  it = pipeline.train_dataset(info, batch_size=batch_size, image_size=SIZE, seed=0,
                              augmentation=augmentation, shuffle_buffer=shuffle_buffer,
                              num_threads=threads, process_index=0, process_count=1)
  next(it)
  start = time.perf_counter()
  for _ in range(steps):
    batch = next(it)
  elapsed = time.perf_counter() - start
  assert batch['image'].shape == (batch_size, SIZE, SIZE, 3)
  return steps * batch_size / elapsed


def time_pil(records, *, batch_size, steps):
  """The plain loop: PIL decode, the same flip and normalisation, np.stack; bytes in RAM."""
  rng = np.random.default_rng(0)
  n = len(records)
  start = time.perf_counter()
  for step in range(steps):
    images = []
    for i in range(step * batch_size, (step + 1) * batch_size):
      pixels = np.asarray(Image.open(io.BytesIO(records[i % n][0])).convert('RGB'),
                          np.float32)
      if rng.random() < 0.5:
        pixels = pixels[:, ::-1]
      images.append((pixels - 127.5) / 128.0)
    batch = {'image': np.stack(images),
             'label': np.array([records[i % n][1] for i in
                                range(step * batch_size, (step + 1) * batch_size)], np.int32)}
  elapsed = time.perf_counter() - start
  assert batch['image'].shape == (batch_size, SIZE, SIZE, 3)
  return steps * batch_size / elapsed


def time_first_batch(info, *, batch_size, start_step, shuffle_buffer, threads):
  start = time.perf_counter()
  it = pipeline.train_dataset(info, batch_size=batch_size, image_size=SIZE, seed=0,
                              start_step=start_step, shuffle_buffer=shuffle_buffer,
                              num_threads=threads, process_index=0, process_count=1)
  next(it)
  return time.perf_counter() - start


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--faces', default=str(FACES))
  parser.add_argument('--num_images', type=int, default=3200)
  parser.add_argument('--num_shards', type=int, default=8)
  parser.add_argument('--batch_size', type=int, default=128)
  parser.add_argument('--steps', type=int, default=50, help='timed batches per run')
  parser.add_argument('--repeats', type=int, default=3, help='runs per row; median shown')
  parser.add_argument('--shuffle_buffer', type=int, default=20_000)
  parser.add_argument('--skip_copies', type=int, default=10,
                      help='the resume measurement reads this many copies of the records')
  args = parser.parse_args()

  records, num_classes = face_jpegs(pathlib.Path(args.faces), args.num_images)
  mean_bytes = statistics.mean(len(b) for b, _ in records)
  with tempfile.TemporaryDirectory() as tmp:
    info = write_dataset(os.path.join(tmp, 'faces'), records, num_classes, args.num_shards)
    rows = []
    for name, fn in [
        ('PIL loop (1 Python thread, bytes in RAM)',
         lambda: time_pil(records, batch_size=args.batch_size, steps=args.steps)),
        ('sface_jax pipeline, 1 thread',
         lambda: time_pipeline(info, batch_size=args.batch_size, steps=args.steps,
                               threads=1, shuffle_buffer=args.shuffle_buffer)),
        ('sface_jax pipeline, 2 threads',
         lambda: time_pipeline(info, batch_size=args.batch_size, steps=args.steps,
                               threads=2, shuffle_buffer=args.shuffle_buffer)),
        ('sface_jax pipeline + the demo\'s augmentation, 2 threads',
         lambda: time_pipeline(info, batch_size=args.batch_size, steps=args.steps,
                               threads=2, shuffle_buffer=args.shuffle_buffer,
                               augmentation=DEMO_AUGMENTATION)),
    ]:
      runs = [fn() for _ in range(args.repeats)]
      rows.append((name, statistics.median(runs), min(runs), max(runs)))

    # Resume: the first batch at a step deep in an epoch vs. at step 0 (same buffer fill).
    big = write_dataset(os.path.join(tmp, 'skip'), records * args.skip_copies, num_classes,
                        args.num_shards)
    steps_per_epoch = big.num_examples // args.batch_size
    skipped = (steps_per_epoch - 1) * args.batch_size
    skip_rates = []
    for _ in range(args.repeats):
      t0 = time_first_batch(big, batch_size=args.batch_size, start_step=0,
                            shuffle_buffer=args.shuffle_buffer, threads=2)
      t1 = time_first_batch(big, batch_size=args.batch_size, start_step=steps_per_epoch - 1,
                            shuffle_buffer=args.shuffle_buffer, threads=2)
      skip_rates.append(skipped / max(t1 - t0, 1e-9))
    skip_rate = statistics.median(skip_rates)

  base = rows[0][1]
  print(f'{args.num_images} ORL face variants, {SIZE}x{SIZE} RGB JPEG q90 '
        f'(mean {mean_bytes / 1024:.1f} KiB), {args.num_shards} shards; batch '
        f'{args.batch_size}, {args.steps} batches x {args.repeats} runs (median [min, max]); '
        f'shuffle buffer {args.shuffle_buffer}; python {platform.python_version()}, '
        f'tensorflow {tf.__version__}, {os.cpu_count()} CPUs')
  print()
  print('| input | images/s | vs PIL loop |')
  print('|---|---:|---:|')
  for name, median, low, high in rows:
    print(f'| {name} | {median:,.0f} [{low:,.0f}, {high:,.0f}] | {median / base:.2f}x |')
  print(f'| resume: records skipped (read + shuffled, not decoded; '
        f'{skip_rate * mean_bytes / 2**20:,.0f} MiB/s), 2 threads | '
        f'{skip_rate:,.0f} | {skip_rate / base:.0f}x |')
  print()
  host_records = 5_822_653
  print(f'Resuming mid-epoch on MS1MV2 ({host_records:,} images) on one host skips at most '
        f'one epoch: {host_records / skip_rate / 60:.1f} min at the skip rate above (files '
        f'in page cache; with P hosts, 1/P of that), versus '
        f'{host_records / rows[2][1] / 3600:.1f} h to decode the same records at 2 threads.')


if __name__ == '__main__':
  main()
