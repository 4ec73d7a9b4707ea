"""MXNet RecordIO writing, for test fixtures and benchmarks: byte for byte as dmlc-core does.

The library only reads RecordIO (`sface_jax.data.recordio`); these writers make the `.rec`
files the tests read (split records included) and the insightface layout around them.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterator, Sequence
from typing import BinaryIO

import numpy as np

from sface_jax.data.recordio import (IR_HEADER, MAGIC, MAGIC_BYTES, MAX_PART_LENGTH, PART_FIRST,
                                     PART_LAST, PART_MIDDLE, PART_WHOLE, _FRAME, _mmap,
                                     _read_record)


def pack(label: float | Sequence[float] | np.ndarray, image: bytes,
         id: int = 0, id2: int = 0) -> bytes:  # pylint: disable=redefined-builtin
  """Builds a payload as MXNet's `recordio.pack` does: a scalar label goes in the header
  (flag 0); a sequence of labels sets flag = len and follows the header as float32."""
  if np.ndim(label) == 0:
    return IR_HEADER.pack(0, float(label), id, id2) + bytes(image)
  labels = np.asarray(label, dtype='<f4').ravel()
  return IR_HEADER.pack(labels.size, 0.0, id, id2) + labels.tobytes() + bytes(image)


def iter_records(path: str, start: int = 0) -> Iterator[tuple[int, bytes]]:
  """Sequential reading without an `.idx`: yields (byte offset, payload) in file order."""
  buf, size = _mmap(path)
  try:
    pos = start
    while pos < size:
      payload, nxt = _read_record(buf, size, pos, path, None)
      yield pos, payload
      pos = nxt
  finally:
    if isinstance(buf, mmap.mmap):
      buf.close()


def build_index(rec_path: str, idx_path: str) -> int:
  """Writes an `.idx` by scanning the `.rec` in order, numbering records 0, 1, 2, ... as
  MXNet's `im2rec` and insightface's tools do. Returns the number of records."""
  tmp = idx_path + '.tmp'
  count = 0
  with open(tmp, 'w') as f:
    for count, (offset, _) in enumerate(iter_records(rec_path), 1):
      f.write(f'{count - 1}\t{offset}\n')
  os.replace(tmp, idx_path)
  return count



class RecordIOWriter:
  """Writes `.rec` (+ `.idx` when `idx_path` is given) byte-for-byte as dmlc-core does,
  including the split of a payload wherever the magic occurs at a 4-byte-aligned position."""

  def __init__(self, rec_path: str, idx_path: str | None = None):
    self.rec_path, self.idx_path = rec_path, idx_path
    self._rec: BinaryIO = open(rec_path + '.tmp', 'wb')
    self._idx = open(idx_path + '.tmp', 'w') if idx_path else None
    self.num_split = 0

  def write(self, payload: bytes, key: int | None = None) -> int:
    """Appends one record; returns its byte offset (recorded in the `.idx` under `key`)."""
    payload = bytes(payload)
    if len(payload) > MAX_PART_LENGTH:
      raise ValueError(f'RecordIO records are < 2**29 bytes; this one is {len(payload)}')
    offset = self._rec.tell()
    view = memoryview(payload)
    start = 0
    cut = payload.find(MAGIC_BYTES)
    while cut >= 0:  # dmlc-core cuts only where the magic sits at a 4-byte-aligned position
      if cut % 4:
        cut = payload.find(MAGIC_BYTES, cut + 1)
        continue
      self._part(PART_FIRST if start == 0 else PART_MIDDLE, view[start:cut])
      start = cut + 4
      self.num_split += 1
      cut = payload.find(MAGIC_BYTES, start)
    self._part(PART_LAST if start else PART_WHOLE, view[start:])
    self._rec.write(b'\0' * (-len(payload) % 4))
    if self._idx is not None:
      if key is None:
        raise ValueError('an indexed writer needs a key for every record')
      self._idx.write(f'{key}\t{offset}\n')
    return offset

  def _part(self, flag: int, data) -> None:
    self._rec.write(_FRAME.pack(MAGIC, flag << 29 | len(data)))
    self._rec.write(data)

  def close(self) -> None:
    self._rec.close()
    os.replace(self.rec_path + '.tmp', self.rec_path)
    if self._idx is not None:
      self._idx.close()
      os.replace(self.idx_path + '.tmp', self.idx_path)

  def __enter__(self) -> 'RecordIOWriter':
    return self

  def __exit__(self, exc_type, *exc) -> None:
    if exc_type is None:
      self.close()
    else:
      self._rec.close()
      if self._idx is not None:
        self._idx.close()


def write_insightface(directory: str, images: Sequence[tuple[bytes, int]],
                      image_size: tuple[int, int] = (112, 112)) -> None:
  """Writes `train.rec`/`train.idx`/`property` in insightface's layout from (image bytes,
  label) pairs sorted by label (labels 0..C-1, each with at least one image). Headers as
  insightface's tools write them: image records carry `id` = key, the others id 0."""
  labels = [label for _, label in images]
  if labels != sorted(labels):
    raise ValueError('insightface layout needs images sorted by label')
  num_classes = labels[-1] + 1 if labels else 0
  ranges = []
  for c in range(num_classes):
    keys = [k + 1 for k, label in enumerate(labels) if label == c]
    if not keys:
      raise ValueError(f'class {c} has no image')
    ranges.append((keys[0], keys[-1] + 1))
  n = len(images)
  with RecordIOWriter(os.path.join(directory, 'train.rec'),
                      os.path.join(directory, 'train.idx')) as w:
    w.write(pack([n + 1, n + 1 + num_classes], b''), key=0)
    for k, (image, label) in enumerate(images, 1):
      w.write(pack(float(label), image, id=k), key=k)
    for c, (first, end) in enumerate(ranges):
      w.write(pack([first, end], b''), key=n + 1 + c)
  with open(os.path.join(directory, 'property'), 'w') as f:
    f.write(f'{num_classes},{image_size[0]},{image_size[1]}')
