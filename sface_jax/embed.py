"""Embeddings of aligned face images with a trained backbone: the command after training.

  python -m sface_jax.embed --workdir DIR --images FOLDER --output emb.npy [--flip]
  python -m sface_jax.embed --checkpoint DIR/checkpoints/20000 --images list.txt \
      --output emb.npy

writes `emb.npy`, float32 (N, D), the raw embeddings (not L2-normalised: their norm is a
quality signal, AdaFace's; `evaluation.identification` and the verification protocol
normalise for themselves), and beside it `emb.json`: the image paths in row order, and what
made the array (checkpoint, step, model, input size, flip).

Decisions, each for a reason:
* Input: a folder is searched recursively for image files (the extensions
  `data.images.EXTENSIONS` lists, hidden entries skipped), in natural order of their path
  (s2/10.pgm after s2/9.pgm), recorded relative to the folder, so `<identity>/<image>`
  folders keep their identity in the path. A LIST is a text file, one path per line (blank
  lines skipped, no comment syntax: '#' is a legal first character of a file name); relative
  paths are taken relative to the list's own folder, so a list travels with its images, and
  are recorded as written.
* Pixels: decoded exactly as evaluation and training decode them (`data.images.decode`,
  the one decoder: RGB, 16-bit PNGs to their high byte; bilinear resize to the model's input
  size when the size differs); formats other than JPEG/PNG (PGM,
  BMP, ...) first become PNG as the dataset converter stores them (`encode_for_storage`), so
  an image embeds the same whether it came through a converted dataset or this command.
* Faces must already be aligned (`data.align` makes 112 × 112 ArcFace crops from 5
  landmarks); nothing here detects or aligns.
* `--flip` gives the evaluation embedding, embed(x) + embed(flip(x)) (`evaluation.embedding`);
  without it, the plain embed(x), half the compute.
* Bad input: every path is checked before the model loads (a missing file is an error naming
  it, and its line in a LIST); an unreadable image stops the run with its path and line.
  Outputs are written under temporary names and renamed when complete (`files.atomic_path`):
  a failed or interrupted run (Ctrl-C, SIGTERM: both unwind, removing the temporaries, and
  exit with 128 + the signal number) leaves the previous `emb.npy`/`emb.json`, if any,
  untouched, and no partial file; only SIGKILL leaves a temporary, which the next run to
  that output deletes. The array is renamed first and the list last.
* Several hosts: every process decodes every batch (simple, and embedding is rarely
  multi-host); process 0 writes the files.
"""

import argparse
import concurrent.futures
import contextlib
import dataclasses
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence

import jax
import numpy as np

from sface_jax import arguments
from sface_jax import checkpoint
from sface_jax import cli
from sface_jax import compilation_cache
from sface_jax import files
from sface_jax import progress
from sface_jax import sharding
from sface_jax.data import images as images_lib
from sface_jax.data import sources
from sface_jax.evaluation import embedding

PROGRESS_SECONDS = 10.0


@dataclasses.dataclass(frozen=True)
class ImageList:
  """Image files in embedding order: `names[i]` as recorded, `paths[i]` to open, and
  `where(i)` to name it in an error ('list.txt line 7: a/b.jpg' or the path)."""
  source: str
  names: tuple[str, ...]
  paths: tuple[str, ...]
  lines: tuple[int, ...] | None = None  # 1-based line numbers when the source is a list

  def where(self, index: int) -> str:
    if self.lines is None:
      return self.paths[index]
    return f'{self.source} line {self.lines[index]}: {self.names[index]}'


def list_images(source: str) -> ImageList:
  """The image files of a folder (recursive) or of a LIST file; see the module docstring."""
  if os.path.isdir(source):
    found = []
    for folder, subfolders, names in os.walk(source):
      subfolders[:] = [d for d in subfolders if not d.startswith('.')]
      for name in names:
        if not name.startswith('.') and os.path.splitext(name)[1].lower() in \
            images_lib.EXTENSIONS:
          found.append(os.path.relpath(os.path.join(folder, name), source))
    found.sort(key=lambda p: [sources.natural_key(part) for part in p.split(os.sep)])
    if not found:
      raise FileNotFoundError(f'{source}: no image files (extensions '
                              f'{" ".join(sorted(images_lib.EXTENSIONS))})')
    return ImageList(source, tuple(found), tuple(os.path.join(source, p) for p in found))
  if not os.path.isfile(source):
    raise FileNotFoundError(f'{source}: no such folder or image list')
  try:
    with open(source, encoding='utf-8') as f:
      text = f.read()
  except (OSError, UnicodeDecodeError) as e:
    raise ValueError(f'{source}: cannot read the image list ({type(e).__name__}: {e})') \
        from None
  base = os.path.dirname(os.path.abspath(source))
  names, paths, lines = [], [], []
  for number, line in enumerate(text.splitlines(), 1):
    name = line.strip()
    if not name:
      continue
    names.append(name)
    paths.append(os.path.join(base, name))  # an absolute `name` stays as it is
    lines.append(number)
  if not names:
    raise ValueError(f'{source}: the image list names no files')
  return ImageList(source, tuple(names), tuple(paths), tuple(lines))


