"""Verification pair sets: insightface `.bin` files read safely, and our own `.npz` format.

A pair set is 2N encoded images (JPEG or PNG bytes), pairs consecutive (images 2i and 2i+1
form pair i), and N booleans: same person or not.

insightface `.bin` (LFW, CFP-FP, AgeDB-30, ...) is a pickle of `(list of 2N image byte strings,
list of N bools)`. `pickle.load` on an untrusted pickle runs arbitrary code (GLOBAL + REDUCE can
call `os.system`), so `read_bin` unpickles with an allow-list: containers, strings, numbers and
bools need no import; the only names a pickle may ask for are
  - `_codecs.encode`, restricted to `(str, 'latin1')`: Python 3 writes `bytes` this way under
    pickle protocols 0-2 (the shared `orl_val.bin` is such a file);
  - NumPy's array and bool/int scalar reconstructors, restricted to plain `numpy.ndarray` and
    boolean/integer dtypes: some `.bin` files hold `issame` as a NumPy bool array. Neither can
    build an object array, and nothing else is importable, so no code runs.
Anything else is refused with an error naming the file and the name asked for. Python-2 pickles
load with `encoding='bytes'` (their `str` are the image bytes).

`.npz` (ours, written by the converter): `np.savez` of
  images   uint8 (total_bytes,)  the 2N image files concatenated
  offsets  int64 (2N + 1,)       image i is images[offsets[i]:offsets[i + 1]]
  issame   bool  (N,)
  name     str   ()              the set's name (informational)
loaded with `allow_pickle=False`, so reading it never unpickles anything.
"""

from __future__ import annotations

import dataclasses
import io
import os
import pickle
import zipfile
from collections.abc import Sequence

import numpy as np

JPEG_MAGIC = b'\xff\xd8\xff'
PNG_MAGIC = b'\x89PNG\r\n\x1a\n'


class PairSetError(ValueError):
  """A malformed or unsafe pair-set file; the message names the file (and index)."""


@dataclasses.dataclass
class PairSet:
  """`images[2i]` and `images[2i + 1]` are pair i; `issame[i]` says whether they match."""
  name: str
  images: list[bytes]
  issame: np.ndarray  # bool (N,)

  def __post_init__(self):
    self.issame = np.asarray(self.issame, dtype=bool).reshape(-1)
    if len(self.images) != 2 * self.issame.size:
      raise PairSetError(f'pair set {self.name!r}: {len(self.images)} images for '
                         f'{self.issame.size} pairs (expected {2 * self.issame.size})')

  @property
  def num_pairs(self) -> int:
    return int(self.issame.size)


def image_format(data: bytes) -> str | None:
  """'jpeg', 'png' or None, from the file's first bytes."""
  if data[:3] == JPEG_MAGIC:
    return 'jpeg'
  if data[:8] == PNG_MAGIC:
    return 'png'
  return None


# ---------------------------------------------------------------------------------------
# `.bin`: a restricted unpickler.


def _latin1_encode(text, encoding='latin1', errors=None):
  """Stands in for `_codecs.encode` in a `.bin`: only the bytes-as-latin1 idiom."""
  if not isinstance(text, str) or encoding not in ('latin1', 'latin-1', b'latin1', b'latin-1') \
      or errors not in (None, 'strict'):
    raise pickle.UnpicklingError(
        f'_codecs.encode called with ({type(text).__name__}, {encoding!r}); only (str, '
        "'latin1') is allowed")
  return text.encode('latin1')


_SAFE_KINDS = 'biu'  # bool, signed and unsigned integer: no object, no structured dtypes


def _safe_dtype(spec, align=False, copy=False):
  if isinstance(spec, bytes):
    spec = spec.decode('ascii')
  if not isinstance(spec, str):
    raise pickle.UnpicklingError(f'numpy.dtype({spec!r}) refused')
  dtype = np.dtype(spec)
  if dtype.kind not in _SAFE_KINDS or dtype.fields is not None or dtype.subdtype is not None:
    raise pickle.UnpicklingError(f'numpy dtype {spec!r} refused (only bool/int)')
  return _SafeDtype(dtype)


class _SafeDtype:
  """A dtype being unpickled: numpy pickles dtypes as `dtype(spec)` + BUILD(state); the state
  (byte order etc.) is ignored here, the spec alone fixes bool/int dtypes except byte order."""

  def __init__(self, dtype: np.dtype):
    self.dtype = dtype

  def __setstate__(self, state):
    if isinstance(state, tuple) and len(state) >= 2 and state[1] in ('>', b'>'):
      self.dtype = self.dtype.newbyteorder('>')


class _NdarrayClass:
  """Placeholder for `numpy.ndarray` (the class numpy's reconstructor is given)."""


