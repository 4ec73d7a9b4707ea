"""MXNet RecordIO (`.rec` + `.idx`) read without MXNet, and insightface's dataset layout on it.

Byte layout (dmlc-core `RecordIOWriter`, which MXNet's `MXRecordIO` calls):

  record  = part+          part = magic:uint32  lrec:uint32  data[length]  zero pad to 4 bytes
  magic   = 0xced7230a     lrec = part_flag << 29 | length   (length < 2**29)

`part_flag` is 0 for a whole record. The writer scans the payload at 4-byte-aligned positions for
the magic; where it occurs, the payload is cut there and the four magic bytes are *dropped*: the
pieces go out as parts flagged 1 (first), 2 (middle), 3 (last), and a reader re-inserts the magic
between consecutive parts. Only the last part can need padding, since cuts are 4-byte aligned.

The `.idx` is text, one `key<TAB>byte_offset` line per record (the offset of its first part).

A payload (MXNet's `recordio.pack`) is a 24-byte little-endian `IfQQ` header (flag uint32,
label float32, id uint64, id2 uint64); when flag > 0 the label is instead `flag` float32 values
that follow the header; the rest is the image file (JPEG or PNG).

insightface layout (`InsightFaceRecord`): record 0 has flag 2 and labels `[N + 1, end)`; records
1..N are images; records N+1..end-1 are one per identity with labels `[first, last + 1)`, the keys
of that identity's images. `property` is the text `num_classes,H,W`. A `.rec` whose record 0 has
flag 0 is read as a plain image list (every key in the `.idx` is an image).

The `.rec` is memory-mapped: a 100 GB file costs address space, not memory; a record is copied
out only when read. Errors (`RecordIOError`, a `ValueError`) name the file and the key or the
byte offset.
"""

from __future__ import annotations

import dataclasses
import mmap
import os
import struct
from collections.abc import Iterator

import numpy as np

MAGIC = 0xCED7230A
MAGIC_BYTES = struct.pack('<I', MAGIC)
MAX_PART_LENGTH = (1 << 29) - 1
_FRAME = struct.Struct('<II')
IR_HEADER = struct.Struct('<IfQQ')  # flag, label, id, id2: 24 bytes, no padding

PART_WHOLE, PART_FIRST, PART_MIDDLE, PART_LAST = 0, 1, 2, 3


class RecordIOError(ValueError):
  """A malformed `.rec`, `.idx` or `property`; the message names the file and where."""


# ---------------------------------------------------------------------------------------
# Payload: the IfQQ header, its optional label array, the image bytes.


@dataclasses.dataclass(frozen=True)
class IRHeader:
  """MXNet's `IRHeader`: `label` is a float, or a float32 array when `flag` > 0."""
  flag: int
  label: float | np.ndarray
  id: int = 0
  id2: int = 0


def unpack(payload: bytes, where: str = 'payload') -> tuple[IRHeader, bytes]:
  """Splits a payload into its header and the image bytes (MXNet's `recordio.unpack`)."""
  if len(payload) < IR_HEADER.size:
    raise RecordIOError(f'{where}: {len(payload)} bytes, shorter than the 24-byte IfQQ header')
  flag, label, id_, id2 = IR_HEADER.unpack_from(payload, 0)
  body = IR_HEADER.size
  if flag > 0:
    end = body + 4 * flag
    if end > len(payload):
      raise RecordIOError(f'{where}: header flag {flag} announces {flag} float32 labels '
                          f'({4 * flag} bytes) but only {len(payload) - body} bytes follow')
    label = np.frombuffer(payload, dtype='<f4', count=flag, offset=body).copy()
    body = end
  return IRHeader(flag, label, id_, id2), payload[body:]


def image_label(header: IRHeader, where: str) -> int:
  """The integer class of an image record: the header label, or the first of the array
  (insightface's `label[0]` convention); a non-integral value is an error."""
  value = header.label if header.flag == 0 else header.label[0]
  value = float(value)
  if not np.isfinite(value) or value != int(value):
    raise RecordIOError(f'{where}: label {value!r} is not an integer class index')
  return int(value)


# ---------------------------------------------------------------------------------------
# Framing.


