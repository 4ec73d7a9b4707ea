"""1:N identification (sface_jax.evaluation.identification) against NumPy brute force.

The faces are the 400 real ORL images (40 people × 10), embedded by a fixed simple
embedding that needs no training: the image shrunk to 14 × 12 pixels, mean-centred and
normalised (raw pixels identify ORL people well above chance and far from perfectly, so
rank-1, rank-5 and TPIR all differ). The reference scores every probe against every gallery
face in float64, sorts the whole gallery per probe (stable: ties to the lower row) and
counts ranks and open-set hits one probe at a time; it shares no code with the sharded
top-k search. Exact equality is meaningful only when no two scores that decide an outcome
are closer than float32 can resolve: the tests check that margin on the data first.

The 8-device check runs this file as a script in a subprocess with 8 forced CPU devices.
"""

import json
import math
import pathlib
import sys

import numpy as np
import pytest

import multi_device

REPO = pathlib.Path(__file__).resolve().parents[1]
K = 5
FPIRS = (1e-2, 1e-1)
MARGIN = 1e-6  # float32 scores of unit vectors are good to ~1e-7


def orl_embeddings(faces_root):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  embeddings, labels = [], []
  for person in range(1, 41):
    for image in range(1, 11):
      with Image.open(faces_root / f's{person}' / f'{image}.pgm') as img:
        small = np.asarray(img.convert('L').resize((12, 14), Image.BILINEAR), np.float64)
      embeddings.append(small.ravel())
      labels.append(person - 1)
  embeddings = np.asarray(embeddings)
  embeddings -= embeddings.mean(axis=0)
  return embeddings.astype(np.float32), np.asarray(labels)


def reference_search(gallery, probes):
  """float64 scores, every gallery row sorted per probe (ties to the lower row). Rounded to
  12 decimals: the BLAS may sum a duplicated row's products in another order than its
  original's (scores 1e-16 apart on an AVX-512 machine), and duplicates must tie exactly."""
  unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
  scores = np.round(unit(probes.astype(np.float64)) @ unit(gallery.astype(np.float64)).T, 12)
  order = np.argsort(-scores, axis=1, kind='stable')
  return np.take_along_axis(scores, order, axis=1), order


def reference_metrics(sorted_scores, order, gallery_labels, probe_labels):
  mated = [label in set(gallery_labels.tolist()) for label in probe_labels]
  ranks = []
  for i, label in enumerate(probe_labels):
    ranks.append(next((r + 1 for r, row in enumerate(order[i]) if gallery_labels[row] == label),
                      None) if mated[i] else None)
  mated_ranks = [r for r in ranks if r is not None]
  out = {'rank1': sum(r == 1 for r in mated_ranks) / len(mated_ranks),
         'rank5': sum(r <= 5 for r in mated_ranks) / len(mated_ranks), 'ranks': ranks}
  non_mated_top = [sorted_scores[i, 0] for i in range(len(probe_labels)) if not mated[i]]
  m = len(non_mated_top)
  for f in FPIRS:
    # The smallest t with at most f·m non-mated top-1 scores above it ("> t" is an alarm).
    feasible = [t for t in non_mated_top + [-math.inf]
                if sum(s > t for s in non_mated_top) <= math.floor(f * m + 1e-9)]
    t = min(feasible)
    hits = [ranks[i] == 1 and sorted_scores[i, 0] > t
            for i in range(len(probe_labels)) if mated[i]]
    out[f] = {'t': t, 'tpir': sum(hits) / len(hits),
              'fpir': sum(s > t for s in non_mated_top) / m}
  return out


def _margins_ok(sorted_scores, thresholds):
  """No decision of the test sits within float32's reach of another score: consecutive
  scores of a probe's top K + 1 differ by more than MARGIN or not at all (duplicate rows),
  and no top-1 score is that close to a threshold without being the score that set it."""
  gaps = -np.diff(sorted_scores[:, :K + 1], axis=1)
  if not np.all((gaps == 0) | (gaps > MARGIN)):
    return False
  top = sorted_scores[:, 0]
  return all(np.sum(np.abs(top - t) <= MARGIN) == np.sum(top == t)
             for t in thresholds if math.isfinite(t))


def random_gallery():
  """1003 random rows (not a multiple of 8), the last 40 exact copies of earlier ones, so
  that ties between rows on different devices happen; 50 probes copy gallery rows."""
  rng = np.random.default_rng(0)
  gallery = rng.normal(size=(1003, 24)).astype(np.float32)
  gallery[963:] = gallery[rng.integers(0, 963, 40)]
  probes = np.concatenate([gallery[np.r_[963:1003, rng.integers(0, 963, 10)]],
                           rng.normal(size=(30, 24)).astype(np.float32)])
  return gallery, probes


