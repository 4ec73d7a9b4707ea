r"""Export a trained backbone for serving: a TensorFlow SavedModel or an ONNX file.

  python -m sface_jax.tools.export --workdir runs/r50 --output r50_savedmodel --format savedmodel
  python -m sface_jax.tools.export --checkpoint runs/r50/checkpoints/20000 --output r50.onnx \
      --format onnx [--check-images face1.jpg faces_dir/ ...]

What the exported model computes: the backbone in inference mode (`train=False`: batch norm
uses its running statistics, dropout is off), from raw pixels to the raw embedding.

  input   float32 RGB pixels in [0, 255], the face aligned and resized to S×S (S = the
          checkpoint's `config.data.image_size`, 112 for the published recipes)
            SavedModel: NHWC (batch, S, S, 3), signature `serving_default`, input `images`
            ONNX:       NCHW (batch, 3, S, S), input `images`
          The batch dimension is free in both, 0 included (an empty batch gives (0, D)).
  inside  (x − 127.5) / 128 (`sface_jax.data.images.normalize`), then the backbone.
  output  `embedding`: float32 (batch, D), NOT L2-normalised and not flip-summed (add the
          embedding of the horizontally flipped face yourself for insightface's
          evaluation protocol, and L2-normalise before taking cosines).

Why the normalisation is inside: the constants are a known trap (insightface's MXNet
models use /128, arcface_torch /127.5); with them in the graph a caller only has to deliver
pixels. Why RGB: our pipeline decodes with PIL/TF, which give RGB, and it is also what
OpenCV's SFace model takes: `cv2.FaceRecognizerSF.feature` builds its blob with
`blobFromImage(aligned_bgr, 1, Size(112, 112), Scalar(0, 0, 0), swapRB=true)`
(opencv `modules/objdetect/src/face_recognize.cpp`): NCHW RGB float32 in [0, 255], no mean,
scale 1, exactly this ONNX export's input. So a 112×112 ONNX export is a drop-in model for
`cv2.FaceRecognizerSF.create(path, "")` (tested: `feature` gives our embedding, `match` its
cosine), whose `alignCrop` warps onto insightface's 5-point template as
`sface_jax.data.align` does; for plain `cv2.dnn` build the same blob with
`cv2.dnn.blobFromImage(bgr_face, 1.0, (S, S), swapRB=True)`.

Every export records these facts, with the training run's name (its work directory's last
component, not its path: an export is shipped elsewhere) and step:
`assets.extra/sface_export.json` in the SavedModel, `metadata_props` in the ONNX file;
`load_exported` reads them.

How each format is produced, and why this way (checked with JAX 0.10.2, 0.11.2 and 0.12.0.1,
TF 2.21, onnx 1.23, onnxruntime 1.32, OpenCV 5.0 and 5.1):

- SavedModel: `jax.experimental.jax2tf.convert` with native serialization (the only mode
  JAX still develops; graph mode is deprecated). The SavedModel holds the exact StableHLO
  program `model.apply(..., train=False)` lowers to, inside one `XlaCallModule` op, for the
  platforms in `--platforms` (default cpu and cuda; lowering for cuda needs no GPU here), with
  the weights as TF variables (`variables/`, not constants in the graph) and a symbolic batch
  dimension (jax.export assumes it ≥ 1; the signature answers an empty batch itself).
  Nothing is re-implemented, so there is nothing to get wrong between the JAX model and the
  export. The StableHLO is written for the installed TensorFlow's reader
  (`_stablehlo_readable_by`), so that TensorFlow and newer ones (TF Serving built from them)
  run it; an older one may not read it. Its limit: tools that translate TF
  graph ops (tf2onnx, the TFLite converter) cannot read `XlaCallModule`.
- ONNX: written directly from the Flax parameters with `onnx.helper`, layer by layer
  (Conv, BatchNormalization, PRelu, Add, Flatten, Gemm), because the other routes fail:
  tf2onnx installs cleanly beside TF 2.21 / protobuf 7 but cannot convert the jax2tf
  SavedModel (`XlaCallModule`), and jax2tf's graph mode is deprecated. A generic
  jaxpr→ONNX translator would give NHWC tensors with a Transpose around every convolution,
  which OpenCV's importer handles badly. The layer graph is NCHW like a PyTorch export
  (OpenCV and onnxruntime both fuse Conv+BatchNormalization), with two exact rewrites: Flax
  kernels HWIO → OIHW, the FC's rows permuted from our (H, W, C) flatten order to ONNX's
  (C, H, W), and the embedding batch norm folded into the FC (W·s, (b − μ)·s + β with
  s = γ/√(σ² + ε), in float64). Opset 17, IR version 8.

Because the ONNX graph re-states the architecture, and because any converter can be wrong,
every export is checked before it is kept: the written file is reloaded (tf.saved_model.load
/ onnxruntime) and run on `--check-images` (faces, decoded and resized to S×S like our
pipeline) or, without them, 8 seeded random images; each embedding must be within
`--tolerance` (default 1e-4) relative L2 distance of the JAX model's, ‖e_export − e_jax‖ /
‖e_jax‖. The output is written under a temporary name beside `--output` and renamed only
after the check passes; a failed check removes it and exits with an error.

Bad input: `--image-size` other than the size the weights fit (the FC / GDC layer fixes the
input side) is refused naming both sizes; `load_exported(path)(images)` with images of
another size than the export's raises naming the file and both sizes; an existing `--output`
is refused.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from sface_jax import compilation_cache

FORMATS = ('savedmodel', 'onnx')
METADATA_FILE = os.path.join('assets.extra', 'sface_export.json')
INPUT_NAME = 'images'
OUTPUT_NAME = 'embedding'
ONNX_OPSET = 17
ONNX_IR_VERSION = 8  # the IR version of opset 17; newer ones are refused by older runtimes
DEFAULT_TOLERANCE = 1e-4
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.pgm', '.ppm', '.bmp')


class ExportError(ValueError):
  """An export that cannot be made, or that failed its parity check."""


# ----------------------------------------------------------------------------- helpers


def _numpy_tree(tree: Any) -> Any:
  if isinstance(tree, dict) or hasattr(tree, 'items'):
    return {key: _numpy_tree(value) for key, value in tree.items()}
  return np.asarray(tree, dtype=np.float32)


def check_image_size(model, variables, image_size: int, where: str, trained_size: int) -> None:
  """The variables fit `model` at `image_size`, or ExportError naming both sizes."""
  import jax  # pylint: disable=g-import-not-at-top
  from sface_jax import models  # pylint: disable=g-import-not-at-top
  try:
    expected = models.abstract_variables(model, image_size)
  except ValueError as e:  # e.g. a side not divisible by 16
    raise ExportError(f'--image-size {image_size}: {e}') from None
  found = {jax.tree_util.keystr(path): np.shape(leaf)
           for path, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]}
  for path, leaf in jax.tree_util.tree_flatten_with_path(
      {'params': expected['params'], 'batch_stats': expected.get('batch_stats', {})})[0]:
    key = jax.tree_util.keystr(path)
    if found.get(key) != tuple(leaf.shape):
      raise ExportError(
          f'{where} was trained at {trained_size}x{trained_size} and its weights fit only '
          f'that input size: at --image-size {image_size}, {key} would be {tuple(leaf.shape)} '
          f'but is {found.get(key)} (the last layers fix the input side); export at '
          f'{trained_size}')


def jax_embeddings(model, variables, pixels: np.ndarray, batch_size: int = 64) -> np.ndarray:
  """The reference: raw embeddings of float32 NHWC [0, 255] pixels, `train=False`."""
  import jax  # pylint: disable=g-import-not-at-top
  from sface_jax.data import images as images_lib  # pylint: disable=g-import-not-at-top
  apply = jax.jit(lambda v, x: model.apply(v, images_lib.normalize(x), train=False)[0])
  return np.concatenate([np.asarray(apply(variables, pixels[i:i + batch_size]))
                         for i in range(0, len(pixels), batch_size)])


def relative_error(got: np.ndarray, want: np.ndarray) -> np.ndarray:
  """Per image ‖got − want‖ / ‖want‖ (float64)."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return np.linalg.norm(got - want, axis=-1) / np.maximum(np.linalg.norm(want, axis=-1), 1e-30)


