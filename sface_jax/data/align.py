"""Face alignment from 5 landmarks: a similarity transform onto the ArcFace template, warped.

Every model in this field (ArcFace, CosFace, SFace, AdaFace, and the insightface `.bin`
verification sets) sees faces aligned the same way: the five landmarks a detector gives
(left eye, right eye, nose tip, left and right mouth corners, in the image's x-right,
y-down pixel coordinates, left/right as seen in the image) are mapped by the least-squares
similarity transform (rotation, uniform scale, translation; no shear, no reflection) onto
fixed positions in a 112×112 crop, and the image is resampled through that transform.

* Template: insightface's `arcface_dst` (python-package/insightface/utils/face_align.py),
  `ARCFACE_TEMPLATE` below. For a crop of S pixels it is scaled by S/112, for every S:
  a model trained here at input size S saw the 112 × 112 crops resized to S × S, i.e. this
  template scaled by S/112. (insightface's `estimate_norm` does that for multiples of 112;
  for multiples of 128 it places the face as the 128-pixel crops of older recipes did, at
  S/128 scale with x shifted by 8·S/128, a smaller face than our training saw; other sizes
  it refuses.)
* Transform: Umeyama, "Least-squares estimation of transformation parameters between two
  point patterns", IEEE TPAMI 13(4), 1991 (the estimator skimage's SimilarityTransform and
  insightface use), written here in NumPy float64: centre both point sets, take the SVD of
  their cross-covariance, flip the last singular direction when its determinant is negative
  so the result is a rotation and never a mirror, scale = trace(D·S) / source variance.
* Warp: bilinear sampling at integer pixel centres (OpenCV's `warpAffine` and skimage's
  `warp(order=1)` convention: pixel (x, y) is the point (x, y), not (x + 0.5, y + 0.5)), each
  output pixel read from the inverse-mapped point of the input; a neighbour outside the image
  counts as 0 (`borderValue=0`, skimage `mode='constant', cval=0`), so a face near the border
  fades to black rather than smearing. OpenCV interpolates with 5-bit fixed-point weights,
  so its uint8 result can differ from this one by a grey level or two; skimage's equals it
  to rounding (tested).

Landmark positions are in the image's pixel-index coordinates (the detector's output as
insightface's RetinaFace/SCRFD give it). Nothing here needs OpenCV or scikit-image.
"""

from __future__ import annotations

import numpy as np

# insightface `arcface_dst`: left eye, right eye, nose, left and right mouth corner, (x, y)
# in a 112 × 112 crop.
ARCFACE_TEMPLATE = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                             [41.5493, 92.3655], [70.7299, 92.2041]], np.float64)
NUM_LANDMARKS = 5


def template(image_size: int = 112) -> np.ndarray:
  """The five target positions (5, 2) in an image_size × image_size crop: the 112-pixel
  template × image_size / 112 (module docstring)."""
  if image_size <= 0:
    raise ValueError(f'image_size must be positive; got {image_size}')
  return ARCFACE_TEMPLATE * (image_size / 112.0)


def check_landmarks(landmarks, where: str = 'landmarks') -> np.ndarray:
  """`landmarks` as float64 (5, 2), or a ValueError naming `where` and what is wrong.

  Also accepted: the flat (10,) layout x1, y1, ..., x5, y5 that detectors and landmark files
  often use. Anything else (68-point sets, (2, 5) transposed arrays, NaN) is an error rather
  than a silently wrong crop.
  """
  points = np.asarray(landmarks, dtype=np.float64)
  if points.shape == (2 * NUM_LANDMARKS,):
    points = points.reshape(NUM_LANDMARKS, 2)
  if points.shape != (NUM_LANDMARKS, 2):
    raise ValueError(
        f'{where}: expected 5 (x, y) landmarks, shape (5, 2) or (10,) (left eye, right eye, '
        f'nose, left mouth corner, right mouth corner); got shape {np.shape(landmarks)}')
  if not np.all(np.isfinite(points)):
    raise ValueError(f'{where}: landmarks must be finite; got {points.tolist()}')
  return points


