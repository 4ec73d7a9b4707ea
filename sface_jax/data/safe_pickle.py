"""Unpickling insightface `.bin` pair sets without letting the pickle run code.

An insightface `.bin` (LFW, CFP-FP, AgeDB-30, ...) is a pickle of `(list of 2N image byte
strings, list of N bools)`. `pickle.load` on an untrusted pickle runs arbitrary code (GLOBAL +
REDUCE can call `os.system`), so `safe_load` unpickles with an allow-list: containers,
strings, numbers and bools need no import; the only names a pickle may ask for are
  - `_codecs.encode`, restricted to `(str, 'latin1')`: Python 3 writes `bytes` this way under
    pickle protocols 0-2 (the shared `orl_val.bin` is such a file);
  - NumPy's array and bool/int scalar reconstructors, restricted to plain `numpy.ndarray` and
    boolean/integer dtypes: some `.bin` files hold `issame` as a NumPy bool array. Neither can
    build an object array, and nothing else is importable, so no code runs.
Anything else raises `pickle.UnpicklingError` naming what was asked for. Python-2 pickles
load with `encoding='bytes'` (their `str` are the image bytes).
"""

from __future__ import annotations

import io
import pickle

import numpy as np

# What a refused or malformed pickle raises while loading.
ERRORS = (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError,
          KeyError, OverflowError, MemoryError)


def safe_load(data: bytes):
  """The unpickled object, with NumPy arrays as plain arrays; raises one of `ERRORS`."""
  return unwrap(_RestrictedUnpickler(io.BytesIO(data), encoding='bytes').load())


def unwrap(value):
  """Arrays built by the restricted reconstructors, as plain NumPy arrays (recursively in
  lists and tuples)."""
  if isinstance(value, _SafeArray):
    if value.array is None:
      raise pickle.UnpicklingError('numpy array without data')
    return value.array
  if isinstance(value, (list, tuple)):
    return type(value)(unwrap(v) for v in value)
  return value




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
