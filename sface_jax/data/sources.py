"""Where training images come from: an insightface RecordIO folder or an image folder.

A source is opened once (`open_source`), which checks it and fixes what the converter's
plan depends on (fingerprint, class and image counts, sizes); then `examples(positions)`
yields the images at those positions, one method per kind, in the order asked.

  insightface folder: `train.rec`, `train.idx`, `property` and any `*.bin` pair sets (MS1MV2
    `faces_emore`, Glint360K, CASIA-WebFace `faces_webface_112x112`, ...); MXNet is not
    needed. The path may also name the `.rec` itself.
  image folder: `root/<identity>/<image>`; identities sorted by name (digit runs compared as
    numbers: s2 < s10) get labels 0..C-1; JPEG and PNG files are stored as they are, anything
    else Pillow reads (PGM, BMP, TIFF, WebP, ...) as PNG. `*.bin` files in `root` are pair
    sets too.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import glob
import hashlib
import os
import re
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar

import numpy as np

from sface_jax.data import images as images_lib
from sface_jax.data import recordio



class SourceError(ValueError):
  """Bad input; the message names the file and the record or key."""


@dataclasses.dataclass(frozen=True)
class Example:
  """One image of a source, as the converter stores it, or why it cannot be stored."""
  image: bytes  # the file bytes to store (b'' when `error` is set)
  label: int
  nbytes: int  # bytes read from the source
  where: str  # the file, or the record file and key, for messages
  error: images_lib.ImageError | None = None  # a bad image: skipped or fatal (convert)


def natural_key(name: str) -> list[Any]:
  """Sort key comparing digit runs as numbers: s2 < s10."""
  return [int(t) if t.isdigit() else t for t in re.split(r'(\d+)', name)]


def identity_folders(root: str) -> list[str]:
  """The identity sub-folders of `root`, in label order."""
  if not os.path.isdir(root):
    raise SourceError(f'{root}: not a folder')
  return sorted((e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith('.')),
                key=natural_key)


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
      raise SourceError(f'identity {name!r} is not a folder of the input')
  if len(set(names)) != len(names):
    raise SourceError(f'identity list {spec!r} names an identity twice')
  return names


def list_image_folder(root: str, identities: str | Sequence[str] | None = None,
                      file_pattern: str | None = None) -> tuple[list[str], list[list[str]]]:
  """(identity names in label order, their image paths), each identity non-empty.
  `file_pattern` (a glob on file names, e.g. '*.pgm') keeps only matching files."""
  names = parse_identities(identities, identity_folders(root))
  names = sorted(names, key=natural_key)
  if not names:
    raise SourceError(f'{root}: no identity folders (expected root/<identity>/<image>)')
  return names, [_list_identity(root, n, file_pattern) for n in names]


def _list_identity(root: str, name: str, file_pattern: str | None) -> list[str]:
  folder = os.path.join(root, name)
  found = sorted((e.name for e in os.scandir(folder)
                  if e.is_file() and not e.name.startswith('.')
                  and os.path.splitext(e.name)[1].lower() in images_lib.EXTENSIONS
                  and (file_pattern is None or fnmatch.fnmatch(e.name, file_pattern))),
                 key=natural_key)
  if not found:
    wanted = (f'matching {file_pattern!r}' if file_pattern else
              f'with extensions {" ".join(sorted(images_lib.EXTENSIONS))}')
    raise SourceError(f'{folder}: empty identity folder (no image files {wanted})')
  return [os.path.join(folder, f) for f in found]


def sha256_file(path: str, head_tail: int | None = None) -> str:
  """SHA-256 of a file, or of its first and last `head_tail` bytes and its size."""
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


@dataclasses.dataclass(frozen=True)
class Source:
  """What the converter's plan needs to know about a source, and its `*.bin` pair sets."""
  kind: ClassVar[str]  # recorded in the plan
  description: str
  fingerprint: str  # changes when the input does
  num_classes: int
  num_images: int
  total_bytes: int
  image_size: tuple[int, int] | None
  pair_set_files: tuple[str, ...]

  def examples(self, positions: np.ndarray, image_size: int | None) -> Iterator[Example]:
    """The examples at `positions` (indices into the source's image list), in that order;
    resized to image_size × image_size (re-encoded) when given. A bad image comes as an
    example with `error` set; a bad record or file raises an error naming it."""
    raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class InsightFaceSource(Source):
  """An insightface `.rec`: image record `keys[i]` lies at byte `offsets[i]`."""
  kind: ClassVar[str] = 'insightface'
  rec_path: str = ''
  keys: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int64))
  offsets: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int64))

  def examples(self, positions, image_size, chunk: int = 8192):
    # Records are read `chunk` at a time, each chunk in file order (forward through the
    # file, which read-ahead likes), so memory stays bounded whatever the shard size.
    with recordio.RecordFile(self.rec_path) as rec:
      for start in range(0, len(positions), chunk):
        yield from self._chunk(rec, np.asarray(positions[start:start + chunk]), image_size)

  def _chunk(self, rec, positions, image_size):
    keys, offsets = self.keys[positions], self.offsets[positions]
    payloads = [b''] * len(positions)
    for i in np.argsort(offsets, kind='stable'):
      payloads[i] = rec.read_at(int(offsets[i]), int(keys[i]))
    for i in range(len(payloads)):
      payload, payloads[i] = payloads[i], b''
      where = f'{self.rec_path}: key {int(keys[i])} (byte offset {int(offsets[i])})'
      header, image = recordio.unpack(payload, where)
      label = recordio.image_label(header, where)
      if not 0 <= label < self.num_classes:
        raise SourceError(f'{where}: label {label} outside [0, {self.num_classes})')
      if images_lib.image_format(image) is None:
        yield Example(b'', label, len(payload), where, images_lib.ImageError(
            where, f'payload is not a JPEG or PNG (starts with {image[:8].hex(" ")})'))
      elif image_size:
        yield _stored(image, label, len(payload), where, image_size)
      else:
        yield Example(image, label, len(payload), where)