def read_check_images(paths: Sequence[str], image_size: int) -> np.ndarray:
  """Image files and folders (their image files, sorted, recursively) → float32 NHWC."""
  from sface_jax.data import images as images_lib  # pylint: disable=g-import-not-at-top
  names = []
  for path in paths:
    if os.path.isdir(path):
      found = sorted(p for p in glob.glob(os.path.join(path, '**', '*'), recursive=True)
                     if p.lower().endswith(IMAGE_EXTENSIONS))
      if not found:
        raise ExportError(f'{path}: no image files ({", ".join(IMAGE_EXTENSIONS)}) in it')
      names.extend(found)
    elif os.path.isfile(path):
      names.append(path)
    else:
      raise ExportError(f'{path}: no such image file or folder')
  pixels = []
  for name in names:
    with open(name, 'rb') as f:
      data = f.read()
    stored, _ = images_lib.encode_for_storage(data, name)  # PGM etc. → PNG, as convert does
    pixels.append(images_lib.decode(stored, image_size, where=name))
  return np.stack(pixels).astype(np.float32)


def random_images(image_size: int, count: int = 8, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).uniform(0, 255, (count, image_size, image_size, 3)
                                             ).astype(np.float32)


# ----------------------------------------------------------------------------- SavedModel


def _tensorflow_stablehlo_version() -> str | None:
  """The newest StableHLO version the installed TensorFlow deserialises, or None where its
  build does not say (TF ships StableHLO's portable API, `get_current_version`)."""
  try:
    from tensorflow.compiler.mlir.stablehlo import stablehlo  # pylint: disable=g-import-not-at-top
    return stablehlo.get_current_version()
  except (ImportError, AttributeError):
    return None


