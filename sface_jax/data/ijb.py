"""IJB-B / IJB-C in insightface's release layout: the meta files, read and checked.

insightface distributes the IJB test sets (`IJB_release/IJBB`, `IJB_release/IJBC`) as

  <dir>/loose_crop/<image>                    the face images (loosely cropped JPEGs)
  <dir>/meta/<t>_name_5pts_score.txt          image x1 y1 x2 y2 ... x5 y5 detector_score
  <dir>/meta/<t>_face_tid_mid.txt             image template_id media_id
  <dir>/meta/<t>_template_pair_label.txt      template_1 template_2 label (1 same, 0 not)

with t = `ijbc` or `ijbb`, fields separated by single spaces. The landmarks are in the
loose crop's pixel coordinates, in the order left eye, right eye, nose, left and right mouth
corner (what `sface_jax.data.align` expects). insightface's `eval_ijbc.py` reads the
5-point file and the template/media file separately and pairs them by line number, without
checking; here the image names must agree line by line, or it is an error naming the line.
It also maps a template that has no face to template 0 without a word (its `template2id`
table is zero-initialised); here a pair naming a template with no face is an error naming
the pair file and line.

Every malformed line (wrong column count, a number that does not parse, a label other than
0/1) is an `IJBError` naming the file and its 1-based line number.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

TARGETS = ('IJBB', 'IJBC')
LANDMARK_COLUMNS = 12  # name, 10 coordinates, score


class IJBError(ValueError):
  """Malformed or inconsistent IJB meta data; the message names the file and line."""


@dataclasses.dataclass(frozen=True)
class IJBMeta:
  """One IJB test set's meta data, one row per face (in the files' order)."""
  target: str
  image_dir: str
  names: list[str]           # image file names, relative to image_dir
  landmarks: np.ndarray      # float64 (N, 5, 2), (x, y)
  face_scores: np.ndarray    # float32 (N,), the detector's score
  templates: np.ndarray      # int64 (N,)
  medias: np.ndarray         # int64 (N,)
  pairs: np.ndarray          # int64 (P, 2): template ids
  labels: np.ndarray         # int64 (P,): 1 same identity, 0 different
  landmark_file: str = ''

  @property
  def num_faces(self) -> int:
    return len(self.names)


def meta_paths(ijb_dir: str, target: str) -> dict[str, str]:
  """{'landmarks', 'faces', 'pairs', 'images'}: the paths for `target` ('IJBB' or 'IJBC')."""
  key = target.upper()
  if key not in TARGETS:
    raise IJBError(f'target must be one of {", ".join(TARGETS)}; got {target!r}')
  prefix = key.lower()
  meta = os.path.join(ijb_dir, 'meta')
  return {'landmarks': os.path.join(meta, f'{prefix}_name_5pts_score.txt'),
          'faces': os.path.join(meta, f'{prefix}_face_tid_mid.txt'),
          'pairs': os.path.join(meta, f'{prefix}_template_pair_label.txt'),
          'images': os.path.join(ijb_dir, 'loose_crop')}


def _lines(path: str):
  """(line number, fields) of every non-empty line; a missing file is an IJBError."""
  if not os.path.isfile(path):
    raise IJBError(f'{path}: no such file (an IJB folder holds meta/ and loose_crop/)')
  with open(path) as f:
    for number, line in enumerate(f, start=1):
      fields = line.split()
      if fields:
        yield number, fields


def _parse(path: str, number: int, text: str, kind):
  try:
    return kind(text)
  except ValueError:
    what = 'an integer' if kind is int else 'a number'
    raise IJBError(f'{path}, line {number}: {text!r} is not {what}') from None


def read_landmarks(path: str) -> tuple[list[str], np.ndarray, np.ndarray]:
  """`<t>_name_5pts_score.txt` → (names, landmarks float64 (N, 5, 2), scores float32 (N,))."""
  names, points, scores = [], [], []
  for number, fields in _lines(path):
    if len(fields) != LANDMARK_COLUMNS:
      raise IJBError(f'{path}, line {number}: {len(fields)} columns, expected '
                     f'{LANDMARK_COLUMNS} (image name, x1 y1 ... x5 y5, detector score)')
    values = [_parse(path, number, text, float) for text in fields[1:]]
    if not np.all(np.isfinite(values)):
      raise IJBError(f'{path}, line {number}: landmarks and score must be finite')
    names.append(fields[0])
    points.append(values[:10])
    scores.append(values[10])
  if not names:
    raise IJBError(f'{path}: no faces listed')
  return (names, np.asarray(points, np.float64).reshape(-1, 5, 2),
          np.asarray(scores, np.float32))


def read_face_list(path: str) -> tuple[list[str], np.ndarray, np.ndarray]:
  """`<t>_face_tid_mid.txt` → (names, template ids int64 (N,), media ids int64 (N,))."""
  names, templates, medias = [], [], []
  for number, fields in _lines(path):
    if len(fields) != 3:
      raise IJBError(f'{path}, line {number}: {len(fields)} columns, expected 3 '
                     '(image name, template id, media id)')
    names.append(fields[0])
    templates.append(_parse(path, number, fields[1], int))
    medias.append(_parse(path, number, fields[2], int))
  if not names:
    raise IJBError(f'{path}: no faces listed')
  return names, np.asarray(templates, np.int64), np.asarray(medias, np.int64)


def read_pairs(path: str) -> tuple[np.ndarray, np.ndarray]:
  """`<t>_template_pair_label.txt` → (pairs int64 (P, 2), labels int64 (P,))."""
  pairs, labels = [], []
  for number, fields in _lines(path):
    if len(fields) != 3:
      raise IJBError(f'{path}, line {number}: {len(fields)} columns, expected 3 '
                     '(template 1, template 2, label)')
    first, second, label = (_parse(path, number, text, int) for text in fields)
    if label not in (0, 1):
      raise IJBError(f'{path}, line {number}: label {label}, expected 1 (same) or 0')
    pairs.append((first, second))
    labels.append(label)
  if not pairs:
    raise IJBError(f'{path}: no template pairs listed')
  return np.asarray(pairs, np.int64), np.asarray(labels, np.int64)


def load_meta(ijb_dir: str, target: str) -> IJBMeta:
  """Reads and cross-checks the three meta files of `target` under `ijb_dir`."""
  paths = meta_paths(ijb_dir, target)
  names, landmarks, scores = read_landmarks(paths['landmarks'])
  face_names, templates, medias = read_face_list(paths['faces'])
  if len(face_names) != len(names):
    raise IJBError(f'{paths["faces"]} lists {len(face_names)} faces but {paths["landmarks"]} '
                   f'lists {len(names)}: the two files must list the same images in the same '
                   'order')
  for index, (name, other) in enumerate(zip(names, face_names)):
    if name != other:
      raise IJBError(f'face {index + 1}: {paths["landmarks"]} names {name!r} but '
                     f'{paths["faces"]} names {other!r} (the files must list the same images '
                     'in the same order; counting non-empty lines)')
  pairs, labels = read_pairs(paths['pairs'])
  known = set(np.unique(templates).tolist())
  missing = ~np.isin(pairs, np.fromiter(known, np.int64, len(known)))
  if missing.any():
    row, column = map(int, np.argwhere(missing)[0])
    line = _line_of_pair(paths['pairs'], row)
    raise IJBError(f'{paths["pairs"]}, line {line}: template {int(pairs[row, column])} has no '
                   f'face (no media) in {paths["faces"]}')
  return IJBMeta(target=target.upper(), image_dir=paths['images'], names=names,
                 landmarks=landmarks, face_scores=scores, templates=templates, medias=medias,
                 pairs=pairs, labels=labels, landmark_file=paths['landmarks'])


def _line_of_pair(path: str, row: int) -> int:
  """The 1-based line number of the `row`-th non-empty line of `path`."""
  for index, (number, _) in enumerate(_lines(path)):
    if index == row:
      return number
  return -1


def landmark_line(meta: IJBMeta, index: int) -> int:
  """The 1-based line of face `index` in the 5-point file (for error messages)."""
  return _line_of_pair(meta.landmark_file, index)