@pytest.fixture(scope='module')
def orl(shared_data):
  from sface_jax.evaluation import identification  # pylint: disable=g-import-not-at-top
  embeddings, labels = orl_embeddings(shared_data / 'orl' / 'faces')
  gallery_idx, probe_idx = identification.split_gallery_probes(labels, non_mated_identities=10)
  return embeddings, labels, gallery_idx, probe_idx


def test_split_gallery_probes():
  from sface_jax.evaluation import identification  # pylint: disable=g-import-not-at-top
  labels = np.array([3, 1, 3, 2, 1, 3, 0, 2, 5])
  gallery, probes = identification.split_gallery_probes(labels)
  assert gallery.tolist() == [0, 1, 3, 6, 8]  # the first image of each identity
  assert probes.tolist() == [2, 4, 5, 7]
  gallery, probes = identification.split_gallery_probes(labels, gallery_per_identity=2)
  assert gallery.tolist() == [0, 1, 2, 3, 4, 6, 7, 8]
  gallery, probes = identification.split_gallery_probes(labels, non_mated_identities=2, seed=3)
  held_out = set(np.unique(labels)) - set(labels[gallery].tolist())
  assert len(held_out) == 2 and all(i in probes for i in np.flatnonzero(np.isin(labels,
                                                                                list(held_out))))
  assert sorted(gallery.tolist() + probes.tolist()) == list(range(labels.size))
  again = identification.split_gallery_probes(labels, non_mated_identities=2, seed=3)
  assert [a.tolist() for a in again] == [gallery.tolist(), probes.tolist()]
  with pytest.raises(ValueError, match='non_mated_identities must be in'):
    identification.split_gallery_probes(labels, non_mated_identities=5)


def test_orl_search_and_metrics_equal_brute_force(orl):
  from sface_jax.evaluation import identification  # pylint: disable=g-import-not-at-top
  embeddings, labels, gallery_idx, probe_idx = orl
  gallery, probes = embeddings[gallery_idx], embeddings[probe_idx]
  gallery_labels, probe_labels = labels[gallery_idx], labels[probe_idx]
  assert (gallery.shape[0], probes.shape[0]) == (30, 370)
  sorted_scores, order = reference_search(gallery, probes)
  want = reference_metrics(sorted_scores, order, gallery_labels, probe_labels)
  assert _margins_ok(sorted_scores, [want[f]['t'] for f in FPIRS])

  # 30 rows in chunks of at most 7: 5 chunks of 6, a running top-5 across chunks.
  index = identification.Gallery(gallery, gallery_labels, chunk_rows=7)
  assert (index.num_chunks, index.chunk) == (5, 6)
  scores, rows = index.search(probes, K, batch_size=64)  # 370 = 5 × 64 + 50, padded
  np.testing.assert_array_equal(rows, order[:, :K])
  np.testing.assert_allclose(scores, sorted_scores[:, :K], rtol=0, atol=1e-6)

  got = identification.identification_metrics(index, gallery_labels, probes, probe_labels,
                                              fpir_targets=FPIRS)
  assert got.rank_rate[1] == want['rank1'] and got.rank_rate[5] == want['rank5']
  assert (got.num_gallery, got.num_mated, got.num_non_mated) == (30, 270, 100)
  want_ranks = [0 if r is None or r > K else r for r in want['ranks']]
  assert got.mated_rank.tolist() == want_ranks
  for f in FPIRS:
    assert got.tpir_at_fpir[f] == want[f]['tpir'], f
    assert got.fpir[f] == want[f]['fpir'] <= f
    # τ is the float32 just above the non-mated top-1 score t that sets it: "≥ τ" is "> t".
    t = np.nextafter(np.float32(got.threshold[f]), np.float32(-np.inf))
    assert t in got.top_scores[got.mated_rank == 0, 0] and abs(t - want[f]['t']) < 1e-6
  # Not a degenerate set: every number is different and none is 0 or 1.
  values = [got.tpir_at_fpir[1e-2], got.tpir_at_fpir[1e-1], got.rank_rate[1],
            got.rank_rate[5]]
  assert 0 < values[0] < values[1] < values[2] < values[3] < 1, values
  json.dumps(got.to_json(), allow_nan=False)