def _jax_exporter():
  """JAX's exporter module, whose `hlo` attribute picks the StableHLO target; None where this
  JAX has no such module or names (then JAX's own target stands).

  Private (`jax._src`), hence imported here, only when a SavedModel is written, never when
  this module is imported: jax 0.10.2 to 0.12 have no public way to choose the version
  `jax.export` serialises at (`jax.export.export` takes only `platforms` and
  `disabled_checks`; of the config options, `jax_export_calling_convention_version` sets the
  calling convention and `jax_export_ignore_forward_compatibility` the custom-call check,
  neither the StableHLO target; `jax2tf.convert` has none either). Replace this with the
  public option once JAX has one.
  """
  try:
    from jax._src.export import _export  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  hlo = getattr(_export, 'hlo', None)
  if not all(hasattr(hlo, name) for name in ('get_version_from_compatibility_requirement',
                                             'get_smaller_version')):
    return None
  return _export


@contextlib.contextmanager
def _stablehlo_readable_by(consumer_version: str | None):
  """Within the block, jax.export serialises StableHLO at most at `consumer_version`.

  Why: jax.export writes the StableHLO version four weeks older than JAX's own
  (`StablehloCompatibilityRequirement.WEEK_4`), and TensorFlow's releases lag further than
  that: jax 0.12.0.1 writes 1.18.0, where the shape assertion of the symbolic batch becomes
  `vhlo.custom_call_v2`, which TF 2.21 (StableHLO 1.13.7) refuses to deserialise (jax 0.10.2
  writes 1.15.0, which TF 2.21 happens to read). StableHLO writes any older version that has
  the program's operations, so the target becomes min(JAX's, `consumer_version`); an
  operation the older version lacks fails at serialisation, naming it. How: the StableHLO
  module JAX's exporter reads (`_jax_exporter`, a private name) is swapped for one whose
  `get_version_from_compatibility_requirement` applies the cap, for the block only. Where
  that name is gone or `consumer_version` is None, nothing is swapped: JAX's own target
  stands, and a version TensorFlow cannot read shows as its error in the export's check.
  """
  exporter = None if consumer_version is None else _jax_exporter()
  if exporter is None:
    yield
    return
  hlo = exporter.hlo

  class CappedStablehlo:
    def __getattr__(self, name):
      return getattr(hlo, name)

    @staticmethod
    def get_version_from_compatibility_requirement(requirement):
      return hlo.get_smaller_version(
          hlo.get_version_from_compatibility_requirement(requirement), consumer_version)

  exporter.hlo = CappedStablehlo()
  try:
    yield
  finally:
    exporter.hlo = hlo