def check_exist(image_list: ImageList) -> None:
  """Every file is there, or an error naming the first one missing (and its line)."""
  for i, path in enumerate(image_list.paths):
    if not os.path.isfile(path):
      raise FileNotFoundError(f'{image_list.where(i)}: no such file')


def read_image(path: str, image_size: int, where: str) -> np.ndarray:
  """uint8 (S, S, 3) pixels of one image file, as evaluation decodes them."""
  try:
    with open(path, 'rb') as f:
      data = f.read()
  except OSError as e:
    raise images_lib.ImageError(where, f'cannot read ({e.strerror or e})') from None
  if images_lib.image_format(data) is None:  # PGM, BMP, ...: stored as PNG, like convert
    data, _ = images_lib.encode_for_storage(data, where)
  return images_lib.decode(data, image_size, where=where)


def decoded_batches(image_list: ImageList, image_size: int, batch_size: int, *,
                    workers: int | None = None) -> Iterator[np.ndarray]:
  """uint8 (b, S, S, 3) batches in order, decoded by a thread pool one batch ahead
  (TensorFlow's decoder and Pillow's resize release the GIL while they work)."""
  arguments.check_positive(batch_size=batch_size, workers=workers)
  count = len(image_list.paths)
  workers = workers or min(32, os.cpu_count() or 1)
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    def submit(start):
      return [pool.submit(read_image, image_list.paths[i], image_size, image_list.where(i))
              for i in range(start, min(start + batch_size, count))]
    upcoming = submit(0)
    for start in range(0, count, batch_size):
      current = upcoming
      upcoming = submit(start + batch_size) if start + batch_size < count else []
      try:
        yield np.stack([future.result() for future in current])
      except BaseException:
        for future in upcoming:
          future.cancel()
        raise


def output_paths(output: str) -> tuple[str, str]:
  """(emb.npy, emb.json) for --output emb.npy."""
  if not output.endswith('.npy'):
    raise ValueError(f'--output {output}: expected a .npy file name (the file list goes '
                     'beside it, .json)')
  return output, output[:-len('.npy')] + '.json'


def embed_files(model, variables, image_list: ImageList, *, image_size: int, batch_size: int,
                output: str, flip: bool = False, mesh=None, metadata: dict | None = None,
                log=print, progress_seconds: float = PROGRESS_SECONDS) -> tuple[int, int]:
  """Embeds every image of `image_list` into `output` (.npy) and writes the list beside it.

  Returns (images, embedding dim). Rows go into a memory-mapped temporary .npy as they come,
  so host memory holds a few batches, not the whole array.
  """
  arguments.check_positive(batch_size=batch_size, image_size=image_size)
  array_path, list_path = output_paths(output)
  directory = os.path.dirname(os.path.abspath(array_path))
  os.makedirs(directory, exist_ok=True)
  files.remove_stale(array_path)
  files.remove_stale(list_path)
  total = len(image_list.paths)
  writer = jax.process_index() == 0
  clock = progress.Progress(total)
  done, dim, last_print = 0, None, time.perf_counter()
  with contextlib.ExitStack() as stack:
    if writer:  # the list is renamed last (contexts close inner first)
      list_tmp = stack.enter_context(files.atomic_path(list_path))
      array_tmp = stack.enter_context(files.atomic_path(array_path))
    array = None
    batches = decoded_batches(image_list, image_size, batch_size)
    for embeddings in embedding.embed_batches(model, variables, batches, batch_size=batch_size,
                                              mesh=mesh, flip=flip):
      count = embeddings.shape[0]
      if dim is None:
        dim = embeddings.shape[1]
        if writer:
          array = np.lib.format.open_memmap(array_tmp, mode='w+', dtype=np.float32,
                                            shape=(total, dim))
        clock.restart(count)  # the first batch compiled: the rate counts from here
      if writer:
        array[done:done + count] = embeddings
      done += count
      now = time.perf_counter()
      if progress_seconds >= 0 and now - last_print >= progress_seconds and done < total:
        rate, left = clock.measure(done)
        last_print = now
        log(f'embed: {done:,}/{total:,} images ({100 * done / total:.1f}%)  '
            f'{rate:,.0f} images/s  ETA {progress.format_duration(left)}')
    if done != total:
      raise RuntimeError(f'embedded {done} of {total} images')  # not reachable: a bug
    if writer:
      array.flush()
      del array
      record = dict(metadata or {}, count=total, dim=dim, flip=flip, normalized=False,
                    image_size=image_size, source=os.path.abspath(image_list.source),
                    files=list(image_list.names))
      with open(list_tmp, 'w', encoding='utf-8') as f:
        json.dump(record, f, indent=1, ensure_ascii=False)
  elapsed = max(clock.elapsed(), 1e-9)
  log(f'embed: {total:,} images in {elapsed:.1f} s ({total / elapsed:,.0f} images/s overall, '
      f'compilation included)')
  return total, dim


