"""Files a reader never sees half-written: write under a temporary name, then rename.

`os.replace` is atomic on one filesystem, so a run killed at any moment leaves either the
old file or the new one, never a truncated one that looks complete. Every writer in the
code base (configs, dataset info, shards, pair sets, reports, plots) goes through here.
"""

import contextlib
import glob
import os
import shutil
from collections.abc import Iterator
from typing import IO

TEMPORARY_MARK = '.tmp-'


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
  """Yields a temporary path beside `path`; renamed to `path` on success, removed on error.

  For writers that take a file name (TFRecordWriter, savefig, np.savez): write to the
  yielded name.
  """
  path = os.fspath(path)
  tmp = f'{path}{TEMPORARY_MARK}{os.getpid()}'
  try:
    yield tmp
    os.replace(tmp, path)
  finally:
    if os.path.isdir(tmp):
      shutil.rmtree(tmp)
    elif os.path.exists(tmp):
      os.remove(tmp)


@contextlib.contextmanager
def atomic_write(path: str, mode: str = 'w') -> Iterator[IO]:
  """`open(path, mode)` for writing, made atomic by `atomic_path`."""
  with atomic_path(path) as tmp, open(tmp, mode) as f:
    yield f


def remove_stale(pattern: str) -> None:
  """Deletes temporary files of writers that were killed (`pattern` names the final files)."""
  for stale in glob.glob(pattern + TEMPORARY_MARK + '*'):
    os.remove(stale)