def _read_record(buf, size: int, offset: int, path: str, key: int | None) -> tuple[bytes, int]:
  """Reads the (possibly split) record starting at `offset`; returns (payload, next offset)."""
  where = f'{path}: record' + (f' key {key}' if key is not None else '')
  parts = []
  pos = offset
  while True:
    if pos + _FRAME.size > size:
      raise RecordIOError(
          f'{where} at byte offset {offset}: truncated, the part header at byte {pos} needs 8 '
          f'bytes but the file ends at byte {size}')
    magic, lrec = _FRAME.unpack_from(buf, pos)
    if magic != MAGIC:
      raise RecordIOError(f'{where}: wrong magic 0x{magic:08x} at byte offset {pos} (expected '
                          f'0x{MAGIC:08x}); not a RecordIO file, or the offset is not a '
                          'record start')
    flag, length = lrec >> 29, lrec & MAX_PART_LENGTH
    if flag > PART_LAST:
      raise RecordIOError(f'{where}: invalid part flag {flag} at byte offset {pos}')
    if (flag in (PART_WHOLE, PART_FIRST)) != (not parts):
      raise RecordIOError(
          f'{where}: part flag {flag} at byte offset {pos} '
          + ('continues no record (the offset points into the middle of a split record)'
             if not parts else f'inside a split record that began at byte offset {offset}'))
    start = pos + _FRAME.size
    if start + length > size:
      raise RecordIOError(
          f'{where} at byte offset {offset}: truncated, the part at byte {pos} announces '
          f'{length} bytes but only {size - start} remain in the file')
    parts.append(buf[start:start + length])
    pos = min(start + ((length + 3) & ~3), size)
    if flag in (PART_WHOLE, PART_LAST):
      break
  return (parts[0] if len(parts) == 1 else MAGIC_BYTES.join(parts)), pos


def _mmap(path: str) -> tuple[mmap.mmap | bytes, int]:
  with open(path, 'rb') as f:
    size = os.fstat(f.fileno()).st_size
    if size == 0:
      return b'', 0
    return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ), size


# ---------------------------------------------------------------------------------------
# The `.idx`.


def read_index(idx_path: str, rec_size: int | None = None,
               rec_path: str = '') -> tuple[np.ndarray, np.ndarray]:
  """Parses an `.idx` into (keys, offsets), int64, sorted by key. Checks that keys are
  unique and, given `rec_size`, that no offset lies past the end of the `.rec`."""
  if not os.path.exists(idx_path):
    raise RecordIOError(
        f'{idx_path} not found: random access into {rec_path or "the .rec"} needs its index '
        '(MXNet writes it beside the .rec; MXNet\'s tools/rec2idx.py rebuilds a lost one)')
  with open(idx_path, 'rb') as f:
    text = f.read()
  lines = text.count(b'\n') + (0 if text.endswith(b'\n') or not text else 1)
  try:
    values = np.fromstring(text.decode('ascii', 'replace'), dtype=np.int64, sep=' ') if text \
        else np.zeros(0, np.int64)
  except ValueError:  # NumPy >= 2.? refuses trailing garbage; older ones stop early
    values = None
  if values is None or values.size != 2 * lines:  # slow path only to point at the bad line
    for number, line in enumerate(text.splitlines(), 1):
      fields = line.split()
      if len(fields) != 2 or not all(v.lstrip(b'-').isdigit() for v in fields):
        raise RecordIOError(f'{idx_path}: line {number} is {line[:80]!r}, expected '
                            '"key<TAB>byte_offset"')
    raise RecordIOError(f'{idx_path}: could not parse {lines} "key<TAB>offset" lines')
  keys, offsets = values[0::2].copy(), values[1::2].copy()
  order = np.argsort(keys, kind='stable')
  keys, offsets = keys[order], offsets[order]
  if keys.size > 1 and np.any(keys[1:] == keys[:-1]):
    dup = int(keys[1:][keys[1:] == keys[:-1]][0])
    raise RecordIOError(f'{idx_path}: key {dup} appears more than once')
  if offsets.size and offsets.min() < 0:
    bad = int(np.argmin(offsets))
    raise RecordIOError(f'{idx_path}: key {keys[bad]} has negative offset {offsets[bad]}')
  if rec_size is not None and offsets.size:
    bad = np.flatnonzero(offsets >= rec_size)
    if bad.size:
      i = int(bad[0])
      raise RecordIOError(
          f'{idx_path}: key {keys[i]} points at byte offset {offsets[i]}, past the end of '
          f'{rec_path} ({rec_size} bytes): the .idx does not belong to this .rec, or the .rec '
          'is truncated')
  return keys, offsets


