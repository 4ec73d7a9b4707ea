"""Export for serving (sface_jax.tools.export): SavedModel and ONNX give the JAX embeddings.

A tiny IResNet with every weight, batch-norm statistic and PReLU slope randomised (so that
folding the statistics in, the layouts and the FC's flatten order are all exercised) is
written as a work directory, exported through the command line, reloaded in plain
TensorFlow / onnxruntime / OpenCV (its dnn module and its SFace recognizer), and compared on
ORL faces.
"""

import contextlib
import json
import pathlib
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tiny_backbone
from sface_jax import models
from sface_jax.tools import export

SIZE = 32
EMBEDDING_DIM = 16
TOLERANCE = 1e-4  # relative L2 per embedding, as the brief and the CLI's default


def randomised(model, seed=0, size=SIZE):
  """Variables of `model` with every leaf random (positive variances)."""
  variables = model.init(jax.random.key(seed), jnp.zeros((1, size, size, 3)), train=False)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(variables)
  rng = np.random.default_rng(seed)
  out = []
  for path, leaf in leaves:
    name = jax.tree_util.keystr(path)
    shape = np.shape(leaf)
    if name.endswith("['var']"):
      value = rng.uniform(0.5, 2.0, shape)
    elif name.endswith("['mean']") or name.endswith("['bias']"):
      value = rng.normal(0.0, 0.2, shape)
    elif name.endswith("['scale']"):
      value = rng.uniform(0.5, 1.5, shape)
    elif name.endswith("['alpha']"):
      value = rng.uniform(0.0, 0.5, shape)
    else:  # kernels: He-like scale so activations stay O(1)
      fan_in = int(np.prod(shape[:-1]))
      value = rng.normal(0.0, np.sqrt(2.0 / fan_in), shape)
    out.append(np.asarray(value, np.float32))
  return jax.tree.unflatten(treedef, out)


def orl_faces(shared_data: pathlib.Path, count: int = 6) -> tuple[np.ndarray, list[str]]:
  """`count` ORL faces of different people, float32 RGB [0, 255], resized to SIZE."""
  paths = [str(shared_data / 'orl' / 'faces' / f's{person}' / '1.pgm')
           for person in range(1, count + 1)]
  return export.read_check_images(paths, SIZE), paths


def write_workdir(directory: pathlib.Path, size: int):
  """A randomised tiny backbone trained at `size`, saved as the work directory `tiny_run`."""
  return tiny_backbone.write_workdir(
      directory / 'tiny_run', image_size=size, embedding_dim=EMBEDDING_DIM, source='test_export',
      variables=randomised(models.get_model('tiny', embedding_dim=EMBEDDING_DIM), size=size))


@pytest.fixture(scope='module')
def tiny_workdir(tmp_path_factory):
  return write_workdir(tmp_path_factory.mktemp('export'), SIZE)


def check_metadata(metadata, workdir):
  """The run is recorded by name and step, never by a path of this machine."""
  assert (metadata['run'], metadata['step']) == ('tiny_run', 0)
  assert str(workdir.parent) not in json.dumps(metadata)


def reference(model, variables, pixels):
  return export.jax_embeddings(model, variables, pixels)


def test_savedmodel_matches_jax_on_faces(shared_data, tiny_workdir, tmp_path, capsys):
  tf = pytest.importorskip('tensorflow')
  workdir, model, variables = tiny_workdir
  faces, paths = orl_faces(shared_data)
  output = tmp_path / 'tiny_savedmodel'
  assert export.main(['--workdir', str(workdir), '--output', str(output),
                      '--format', 'savedmodel', '--platforms', 'cpu',
                      '--check-images'] + paths[:3]) == 0
  assert 'max relative error' in capsys.readouterr().out
  assert sorted(p.name for p in tmp_path.iterdir()) == ['tiny_savedmodel']  # no temporaries
  loaded = tf.saved_model.load(str(output))  # plain TensorFlow, no sface_jax code
  serve = loaded.signatures['serving_default']
  assert serve.structured_input_signature[1]['images'].shape.as_list() == [None, SIZE, SIZE, 3]
  got = serve(images=tf.constant(faces))['embedding'].numpy()
  want = reference(model, variables, faces)
  assert got.shape == (len(faces), EMBEDDING_DIM)
  assert np.max(export.relative_error(got, want)) < TOLERANCE
  with open(output / export.METADATA_FILE) as f:
    meta = json.load(f)
  assert (meta['image_size'], meta['layout'], meta['channels']) == (SIZE, 'NHWC', 'RGB')
  check_metadata(meta, workdir)
  # A free batch size includes 0: jax.export's symbolic batch is ≥ 1, the signature answers.
  empty = serve(images=tf.zeros((0, SIZE, SIZE, 3)))['embedding']
  assert empty.shape == (0, EMBEDDING_DIM) and empty.dtype == tf.float32
  assert export.load_exported(str(output))(faces[:0]).shape == (0, EMBEDDING_DIM)


def artifact_version(serialized) -> str:
  """The StableHLO version a portable artifact was written in (its bytecode header)."""
  return re.search(rb'StableHLO_v([0-9.]+)', bytes(serialized)).group(1).decode()


