"""5-landmark alignment (sface_jax.data.align) against transforms computed by hand, and
against scikit-image's SimilarityTransform and warp when scikit-image is installed."""

import math

import numpy as np
import pytest
from PIL import Image

from sface_jax.data import align

TEMPLATE = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                     [41.5493, 92.3655], [70.7299, 92.2041]])


def _similarity(scale, degrees, tx, ty):
  """[[s·cos, −s·sin, tx], [s·sin, s·cos, ty]], written out by hand."""
  c, s = scale * math.cos(math.radians(degrees)), scale * math.sin(math.radians(degrees))
  return np.array([[c, -s, tx], [s, c, ty]])


def _apply(matrix, points):
  return points @ matrix[:, :2].T + matrix[:, 2]


def _inverse(matrix):
  return np.linalg.inv(np.vstack([matrix, [0, 0, 1]]))[:2]


@pytest.mark.parametrize('scale,degrees,tx,ty', [
    (1.0, 0.0, 0.0, 0.0), (0.37, 23.0, 13.0, -4.0), (2.5, -170.0, 210.5, 91.25),
    (1.9, 90.0, -30.0, 400.0)])
def test_a_known_similarity_is_recovered_exactly(scale, degrees, tx, ty):
  # The face in the photo is the template moved by the inverse of `want`: aligning it must
  # give back `want` (crop = want · photo).
  want = _similarity(scale, degrees, tx, ty)
  landmarks = _apply(_inverse(want), TEMPLATE)
  got = align.estimate_transform(landmarks)
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-9)
  np.testing.assert_allclose(_apply(got, landmarks), TEMPLATE, rtol=0, atol=1e-9)
  # The flat (10,) layout x1, y1, ..., x5, y5 means the same.
  np.testing.assert_allclose(align.estimate_transform(landmarks.reshape(-1)), got, atol=1e-12)


def test_template_and_its_other_sizes():
  np.testing.assert_array_equal(align.template(112), TEMPLATE)
  for size in (96, 128, 160, 224):  # not only multiples of 112 (insightface refuses 96, 160)
    np.testing.assert_allclose(align.template(size), TEMPLATE * size / 112, rtol=1e-15)


@pytest.mark.parametrize('size', [96, 128, 160])
def test_aligned_crops_of_other_sizes_put_the_landmarks_on_the_scaled_template(size):
  """A photo with a bright blob on each landmark: in the crop at S the blobs' centroids sit
  at the 112 template × S/112, where training's crops (112, resized to S) have them."""
  landmarks = _apply(_inverse(_similarity(0.6, 17.0, -25.0, 10.0)), TEMPLATE)  # 1/0.6 size
  ys, xs = np.mgrid[0:260, 0:260].astype(np.float64)
  photo = np.zeros((260, 260))
  for x, y in landmarks:
    photo += 250 * np.exp(-((xs - x) ** 2 + (ys - y) ** 2) / (2 * 3.0 ** 2))
  crop = align.align_face(photo, landmarks, size)
  want = TEMPLATE * size / 112
  cy, cx = np.mgrid[0:size, 0:size].astype(np.float64)
  for x, y in want:
    window = (np.abs(cx - x) <= 7) & (np.abs(cy - y) <= 7)
    weights = crop * window
    centroid = (np.sum(weights * cx) / weights.sum(), np.sum(weights * cy) / weights.sum())
    np.testing.assert_allclose(centroid, (x, y), atol=0.15)


def test_noisy_landmarks_least_squares_and_no_mirror():
  rng = np.random.default_rng(0)
  landmarks = _apply(_inverse(_similarity(0.5, 12, 20, 30)), TEMPLATE)
  landmarks += rng.normal(0, 2.0, landmarks.shape)
  matrix = align.estimate_transform(landmarks)
  linear = matrix[:, :2]
  # A similarity: equal column norms, orthogonal columns, positive determinant.
  assert abs(np.linalg.norm(linear[:, 0]) - np.linalg.norm(linear[:, 1])) < 1e-12
  assert abs(linear[:, 0] @ linear[:, 1]) < 1e-12 and np.linalg.det(linear) > 0
  # Least squares: any small change of the four parameters fits worse.
  def cost(params):
    a, b, tx, ty = params
    m = np.array([[a, -b, tx], [b, a, ty]])
    return np.sum((_apply(m, landmarks) - TEMPLATE) ** 2)
  best = np.array([linear[0, 0], linear[1, 0], matrix[0, 2], matrix[1, 2]])
  for delta in np.eye(4) * 1e-4:
    assert cost(best + delta) > cost(best) and cost(best - delta) > cost(best)
  # Mirrored landmarks (left and right swapped in x) still give a rotation, not a reflection.
  mirrored = landmarks * [-1, 1]
  assert np.linalg.det(align.estimate_transform(mirrored)[:, :2]) > 0


