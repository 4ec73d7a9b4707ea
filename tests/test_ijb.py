"""IJB-B/C 1:1 verification (sface_jax.evaluation.ijb) on a tiny IJB-layout folder.

The folder is built from ORL faces: 6 people × 10 images, each image pasted at a known
offset into a larger JPEG "loose crop", with 5 landmarks placed at the ArcFace template plus
that offset, so that alignment must recover exactly the pasted 112×112 face. Templates hold
2-3 images over 1-2 media (one media id shared by two templates of a person, which must be
pooled per template). Template scores are checked against a NumPy reference written here
with loops, from embeddings of the known crops.
"""

import dataclasses
import io
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import tiny_backbone
from sface_jax import models
from sface_jax.data import align
from sface_jax.data import ijb as ijb_data
from sface_jax.evaluation import ijb

SIZE = 112  # the template is exact at 112: integer offsets make alignment a pure shift
PEOPLE = 6
CANVAS = (150, 140)  # (height, width) of each loose crop
# Per person: (template index, media index) of images 1..10; media index 0 of templates 0
# and 2 get the same media id (a media shared by two templates).
LAYOUT = [(0, 0), (0, 0), (0, 1), (1, 2), (1, 2), (2, 0), (2, 3), (2, 3), (3, 4), (3, 5)]


def randomised_tiny(seed=0):
  model = models.get_model('tiny', embedding_dim=16)
  variables = model.init(jax.random.key(seed), jnp.zeros((1, SIZE, SIZE, 3)), train=False)
  rng = np.random.default_rng(seed)
  def randomise(path, leaf):
    name = jax.tree_util.keystr(path)
    shape = np.shape(leaf)
    if name.endswith("['var']"):
      return rng.uniform(0.5, 2.0, shape).astype(np.float32)
    if name.endswith("['mean']") or name.endswith("['bias']"):
      return rng.normal(0.0, 0.2, shape).astype(np.float32)
    if name.endswith("['scale']"):
      return rng.uniform(0.5, 1.5, shape).astype(np.float32)
    if name.endswith("['alpha']"):
      return rng.uniform(0.0, 0.5, shape).astype(np.float32)
    return rng.normal(0.0, np.sqrt(2.0 / np.prod(shape[:-1])), shape).astype(np.float32)
  return model, jax.tree_util.tree_map_with_path(randomise, variables)


@pytest.fixture(scope='module')
def ijb_folder(shared_data, tmp_path_factory):
  """(ijb_dir, faces: list of dicts with the known crop, template, media, score)."""
  root = tmp_path_factory.mktemp('ijb') / 'IJBC'
  (root / 'meta').mkdir(parents=True)
  (root / 'loose_crop').mkdir()
  rng = np.random.default_rng(0)
  faces, landmark_lines, face_lines = [], [], []
  for person in range(PEOPLE):
    for image in range(10):
      grey = np.asarray(Image.open(shared_data / 'orl' / 'faces' / f's{person + 1}' /
                                   f'{image + 1}.pgm'), np.float64)
      grey = np.pad(grey, ((0, 0), (10, 10)), mode='edge')  # 112×92 → 112×112
      rgb = np.stack([grey, 0.8 * grey + 20, 0.6 * grey + 40], axis=-1)  # not grey: RGB order
      canvas = rng.uniform(0, 255, CANVAS + (3,))
      ox, oy = int(rng.integers(0, CANVAS[1] - SIZE)), int(rng.integers(0, CANVAS[0] - SIZE))
      canvas[oy:oy + SIZE, ox:ox + SIZE] = rgb
      name = f'{len(faces) + 1}.jpg'
      buffer = io.BytesIO()
      Image.fromarray(np.clip(np.rint(canvas), 0, 255).astype(np.uint8)).save(
          buffer, 'JPEG', quality=95)
      (root / 'loose_crop' / name).write_bytes(buffer.getvalue())
      decoded = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert('RGB'))
      template_index, media_index = LAYOUT[image]
      template = 100 + 4 * person + template_index
      media = 5000 + 10 * person + media_index
      score = float(np.round(rng.uniform(0.5, 1.0), 4))
      points = align.ARCFACE_TEMPLATE + (ox, oy)
      landmark_lines.append(' '.join([name] + [f'{v:.4f}' for v in points.reshape(-1)]
                                     + [f'{score}']))
      face_lines.append(f'{name} {template} {media}')
      faces.append({'crop': decoded[oy:oy + SIZE, ox:ox + SIZE], 'template': template,
                    'media': media, 'score': score, 'person': person})
  templates = sorted({face['template'] for face in faces})
  person_of = {face['template']: face['person'] for face in faces}
  pair_lines = [f'{a} {b} {int(person_of[a] == person_of[b])}'
                for i, a in enumerate(templates) for b in templates[i + 1:]]
  (root / 'meta' / 'ijbc_name_5pts_score.txt').write_text('\n'.join(landmark_lines) + '\n')
  (root / 'meta' / 'ijbc_face_tid_mid.txt').write_text('\n'.join(face_lines) + '\n')
  (root / 'meta' / 'ijbc_template_pair_label.txt').write_text('\n'.join(pair_lines) + '\n')
  return root, faces