def test_threshold_and_tpir_by_hand():
  from sface_jax.evaluation import identification  # pylint: disable=g-import-not-at-top
  gallery_labels = np.array([10, 11, 12])
  # Probes 0-3 non-mated (label 99), 4-7 mated; rows point into the gallery.
  probe_labels = np.array([99, 99, 99, 99, 10, 11, 12, 10])
  top_scores = np.array([[0.9, 0], [0.5, 0], [0.5, 0], [0.2, 0],
                         [0.5, 0], [0.6, 0], [0.95, 0.9], [0.7, 0.1]], np.float32)
  top_rows = np.array([[0, 1], [1, 0], [2, 0], [0, 1],
                       [0, 1], [1, 0], [0, 2], [2, 1]])
  got = identification.metrics_from_search(top_scores, top_rows, gallery_labels, probe_labels,
                                           ranks=(1, 2), fpir_targets=(0.25, 0.5, 1.0, 0.0))
  assert got.mated_rank.tolist() == [0, 0, 0, 0, 1, 1, 2, 0]
  assert got.rank_rate == {1: 0.5, 2: 0.75}
  # FPIR 0.25: one alarm allowed, t = 0.5 (second highest): only 0.9 is ≥ τ.
  assert got.fpir[0.25] == 0.25 and got.tpir_at_fpir[0.25] == 0.25  # 0.6 passes, 0.5 not
  # FPIR 0.5: two allowed, but 0.5 appears twice: t = 0.5 again, FPIR reached 0.25.
  assert got.fpir[0.5] == 0.25 and got.threshold[0.5] == got.threshold[0.25]
  assert got.threshold[1.0] == -math.inf and got.fpir[1.0] == 1.0
  assert got.tpir_at_fpir[1.0] == 0.5  # every rank-1 hit
  assert got.fpir[0.0] == 0.0 and got.tpir_at_fpir[0.0] == 0.0  # τ above 0.9
  closed = identification.metrics_from_search(top_scores[4:], top_rows[4:], gallery_labels,
                                              probe_labels[4:], ranks=(1,))
  assert math.isnan(closed.tpir_at_fpir[1e-2]) and closed.rank_rate[1] == 0.5
  assert closed.to_json()['tpir_at_fpir']['0.01'] is None


def test_bad_inputs():
  from sface_jax.evaluation import identification  # pylint: disable=g-import-not-at-top
  gallery = np.eye(4, dtype=np.float32)
  with pytest.raises(ValueError, match='embedding row 2 is not finite'):
    identification.Gallery(np.where(np.arange(4)[:, None] == 2, np.nan, gallery))
  index = identification.Gallery(gallery)
  with pytest.raises(ValueError, match=r'k must be in \[1, 4\]'):
    index.search(gallery, 5)
  with pytest.raises(ValueError, match=r'probes must be \(Q, 4\)'):
    index.search(np.zeros((2, 3)), 1)


def test_command_line_on_embed_output(orl, tmp_path, capsys):
  """The CLI reads `sface_jax.embed`'s files (identity = the image's folder) and gives the
  numbers of the library call on the same split."""
  from sface_jax.evaluation import identification  # pylint: disable=g-import-not-at-top
  embeddings, labels, gallery_idx, probe_idx = orl
  np.save(tmp_path / 'emb.npy', embeddings)
  files = [f's{label + 1}/{i % 10 + 1}.pgm' for i, label in enumerate(labels)]
  (tmp_path / 'emb.json').write_text(json.dumps({'files': files}))
  argv = ['--embeddings', str(tmp_path / 'emb.npy'), '--non-mated-identities', '10',
          '--json', str(tmp_path / 'id.json')]
  assert identification.main(argv) == 0
  table = capsys.readouterr().out.splitlines()
  # np.unique sorts 's1', 's10', ...: other label numbers, so other held-out people; the
  # library call on that same labelling must agree.
  names, relabelled = np.unique([f.split('/')[0] for f in files], return_inverse=True)
  g, p = identification.split_gallery_probes(relabelled, non_mated_identities=10)
  want = identification.identification_metrics(embeddings[g], relabelled[g], embeddings[p],
                                                relabelled[p])
  assert table[2].split()[:3] == ['30', '270', '100']
  assert float(table[2].split()[3]) == round(100 * want.rank_rate[1], 3)
  with open(tmp_path / 'id.json') as f:
    assert json.load(f)['tpir_at_fpir'] == want.to_json()['tpir_at_fpir']
  # Gallery and probes from two files; a file list without identity folders is an error.
  np.save(tmp_path / 'probes.npy', embeddings[p])
  (tmp_path / 'probes.json').write_text(json.dumps({'files': [files[i] for i in p]}))
  np.save(tmp_path / 'gallery.npy', embeddings[g])
  (tmp_path / 'gallery.json').write_text(json.dumps({'files': [files[i] for i in g]}))
  assert identification.main(['--embeddings', str(tmp_path / 'gallery.npy'),
                              '--probes', str(tmp_path / 'probes.npy')]) == 0
  assert capsys.readouterr().out.splitlines()[2] == table[2]
  (tmp_path / 'gallery.json').write_text(json.dumps({'files': ['flat.pgm'] * len(g)}))
  assert identification.main(['--embeddings', str(tmp_path / 'gallery.npy')]) == 1
  assert "'flat.pgm' is not in an identity folder" in capsys.readouterr().err