def polymorphic_export():
  """A fresh shape-polymorphic jax.export (with the batch's shape assertion)."""
  (batch,) = jax.export.symbolic_shape('b')
  return jax.export.export(jax.jit(lambda x: jnp.tanh(x) @ x.T))(
      jax.ShapeDtypeStruct((batch, 4), jnp.float32))


def jax_stablehlo_target() -> str:
  from jax.extend.mlir.dialects import stablehlo  # pylint: disable=g-import-not-at-top
  return stablehlo.get_version_from_compatibility_requirement(
      stablehlo.StablehloCompatibilityRequirement.WEEK_4)


def test_savedmodel_stablehlo_is_what_the_installed_tensorflow_reads():
  """jax.export serialises for consumers four weeks older than JAX, TensorFlow lags further
  (jax 0.12 + TF 2.21 failed here with `vhlo.custom_call_v2`): inside the export's block a
  shape-polymorphic program, with its shape assertion, is written at min(JAX's target,
  TensorFlow's version) and deserialises in TF's StableHLO; outside it, JAX's target again."""
  pytest.importorskip('tensorflow')
  from jax.extend.mlir.dialects import stablehlo  # pylint: disable=g-import-not-at-top
  from tensorflow.compiler.mlir.stablehlo import stablehlo as tf_stablehlo  # pylint: disable=g-import-not-at-top
  consumer = export._tensorflow_stablehlo_version()  # pylint: disable=protected-access
  assert consumer == tf_stablehlo.get_current_version()
  own = jax_stablehlo_target()
  assert artifact_version(polymorphic_export().mlir_module_serialized) == own
  with export._stablehlo_readable_by(consumer):  # pylint: disable=protected-access
    exported = polymorphic_export()
  assert artifact_version(exported.mlir_module_serialized) == stablehlo.get_smaller_version(
      own, consumer)
  assert artifact_version(polymorphic_export().mlir_module_serialized) == own  # restored
  # StableHLO bytecode back from TF's reader (which raises on an operation it does not know)
  module = tf_stablehlo.deserialize_portable_artifact_str(exported.mlir_module_serialized)
  assert b'shape_assertion' in module and b'tanh' in module


def test_stablehlo_cap_falls_back_to_jax_target_where_the_private_name_is_gone(monkeypatch):
  """The cap reaches into a private JAX module (no public option exists): where a JAX lacks
  it, the export goes on with JAX's own target instead of failing."""
  with contextlib.ExitStack() as block:
    with monkeypatch.context() as patch:
      # `from jax._src.export import _export` raises ImportError while this is None.
      patch.setitem(sys.modules, 'jax._src.export', None)
      assert export._jax_exporter() is None  # pylint: disable=protected-access
      # Capped at StableHLO's oldest version, had the swap happened.
      block.enter_context(export._stablehlo_readable_by('0.9.0'))  # pylint: disable=protected-access
    exported = polymorphic_export()
  assert artifact_version(exported.mlir_module_serialized) == jax_stablehlo_target()
  # The control: with the module there, the same block does cap.
  assert export._jax_exporter() is not None  # pylint: disable=protected-access
  with export._stablehlo_readable_by('1.0.0'):  # pylint: disable=protected-access
    assert artifact_version(polymorphic_export().mlir_module_serialized) == '1.0.0'


def test_onnx_matches_jax_on_faces(shared_data, tiny_workdir, tmp_path):
  onnxruntime = pytest.importorskip('onnxruntime')
  workdir, model, variables = tiny_workdir
  faces, paths = orl_faces(shared_data)
  output = tmp_path / 'tiny.onnx'
  assert export.main(['--checkpoint', str(workdir / 'checkpoints' / '0'), '--output',
                      str(output), '--format', 'onnx', '--check-images'] + paths[:3]) == 0
  session = onnxruntime.InferenceSession(str(output), providers=['CPUExecutionProvider'])
  (inputs,), (outputs,) = session.get_inputs(), session.get_outputs()
  assert (inputs.name, inputs.shape[1:]) == ('images', [3, SIZE, SIZE])
  assert outputs.name == 'embedding'
  got = session.run(None, {'images': faces.transpose(0, 3, 1, 2).copy()})[0]
  want = reference(model, variables, faces)
  assert np.max(export.relative_error(got, want)) < TOLERANCE
  # the same through the loader, which takes NHWC like the SavedModel
  loaded = export.load_exported(str(output))
  np.testing.assert_array_equal(loaded(faces), got)
  assert loaded(faces[:0]).shape == (0, EMBEDDING_DIM)
  check_metadata(loaded.metadata, workdir)