def write_savedmodel(model, variables, image_size: int, path: str, metadata: dict[str, Any],
                     platforms: Sequence[str] = ('cpu', 'cuda')) -> None:
  """jax2tf (native serialization) of `model.apply(variables, normalize(x), train=False)`."""
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  import jax  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from jax.experimental import jax2tf  # pylint: disable=g-import-not-at-top
  from sface_jax.data import images as images_lib  # pylint: disable=g-import-not-at-top

  def serve(variables, pixels):
    return model.apply(variables, images_lib.normalize(pixels), train=False)[0]

  converted = jax2tf.convert(
      serve, polymorphic_shapes=[None, f'(b, {image_size}, {image_size}, 3)'],
      with_gradient=False, native_serialization_platforms=tuple(platforms))
  module = tf.Module()
  module.weights = tf.nest.map_structure(lambda a: tf.Variable(a, trainable=False),
                                         _numpy_tree(variables))

  # jax.export's symbolic batch is at least 1 (a shape assertion in the program says so):
  # an empty batch is answered here, without running it.
  embedding_dim = jax.eval_shape(
      serve, variables, jax.ShapeDtypeStruct((1, image_size, image_size, 3), np.float32)
  ).shape[-1]

  @tf.function(autograph=False, input_signature=[
      tf.TensorSpec([None, image_size, image_size, 3], tf.float32, name=INPUT_NAME)])
  def serving_default(images):
    return {OUTPUT_NAME: tf.cond(tf.shape(images)[0] > 0,
                                 lambda: converted(module.weights, images),
                                 lambda: tf.zeros([0, embedding_dim], tf.float32))}

  module.serving_default = serving_default
  # TensorFlow runs the module with its own XLA: no StableHLO newer than that XLA reads.
  with _stablehlo_readable_by(_tensorflow_stablehlo_version()):
    tf.saved_model.save(module, path, signatures={'serving_default': serving_default})
  os.makedirs(os.path.join(path, 'assets.extra'), exist_ok=True)
  with open(os.path.join(path, METADATA_FILE), 'w') as f:
    json.dump(metadata, f, indent=1)


# ----------------------------------------------------------------------------- ONNX


class _OnnxGraph:
  """Accumulates NCHW nodes and initialisers; names are generated from the layer paths."""

  def __init__(self):
    self.nodes, self.initializers = [], []

  def constant(self, name: str, array: np.ndarray) -> str:
    from onnx import numpy_helper  # pylint: disable=g-import-not-at-top
    self.initializers.append(numpy_helper.from_array(np.asarray(array, np.float32), name))
    return name

  def node(self, op: str, inputs: Sequence[str], name: str, **attributes) -> str:
    from onnx import helper  # pylint: disable=g-import-not-at-top
    self.nodes.append(helper.make_node(op, list(inputs), [name], name=name, **attributes))
    return name

  def conv(self, x: str, kernel: np.ndarray, name: str, *, stride: int = 1,
           padding: int = 0, groups: int = 1) -> str:
    """Flax kernel (kh, kw, C_in/groups, C_out) → ONNX weight (C_out, C_in/groups, kh, kw)."""
    kernel = np.asarray(kernel, np.float32)
    weight = self.constant(f'{name}.weight', kernel.transpose(3, 2, 0, 1))
    return self.node('Conv', [x, weight], name, kernel_shape=list(kernel.shape[:2]),
                     strides=[stride, stride], pads=[padding] * 4, group=groups,
                     dilations=[1, 1])

  def batch_norm(self, x: str, params: dict, stats: dict, name: str, epsilon: float) -> str:
    channels = np.shape(stats['mean'])[0]
    scale = params.get('scale', np.ones(channels, np.float32))
    bias = params.get('bias', np.zeros(channels, np.float32))
    inputs = [self.constant(f'{name}.{key}', value) for key, value in
              (('scale', scale), ('bias', bias), ('mean', stats['mean']), ('var', stats['var']))]
    return self.node('BatchNormalization', [x] + inputs, name, epsilon=float(epsilon))

  def prelu(self, x: str, alpha: np.ndarray, name: str) -> str:
    slope = self.constant(f'{name}.slope', np.asarray(alpha, np.float32).reshape(-1, 1, 1))
    return self.node('PRelu', [x, slope], name)

  def dense_bn(self, x: str, kernel: np.ndarray, bias: np.ndarray | None, bn_params: dict,
               bn_stats: dict, name: str, epsilon: float) -> str:
    """Gemm with the following BatchNorm1d folded in exactly (float64, then float32)."""
    kernel = np.asarray(kernel, np.float64)
    bias = np.zeros(kernel.shape[1]) if bias is None else np.asarray(bias, np.float64)
    scale = np.asarray(bn_params.get('scale', np.ones(kernel.shape[1])), np.float64)
    shift = np.asarray(bn_params.get('bias', np.zeros(kernel.shape[1])), np.float64)
    factor = scale / np.sqrt(np.asarray(bn_stats['var'], np.float64) + epsilon)
    weight = self.constant(f'{name}.weight', kernel * factor)
    folded = self.constant(f'{name}.bias',
                           (bias - np.asarray(bn_stats['mean'], np.float64)) * factor + shift)
    return self.node('Gemm', [x, weight, folded], name)