def test_bad_landmarks_fail_clearly():
  for bad in (np.zeros((68, 2)), np.zeros((2, 5)), np.zeros((5, 3)), np.zeros(8)):
    with pytest.raises(ValueError, match=r'expected 5 \(x, y\) landmarks.*got shape'):
      align.estimate_transform(bad)
  with pytest.raises(ValueError, match='finite'):
    align.estimate_transform(np.full((5, 2), np.nan))
  with pytest.raises(ValueError, match='coincide'):
    align.estimate_transform(np.ones((5, 2)))
  faces = [np.zeros((8, 8, 3))] * 2
  landmarks = np.stack([TEMPLATE, np.full((5, 2), np.nan)])
  with pytest.raises(ValueError, match='face 1: landmarks must be finite'):
    align.align_faces(faces, landmarks)
  with pytest.raises(ValueError, match=r'landmarks must be \(N, 5, 2\) for N = 2'):
    align.align_faces(faces, landmarks[:1])


def test_warp_of_a_linear_image_is_exact():
  # Bilinear interpolation reproduces a linear function of (x, y) exactly, so every crop
  # pixel whose source neighbours lie inside the photo equals f(M⁻¹ · pixel).
  height, width = 300, 260
  ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
  f = lambda x, y: 0.3 * x + 0.7 * y + 5.0
  photo = np.stack([f(xs, ys), f(xs, ys) * 0.5, 250 - f(xs, ys) * 0.2], axis=-1)
  matrix = _similarity(0.6, 17, -20, -35)
  crop = align.warp_affine(photo, matrix, 112)
  v, u = np.mgrid[0:112, 0:112].astype(np.float64)
  source = np.stack([u.ravel(), v.ravel()], 1) @ _inverse(matrix)[:, :2].T + _inverse(matrix)[:, 2]
  inside = ((source[:, 0] >= 0) & (source[:, 0] <= width - 1) & (source[:, 1] >= 0)
            & (source[:, 1] <= height - 1)).reshape(112, 112)
  assert inside.mean() > 0.9
  want = f(source[:, 0], source[:, 1]).reshape(112, 112)
  np.testing.assert_allclose(crop[..., 0][inside], want[inside], rtol=0, atol=1e-9)
  np.testing.assert_allclose(crop[..., 1][inside], 0.5 * want[inside], rtol=0, atol=1e-9)
  # Far outside the photo the crop is the border value.
  far = align.warp_affine(photo, _similarity(1, 0, 5000, 5000), 8)
  assert np.all(far == 0)
  # Integer images come back rounded, in their dtype; greyscale stays 2-D.
  grey_photo = np.clip(photo[..., 0], 0, 255).astype(np.uint8)
  grey = align.warp_affine(grey_photo, matrix, 112)
  assert grey.dtype == np.uint8 and grey.shape == (112, 112)
  np.testing.assert_array_equal(
      grey, np.rint(align.warp_affine(grey_photo.astype(np.float64), matrix, 112)))


def test_identity_alignment_of_an_aligned_face(shared_data):
  """A face already at the template positions comes back pixel for pixel."""
  with Image.open(shared_data / 'orl' / 'faces' / 's1' / '1.pgm') as img:
    face = np.asarray(img.convert('RGB').resize((112, 112)))
  crop = align.align_face(face, TEMPLATE)
  np.testing.assert_array_equal(crop, face)
  shifted = align.align_face(face, TEMPLATE + [3, -2])  # landmarks 3 right, 2 up
  np.testing.assert_array_equal(shifted[2:, :-3], face[:-2, 3:])
  both = align.align_faces([face, face], np.stack([TEMPLATE, TEMPLATE + [3, -2]]))
  np.testing.assert_array_equal(both, np.stack([crop, shifted]))


def test_against_scikit_image(shared_data):
  transform = pytest.importorskip('skimage.transform')
  rng = np.random.default_rng(1)
  with Image.open(shared_data / 'orl' / 'faces' / 's3' / '4.pgm') as img:
    photo = np.asarray(img.convert('RGB').resize((184, 224)))  # (224, 184, 3)
  for trial in range(5):
    want = _similarity(rng.uniform(0.4, 1.5), rng.uniform(-40, 40), rng.uniform(-50, 20),
                       rng.uniform(-60, 10))
    landmarks = _apply(_inverse(want), TEMPLATE) + rng.normal(0, 1.5, (5, 2)) * (trial > 0)
    if hasattr(transform.SimilarityTransform, 'from_estimate'):  # scikit-image >= 0.26
      reference = transform.SimilarityTransform.from_estimate(landmarks, TEMPLATE)
    else:
      reference = transform.SimilarityTransform()
      assert reference.estimate(landmarks, TEMPLATE)
    matrix = align.estimate_transform(landmarks)
    np.testing.assert_allclose(matrix, reference.params[:2], rtol=0, atol=1e-9)
    crop = align.warp_affine(photo.astype(np.float64), matrix, 112)
    expected = transform.warp(photo.astype(np.float64), reference.inverse, output_shape=(112, 112),
                              order=1, mode='constant', cval=0.0, preserve_range=True)
    assert expected.mean() > 20  # mostly face, not border
    np.testing.assert_allclose(crop, expected, rtol=0, atol=1e-6)
