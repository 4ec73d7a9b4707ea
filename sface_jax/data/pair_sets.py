"""Verification pair sets: insightface `.bin` files (read safely), our `.npz`, decoded sets.

A pair set is 2N encoded images (JPEG or PNG bytes), pairs consecutive (images 2i and 2i+1
form pair i), and N booleans: same person or not.

insightface `.bin` (LFW, CFP-FP, AgeDB-30, ...): a pickle of `(list of 2N image byte strings,
list of N bools)`, read by `safe_pickle` so that no code in it runs.

`.npz` (ours, written by the converter): `np.savez` of
  images   uint8 (total_bytes,)  the 2N image files concatenated
  offsets  int64 (2N + 1,)       image i is images[offsets[i]:offsets[i + 1]]
  issame   bool  (N,)
  name     str   ()              the set's name (informational)
loaded with `allow_pickle=False`, so reading it never unpickles anything.

`load(name_or_path, data_dir, image_size)` finds a set by name in a converted dataset (or by
path) and decodes it once, for evaluation; `from_identities` builds one from held-out people.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import pickle
import zipfile
from collections.abc import Sequence

import numpy as np

from sface_jax import files
from sface_jax.data import images as images_lib
from sface_jax.data import safe_pickle

VERIFICATION_DIR = 'verification'


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


@dataclasses.dataclass(frozen=True)
class VerificationSet:
  """A decoded pair set: pair i is images[2i] and images[2i + 1]."""
  name: str
  images: np.ndarray  # uint8 (2N, S, S, 3)
  issame: np.ndarray  # bool (N,)
  path: str = ''

  def __post_init__(self):
    if self.images.ndim != 4 or self.images.shape[0] != 2 * np.shape(self.issame)[0]:
      raise ValueError(f'pair set {self.name!r}: images {self.images.shape} for '
                       f'{np.shape(self.issame)[0]} pairs; expected (2 x pairs, S, S, 3)')


# ---------------------------------------------------------------------------------------
# Files.


def read_bin(path: str, name: str | None = None) -> PairSet:
  """Reads an insightface `.bin` without letting the pickle import or call anything."""
  path = os.fspath(path)
  name = name or os.path.splitext(os.path.basename(path))[0]
  with open(path, 'rb') as f:
    data = f.read()
  try:
    obj = safe_pickle.safe_load(data)
  except safe_pickle.ERRORS as e:
    raise PairSetError(f'{path}: not a safe insightface .bin pickle ({e})') from None
  if not isinstance(obj, (tuple, list)) or len(obj) != 2:
    raise PairSetError(f'{path}: expected a pickle of (images, issame), got '
                       f'{type(obj).__name__}')
  images, issame = obj
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
    for i, v in enumerate(issame):
      if not isinstance(v, (bool, int, np.bool_, np.integer)):
        raise PairSetError(f'{path}: issame[{i}] is a {type(v).__name__}, expected a bool')
    values = np.asarray(issame)
  else:
    raise PairSetError(f'{path}: issame is a {type(issame).__name__}, expected a list of bools')
  if values.size and not np.all((values == 0) | (values == 1)):
    raise PairSetError(f'{path}: issame holds values other than True/False')
  issame = values.astype(bool)
  if len(images) != 2 * issame.size:
    raise PairSetError(f'{path}: {len(images)} images for {issame.size} pairs (a pair set '
                       f'needs 2 x pairs = {2 * issame.size} images)')
  return PairSet(name, images, issame)


def write_npz(pair_set: PairSet, path: str) -> str:
  """Writes `pair_set` to `path` atomically. Returns `path`."""
  lengths = np.fromiter((len(b) for b in pair_set.images), dtype=np.int64,
                        count=len(pair_set.images))
  offsets = np.zeros(len(pair_set.images) + 1, np.int64)
  np.cumsum(lengths, out=offsets[1:])
  blob = np.frombuffer(b''.join(pair_set.images), dtype=np.uint8)
  with files.atomic_write(path, 'wb') as f:
    np.savez(f, images=blob, offsets=offsets, issame=np.asarray(pair_set.issame, bool),
             name=np.asarray(pair_set.name))
  return os.fspath(path)


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
# Finding and decoding a set for evaluation.


def resolve(name_or_path: str, data_dir: str = '') -> str:
  """`<data_dir>/verification/<name>.npz`, `<data_dir>/<name>.bin`, or an explicit path."""
  candidates = [name_or_path] if os.path.splitext(name_or_path)[1] in ('.bin', '.npz') else []
  if data_dir:
    candidates += [os.path.join(data_dir, VERIFICATION_DIR, f'{name_or_path}.npz'),
                   os.path.join(data_dir, f'{name_or_path}.bin')]
  for path in candidates:
    if os.path.isfile(path):
      return path
  tried = ', '.join(candidates) or f'nothing (no data dir given and {name_or_path!r} is no path)'
  raise FileNotFoundError(f'pair set {name_or_path!r} not found; tried {tried}')


def load(name_or_path: str, data_dir: str, image_size: int) -> VerificationSet:
  """Reads and decodes a pair set once; an image count other than 2 × pairs, or an
  undecodable image, is an error naming the file (and the index)."""
  path = resolve(name_or_path, data_dir)
  name = (name_or_path if path != name_or_path
          else os.path.splitext(os.path.basename(path))[0])
  pairs = read_pairs(path)
  try:
    decoded = images_lib.decode_all(pairs.images, image_size, name=f'pair set {name!r} ({path})')
  except images_lib.ImageError as e:
    raise PairSetError(str(e)) from None
  return VerificationSet(name=name, images=decoded, issame=pairs.issame, path=path)


# ---------------------------------------------------------------------------------------
# Building a set from held-out people.


def from_identities(encoded: Sequence[bytes], owners: Sequence[int], *, name: str,
                    seed: int = 0, num_different: int | None = None) -> PairSet:
  """Every same-person pair of the images, then as many different-person pairs (or
  `num_different`) drawn without repetition with `seed`, all shuffled with `seed`.

  `encoded[i]` is an image file of person `owners[i]`; images of one person are consecutive.
  """
  owner = np.asarray(owners)
  if len(np.unique(owner)) < 2:
    raise PairSetError(f'pair set {name!r}: needs at least 2 identities')
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
  return PairSet(name, images, np.asarray(issame, bool))