# ---------------------------------------------------------------------------------------
# Random access.


class RecordFile:
  """A memory-mapped `.rec`: reads the record at a byte offset (no `.idx` needed)."""

  def __init__(self, path: str):
    self.path = os.fspath(path)
    if not os.path.exists(self.path):
      raise RecordIOError(f'{self.path} not found')
    self._buf, self.size = _mmap(self.path)

  def read_at(self, offset: int, key: int | None = None) -> bytes:
    """The payload of the record at `offset` (split parts joined back with the magic);
    `key` only makes error messages name it."""
    return _read_record(self._buf, self.size, int(offset), self.path, key)[0]

  def close(self) -> None:
    if isinstance(self._buf, mmap.mmap):
      self._buf.close()

  def __enter__(self) -> 'RecordFile':
    return self

  def __exit__(self, *exc) -> None:
    self.close()


class IndexedRecordIO:
  """Random access to a `.rec` by key through its `.idx` (MXNet's `MXIndexedRecordIO`)."""

  def __init__(self, rec_path: str, idx_path: str | None = None):
    self.rec_path = os.fspath(rec_path)
    self.idx_path = os.fspath(idx_path) if idx_path else os.path.splitext(self.rec_path)[0] + '.idx'
    self.file = RecordFile(self.rec_path)
    self.size = self.file.size
    try:
      self.keys, self.offsets = read_index(self.idx_path, self.size, self.rec_path)
    except BaseException:
      self.file.close()
      raise
    # Keys are nearly always 0..K-1; then the key is the position, no search needed.
    self._dense = bool(self.keys.size and self.keys[0] == 0 and self.keys[-1] == self.keys.size - 1)

  def __len__(self) -> int:
    return int(self.keys.size)

  def __contains__(self, key: int) -> bool:
    return self._position(key, raise_missing=False) is not None

  def __enter__(self) -> 'IndexedRecordIO':
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def close(self) -> None:
    self.file.close()

  def _position(self, key: int, raise_missing: bool = True) -> int | None:
    if self._dense:
      pos = int(key) if 0 <= key < self.keys.size else None
    else:
      i = int(np.searchsorted(self.keys, key))
      pos = i if i < self.keys.size and self.keys[i] == key else None
    if pos is None and raise_missing:
      raise RecordIOError(f'{self.idx_path}: no key {key} (the index holds {self.keys.size} '
                          'keys)')
    return pos

  def offset(self, key: int) -> int:
    return int(self.offsets[self._position(key)])

  def read(self, key: int) -> bytes:
    """The payload of record `key` (split parts joined back with the magic)."""
    return self.file.read_at(self.offset(key), key)

  def read_at(self, offset: int, key: int | None = None) -> bytes:
    return self.file.read_at(offset, key)

  def check_last_record(self) -> None:
    """Reads the record at the largest offset, so a truncated file fails before any work."""
    if self.offsets.size:
      i = int(np.argmax(self.offsets))
      self.read_at(self.offsets[i], int(self.keys[i]))


# ---------------------------------------------------------------------------------------
# insightface's layout.


def read_property(path: str) -> tuple[int, int, int]:
  """`property`: the text `num_classes,H,W`."""
  with open(path) as f:
    text = f.read().strip()
  try:
    num_classes, height, width = (int(v) for v in text.split(','))
  except ValueError:
    raise RecordIOError(f'{path}: {text[:80]!r} is not "num_classes,H,W"') from None
  if num_classes <= 0 or height <= 0 or width <= 0:
    raise RecordIOError(f'{path}: {text!r} has a non-positive field')
  return num_classes, height, width


