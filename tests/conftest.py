"""Shared test fixtures.

`shared_data` is `../shared/data` next to the repository (the AT&T/ORL faces as images and
as an insightface RecordIO dataset). Tests that need it skip only when that folder is absent
(a user's machine); in CI it is present.
"""

import os
import pathlib

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / 'shared' / 'data'


@pytest.fixture(scope='session')
def shared_data() -> pathlib.Path:
  if not SHARED_DATA.is_dir():
    pytest.skip(f'{SHARED_DATA} is absent (real-face data ships only beside CI checkouts)')
  return SHARED_DATA
