"""Shared test fixtures.

`shared_data` is `../shared/data` next to the repository (the AT&T/ORL faces as images and
as an insightface RecordIO dataset). Tests that need it skip only when that folder is absent
(a user's machine); in CI it is present.
"""

import os
import pathlib
import tempfile

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
# Many tests (and the subprocesses they start, which inherit the environment) compile the same
# small train steps; XLA's persistent cache turns a repeat compile from seconds into a load.
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR',
                      os.path.join(tempfile.gettempdir(), 'sface_jax_test_xla_cache'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.5')

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / 'shared' / 'data'


@pytest.fixture(scope='session')
def shared_data() -> pathlib.Path:
  if not SHARED_DATA.is_dir():
    pytest.skip(f'{SHARED_DATA} is absent (real-face data ships only beside CI checkouts)')
  return SHARED_DATA