def reference_scores(features, faces, pairs, detector_score=True):
  """eval_ijbc's pooling with plain loops, float64."""
  per_template = {}
  for feature, face in zip(features, faces):
    weight = face['score'] if detector_score else 1.0
    per_template.setdefault(face['template'], {}).setdefault(face['media'], []).append(
        np.asarray(feature, np.float64) * np.float32(weight))
  pooled = {}
  for template, medias in per_template.items():
    total = sum(np.mean(np.stack(rows), axis=0) for rows in medias.values())
    pooled[template] = total / np.linalg.norm(total)
  return np.array([pooled[a] @ pooled[b] for a, b in pairs])


def test_scores_match_numpy_reference(ijb_folder, tmp_path):
  root, faces = ijb_folder
  model, variables = randomised_tiny()
  workdir, _, _ = tiny_backbone.write_workdir(tmp_path / 'tiny', image_size=SIZE,
                                              embedding_dim=16, source='test_ijb',
                                              variables=variables)
  assert ijb.main(['--workdir', str(workdir), '--ijb-dir', str(root), '--target', 'ijbc',
                   '--batch-size', '32', '--workers', '2']) == 0
  with open(workdir / 'eval' / 'ijb_ijbc.json') as f:
    report = json.load(f)
  assert (report['faces'], report['templates']) == (10 * PEOPLE, 4 * PEOPLE)
  assert set(report['tar_at_far']) == {'1e-6', '1e-5', '1e-4', '1e-3', '1e-2', '1e-1'}
  assert (workdir / 'eval' / 'ijb_ijbc_roc.png').stat().st_size > 0
  scores = np.load(workdir / 'eval' / 'ijb_ijbc_scores.npy')

  # Reference: the known crops, embedded with their flips by the model directly.
  crops = np.stack([face['crop'] for face in faces]).astype(np.float32)
  apply = jax.jit(lambda x: model.apply(variables, (x - 127.5) / 128, train=False)[0])
  features = np.asarray(apply(crops)) + np.asarray(apply(crops[:, :, ::-1]))
  meta = ijb_data.load_meta(str(root), 'IJBC')
  want = reference_scores(features, faces, meta.pairs)
  # The crops are exact (test_alignment_recovers_the_pasted_face); what remains is float32
  # round-off of the two pipelines' batching.
  np.testing.assert_allclose(scores, want, rtol=0, atol=1e-5)
  # On the same features the pooling and scoring agree to float64 round-off.
  result = ijb.verify(features, meta)
  np.testing.assert_allclose(result.scores, want, rtol=0, atol=1e-6)
  unweighted = ijb.verify(features, meta, detector_score=False)
  np.testing.assert_allclose(unweighted.scores,
                             reference_scores(features, faces, meta.pairs, False), atol=1e-6)
  assert not np.allclose(unweighted.scores, result.scores)  # the scores do weigh


def test_alignment_recovers_the_pasted_face(ijb_folder):
  root, faces = ijb_folder
  meta = ijb_data.load_meta(str(root), 'IJBC')
  for index in (0, 17, 59):
    crop = ijb.aligned_face(meta, index, SIZE, align.align_face)
    assert crop.shape == (SIZE, SIZE, 3) and crop.dtype == np.uint8
    np.testing.assert_array_equal(crop, faces[index]['crop'])  # an exact shift: exact


def test_pooling_follows_eval_ijbc():
  features = np.array([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0], [0.0, 0.0], [5.0, 5.0]])
  templates = np.array([7, 7, 7, 3, 3])
  medias = np.array([1, 1, 2, 1, 9])  # media 1 in two templates: grouped per template
  pooled, ids = ijb.template_features(features, templates, medias)
  np.testing.assert_array_equal(ids, [3, 7])
  # template 7: mean(1, 3) = (2, 0) from media 1, plus (0, 2) → (2, 2)/‖·‖
  np.testing.assert_allclose(pooled[1], [2 ** -0.5, 2 ** -0.5])
  np.testing.assert_allclose(pooled[0], [2 ** -0.5, 2 ** -0.5])