@dataclasses.dataclass(frozen=True)
class ImageFolderSource(Source):
  """`files[i]` is (path, label); `identity_names[label]` is the folder's name."""
  kind: ClassVar[str] = 'image_folder'
  files: tuple[tuple[str, int], ...] = ()
  identity_names: tuple[str, ...] = ()

  def examples(self, positions, image_size):
    for position in positions:
      path, label = self.files[int(position)]
      yield read_example(path, label, image_size, self.image_size)


def read_example(path: str, label: int, image_size: int | None = None,
                 expected_size: tuple[int, int] | None = None) -> Example:
  """An image file as an `Example` (see `images.encode_for_storage` for the sizes)."""
  with open(path, 'rb') as f:
    data = f.read()
  return _stored(data, label, len(data), path, image_size, expected_size)


def _stored(data: bytes, label: int, nbytes: int, where: str, image_size: int | None,
            expected_size: tuple[int, int] | None = None) -> Example:
  try:
    image = images_lib.encode_for_storage(data, where, image_size, expected_size)[0]
  except images_lib.ImageError as e:
    return Example(b'', label, nbytes, where, e)
  return Example(image, label, nbytes, where)


def is_insightface(path: str) -> bool:
  return (os.path.isfile(path) and path.endswith('.rec')) or \
      os.path.exists(os.path.join(path, 'train.rec'))


def open_insightface(path: str, num_classes: int | None = None) -> InsightFaceSource:
  """Opens and checks an insightface folder (or its `.rec`)."""
  if os.path.isdir(path):
    rec_path = os.path.join(path, 'train.rec')
  else:
    rec_path, path = path, os.path.dirname(path) or '.'
  if not os.path.exists(rec_path):
    raise SourceError(f'{rec_path} not found')
  idx_path = os.path.splitext(rec_path)[0] + '.idx'
  with recordio.InsightFaceRecord(rec_path, idx_path, num_classes=num_classes) as data:
    if data.num_classes is None:
      raise SourceError(
          f'{rec_path}: the number of classes is unknown (no {data.property_path} and no '
          'identity table in record 0); pass --num-classes')
    keys = data.image_keys
    offsets = data.records.offsets[np.searchsorted(data.records.keys, keys)]
    h = hashlib.sha256()
    h.update(sha256_file(idx_path).encode())
    h.update(sha256_file(rec_path, head_tail=1 << 20).encode())
    if data.property is not None:
      h.update(repr(data.property).encode())
    image_size = data.image_size
    if image_size is None and keys.size:
      first = data.read_image(int(keys[0]))[0]
      image_size = images_lib.encode_for_storage(first, f'{rec_path}: key {int(keys[0])}')[1]
    return InsightFaceSource(
        description=f'insightface RecordIO {os.path.abspath(rec_path)}',
        fingerprint=h.hexdigest(), num_classes=int(data.num_classes),
        num_images=int(keys.size), total_bytes=data.records.size,
        image_size=tuple(image_size) if image_size else None,
        pair_set_files=tuple(sorted(glob.glob(os.path.join(path, '*.bin')))),
        rec_path=rec_path, keys=keys, offsets=offsets)


def open_image_folder(root: str, identities: str | Sequence[str] | None = None,
                      file_pattern: str | None = None) -> ImageFolderSource:
  """Lists and checks an image folder (every identity non-empty, the first image readable)."""
  names, paths = list_image_folder(root, identities, file_pattern)
  h = hashlib.sha256()
  listed, total = [], 0
  for label, (name, group) in enumerate(zip(names, paths)):
    for path in group:
      size = os.path.getsize(path)
      total += size
      listed.append((path, label))
      h.update(f'{name}/{os.path.basename(path)}\t{size}\n'.encode())
  with open(listed[0][0], 'rb') as f:
    first_size = images_lib.encode_for_storage(f.read(), listed[0][0])[1]
  return ImageFolderSource(
      description=f'image folder {os.path.abspath(root)}', fingerprint=h.hexdigest(),
      num_classes=len(names), num_images=len(listed), total_bytes=total,
      image_size=first_size,
      pair_set_files=tuple(sorted(glob.glob(os.path.join(root, '*.bin')))),
      files=tuple(listed), identity_names=tuple(names))