class _SafeArray:
  """An array being unpickled: `_reconstruct(ndarray, shape, dtype)` then BUILD(state) with
  state = (version, shape, dtype, is_fortran, raw bytes)."""

  def __init__(self):
    self.array = None

  def __setstate__(self, state):
    if not isinstance(state, tuple) or len(state) not in (4, 5):
      raise pickle.UnpicklingError('malformed numpy array state')
    shape, dtype, fortran, raw = state[-4:]
    if not isinstance(dtype, _SafeDtype):
      raise pickle.UnpicklingError('numpy array with a dtype that is not bool/int')
    if isinstance(raw, str):
      raw = raw.encode('latin1')
    if not isinstance(raw, bytes):
      raise pickle.UnpicklingError('numpy array data is not a byte string')
    shape = tuple(int(v) for v in shape)
    count = int(np.prod(shape)) if shape else 1
    if len(raw) != count * dtype.dtype.itemsize:
      raise pickle.UnpicklingError('numpy array data does not match its shape')
    self.array = np.frombuffer(raw, dtype=dtype.dtype).reshape(
        shape, order='F' if fortran else 'C').copy()


def _reconstruct(cls, shape, dtype_code):
  del shape, dtype_code
  if cls is not _NdarrayClass:
    raise pickle.UnpicklingError('numpy reconstructor called for a class other than ndarray')
  return _SafeArray()


def _frombuffer(buffer, dtype, shape, order):
  """NumPy's protocol-5 array reconstructor, for bool/int dtypes only."""
  if not isinstance(dtype, _SafeDtype):
    raise pickle.UnpicklingError('numpy array with a dtype that is not bool/int')
  if isinstance(buffer, (bytearray, memoryview, pickle.PickleBuffer)):
    buffer = bytes(buffer)
  if not isinstance(buffer, bytes):
    raise pickle.UnpicklingError('numpy array data is not a byte string')
  shape = tuple(int(v) for v in shape)
  if len(buffer) != int(np.prod(shape)) * dtype.dtype.itemsize:
    raise pickle.UnpicklingError('numpy array data does not match its shape')
  wrapped = _SafeArray()
  wrapped.array = np.frombuffer(buffer, dtype=dtype.dtype).reshape(
      shape, order='F' if order in ('F', b'F') else 'C').copy()
  return wrapped


def _scalar(dtype, raw=None):
  if not isinstance(dtype, _SafeDtype):
    raise pickle.UnpicklingError('numpy scalar with a dtype that is not bool/int')
  if isinstance(raw, str):
    raw = raw.encode('latin1')
  if not isinstance(raw, bytes) or len(raw) != dtype.dtype.itemsize:
    raise pickle.UnpicklingError('malformed numpy scalar')
  return np.frombuffer(raw, dtype=dtype.dtype)[0].item()


_ALLOWED = {
    ('_codecs', 'encode'): _latin1_encode,
    ('numpy', 'dtype'): _safe_dtype,
    ('numpy', 'ndarray'): _NdarrayClass,
}
for _module in ('numpy.core.multiarray', 'numpy._core.multiarray'):
  _ALLOWED[(_module, '_reconstruct')] = _reconstruct
  _ALLOWED[(_module, 'scalar')] = _scalar
for _module in ('numpy.core.numeric', 'numpy._core.numeric'):
  _ALLOWED[(_module, '_frombuffer')] = _frombuffer


class _RestrictedUnpickler(pickle.Unpickler):

  def find_class(self, module, name):
    allowed = _ALLOWED.get((module, name))
    if allowed is None:
      raise pickle.UnpicklingError(f'refused to import {module}.{name}')
    return allowed

  def persistent_load(self, pid):
    raise pickle.UnpicklingError('persistent ids are not allowed')


def _unwrap(value):
  if isinstance(value, _SafeArray):
    if value.array is None:
      raise pickle.UnpicklingError('numpy array without data')
    return value.array
  return value


def read_bin(path: str, name: str | None = None) -> PairSet:
  """Reads an insightface `.bin` without letting the pickle import or call anything."""
  path = os.fspath(path)
  name = name or os.path.splitext(os.path.basename(path))[0]
  with open(path, 'rb') as f:
    data = f.read()
  try:
    obj = _RestrictedUnpickler(io.BytesIO(data), encoding='bytes').load()
  except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
          IndexError, KeyError, OverflowError, MemoryError) as e:
    raise PairSetError(f'{path}: not a safe insightface .bin pickle ({e})') from None
  if not isinstance(obj, (tuple, list)) or len(obj) != 2:
    raise PairSetError(f'{path}: expected a pickle of (images, issame), got '
                       f'{type(obj).__name__}')
  images, issame = (_unwrap(v) for v in obj)
  if not isinstance(images, (list, tuple)):
    raise PairSetError(f'{path}: images is a {type(images).__name__}, expected a list')
  images = list(images)
  for i, image in enumerate(images):
    if isinstance(image, bytearray):
      images[i] = bytes(image)
    elif not isinstance(image, bytes):
      raise PairSetError(f'{path}: image {i} is a {type(image).__name__}, expected bytes')
  if isinstance(issame, np.ndarray):
    values = issame.reshape(-1)
  elif isinstance(issame, (list, tuple)):
    values = [_unwrap(v) for v in issame]
    for i, v in enumerate(values):
      if not isinstance(v, (bool, int, np.bool_, np.integer)):
        raise PairSetError(f'{path}: issame[{i}] is a {type(v).__name__}, expected a bool')
    values = np.asarray(values)
  else:
    raise PairSetError(f'{path}: issame is a {type(issame).__name__}, expected a list of bools')
  if values.size and not np.all((values == 0) | (values == 1)):
    raise PairSetError(f'{path}: issame holds values other than True/False')
  issame = values.astype(bool)
  if len(images) != 2 * issame.size:
    raise PairSetError(f'{path}: {len(images)} images for {issame.size} pairs (a pair set '
                       f'needs 2 x pairs = {2 * issame.size} images)')
  return PairSet(name, images, issame)


