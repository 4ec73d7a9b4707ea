"""Verification protocol, embedding and reports of `sface_jax.evaluate`.

The reference below is insightface `arcface_torch/eval/verification.py` re-derived in plain
NumPy float64, one fold at a time and one comparison matrix per fold (the implementation under
test sorts the distances and counts with `searchsorted`, so the two share no code path):
`sklearn.normalize`, squared distances, `KFold(10, shuffle=False)` folds, `np.argmax` over
the training accuracy at thresholds `np.arange(0, 4, 0.01)`, and `calculate_val`'s FAR curve
on `np.arange(0, 4, 0.001)` inverted by `interp1d(kind='slinear')` as SciPy <= 1.8 computed it
(SciPy >= 1.9 refuses the repeated FAR values that every real curve has). That interpolant was
a linear B-spline with knots (x0, x0, ..., xn, xn): we build exactly that with SciPy's BSpline.
"""

import dataclasses
import io
import json
import os
import pickle
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from scipy import interpolate

import multi_device
from sface_jax.configs import base as base_config
from sface_jax import checkpoint
from sface_jax import evaluate
from sface_jax.data import pair_sets
from sface_jax.evaluation import embedding
from sface_jax.evaluation import far_resolution
from sface_jax.evaluation import report
from sface_jax.evaluation import verification

FARS = (1e-3, 1e-4)


# ---- the reference -------------------------------------------------------------------------


def _scipy18_slinear(x, y):
  """`scipy.interpolate.interp1d(x, y, kind='slinear')` as SciPy 1.8 built it."""
  order = np.argsort(x, kind='mergesort')
  x, y = x[order], y[order]
  return interpolate.BSpline.construct_fast(np.r_[x[0], x, x[-1]], y, 1)


def _reference(embeddings_a, embeddings_b, issame, num_folds=10):
  def normalize(x):
    x = np.asarray(x, np.float64)
    norms = np.sqrt(np.einsum('ij,ij->i', x, x))
    norms[norms == 0] = 1.0
    return x / norms[:, None]

  dist = np.sum(np.square(normalize(embeddings_a) - normalize(embeddings_b)), axis=1)
  same = np.asarray(issame, bool)
  everything = np.arange(len(same))
  splits = [(np.setdiff1d(everything, test) if num_folds > 1 else test, test)
            for test in np.array_split(everything, num_folds)]

  thresholds = np.arange(0, 4, 0.01)
  accuracy, chosen, tprs, fprs, tied = [], [], [], [], 0
  for train, test in splits:
    correct_train = ((dist[train][None, :] < thresholds[:, None]) == same[train]).sum(1)
    best = int(np.argmax(correct_train / float(len(train))))
    tied += int(np.sum(correct_train == correct_train[best]) > 1)
    chosen.append(thresholds[best])
    predicted = dist[test][None, :] < thresholds[:, None]
    positives, negatives = same[test].sum(), (~same[test]).sum()
    tp = (predicted & same[test]).sum(1)
    fp = (predicted & ~same[test]).sum(1)
    tprs.append(tp / float(positives) if positives else np.zeros(len(thresholds)))
    fprs.append(fp / float(negatives) if negatives else np.zeros(len(thresholds)))
    accuracy.append(float((predicted[best] == same[test]).sum()) / test.size)

  fine = np.arange(0, 4, 0.001)
  vals = {target: [] for target in FARS}
  fars = {target: [] for target in FARS}
  for train, test in splits:
    negatives = ~same[train]
    far_train = ((dist[train][None, :] < fine[:, None]) & negatives).sum(1) / float(
        negatives.sum())
    for target in FARS:
      if np.max(far_train) >= target:
        threshold = float(_scipy18_slinear(far_train, fine)(target))
      else:
        threshold = 0.0
      accepted = dist[test] < threshold
      vals[target].append(float((accepted & same[test]).sum()) / float(same[test].sum()))
      fars[target].append(float((accepted & ~same[test]).sum()) / float((~same[test]).sum()))
  tar = {t: (np.mean(vals[t]), np.std(vals[t]), np.mean(fars[t])) for t in FARS}
  training_impostors = min(int((~same[train]).sum()) for train, _ in splits)
  return {'accuracy': np.mean(accuracy), 'accuracy_std': np.std(accuracy),
          'training_impostors': training_impostors,
          'fold_accuracy': np.array(accuracy), 'best_threshold': np.mean(chosen),
          'fold_threshold': np.array(chosen), 'tpr': np.mean(tprs, 0),
          'fpr': np.mean(fprs, 0), 'tar': tar, 'tied_folds': tied}