@contextlib.contextmanager
def _signals_interrupt():
  """SIGTERM raises KeyboardInterrupt, as SIGINT does, so that an interrupted run unwinds
  (removing its temporary files) instead of dying where it stands. Yields {'signal': the
  signal received} (SIGINT until one is); the previous handlers come back on exit. Off the
  main thread, where Python cannot set handlers, nothing changes."""
  received = {'signal': signal.SIGINT}
  if threading.current_thread() is not threading.main_thread():
    yield received
    return

  def interrupt(signum, frame):
    del frame
    received['signal'] = signal.Signals(signum)
    raise KeyboardInterrupt

  previous = {s: signal.signal(s, interrupt) for s in (signal.SIGINT, signal.SIGTERM)}
  try:
    yield received
  finally:
    for signum, handler in previous.items():
      signal.signal(signum, handler)


def _parse_args(argv):
  parser = argparse.ArgumentParser(
      prog='python -m sface_jax.embed', formatter_class=cli.HelpFormatter,
      description='Embeddings of aligned face images with a trained backbone.')
  checkpoint.add_source_arguments(parser)
  parser.add_argument('--images', required=True,
                      help='a folder (searched recursively) or a text file with one image '
                           'path per line (relative to the file)')
  parser.add_argument('--output', required=True,
                      help='the .npy to write; the file list goes beside it as .json')
  parser.add_argument('--flip', action='store_true',
                      help='embed(x) + embed(flip(x)), the evaluation embedding')
  parser.add_argument('--batch-size', type=arguments.positive_int, default=None,
                      help="images per step; default: the run's config.eval.batch_size")
  parser.add_argument('--model', default=None,
                      help='architecture to load the weights into; default: the trained one')
  compilation_cache.add_arguments(parser)  # --compilation-cache-dir, --no-compilation-cache
  return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
  args = _parse_args(argv)
  try:
    output_paths(args.output)
    image_list = list_images(args.images)
    check_exist(image_list)
    workdir, step = checkpoint.resolve(args.workdir or args.checkpoint)
    config, model, variables = checkpoint.load_for_inference(args.workdir or args.checkpoint,
                                                             model_name=args.model)
  except (FileNotFoundError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  mesh = sharding.make_mesh() if jax.device_count() > 1 else None
  batch_size = args.batch_size if args.batch_size is not None else config.eval.batch_size
  metadata = {'checkpoint': workdir, 'step': step, 'model': args.model or config.model.name}
  print(f'embedding {len(image_list.paths):,} images with {metadata["model"]} '
        f'(step {step}) on {jax.device_count()} device(s), batches of {batch_size}'
        f'{", flip-summed" if args.flip else ""}', file=sys.stderr)
  try:
    with _signals_interrupt() as received:
      count, dim = embed_files(model, variables, image_list,
                               image_size=config.data.image_size, batch_size=batch_size,
                               output=args.output, flip=args.flip, mesh=mesh,
                               metadata=metadata,
                               log=lambda line: print(line, file=sys.stderr, flush=True))
  except (OSError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  except KeyboardInterrupt:
    signum = received['signal']
    print(f'embed: interrupted ({signum.name}); {args.output} not written (a previous one '
          'is as it was)', file=sys.stderr, flush=True)
    return 128 + signum
  _, list_path = output_paths(args.output)
  print(f'wrote {args.output} ({count:,} × {dim} float32) and {list_path}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