def _flatten_hwc_to_chw(kernel: np.ndarray, channels: int) -> np.ndarray:
  """Dense rows in our flatten order (h·W + w)·C + c → ONNX Flatten's c·H·W + h·W + w."""
  flat, features = kernel.shape
  side = int(round((flat // channels) ** 0.5))
  if side * side * channels != flat:
    raise ExportError(f'fc input {flat} is not a square map of {channels} channels')
  return (np.asarray(kernel).reshape(side, side, channels, features)
          .transpose(2, 0, 1, 3).reshape(flat, features))


def _iresnet_onnx(graph: _OnnxGraph, model, params: dict, stats: dict, x: str) -> str:
  """iresnet.IResNet, module by module (same names, strides and paddings)."""
  from sface_jax.models import iresnet  # pylint: disable=g-import-not-at-top
  eps = iresnet.BN_EPSILON
  x = graph.conv(x, params['conv1']['kernel'], 'conv1', padding=1)
  x = graph.batch_norm(x, params['bn1'], stats['bn1'], 'bn1', eps)
  x = graph.prelu(x, params['prelu']['alpha'], 'prelu')
  for stage, num_blocks in enumerate(model.stage_sizes):
    for block in range(num_blocks):
      name = f'layer{stage + 1}_{block}'
      p, s = params[name], stats[name]
      stride = 2 if block == 0 else 1
      y = graph.batch_norm(x, p['bn1'], s['bn1'], f'{name}.bn1', eps)
      y = graph.conv(y, p['conv1']['kernel'], f'{name}.conv1', padding=1)
      y = graph.batch_norm(y, p['bn2'], s['bn2'], f'{name}.bn2', eps)
      y = graph.prelu(y, p['prelu']['alpha'], f'{name}.prelu')
      y = graph.conv(y, p['conv2']['kernel'], f'{name}.conv2', stride=stride, padding=1)
      y = graph.batch_norm(y, p['bn3'], s['bn3'], f'{name}.bn3', eps)
      if 'downsample_conv' in p:
        x = graph.conv(x, p['downsample_conv']['kernel'], f'{name}.downsample_conv',
                       stride=stride)
        x = graph.batch_norm(x, p['downsample_bn'], s['downsample_bn'],
                             f'{name}.downsample_bn', eps)
      x = graph.node('Add', [y, x], f'{name}.add')
  x = graph.batch_norm(x, params['bn2'], stats['bn2'], 'bn2', eps)
  x = graph.node('Flatten', [x], 'flatten', axis=1)
  kernel = _flatten_hwc_to_chw(params['fc']['kernel'], model.stage_widths[-1])
  return graph.dense_bn(x, kernel, params['fc']['bias'], params['features'],
                        stats['features']['stats'], 'fc', eps)


def _mobilefacenet_onnx(graph: _OnnxGraph, model, params: dict, stats: dict, x: str) -> str:
  """mobilefacenet.MobileFaceNet, module by module."""
  from sface_jax.models import iresnet  # pylint: disable=g-import-not-at-top
  eps = iresnet.BN_EPSILON

  def conv_bn(x, name, stride=1, activation=True, padding=None):
    p, s = params, stats
    for part in name.split('/'):
      p, s = p[part], s[part]
    kernel = np.asarray(p['conv']['kernel'])
    groups = x_channels[0] // kernel.shape[2]
    pad = kernel.shape[0] // 2 if padding is None else padding
    x = graph.conv(x, kernel, f'{name}.conv', stride=stride, padding=pad, groups=groups)
    x_channels[0] = kernel.shape[3]
    x = graph.batch_norm(x, p['bn'], s['bn'], f'{name}.bn', eps)
    if activation:
      x = graph.prelu(x, p['prelu']['alpha'], f'{name}.prelu')
    return x

  def depthwise(x, name, stride, residual):
    y = conv_bn(x, f'{name}/expand')
    y = conv_bn(y, f'{name}/depthwise', stride=stride)
    y = conv_bn(y, f'{name}/project', activation=False)
    return graph.node('Add', [x, y], f'{name}.add') if residual else y

  x_channels = [3]
  x = conv_bn(x, 'stem', stride=2)
  x = conv_bn(x, 'stem_dw')
  for stage in range(1, 4):
    x = depthwise(x, f'stage{stage}_down', 2, False)
    for index in range(model.stage_sizes[stage]):
      x = depthwise(x, f'stage{stage}_{index}', 1, True)
  x = conv_bn(x, 'conv_sep')
  x = conv_bn(x, 'gdc', activation=False, padding=0)  # the GDC: kernel = the map, VALID
  x = graph.node('Flatten', [x], 'flatten', axis=1)  # 1×1 map: the order does not matter
  return graph.dense_bn(x, params['fc']['kernel'], None, params['features'],
                        stats['features'], 'fc', eps)


def onnx_model(model, variables, image_size: int, metadata: dict[str, Any]):
  """The backbone as an `onnx.ModelProto`: NCHW RGB [0, 255] in, raw embedding out."""
  from onnx import TensorProto, helper  # pylint: disable=g-import-not-at-top
  from sface_jax.data import images as images_lib  # pylint: disable=g-import-not-at-top
  from sface_jax.models import iresnet, mobilefacenet  # pylint: disable=g-import-not-at-top
  variables = _numpy_tree(variables)
  params, stats = variables['params'], variables.get('batch_stats', {})
  graph = _OnnxGraph()
  mean = graph.constant('pixel_mean', np.array(images_lib.PIXEL_MEAN, np.float32))
  inverse_scale = graph.constant('pixel_inverse_scale',
                                 np.array(1.0 / images_lib.PIXEL_SCALE, np.float32))
  x = graph.node('Sub', [INPUT_NAME, mean], 'centre')
  x = graph.node('Mul', [x, inverse_scale], 'normalise')  # ×1/128 is exact: a power of 2
  if isinstance(model, iresnet.IResNet):
    x = _iresnet_onnx(graph, model, params, stats, x)
  elif isinstance(model, mobilefacenet.MobileFaceNet):
    x = _mobilefacenet_onnx(graph, model, params, stats, x)
  else:
    raise ExportError(f'no ONNX writer for {type(model).__name__}')
  graph.nodes.append(helper.make_node('Identity', [x], [OUTPUT_NAME], name=OUTPUT_NAME))
  embedding_dim = metadata['embedding_dim']
  onnx_graph = helper.make_graph(
      graph.nodes, 'sface_jax_backbone',
      [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT,
                                     ['batch', 3, image_size, image_size])],
      [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ['batch', embedding_dim])],
      initializer=graph.initializers)
  proto = helper.make_model(onnx_graph, producer_name='sface_jax',
                            opset_imports=[helper.make_opsetid('', ONNX_OPSET)])
  proto.ir_version = ONNX_IR_VERSION
  helper.set_model_props(proto, {key: json.dumps(value) for key, value in metadata.items()})
  return proto


def write_onnx(model, variables, image_size: int, path: str, metadata: dict[str, Any]) -> None:
  try:
    import onnx  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ExportError('--format onnx needs the onnx package: pip install onnx onnxruntime') \
        from None
  proto = onnx_model(model, variables, image_size, metadata)
  onnx.checker.check_model(proto)
  onnx.save_model(proto, path)


# ----------------------------------------------------------------------------- loading


class ExportedModel:
  """An export, loaded: call it with NHWC RGB [0, 255] pixels to get raw embeddings.

  The ONNX file's NCHW layout is handled here, so both formats take the same arrays.
  Images of another size than the export's raise ExportError naming the file.
  """

  def __init__(self, path: str):
    self.path = path
    if os.path.isdir(path):
      meta = os.path.join(path, METADATA_FILE)
      if not os.path.exists(meta):
        raise ExportError(f'{path}: not a sface_jax SavedModel export ({METADATA_FILE} missing)')
      with open(meta) as f:
        self.metadata = json.load(f)
      os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
      import tensorflow as tf  # pylint: disable=g-import-not-at-top
      self._tf = tf
      self._function = tf.saved_model.load(path).signatures['serving_default']
    elif os.path.isfile(path):
      try:
        import onnx  # pylint: disable=g-import-not-at-top
        import onnxruntime  # pylint: disable=g-import-not-at-top
      except ImportError:
        raise ExportError(f'{path}: running an ONNX export needs onnx and onnxruntime '
                          '(pip install onnx onnxruntime)') from None
      proto = onnx.load(path, load_external_data=False)
      self.metadata = {prop.key: json.loads(prop.value) for prop in proto.metadata_props}
      if 'image_size' not in self.metadata:
        raise ExportError(f'{path}: not a sface_jax ONNX export (no image_size in its metadata)')
      options = onnxruntime.SessionOptions()
      options.log_severity_level = 3
      self._session = onnxruntime.InferenceSession(path, options,
                                                   providers=['CPUExecutionProvider'])
    else:
      raise ExportError(f'{path}: no such export')
    self.image_size = int(self.metadata['image_size'])
    self.format = self.metadata['format']

  def __call__(self, pixels: np.ndarray) -> np.ndarray:
    pixels = np.asarray(pixels, np.float32)
    if pixels.ndim != 4 or pixels.shape[-1] != 3:
      raise ExportError(f'{self.path}: images must be (N, H, W, 3) RGB; got {pixels.shape}')
    if pixels.shape[1:3] != (self.image_size, self.image_size):
      raise ExportError(
          f'{self.path}: this export takes {self.image_size}x{self.image_size} faces, got '
          f'{pixels.shape[2]}x{pixels.shape[1]} (WxH); align/resize them to '
          f'{self.image_size}x{self.image_size} first')
    if self.format == 'savedmodel':
      return self._function(images=self._tf.constant(pixels))[OUTPUT_NAME].numpy()
    return self._session.run([OUTPUT_NAME],
                             {INPUT_NAME: np.ascontiguousarray(pixels.transpose(0, 3, 1, 2))})[0]


def load_exported(path: str) -> ExportedModel:
  return ExportedModel(path)


# ----------------------------------------------------------------------------- export


def export(source: str, output: str, export_format: str, *, image_size: int | None = None,
           check_pixels: np.ndarray | None = None, tolerance: float = DEFAULT_TOLERANCE,
           platforms: Sequence[str] = ('cpu', 'cuda'), model_name: str | None = None
           ) -> dict[str, Any]:
  """Exports the backbone of `source` (work dir or checkpoint) to `output`, checked.

  Returns {'path', 'max_relative_error', 'images', 'metadata'}. Raises ExportError (the
  output is not left behind) on a size mismatch, an existing output or a failed check.
  """
  from sface_jax import checkpoint  # pylint: disable=g-import-not-at-top
  from sface_jax import files  # pylint: disable=g-import-not-at-top
  if export_format not in FORMATS:
    raise ExportError(f'--format must be one of {", ".join(FORMATS)}, got {export_format!r}')
  output = os.path.abspath(output)
  if os.path.exists(output):
    raise ExportError(f'{output}: exists; choose a new output path')
  config, model, variables = checkpoint.load_for_inference(source, model_name=model_name)
  trained_size = int(config.data.image_size)
  image_size = trained_size if image_size is None else int(image_size)
  if image_size != trained_size:
    check_image_size(model, variables, image_size, source, trained_size)
  if model.dtype != np.float32:  # an export is float32: serving runtimes expect it
    model = model.clone(dtype=np.float32)
  if check_pixels is None:
    check_pixels = random_images(image_size)
  check_pixels = np.asarray(check_pixels, np.float32)
  if check_pixels.shape[1:] != (image_size, image_size, 3):
    raise ExportError(f'check images are {check_pixels.shape[1:]}, the export takes '
                      f'({image_size}, {image_size}, 3)')
  workdir, step = checkpoint.resolve(source)
  metadata = {
      'format': export_format, 'model': config.model.name,
      'embedding_dim': int(config.model.embedding_dim), 'image_size': image_size,
      'layout': 'NHWC' if export_format == 'savedmodel' else 'NCHW',
      'channels': 'RGB', 'pixel_range': [0, 255],
      'normalisation': '(x - 127.5) / 128, inside the model',
      'output': f'{OUTPUT_NAME}: raw (not L2-normalised, not flip-summed) float32 (batch, D)',
      'run': os.path.basename(os.path.normpath(workdir)), 'step': int(step)}
  os.makedirs(os.path.dirname(output), exist_ok=True)
  with files.atomic_path(output) as tmp:
    if export_format == 'savedmodel':
      write_savedmodel(model, variables, image_size, tmp, metadata, platforms)
    else:
      write_onnx(model, variables, image_size, tmp, metadata)
    want = jax_embeddings(model, variables, check_pixels)
    got = ExportedModel(tmp)(check_pixels)
    errors = relative_error(got, want)
    worst = float(np.max(errors))
    if not np.all(np.isfinite(errors)) or worst > tolerance:
      raise ExportError(
          f'parity check failed: the {export_format} export differs from the JAX model by '
          f'{worst:.3g} relative L2 (tolerance {tolerance:g}) on image '
          f'{int(np.argmax(errors))} of {len(errors)}; nothing written to {output}')
  return {'path': output, 'max_relative_error': worst, 'images': len(check_pixels),
          'metadata': metadata}


def main(argv: Sequence[str] | None = None) -> int:
  from sface_jax import cli  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(
      prog='python -m sface_jax.tools.export', formatter_class=cli.HelpFormatter,
      description='Export a trained backbone (inference mode) as a TensorFlow SavedModel or '
                  'ONNX, checked against the JAX model before it is kept.')
  from sface_jax import checkpoint  # pylint: disable=g-import-not-at-top
  checkpoint.add_source_arguments(parser)
  parser.add_argument('--output', required=True,
                      help='SavedModel directory or .onnx file to create (must not exist)')
  parser.add_argument('--format', required=True, choices=FORMATS,
                      help='savedmodel: a TensorFlow SavedModel directory; onnx: one file')
  parser.add_argument('--image-size', type=int, default=None,
                      help="input side S; default, and the only one that fits: the run's "
                           'config.data.image_size')
  parser.add_argument('--check-images', nargs='+', default=None,
                      help='faces (files or folders) for the parity check; default: 8 random '
                           'images')
  parser.add_argument('--tolerance', type=float, default=DEFAULT_TOLERANCE,
                      help='largest allowed relative L2 error per embedding')
  parser.add_argument('--platforms', default='cpu,cuda',
                      help='SavedModel: platforms to lower for (cpu, cuda, tpu)')
  parser.add_argument('--model', default=None,
                      help='architecture to load the weights into; default: the trained one')
  compilation_cache.add_arguments(parser)  # --compilation-cache-dir, --no-compilation-cache
  args = parser.parse_args(argv)
  try:
    pixels = None
    if args.check_images:
      if args.image_size is None:
        from sface_jax import checkpoint  # pylint: disable=g-import-not-at-top
        size = int(checkpoint.load_config(checkpoint.resolve(
            args.workdir or args.checkpoint)[0]).data.image_size)
      else:
        size = args.image_size
      pixels = read_check_images(args.check_images, size)
    result = export(args.workdir or args.checkpoint, args.output, args.format,
                    image_size=args.image_size, check_pixels=pixels, tolerance=args.tolerance,
                    platforms=[p.strip() for p in args.platforms.split(',') if p.strip()],
                    model_name=args.model)
  except (ExportError, FileNotFoundError, ValueError, OSError) as e:
    print(f'export: error: {e}', file=sys.stderr, flush=True)
    return 1
  meta = result['metadata']
  layout = ('(batch, S, S, 3) NHWC' if meta['layout'] == 'NHWC' else '(batch, 3, S, S) NCHW')
  print(f'wrote {result["path"]} ({args.format}): input "{INPUT_NAME}" float32 {layout}, '
        f'S = {meta["image_size"]}, RGB in [0, 255]; output "{OUTPUT_NAME}" (batch, '
        f'{meta["embedding_dim"]}) raw. Parity with JAX on {result["images"]} images: max '
        f'relative error {result["max_relative_error"]:.2e} (tolerance {args.tolerance:g})')
  return 0


if __name__ == '__main__':
  sys.exit(main())