# ---- embedding sets ------------------------------------------------------------------------


def _clustered(seed, num_pairs, *, dim=128, layout='blocks', dtype=np.float32):
  """Face-like embeddings: identity centres plus per-pair noise of varied strength, so that
  some pairs are hard; raw norms around 20-40 like a trained backbone's."""
  rng = np.random.default_rng(seed)
  if layout == 'blocks':  # LFW's order: each tenth is half positive pairs, then negatives
    block = np.arange(num_pairs) % (num_pairs // 10)
    issame = block < (num_pairs // 20)
  else:
    issame = rng.random(num_pairs) < 0.5
  centres = rng.normal(size=(num_pairs, dim))
  others = rng.normal(size=(num_pairs, dim))
  noise = rng.uniform(0.3, 1.3, size=(num_pairs, 1))
  a = centres + noise * rng.normal(size=(num_pairs, dim))
  b = np.where(issame[:, None], centres, others) + noise * rng.normal(size=(num_pairs, dim))
  scale = rng.uniform(2, 4, size=(num_pairs, 1))
  return (scale * a).astype(dtype), (scale * b).astype(dtype), issame


def _random(seed, num_pairs, dim=16):
  rng = np.random.default_rng(seed)
  return (rng.normal(size=(num_pairs, dim)).astype(np.float32),
          rng.normal(size=(num_pairs, dim)).astype(np.float32), rng.random(num_pairs) < 0.5)


def _check_against_reference(a, b, issame, num_folds=10):
  got = verification.verification_metrics(a, b, issame, num_folds)
  want = _reference(a, b, issame, num_folds)
  assert got.num_pairs == len(issame)
  np.testing.assert_array_equal(got.fold_accuracy, want['fold_accuracy'])
  np.testing.assert_array_equal(got.fold_threshold, want['fold_threshold'])
  assert got.accuracy == want['accuracy']
  assert got.accuracy_std == want['accuracy_std']
  assert got.best_threshold == want['best_threshold']
  np.testing.assert_allclose(got.tpr, want['tpr'], rtol=0, atol=1e-12)
  np.testing.assert_allclose(got.fpr, want['fpr'], rtol=0, atol=1e-12)
  for far in FARS:
    mean, std, far_measured = want['tar'][far]
    assert abs(got.tar_at_far[far][0] - mean) <= 1e-6, (far, got.tar_at_far[far], mean)
    assert abs(got.tar_at_far[far][1] - std) <= 1e-6
    assert abs(got.far_at_far[far] - far_measured) <= 1e-6
  assert got.threshold_impostor_pairs == want['training_impostors']
  return got, want


@pytest.mark.parametrize('num_pairs, layout, seed', [
    (6000, 'blocks', 0),  # LFW, AgeDB-30, CALFW, CPLFW
    (7000, 'blocks', 1),  # CFP-FP
    (2503, 'random', 2),  # not divisible by 10: folds of 251 and 250 pairs
])
def test_protocol_equals_reference_on_face_like_embeddings(num_pairs, layout, seed):
  got, _ = _check_against_reference(*_clustered(seed, num_pairs, layout=layout))
  # A meaningful set: far from chance, with a TAR curve that needs the interpolation.
  assert 0.85 < got.accuracy < 1.0
  assert 0.0 < got.tar_at_far[1e-4][0] < got.tar_at_far[1e-3][0] < 1.0
  # LFW's layout: 3,000 impostor pairs, 2,700 in each set of training folds: FAR = 1e-3 is
  # 2.7 of them, FAR = 1e-4 not one (the figure above is insightface's, but means nothing).
  assert got.resolved(1e-3) and not got.resolved(1e-4)


def test_protocol_equals_reference_on_random_embeddings_and_ties():
  # Chance-level accuracy: many thresholds tie for the best (the first must win).
  got, want = _check_against_reference(*_random(3, 2503))
  assert 0.4 < got.accuracy < 0.6 and want['tied_folds'] > 0
  # 53 pairs: folds of 6 and 5, long runs of equal training accuracy and of equal FAR.
  _, want = _check_against_reference(*_random(4, 53))
  assert want['tied_folds'] == 10


def test_protocol_single_fold_trains_on_the_test_fold():
  a, b, _ = _clustered(5, 53, layout='random')
  _check_against_reference(a, b, np.arange(53) % 3 == 0, num_folds=1)


def test_protocol_edge_cases():
  rng = np.random.default_rng(6)
  num_pairs, dim = 53, 8
  a = rng.normal(size=(num_pairs, dim))
  issame = np.arange(num_pairs) % 2 == 0
  # Positives identical (distance exactly 0: never below threshold 0), negatives antipodal
  # (distance exactly 4: never accepted, so the training FAR never reaches the target and
  # insightface falls back to threshold 0.0, i.e. TAR 0).
  b = np.where(issame[:, None], a, -a)
  got, _ = _check_against_reference(a, b, issame)
  assert got.accuracy == 1.0
  assert got.tar_at_far[1e-3] == (0.0, 0.0)
  # A zero embedding stays zero after normalisation (scikit-learn's rule).
  a[3] = 0.0
  _check_against_reference(a, b, issame)


def test_slinear_matches_scipy_with_repeated_values():
  rng = np.random.default_rng(7)
  slinear = jax.jit(jax.vmap(jax.vmap(verification._slinear, (None, None, 0)), (0, None, 0)))
  for n in (2, 3, 17, 40):
    x = np.sort(rng.integers(0, 6, (50, n)) / 5.0, axis=1)  # long runs of equal values
    y = np.arange(n) * 0.001
    targets = np.concatenate([x[:, rng.integers(0, n, 4)],  # on the knots, ends included
                              x[:, :1] + rng.random((50, 4)) * (x[:, -1:] - x[:, :1])], 1)
    want = np.stack([_scipy18_slinear(xs, y)(ts) for xs, ts in zip(x, targets)])
    with jax.enable_x64(True):
      got = np.asarray(slinear(x, y, targets))
    # Compiled, XLA may fuse the two products and the sum (FMA): the last bit can differ.
    np.testing.assert_allclose(got, want, rtol=1e-15, atol=0)
  # Where the values are distinct, the 1.8 B-spline is today's interp1d.
  x = np.sort(rng.uniform(0, 1, 30))
  np.testing.assert_allclose(_scipy18_slinear(x, x ** 2)(0.37),
                             interpolate.interp1d(x, x ** 2, kind='slinear')(0.37), rtol=1e-14)


def test_folds_are_sklearn_kfold_in_order():
  # KFold(10, shuffle=False) on 2503 items: three folds of 251, then seven of 250.
  ids = verification.fold_ids(2503, 10)
  np.testing.assert_array_equal(np.bincount(ids), [251] * 3 + [250] * 7)
  assert np.all(np.diff(ids) >= 0)


def test_protocol_rejects_bad_shapes():
  a, b, issame = _random(8, 20)
  with pytest.raises(ValueError, match='issame'):
    verification.verification_metrics(a, b, issame[:-1])
  with pytest.raises(ValueError, match='embeddings_a'):
    verification.verification_metrics(a, b[:, :-1], issame)
  with pytest.raises(ValueError, match='folds'):
    verification.verification_metrics(a[:5], b[:5], issame[:5])


# ---- embedding -----------------------------------------------------------------------------


class TinyEmbedder(nn.Module):
  """Flatten -> Dense: flip-sensitive, with a NumPy twin below."""
  dim: int = 8

  @nn.compact
  def __call__(self, images, train=False):
    embeddings = nn.Dense(self.dim)(images.reshape(images.shape[0], -1))
    return embeddings, jnp.linalg.norm(embeddings, axis=-1)


def _tiny(size=6, dim=8, seed=0):
  model = TinyEmbedder(dim)
  variables = model.init(jax.random.key(seed), jnp.zeros((1, size, size, 3)))
  return model, variables


def _numpy_embed(variables, images_uint8):
  kernel = np.asarray(variables['params']['Dense_0']['kernel'], np.float64)
  bias = np.asarray(variables['params']['Dense_0']['bias'], np.float64)
  def one(x):
    x = (x.astype(np.float64) - 127.5) / 128.0
    return x.reshape(x.shape[0], -1) @ kernel + bias
  plain, flipped = one(images_uint8), one(images_uint8[:, :, ::-1, :])
  norms = np.stack([np.linalg.norm(plain, axis=1), np.linalg.norm(flipped, axis=1)], 1)
  return plain + flipped, norms


def _images(seed, count, size=6):
  return np.random.default_rng(seed).integers(0, 256, (count, size, size, 3), dtype=np.uint8)


def test_embed_flip_sum_and_padding_match_numpy():
  model, variables = _tiny()
  images = _images(0, 37)
  want, want_norms = _numpy_embed(variables, images)
  for batch_size in (8, 37, 64):  # 8: four full batches and one of 5 padded to 8
    got, norms = embedding.embed(model, variables, images, batch_size=batch_size,
                                return_norms=True)
    assert got.dtype == np.float32 and got.shape == (37, 8)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(norms, want_norms, rtol=1e-5, atol=1e-5)
  # The flip matters for this model, so the test above checks that it happens.
  assert not np.allclose(want_norms[:, 0], want_norms[:, 1])
  # Float input is taken as already normalised; an apply function works like the module.
  normalised = (images.astype(np.float32) - 127.5) / 128
  np.testing.assert_allclose(embedding.embed(model.apply, variables, normalised, batch_size=16),
                             want, rtol=1e-5, atol=1e-5)


def test_evaluate_sets_counts_every_pair_once():
  model, variables = _tiny()
  images = _images(1, 2 * 20)
  issame = np.arange(20) % 2 == 0  # each fold of 2 holds a positive and a negative pair
  pair_set = pair_sets.VerificationSet('tiny', images, issame)
  results = evaluate.evaluate_sets(model, variables, [pair_set], batch_size=8)
  want = embedding.embed(model, variables, images, batch_size=64)  # one batch, no padding
  _, norms = _numpy_embed(variables, images)
  got = results['tiny']
  assert got.num_pairs == 20
  expected = _reference(want[0::2], want[1::2], issame)
  assert got.accuracy == expected['accuracy']
  assert got.best_threshold == expected['best_threshold']
  np.testing.assert_allclose(got.xnorm, norms.mean(), rtol=1e-6)  # over images and flips
  with pytest.raises(ValueError, match="'odd'"):
    pair_sets.VerificationSet('odd', images[:-1], issame)


MESH_SCRIPT = textwrap.dedent('''
    import jax, jax.numpy as jnp, numpy as np
    import flax.linen as nn
    from sface_jax import evaluate, sharding
    from sface_jax.data import pair_sets
    from sface_jax.evaluation import embedding
    assert jax.device_count() == 8, jax.devices()

    class TinyEmbedder(nn.Module):
      @nn.compact
      def __call__(self, images, train=False):
        e = nn.Dense(8)(images.reshape(images.shape[0], -1))
        return e, jnp.linalg.norm(e, axis=-1)

    model = TinyEmbedder()
    variables = model.init(jax.random.key(0), jnp.zeros((1, 6, 6, 3)))
    images = np.random.default_rng(0).integers(0, 256, (37, 6, 6, 3), dtype=np.uint8)
    single, single_norms = embedding.embed(model, variables, images, batch_size=12,
                                          return_norms=True)
    for mesh in (sharding.make_mesh(), jax.make_mesh((4, 2), ('a', 'b'))):
      # 12 per batch -> 16 (a multiple of 8); 37 images -> 3 batches, the last 5 real.
      sharded, norms = embedding.embed(model, variables, images, batch_size=12, mesh=mesh,
                                      return_norms=True)
      np.testing.assert_allclose(sharded, single, rtol=1e-6, atol=1e-6)
      np.testing.assert_allclose(norms, single_norms, rtol=1e-6, atol=1e-6)
    pair_set = pair_sets.VerificationSet('s', images[:36], np.arange(18) % 2 == 0)
    one = evaluate.evaluate_sets(model, variables, [pair_set], batch_size=12)['s']
    many = evaluate.evaluate_sets(model, variables, [pair_set], batch_size=12,
                                  mesh=sharding.make_mesh())['s']
    assert (one.accuracy, one.best_threshold) == (many.accuracy, many.best_threshold)
    print('MESH-OK')
''')


def test_embed_on_an_8_device_mesh_equals_one_device():
  assert 'MESH-OK' in multi_device.run_python('-c', MESH_SCRIPT).stdout


# ---- pair-set files, the Evaluator, reports, the command line ------------------------------


def _jpeg(pixels):
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, format='JPEG', quality=95)
  return buffer.getvalue()


def _write_bin(path, num_pairs, size=6, seed=0, images=None):
  if images is None:
    images = [_jpeg(p) for p in _images(seed, 2 * num_pairs, size)]
  issame = [i % 2 == 0 for i in range(num_pairs)]  # both kinds in every fold
  with open(path, 'wb') as f:
    pickle.dump((images, issame), f, protocol=2)  # as insightface's .bin files are written
  return images, np.array(issame)


def test_evaluator_decodes_once_and_keeps_the_best(tmp_path, monkeypatch):
  _write_bin(tmp_path / 'lfw.bin', 20)
  _write_bin(tmp_path / 'explicit.bin', 20, seed=1)
  model, variables = _tiny()
  evaluator = evaluate.Evaluator(['lfw', str(tmp_path / 'explicit.bin')], str(tmp_path), 6,
                                 batch_size=16)
  assert [s.name for s in evaluator.sets] == ['lfw', 'explicit']
  assert evaluator.sets[0].images.shape == (40, 6, 6, 3)

  from sface_jax.data import images as images_lib  # pylint: disable=g-import-not-at-top
  def no_more_reading(*args, **kwargs):
    raise AssertionError('the Evaluator decoded a set again')
  monkeypatch.setattr(images_lib, 'decode_all', no_more_reading)
  first = evaluator.run(model, variables)
  assert set(first) == {'lfw', 'explicit'} and first['lfw'].num_pairs == 20
  want = embedding.embed(model, variables, evaluator.sets[0].images, batch_size=16)
  assert first['lfw'].accuracy == _reference(want[0::2], want[1::2],
                                             evaluator.sets[0].issame)['accuracy']
  _, other_variables = _tiny(seed=1)
  second = evaluator.run(model, other_variables)
  for name in first:
    assert evaluator.highest_accuracy[name] == max(first[name].accuracy, second[name].accuracy)


def test_pair_set_names_resolve_npz_then_bin(tmp_path):
  os.makedirs(tmp_path / 'verification')
  (tmp_path / 'verification' / 'lfw.npz').write_bytes(b'')
  (tmp_path / 'lfw.bin').write_bytes(b'')
  (tmp_path / 'agedb_30.bin').write_bytes(b'')
  assert pair_sets.resolve('lfw', str(tmp_path)) == str(
      tmp_path / 'verification' / 'lfw.npz')
  assert pair_sets.resolve('agedb_30', str(tmp_path)) == str(tmp_path / 'agedb_30.bin')
  with pytest.raises(FileNotFoundError, match='cplfw.npz.*cplfw.bin'):
    pair_sets.resolve('cplfw', str(tmp_path))


def test_bad_pair_sets_name_the_set(tmp_path):
  images, _ = _write_bin(tmp_path / 'short.bin', 4)
  with open(tmp_path / 'short.bin', 'wb') as f:
    pickle.dump((images[:7], [True, False, True, False]), f, protocol=2)
  with pytest.raises(ValueError, match=r'short\.bin.*7 images for 4 pairs'):
    pair_sets.load(str(tmp_path / 'short.bin'), '', 6)
  images[5] = b'\xff\xd8\xff not a jpeg'
  _write_bin(tmp_path / 'broken.bin', 4, images=images)
  with pytest.raises(ValueError, match=r"'broken'.*image 5"):
    pair_sets.load(str(tmp_path / 'broken.bin'), '', 6)


def _some_results():
  results = {}
  for name, seed, pairs in (('lfw', 10, 2503), ('cfp_fp', 11, 53)):
    metrics = verification.verification_metrics(*_clustered(seed, pairs, dim=32, layout='random'))
    results[name] = dataclasses.replace(metrics, xnorm=31.25)
  return results


def test_report_table_json_and_roc_png(tmp_path):
  results = _some_results()
  table = report.format_table(results)
  lines = table.splitlines()
  assert 'TAR@FAR=1e-03' in lines[0] and 'TAR@FAR=1e-04' in lines[0]
  lfw, cfp_fp = results['lfw'], results['cfp_fp']
  # 2,503 pairs in random order: about 1,125 impostor pairs per set of training folds, so
  # FAR = 1e-3 is resolved and 1e-4 is not; 53 pairs resolve neither.
  assert 1000 <= lfw.threshold_impostor_pairs < 10_000 and cfp_fp.threshold_impostor_pairs < 1000
  row = lines[2].split()
  assert row[:2] == ['lfw', '2503']
  assert row[2:5] == [f'{100 * lfw.accuracy:.3f}', '±', f'{100 * lfw.accuracy_std:.3f}']
  assert row[5:7] == [f'{lfw.best_threshold:.3f}', '31.250']
  assert row[7:] == [f'{100 * lfw.tar_at_far[1e-3][0]:.3f}', '–']
  assert lines[3].split()[7:] == ['–', '–']
  assert lines[4].startswith('– = not resolved') and (
      f'lfw: {lfw.threshold_impostor_pairs:,}, cfp_fp: {cfp_fp.threshold_impostor_pairs}'
      in lines[4])

  paths = report.write_report(results, str(tmp_path), step=1200, source='run')
  with open(paths['json']) as f:
    written = json.load(f)
  assert written['step'] == 1200 and list(written['sets']) == ['lfw', 'cfp_fp']
  saved = written['sets']['cfp_fp']
  assert saved['accuracy'] == cfp_fp.accuracy
  assert saved['threshold_impostor_pairs'] == cfp_fp.threshold_impostor_pairs
  # Unresolved: null, flagged, with the FAR actually measured kept.
  assert saved['tar_at_far']['1e-04'] == {'tar': None, 'tar_std': None, 'resolved': False,
                                          'far': cfp_fp.far_at_far[1e-4]}
  assert written['sets']['lfw']['tar_at_far']['1e-03'] == {
      'tar': lfw.tar_at_far[1e-3][0], 'tar_std': lfw.tar_at_far[1e-3][1], 'resolved': True,
      'far': lfw.far_at_far[1e-3]}
  assert saved['roc']['fpr'] == cfp_fp.fpr.tolist()
  with open(paths['roc'], 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'
  assert sorted(os.listdir(tmp_path / 'eval')) == [
      'roc-step1200.png', 'roc.png', 'verification-step1200.json', 'verification.json']


def test_far_resolution_rule():
  """far·N ≥ 1, exactly at the boundary despite 1e-3 · 1000 etc. being computed in floats."""
  for far in (1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6):
    pairs = round(1 / far)
    assert far_resolution.resolved(far, pairs) and not far_resolution.resolved(far, pairs - 1)
  assert not far_resolution.resolved(1e-3, 0)


def test_ijb_table_and_json_leave_out_what_the_impostors_cannot_resolve():
  from sface_jax.evaluation import ijb  # pylint: disable=g-import-not-at-top
  # 180 impostor pairs (the toy IJB's size): only FAR = 1e-2 and 1e-1 are resolved.
  tars = {far: 0.5 + i / 100 for i, far in enumerate(ijb.FAR_TARGETS)}
  result = ijb.IJBResult(target='IJBC', num_faces=40, num_templates=20, num_pairs=200,
                         num_positive=20, tar_at_far=tars, auc=0.9, xnorm=20.0,
                         fpr=np.zeros(2), tpr=np.zeros(2), scores=np.zeros(200), settings={})
  lines = ijb.format_table([result]).splitlines()
  cells = lines[2].split()[4:-1]
  assert cells == ['–'] * 4 + [f'{100 * tars[1e-2]:.2f}', f'{100 * tars[1e-1]:.2f}']
  assert lines[3].startswith('– = not resolved') and 'IJBC: 180' in lines[3]
  saved = result.to_json()
  assert saved['impostor_pairs'] == 180
  assert saved['tar_at_far'] == {'1e-6': None, '1e-5': None, '1e-4': None, '1e-3': None,
                                 '1e-2': tars[1e-2], '1e-1': tars[1e-1]}


def test_command_line(tmp_path, monkeypatch, capsys):
  _write_bin(tmp_path / 'lfw.bin', 20)
  config = base_config.get_config()
  config.data.dir = str(tmp_path)
  config.data.image_size = 6
  model, variables = _tiny()
  loaded = []
  def fake_load(path, model_name=None):
    loaded.append((path, model_name))
    return config, model, variables
  monkeypatch.setattr(checkpoint, 'load_for_inference', fake_load)
  monkeypatch.setattr(checkpoint, 'resolve', lambda path: (path, 7))
  workdir = tmp_path / 'run'
  assert evaluate.main(['--workdir', str(workdir), '--sets', 'lfw', '--batch-size', '8']) == 0
  assert loaded == [(str(workdir), None)]
  out = capsys.readouterr().out
  assert out.splitlines()[2].split()[:2] == ['lfw', '20']
  with open(workdir / 'eval' / 'verification.json') as f:
    assert json.load(f)['sets']['lfw']['num_pairs'] == 20

  def wrong_architecture(path, model_name=None):
    raise ValueError(f"{path} holds a 'r50' backbone, which does not fit model {model_name!r}")
  monkeypatch.setattr(checkpoint, 'load_for_inference', wrong_architecture)
  assert evaluate.main(['--checkpoint', str(tmp_path / 'checkpoints' / '7'),
                        '--model', 'r100']) == 1
  assert "'r50' backbone, which does not fit model 'r100'" in capsys.readouterr().err
  monkeypatch.setattr(checkpoint, 'load_for_inference', fake_load)
  assert evaluate.main(['--workdir', str(workdir), '--sets', 'missing']) == 1
  assert "pair set 'missing' not found" in capsys.readouterr().err


def test_orl_bin_end_to_end(shared_data):
  """The real insightface-format .bin beside CI, through pair_sets and the whole pipeline."""
  path = shared_data / 'orl' / 'insightface' / 'orl_val.bin'
  model, variables = _tiny(size=16)
  evaluator = evaluate.Evaluator([str(path)], '', 16, batch_size=128)
  (name, result), = evaluator.run(model, variables).items()
  pair_set = evaluator.sets[0]
  assert name == 'orl_val' and result.num_pairs == pair_set.issame.size > 0
  want = embedding.embed(model, variables, pair_set.images, batch_size=128)
  _, norms = _numpy_embed(variables, pair_set.images)
  expected = _reference(want[0::2], want[1::2], pair_set.issame)
  assert result.accuracy == expected['accuracy']
  np.testing.assert_allclose(result.xnorm, norms.mean(), rtol=1e-5)