# ---------------------------------------------------------------------------------------
# `.npz`: our format.


def write_npz(pairset: PairSet, path: str) -> str:
  """Writes `pairset` to `path` (temporary name, then rename). Returns `path`."""
  path = os.fspath(path)
  lengths = np.fromiter((len(b) for b in pairset.images), dtype=np.int64,
                        count=len(pairset.images))
  offsets = np.zeros(len(pairset.images) + 1, np.int64)
  np.cumsum(lengths, out=offsets[1:])
  blob = np.frombuffer(b''.join(pairset.images), dtype=np.uint8)
  tmp = path + '.tmp'
  with open(tmp, 'wb') as f:
    np.savez(f, images=blob, offsets=offsets, issame=np.asarray(pairset.issame, bool),
             name=np.asarray(pairset.name))
  os.replace(tmp, path)
  return path


def read_npz(path: str, name: str | None = None) -> PairSet:
  path = os.fspath(path)
  try:
    with np.load(path, allow_pickle=False) as z:
      missing = {'images', 'offsets', 'issame'} - set(z.files)
      if missing:
        raise PairSetError(f'{path}: missing arrays {sorted(missing)}')
      blob, offsets, issame = z['images'], z['offsets'], z['issame']
      stored_name = str(z['name']) if 'name' in z.files else None
  except PairSetError:
    raise
  except (ValueError, OSError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError) as e:
    raise PairSetError(f'{path}: not a pair-set .npz ({e})') from None
  if blob.dtype != np.uint8 or blob.ndim != 1:
    raise PairSetError(f'{path}: "images" is {blob.dtype}{blob.shape}, expected uint8 (bytes,)')
  if offsets.ndim != 1 or offsets.size < 1 or offsets[0] != 0 or offsets[-1] != blob.size \
      or np.any(np.diff(offsets) < 0):
    raise PairSetError(f'{path}: "offsets" are not increasing from 0 to {blob.size}')
  if issame.dtype != np.bool_ or issame.ndim != 1:
    raise PairSetError(f'{path}: "issame" is {issame.dtype}{issame.shape}, expected bool (N,)')
  if offsets.size - 1 != 2 * issame.size:
    raise PairSetError(f'{path}: {offsets.size - 1} images for {issame.size} pairs (a pair set '
                       f'needs 2 x pairs = {2 * issame.size} images)')
  raw = blob.tobytes()
  images = [raw[a:b] for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist())]
  return PairSet(name or stored_name or os.path.splitext(os.path.basename(path))[0],
                 images, issame.copy())


def read_pairs(path: str) -> PairSet:
  """A pair set from an insightface `.bin` or our `.npz`, by extension."""
  ext = os.path.splitext(os.fspath(path))[1].lower()
  if ext == '.bin':
    return read_bin(path)
  if ext == '.npz':
    return read_npz(path)
  raise PairSetError(f'{path}: unknown pair-set extension {ext!r} (expected .bin or .npz)')


# ---------------------------------------------------------------------------------------
# Decoding.


def decode_image(data: bytes, image_size: int | None = None, where: str = 'image') -> np.ndarray:
  """Decodes JPEG/PNG bytes to uint8 (H, W, 3); greyscale becomes 3 equal channels; resized
  (bilinear, antialiased) to (image_size, image_size) when the size differs."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  try:
    with Image.open(io.BytesIO(data)) as img:
      if img.format not in ('JPEG', 'PNG'):
        raise PairSetError(f'{where}: {img.format} image, expected JPEG or PNG')
      img = img.convert('RGB')
      if image_size and img.size != (image_size, image_size):
        img = img.resize((image_size, image_size), Image.BILINEAR)
      return np.asarray(img, dtype=np.uint8)
  except PairSetError:
    raise
  except Exception as e:  # PIL raises many types for corrupt data.  pylint: disable=broad-except
    raise PairSetError(f'{where}: cannot decode ({type(e).__name__}: {e})') from None


def decode_images(images: Sequence[bytes], image_size: int, name: str = 'pair set') -> np.ndarray:
  """Decodes a pair set's images into uint8 (N, S, S, 3); an undecodable image raises an error
  naming the set and the index."""
  out = np.empty((len(images), image_size, image_size, 3), np.uint8)
  for i, data in enumerate(images):
    out[i] = decode_image(data, image_size, where=f'{name}: image {i}')
  return out