class InsightFaceRecord:
  """An insightface training set: `train.rec`, `train.idx`, optional `property`.

  Attributes: `image_keys` (int64 array of the image records' keys), `identity_table`
  ((C, 2) int64 `[first, end)` key ranges, or None when record 0 has flag 0),
  `property` ((num_classes, H, W) or None), `num_classes`.
  """

  def __init__(self, rec_path: str, idx_path: str | None = None,
               property_path: str | None = None, num_classes: int | None = None):
    self.records = IndexedRecordIO(rec_path, idx_path)
    self.rec_path = self.records.rec_path
    if property_path is None:
      property_path = os.path.join(os.path.dirname(self.rec_path), 'property')
    self.property_path = property_path
    self.property = read_property(property_path) if os.path.exists(property_path) else None
    self.records.check_last_record()
    self.header0 = None
    self.identity_table = None
    if 0 in self.records:
      self.header0, _ = unpack(self.records.read(0), self._where(0))
    if self.header0 is not None and self.header0.flag >= 2:
      first_identity, end = (int(v) for v in self.header0.label[:2])
      if not 1 <= first_identity <= end:
        raise RecordIOError(f'{self._where(0)}: header labels [{first_identity}, {end}) are not '
                            'a valid insightface image/identity range')
      self.image_keys = np.arange(1, first_identity, dtype=np.int64)
      self.identity_keys = np.arange(first_identity, end, dtype=np.int64)
      missing = np.setdiff1d(np.arange(1, end), self.records.keys, assume_unique=True)
      if missing.size:
        raise RecordIOError(
            f'{self.records.idx_path}: key {int(missing[0])} missing ({missing.size} of keys '
            f'[1, {end}) are absent), but record 0 of {self.rec_path} says images are keys '
            f'[1, {first_identity}) and identities [{first_identity}, {end})')
      if self.identity_keys.size:
        self.identity_table = self._read_identity_table()
    else:
      self.image_keys = self.records.keys.copy()
      self.identity_keys = np.zeros(0, np.int64)

    table_classes = None if self.identity_table is None else len(self.identity_table)
    prop_classes = None if self.property is None else self.property[0]
    if prop_classes is not None and table_classes is not None and prop_classes != table_classes:
      raise RecordIOError(f'{property_path} says {prop_classes} classes but record 0 of '
                          f'{self.rec_path} lists {table_classes} identities')
    if num_classes is not None and prop_classes is not None and num_classes != prop_classes:
      raise RecordIOError(f'{property_path} says {prop_classes} classes, but {num_classes} '
                          'were asked for')
    self.num_classes = next((c for c in (num_classes, prop_classes, table_classes)
                             if c is not None), None)

  def _where(self, key: int) -> str:
    return f'{self.rec_path}: key {key}'

  def _read_identity_table(self) -> np.ndarray:
    table = np.zeros((self.identity_keys.size, 2), np.int64)
    num_images = self.image_keys.size
    for i, key in enumerate(self.identity_keys):
      header, _ = unpack(self.records.read(int(key)), self._where(int(key)))
      labels = np.atleast_1d(header.label)
      if labels.size < 2:
        raise RecordIOError(f'{self._where(int(key))}: identity record without a '
                            '[first, end) label pair')
      first, end = int(labels[0]), int(labels[1])
      if not 1 <= first <= end <= num_images + 1:
        raise RecordIOError(f'{self._where(int(key))}: identity range [{first}, {end}) outside '
                            f'the image keys [1, {num_images + 1})')
      table[i] = first, end
    return table

  @property
  def num_images(self) -> int:
    return int(self.image_keys.size)

  @property
  def image_size(self) -> tuple[int, int] | None:
    return None if self.property is None else self.property[1:]

  def close(self) -> None:
    self.records.close()

  def __enter__(self) -> 'InsightFaceRecord':
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def read_image(self, key: int) -> tuple[bytes, int]:
    """(image bytes, integer label) of image record `key`; the label is checked against
    `num_classes` when that is known."""
    header, image = unpack(self.records.read(key), self._where(key))
    label = image_label(header, self._where(key))
    if self.num_classes is not None and not 0 <= label < self.num_classes:
      raise RecordIOError(f'{self._where(key)}: label {label} outside [0, {self.num_classes})')
    return image, label

  def iter_images(self) -> Iterator[tuple[int, bytes, int]]:
    """(key, image bytes, label) for every image, in key order."""
    for key in self.image_keys:
      image, label = self.read_image(int(key))
      yield int(key), image, label

  def check_identity_table(self) -> None:
    """Checks that identity i's key range holds exactly the images labelled i (reads every
    image header: one pass over the file)."""
    if self.identity_table is None:
      return
    for identity, (first, end) in enumerate(self.identity_table):
      for key in range(int(first), int(end)):
        _, label = self.read_image(key)
        if label != identity:
          raise RecordIOError(f'{self._where(key)}: label {label}, but the identity table puts '
                              f'it in identity {identity} (keys [{first}, {end}))')