def umeyama(source: np.ndarray, target: np.ndarray, estimate_scale: bool = True) -> np.ndarray:
  """The least-squares similarity transform taking `source` points onto `target` points.

  Minimises Σ‖target_i − (c·R·source_i + t)‖² over rotations R (det R = +1), scale c > 0
  (fixed at 1 without `estimate_scale`) and translation t (Umeyama 1991, Theorem 1 and
  eq. 40-42). Points are (N, d), N ≥ 2 distinct; returns the (d + 1, d + 1) homogeneous
  matrix [[c·R, t], [0, 1]], float64.
  """
  source = np.asarray(source, np.float64)
  target = np.asarray(target, np.float64)
  if source.shape != target.shape or source.ndim != 2:
    raise ValueError(f'source and target must both be (N, d); got {source.shape} and '
                     f'{target.shape}')
  num, dim = source.shape
  source_mean, target_mean = source.mean(axis=0), target.mean(axis=0)
  source_centred, target_centred = source - source_mean, target - target_mean
  source_variance = np.mean(np.sum(source_centred ** 2, axis=1))
  if source_variance <= 1e-12 * max(1.0, float(np.max(np.abs(source)))) ** 2:
    raise ValueError(f'the {num} source points coincide: no transform is determined')
  covariance = target_centred.T @ source_centred / num  # Σ_xy of the paper (d, d)
  u, singular, vt = np.linalg.svd(covariance)
  signs = np.ones(dim)
  rank = int(np.sum(singular > 1e-12 * singular[0])) if singular[0] > 0 else 0
  if rank == dim - 1:  # eq. 43: the sign is fixed by det(U)·det(V) when Σ_xy is singular
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
      signs[-1] = -1.0
  elif np.linalg.det(covariance) < 0:  # eq. 39: a reflection fits better; take the rotation
    signs[-1] = -1.0
  rotation = u @ np.diag(signs) @ vt
  scale = float(singular @ signs / source_variance) if estimate_scale else 1.0
  matrix = np.eye(dim + 1)
  matrix[:dim, :dim] = scale * rotation
  matrix[:dim, dim] = target_mean - scale * rotation @ source_mean
  return matrix


def estimate_transform(landmarks, image_size: int = 112) -> np.ndarray:
  """The (2, 3) affine matrix taking image pixels to crop pixels: crop = M @ [x, y, 1]."""
  points = check_landmarks(landmarks)
  return umeyama(points, template(image_size))[:2]


def warp_affine(image: np.ndarray, matrix: np.ndarray, output_size: int | tuple[int, int],
                border_value: float = 0.0) -> np.ndarray:
  """`image` resampled through `matrix` (2, 3), output pixel p ← input at M⁻¹·p, bilinear.

  `image` is (H, W) or (H, W, C), any real dtype; the output has its dtype (uint8 and other
  integer types rounded to nearest and clipped to their range). `output_size` is S or
  (height, width). Neighbours outside the input count as `border_value`.
  """
  image = np.asarray(image)
  if image.ndim not in (2, 3):
    raise ValueError(f'image must be (H, W) or (H, W, C); got shape {image.shape}')
  matrix = np.asarray(matrix, np.float64)
  if matrix.shape != (2, 3):
    raise ValueError(f'matrix must be (2, 3); got {matrix.shape}')
  out_h, out_w = (output_size, output_size) if np.isscalar(output_size) else output_size
  full = np.vstack([matrix, [0.0, 0.0, 1.0]])
  if abs(np.linalg.det(full)) < 1e-12:
    raise ValueError(f'matrix {matrix.tolist()} is singular')
  inverse = np.linalg.inv(full)[:2]
  ys, xs = np.mgrid[0:out_h, 0:out_w].astype(np.float64)
  src_x = inverse[0, 0] * xs + inverse[0, 1] * ys + inverse[0, 2]
  src_y = inverse[1, 0] * xs + inverse[1, 1] * ys + inverse[1, 2]
  x0, y0 = np.floor(src_x), np.floor(src_y)
  fx, fy = src_x - x0, src_y - y0
  x0, y0 = x0.astype(np.int64), y0.astype(np.int64)
  pixels = image.astype(np.float64)
  if pixels.ndim == 2:
    pixels = pixels[..., None]
  height, width = pixels.shape[:2]
  out = np.zeros((out_h, out_w, pixels.shape[2]), np.float64)
  for dy, wy in ((0, 1.0 - fy), (1, fy)):
    for dx, wx in ((0, 1.0 - fx), (1, fx)):
      xi, yi = x0 + dx, y0 + dy
      inside = (xi >= 0) & (xi < width) & (yi >= 0) & (yi < height)
      values = pixels[np.clip(yi, 0, height - 1), np.clip(xi, 0, width - 1)]
      values = np.where(inside[..., None], values, border_value)
      out += (wx * wy)[..., None] * values
  if image.ndim == 2:
    out = out[..., 0]
  if np.issubdtype(image.dtype, np.integer):
    info = np.iinfo(image.dtype)
    return np.clip(np.rint(out), info.min, info.max).astype(image.dtype)
  return out.astype(image.dtype)


def align_face(image: np.ndarray, landmarks, image_size: int = 112) -> np.ndarray:
  """The aligned image_size × image_size crop of the face with these 5 landmarks."""
  return warp_affine(image, estimate_transform(landmarks, image_size), image_size)


def align_faces(images, landmarks, image_size: int = 112) -> np.ndarray:
  """Aligned crops (N, S, S, C) of N images (each (H, W, C), sizes may differ) with
  landmarks (N, 5, 2); a wrong landmark array is an error naming its face."""
  landmarks = np.asarray(landmarks, np.float64)
  if landmarks.ndim != 3 or landmarks.shape[0] != len(images):
    raise ValueError(f'landmarks must be (N, 5, 2) for N = {len(images)} images; got shape '
                     f'{landmarks.shape}')
  crops = [warp_affine(image, estimate_transform(check_landmarks(points, f'face {i}'),
                                                 image_size), image_size)
           for i, (image, points) in enumerate(zip(images, landmarks))]
  return np.stack(crops)