def test_roc_and_tar_follow_sklearn_and_eval_ijbc():
  # scikit-learn's documented roc_curve example (drop_intermediate=True).
  fpr, tpr, thresholds = ijb.roc_curve(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8]))
  np.testing.assert_allclose(fpr, [0, 0, 0.5, 0.5, 1])
  np.testing.assert_allclose(tpr, [0, 0.5, 0.5, 1, 1])
  np.testing.assert_allclose(thresholds, [np.inf, 0.8, 0.4, 0.35, 0.1])
  # Every kept point is a brute-force (FPR, TPR) at its threshold (score ≥ t accepted), and
  # the dropped ones lie on straight segments between kept ones.
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 2, 500)
  scores = np.round(rng.normal(labels, 1.0), 1)  # ties on purpose
  fpr, tpr, thresholds = ijb.roc_curve(labels, scores)
  for f, t, threshold in zip(fpr[1:], tpr[1:], thresholds[1:]):
    accepted = scores >= threshold
    assert f == np.mean(accepted[labels == 0]) and t == np.mean(accepted[labels == 1])
  for threshold in np.unique(scores):
    accepted = scores >= threshold
    f, t = np.mean(accepted[labels == 0]), np.mean(accepted[labels == 1])
    assert any(fpr[i] <= f <= fpr[i + 1] and tpr[i] <= t <= tpr[i + 1] and
               abs((fpr[i + 1] - fpr[i]) * (t - tpr[i]) - (tpr[i + 1] - tpr[i]) * (f - fpr[i]))
               < 1e-12 for i in range(len(fpr) - 1))
  assert len(fpr) < len(np.unique(scores)) + 1  # some points were dropped
  # eval_ijbc's TAR: nearest FPR; among equally near points the highest TPR.
  fpr = np.array([0.0, 0.001, 0.001, 0.003, 0.01, 1.0])
  tpr = np.array([0.0, 0.40, 0.50, 0.60, 0.70, 1.0])
  table = ijb.tar_at_far(fpr, tpr, (1e-6, 1e-3, 2e-3, 1e-1))
  assert table == {1e-6: 0.0, 1e-3: 0.5, 2e-3: 0.6, 1e-1: 0.7}


def _write(path, text):
  path.write_text(text)


def test_bad_meta_files_name_file_and_line(ijb_folder, tmp_path):
  root, _ = ijb_folder
  copy = tmp_path / 'IJBC'
  (copy / 'meta').mkdir(parents=True)
  (copy / 'loose_crop').symlink_to(root / 'loose_crop')
  meta_files = ['ijbc_name_5pts_score.txt', 'ijbc_face_tid_mid.txt',
                'ijbc_template_pair_label.txt']
  original = {name: (root / 'meta' / name).read_text().splitlines() for name in meta_files}

  def write(**changes):
    for name in meta_files:
      lines = list(original[name])
      for index, line in changes.get(name.split('_', 1)[1].split('.')[0], {}).items():
        if line is None:
          del lines[index]
        else:
          lines[index] = line
      _write(copy / 'meta' / name, '\n'.join(lines) + '\n')

  # A landmark line with a coordinate missing (11 columns).
  bad = original['ijbc_name_5pts_score.txt'][2].rsplit(' ', 2)
  write(name_5pts_score={2: bad[0] + ' ' + bad[2]})
  with pytest.raises(ijb_data.IJBError, match=r'ijbc_name_5pts_score.txt, line 3: 11 columns'):
    ijb_data.load_meta(str(copy), 'IJBC')
  # A pair naming a template with no face (no media).
  write(template_pair_label={4: '100 999 0'})
  with pytest.raises(ijb_data.IJBError,
                     match=r'ijbc_template_pair_label.txt, line 5: template 999 has no face'):
    ijb_data.load_meta(str(copy), 'IJBC')
  # The two face lists disagree.
  write(face_tid_mid={6: 'other.jpg 101 5001'})
  with pytest.raises(ijb_data.IJBError, match=r"face 7: .* names '7.jpg' but .* 'other.jpg'"):
    ijb_data.load_meta(str(copy), 'IJBC')
  # A missing image: the error names the image and its line in the 5-point file.
  write()
  meta = ijb_data.load_meta(str(copy), 'IJBC')
  meta = dataclasses.replace(meta, image_dir=str(tmp_path / 'nowhere'))
  with pytest.raises(ijb_data.IJBError, match=r'nowhere/4.jpg: cannot read .* line 4'):
    ijb.aligned_face(meta, 3, SIZE, align.align_face)