def test_onnx_loads_in_opencv_dnn(shared_data, tiny_workdir, tmp_path):
  cv2 = pytest.importorskip('cv2')
  workdir, model, variables = tiny_workdir
  faces, _ = orl_faces(shared_data, count=3)
  output = tmp_path / 'tiny.onnx'
  assert export.main(['--workdir', str(workdir), '--output', str(output),
                      '--format', 'onnx']) == 0
  net = cv2.dnn.readNetFromONNX(str(output))
  bgr = np.ascontiguousarray(faces[..., ::-1])  # what cv2.imread gives
  # The documented call: RGB, NCHW, pixels as they are (no mean, scale 1).
  blob = cv2.dnn.blobFromImages(list(bgr), 1.0, (SIZE, SIZE), swapRB=True)
  net.setInput(blob)
  got = net.forward()
  want = reference(model, variables, faces)
  assert np.max(export.relative_error(got, want)) < TOLERANCE


def test_opencv_face_recognizer_sf_takes_the_112_onnx_export(shared_data, tmp_path):
  """cv2.FaceRecognizerSF, OpenCV's SFace API, runs our 112×112 ONNX export: its `feature`
  (blobFromImage(bgr, swapRB=true): RGB, as the export takes) gives our embedding of the
  aligned face, and its `match` the cosine of two of them."""
  cv2 = pytest.importorskip('cv2')
  if not hasattr(cv2, 'FaceRecognizerSF'):
    pytest.skip('this OpenCV has no FaceRecognizerSF (objdetect without dnn)')
  workdir, model, variables = write_workdir(tmp_path, 112)
  output = tmp_path / 'tiny112.onnx'
  assert export.main(['--workdir', str(workdir), '--output', str(output),
                      '--format', 'onnx']) == 0
  _, paths = orl_faces(shared_data, count=3)
  faces = np.round(export.read_check_images(paths, 112)).astype(np.uint8)  # aligned, RGB
  recognizer = cv2.FaceRecognizerSF.create(str(output), '')
  got = np.concatenate([recognizer.feature(np.ascontiguousarray(face[..., ::-1]))
                        for face in faces])  # BGR, as cv2.imread gives
  want = reference(model, variables, faces.astype(np.float32))
  assert got.shape == want.shape
  assert np.max(export.relative_error(got, want)) < TOLERANCE
  unit = want / np.linalg.norm(want, axis=1, keepdims=True)
  score = recognizer.match(got[:1], got[1:2], cv2.FaceRecognizerSF_FR_COSINE)
  assert abs(score - float(unit[0] @ unit[1])) < 1e-5


def test_mobilefacenet_onnx_matches_jax(shared_data):
  onnxruntime = pytest.importorskip('onnxruntime')
  pytest.importorskip('onnx')
  model = models.get_model('mbf', embedding_dim=EMBEDDING_DIM, stage_sizes=(1, 1, 2, 1),
                           stage_widths=(16, 16, 32, 32), down_expansions=(16, 32, 64),
                           residual_expansions=(16, 32, 32), stem_groups=8, head_width=64)
  variables = randomised(model, seed=1)
  faces, _ = orl_faces(shared_data, count=4)
  proto = export.onnx_model(model, variables, SIZE, {'embedding_dim': EMBEDDING_DIM,
                                                     'image_size': SIZE, 'format': 'onnx'})
  session = onnxruntime.InferenceSession(proto.SerializeToString(),
                                         providers=['CPUExecutionProvider'])
  got = session.run(None, {'images': faces.transpose(0, 3, 1, 2).copy()})[0]
  want = reference(model, variables, faces)
  assert np.max(export.relative_error(got, want)) < TOLERANCE


def test_failed_parity_check_writes_nothing(tiny_workdir, tmp_path, monkeypatch, capsys):
  pytest.importorskip('onnxruntime')
  workdir, _, _ = tiny_workdir
  # A converter bug: the FC rows left in our (H, W, C) order instead of ONNX's (C, H, W).
  monkeypatch.setattr(export, '_flatten_hwc_to_chw', lambda kernel, channels: kernel)
  output = tmp_path / 'bad.onnx'
  assert export.main(['--workdir', str(workdir), '--output', str(output),
                      '--format', 'onnx']) == 1
  error = capsys.readouterr().err
  assert 'parity check failed' in error and 'nothing written' in error
  assert list(tmp_path.iterdir()) == []


def test_wrong_image_size_is_a_clear_error(tiny_workdir, tmp_path, capsys):
  pytest.importorskip('onnxruntime')
  workdir, _, _ = tiny_workdir
  assert export.main(['--workdir', str(workdir), '--output', str(tmp_path / 'x.onnx'),
                      '--format', 'onnx', '--image-size', '64']) == 1
  error = capsys.readouterr().err
  assert 'trained at 32x32' in error and '--image-size 64' in error
  assert list(tmp_path.iterdir()) == []
  # An export asked for faces of another size than it takes.
  output = tmp_path / 'tiny.onnx'
  assert export.main(['--workdir', str(workdir), '--output', str(output),
                      '--format', 'onnx']) == 0
  with pytest.raises(export.ExportError, match=r'takes 32x32 faces, got 48x48'):
    export.load_exported(str(output))(np.zeros((1, 48, 48, 3), np.float32))
  # An existing output is not overwritten.
  assert export.main(['--workdir', str(workdir), '--output', str(output),
                      '--format', 'onnx']) == 1
  assert 'exists' in capsys.readouterr().err
