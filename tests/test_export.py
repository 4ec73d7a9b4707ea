"""Export for serving (sface_jax.tools.export): SavedModel and ONNX give the JAX embeddings.

A tiny IResNet with every weight, batch-norm statistic and PReLU slope randomised (so that
folding the statistics in, the layouts and the FC's flatten order are all exercised) is
written as a work directory, exported through the command line, reloaded in plain
TensorFlow / onnxruntime / OpenCV, and compared on ORL faces.
"""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sface_jax import checkpoint
from sface_jax import models
from sface_jax.tools import export
from sface_jax.tools import import_torch

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


@pytest.fixture(scope='module')
def tiny_workdir(tmp_path_factory):
  model = models.get_model('tiny', embedding_dim=EMBEDDING_DIM)
  variables = randomised(model)
  workdir = tmp_path_factory.mktemp('export') / 'tiny_run'
  config = import_torch.imported_config('tiny', embedding_dim=EMBEDDING_DIM, image_size=SIZE,
                                        source='test_export')
  checkpoint.save_backbone(str(workdir), config, variables)
  return workdir, model, variables


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


def test_savedmodel_stablehlo_is_what_the_installed_tensorflow_reads():
  """jax.export serialises for consumers four weeks older than JAX, TensorFlow lags further
  (jax 0.12 + TF 2.21 failed here with `vhlo.custom_call_v2`): inside the export's block a
  shape-polymorphic program, with its shape assertion, deserialises in TF's StableHLO."""
  pytest.importorskip('tensorflow')
  from jax._src.export import _export  # pylint: disable=g-import-not-at-top
  from tensorflow.compiler.mlir.stablehlo import stablehlo as tf_stablehlo  # pylint: disable=g-import-not-at-top
  consumer = export._tensorflow_stablehlo_version()  # pylint: disable=protected-access
  assert consumer == tf_stablehlo.get_current_version()
  hlo = _export.hlo
  week_4 = hlo.StablehloCompatibilityRequirement.WEEK_4
  (batch,) = jax.export.symbolic_shape('b')
  with export._stablehlo_readable_by(consumer):  # pylint: disable=protected-access
    target = _export.hlo.get_version_from_compatibility_requirement(week_4)
    exported = jax.export.export(jax.jit(lambda x: jnp.tanh(x) @ x.T))(
        jax.ShapeDtypeStruct((batch, 4), jnp.float32))
  assert target == hlo.get_smaller_version(
      hlo.get_version_from_compatibility_requirement(week_4), consumer)
  assert _export.hlo is hlo  # restored
  # StableHLO bytecode back from TF's reader (which raises on an operation it does not know)
  module = tf_stablehlo.deserialize_portable_artifact_str(exported.mlir_module_serialized)
  assert b'shape_assertion' in module and b'tanh' in module


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
  np.testing.assert_array_equal(export.load_exported(str(output))(faces), got)


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