# ---- 8 devices against 1 -------------------------------------------------------------------


def check_devices(path):
  import jax  # pylint: disable=g-import-not-at-top
  from sface_jax import sharding  # pylint: disable=g-import-not-at-top
  from sface_jax.evaluation import identification  # pylint: disable=g-import-not-at-top
  assert jax.device_count() == 8
  data = np.load(path)
  random_rows, random_probes = random_gallery()
  out = {}
  for name, mesh in (('one', sharding.make_mesh(jax.devices()[:1])),
                     ('many', sharding.make_mesh())):
    for chunk_rows in (3, 1 << 15):
      index = identification.Gallery(data['gallery'], data['gallery_labels'], mesh=mesh,
                                     chunk_rows=chunk_rows)
      metrics = identification.identification_metrics(
          index, data['gallery_labels'], data['probes'], data['probe_labels'],
          fpir_targets=FPIRS, batch_size=100)
      blocks = sorted({tuple(s.data.shape) for s in index.rows.addressable_shards})
      scores, rows = identification.Gallery(random_rows, mesh=mesh,
                                            chunk_rows=chunk_rows).search(random_probes, 7)
      out[f'{name}/{chunk_rows}'] = {
          'metrics': metrics.to_json(), 'rows': metrics.top_rows.tolist(),
          'scores': metrics.top_scores.tolist(), 'blocks': blocks,
          'padded': index.padded_rows, 'random_rows': rows.tolist(),
          'random_scores': scores.tolist()}
  return out


def test_eight_devices_equal_one(orl, tmp_path):
  embeddings, labels, gallery_idx, probe_idx = orl
  path = tmp_path / 'orl.npz'
  np.savez(path, gallery=embeddings[gallery_idx], gallery_labels=labels[gallery_idx],
           probes=embeddings[probe_idx], probe_labels=labels[probe_idx])
  done = multi_device.run_python(__file__, str(path))
  out = json.loads(done.stdout.strip().splitlines()[-1])
  one = out['one/32768']
  # 30 rows on 8 devices: 4 per device, 32 with the padding; each device holds only its block.
  assert out['many/32768']['padded'] == 32 and out['many/32768']['blocks'] == [[4, 168]]
  assert out['many/3']['padded'] == 8 * 2 * 2 and out['many/3']['blocks'] == [[4, 168]]
  assert out['one/32768']['blocks'] == [[30, 168]]
  sorted_scores, order = reference_search(np.load(path)['gallery'], np.load(path)['probes'])
  assert one['rows'] == order[:, :K].tolist()
  # Ties (the duplicated rows, on other devices than their originals) go to the lower row.
  gallery, probes = random_gallery()
  sorted_scores, order = reference_search(gallery, probes)
  assert _margins_ok(sorted_scores, [])
  assert np.sum(sorted_scores[:, 0] == sorted_scores[:, 1]) >= 40  # the copied rows
  assert one['random_rows'] == order[:, :7].tolist()
  for key, result in out.items():
    assert result['rows'] == one['rows'], key
    # Scores (so thresholds) may differ in the last bits between matrix-product shapes;
    # every decision and rate is the same.
    without = lambda metrics: {k: v for k, v in metrics.items() if k != 'threshold'}
    assert without(result['metrics']) == without(one['metrics']), key
    np.testing.assert_allclose(list(result['metrics']['threshold'].values()),
                               list(one['metrics']['threshold'].values()), rtol=0, atol=1e-6)
    np.testing.assert_allclose(result['scores'], one['scores'], rtol=0, atol=1e-6)
    assert result['random_rows'] == one['random_rows'], key
    np.testing.assert_allclose(result['random_scores'], one['random_scores'], atol=1e-6)


if __name__ == '__main__':
  sys.path.insert(0, str(REPO))
  print(json.dumps(check_devices(sys.argv[1])))
