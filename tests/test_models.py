"""Backbones: sizes against published figures, the output contract, dtypes, sharded BN.

Full-size models are only traced (jax.eval_shape / cost analysis of a compiled forward
pass, no weights allocated); anything that runs uses the `tiny` preset at 32–64 px.
"""

import pathlib
import re
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import multi_device

from sface_jax import models
from sface_jax import xla_options

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]

# Parameters per model (512-d embedding, 112×112): exact, as also built by PyTorch from
# arcface_torch's definition (test below), and the published figure where there is one
# (sface_jax/models/__main__.py cites them: ONNX sizes in insightface's MFR baselines).
PARAMETERS = {
    'r18': 24_025_600, 'r34': 34_139_328, 'r50': 43_590_848, 'r100': 65_156_160,
    'r200': 118_833_920, 'mbf': 2_059_520, 'r18_small': 3_914_752, 'tiny': 829_256,
}
PUBLISHED_PARAMETERS = {'r18': 24.028e6, 'r34': 34.143e6, 'r50': 43.596e6, 'r100': 65.166e6}
PUBLISHED_MACS = {'r18': 2.6e9, 'r50': 6.3e9, 'r100': 12.1e9, 'r200': 23.5e9, 'mbf': 0.45e9}


@pytest.mark.parametrize('name', sorted(PARAMETERS))
def test_parameter_count(name):
  count = models.count_parameters(models.get_model(name))
  assert count == PARAMETERS[name]
  if name in PUBLISHED_PARAMETERS:
    assert abs(count / PUBLISHED_PARAMETERS[name] - 1) < 0.005


def test_parameter_counts_equal_arcface_torch_definition():
  torch = pytest.importorskip('torch')
  import torch_reference  # pylint: disable=g-import-not-at-top
  with torch.device('meta'):  # shapes only, nothing allocated
    for name in ('r18', 'r34', 'r50', 'r100', 'r200', 'mbf'):
      torch_model = torch_reference.build(name)
      assert sum(p.numel() for p in torch_model.parameters()) == PARAMETERS[name], name


@pytest.mark.parametrize('name', sorted(PUBLISHED_MACS))
def test_dense_macs_match_published(name):
  """Conv + dense MACs with every kernel tap counted (ptflops' convention) within 5%."""
  macs = models.dense_macs(models.get_model(name))
  assert abs(macs / PUBLISHED_MACS[name] - 1) < 0.05, macs


def _valid_taps(size, kernel, stride, padding):
  """Σ over output positions of the kernel taps that land inside the input (one axis)."""
  out = (size + 2 * padding - kernel) // stride + 1
  return sum(sum(0 <= i * stride - padding + j < size for j in range(kernel))
             for i in range(out))


def iresnet_valid_macs(stage_sizes, widths=(64, 128, 256, 512), stem=64, side=112, dim=512):
  """NumPy-free reference: IResNet MACs counting only taps over real (unpadded) input."""
  total = _valid_taps(side, 3, 1, 1) ** 2 * 3 * stem
  cin = stem
  for num_blocks, width in zip(stage_sizes, widths):
    for block in range(num_blocks):
      stride = 2 if block == 0 else 1
      total += _valid_taps(side, 3, 1, 1) ** 2 * cin * width  # conv1
      total += _valid_taps(side, 3, stride, 1) ** 2 * width * width  # conv2
      if block == 0:
        total += _valid_taps(side, 1, 2, 0) ** 2 * cin * width  # projection
      side //= stride
      cin = width
  return total + side * side * cin * dim


def test_xla_cost_analysis_r50():
  """XLA's count is below the published 6.3 G only by the taps over zero padding.

  XLA's cost analysis skips kernel taps that fall on the padding (−7% at 112×112 for
  r50, most of it on the 7×7 and 14×14 maps); what is left is element-wise work.
  """
  xla = models.xla_macs(models.get_model('r50'))
  valid = iresnet_valid_macs((3, 4, 14, 3))
  assert 0 <= xla - valid < 0.02 * valid, (xla, valid)
  assert abs(valid / 6.3e9 - 1) < 0.08


def test_xla_cost_analysis_mbf():
  xla = models.xla_macs(models.get_model('mbf'))
  assert abs(xla / 0.45e9 - 1) < 0.05, xla


def _init(model, side, batch=2, seed=0):
  """Random images and variables, filled on the host from `jax.eval_shape(model.init)`.

  (Compiling `model.init` itself costs ~20 s on two busy CPU cores, almost all of it
  in the threefry random-number kernels, so the tests do not call it.)
  """
  rng = np.random.RandomState(seed)
  images = rng.normal(size=(batch, side, side, 3)).astype(np.float32)
  abstract = models.abstract_variables(model, side)

  def fill(path, leaf):
    name = path[-1].key
    if name == 'var':
      return rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32)
    if name in ('scale', 'alpha'):
      return rng.uniform(0.5, 1.0, leaf.shape).astype(np.float32)
    if name == 'kernel':
      fan_in = int(np.prod(leaf.shape[:-1]))
      return (rng.normal(size=leaf.shape) * np.sqrt(2 / fan_in)).astype(np.float32)
    return (rng.normal(size=leaf.shape) * 0.1).astype(np.float32)
  return images, jax.tree_util.tree_map_with_path(fill, abstract)


def _apply(model, train=False, **kwargs):
  if train:
    return jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=['batch_stats'],
                                            **kwargs))
  return jax.jit(lambda v, x: model.apply(v, x, train=False))


TINY_MBF = dict(stage_widths=(16, 16, 32, 32), down_expansions=(16, 32, 64),
                residual_expansions=(16, 32, 32), stem_groups=16, head_width=64)


@pytest.mark.parametrize('name,side,overrides', [
    ('tiny', 32, {}), ('tiny', 64, {}), ('mbf', 32, TINY_MBF)])
def test_outputs_contract(name, side, overrides):
  model = models.get_model(name, embedding_dim=24, **overrides)
  images, variables = _init(model, side, batch=3)
  assert set(variables) == {'params', 'batch_stats'}
  embeddings, norms = _apply(model)(variables, images)
  assert embeddings.shape == (3, 24) and embeddings.dtype == jnp.float32
  assert norms.shape == (3,) and norms.dtype == jnp.float32
  np.testing.assert_allclose(norms, np.linalg.norm(np.asarray(embeddings), axis=1),
                             rtol=1e-5)
  (train_embeddings, _), updates = _apply(model, train=True)(variables, images)
  assert train_embeddings.shape == (3, 24)
  changed = jax.tree_util.tree_map(lambda a, b: bool(jnp.any(a != b)),
                                   variables['batch_stats'], updates['batch_stats'])
  assert all(jax.tree_util.tree_leaves(changed))


@pytest.mark.parametrize('cin,cout,groups,kernel,stride,padding,side', [
    (8, 8, 8, 3, 1, ((1, 1), (1, 1)), 9),  # depthwise
    (8, 8, 8, 3, 2, ((1, 1), (1, 1)), 8),  # depthwise, stride 2
    (8, 8, 4, 3, 1, ((1, 1), (1, 1)), 6),  # 2 in / 2 out per group (arcface_torch's mbf stem)
    (8, 12, 4, 3, 2, ((1, 1), (1, 1)), 7),  # 2 in / 3 out per group, odd side
    (6, 6, 6, 4, 1, ((0, 0), (0, 0)), 4),  # global depthwise (GDC) on a 4×4 map
    (6, 9, 3, 3, 1, ((0, 2), (1, 0)), 5),  # asymmetric padding, 2 in / 3 out
    (4, 4, 4, 3, 1, ((3, 3), (3, 3)), 3),  # padding past k − 1 (cropped in the backward)
])
def test_grouped_conv_taps_equals_xla_convolution(cin, cout, groups, kernel, stride, padding,
                                                  side):
  """Value, d/dx and d/dkernel of the tap sum (its hand-written VJP) against XLA's grouped
  convolution and XLA's own transpose of it, in float32, and in bfloat16 within bf16's
  resolution."""
  from sface_jax.models import mobilefacenet  # pylint: disable=g-import-not-at-top
  rng = np.random.RandomState(0)
  x = rng.normal(size=(2, side, side, cin)).astype(np.float32)
  w = rng.normal(size=(kernel, kernel, cin // groups, cout)).astype(np.float32)

  def taps(x, w):
    return mobilefacenet.grouped_conv_taps(x, w, stride, padding, groups)

  def xla(x, w):
    return jax.lax.conv_general_dilated(x, w, (stride, stride), padding,
                                        dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                        feature_group_count=groups)

  def value_and_vjp(conv, dtype):
    @jax.jit
    def run(x, w, cotangent):
      value, vjp = jax.vjp(conv, x.astype(dtype), w.astype(dtype))
      return [a.astype(jnp.float32) for a in (value, *vjp(cotangent.astype(dtype)))]
    return run

  out_h = (side + sum(padding[0]) - kernel) // stride + 1
  out_w = (side + sum(padding[1]) - kernel) // stride + 1
  cotangent = rng.normal(size=(2, out_h, out_w, cout)).astype(np.float32)
  expected = value_and_vjp(xla, jnp.float32)(x, w, cotangent)
  got = value_and_vjp(taps, jnp.float32)(x, w, cotangent)
  got16 = value_and_vjp(taps, jnp.bfloat16)(x, w, cotangent)
  assert got[0].shape == (2, out_h, out_w, cout)
  for a, a16, b in zip(got, got16, expected):  # output, d/dx, d/dkernel
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    scale = np.max(np.abs(b))
    np.testing.assert_allclose(a16, b, atol=0.03 * scale)


def test_tap_sum_is_compiled_once_not_into_each_consumer():
  """XLA fuses cheap element-wise producers into every consumer; `_taps_forward` puts the
  tap sum behind a conditional so that three consumers read one result. Without it, the
  sum's nine slices are compiled into each consumer's fusion (four fused computations)."""
  from sface_jax.models import mobilefacenet  # pylint: disable=g-import-not-at-top
  if jax.default_backend() != 'cpu':
    pytest.skip('the tap sums and this fusion behaviour are XLA:CPU-specific')

  def three_consumers(x, w):
    y = mobilefacenet.grouped_conv_taps(x, w, 1, ((1, 1), (1, 1)), 8)
    return y - y.mean(axis=(0, 1, 2)), jnp.where(y > 0, y, 0.25 * y), jnp.exp(y)

  compiled = jax.jit(three_consumers, compiler_options=xla_options.compiler_options('cpu')
                    ).lower(jnp.ones((2, 8, 8, 8)), jnp.ones((3, 3, 1, 8))).compile()
  computations = re.split(r'\n(?=\S.*\{\n)', compiled.as_text())
  with_the_taps = [c for c in computations if len(re.findall(r' slice\(', c)) >= 9]
  assert 1 <= len(with_the_taps) <= 2  # the conditional's two (identical) branches


def test_pointwise_conv_as_matmul_equals_xla_convolution():
  """MobileFaceNet's 1×1 convolutions on the CPU: value, d/dx and d/dkernel against a float64
  NumPy reference, and the compiled gradient has no convolution left (the kernel gradient is
  the matmul's transpose, not XLA's Eigen convolution). Any other convolution passes through
  to XLA's unchanged."""
  from sface_jax.models import mobilefacenet  # pylint: disable=g-import-not-at-top
  if jax.default_backend() != 'cpu':
    pytest.skip('the matmul form is taken only when tracing for the CPU')
  rng = np.random.RandomState(0)
  x = rng.normal(size=(2, 5, 6, 8)).astype(np.float32)
  w = rng.normal(size=(1, 1, 8, 12)).astype(np.float32)
  cotangent = rng.normal(size=(2, 5, 6, 12)).astype(np.float32)
  dimensions = jax.lax.conv_dimension_numbers(x.shape, w.shape, ('NHWC', 'HWIO', 'NHWC'))

  def pointwise(x, w):
    return mobilefacenet.pointwise_as_matmul(x, w, (1, 1), ((0, 0), (0, 0)),
                                             dimension_numbers=dimensions)

  def value_and_vjp(x, w, cotangent):
    value, vjp = jax.vjp(pointwise, x, w)
    return (value, *vjp(cotangent))

  x64, w64, dy64 = (a.astype(np.float64) for a in (x, w, cotangent))
  expected = (np.einsum('bhwc,cd->bhwd', x64, w64[0, 0]),
              np.einsum('bhwd,cd->bhwc', dy64, w64[0, 0]),
              np.einsum('bhwc,bhwd->cd', x64, dy64)[None, None])
  compiled = jax.jit(value_and_vjp).lower(x, w, cotangent).compile()
  for got, want in zip(compiled(x, w, cotangent), expected):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  assert ' convolution(' not in compiled.as_text()
  # a 3×3 convolution is XLA's own
  w3 = rng.normal(size=(3, 3, 8, 12)).astype(np.float32)
  got = mobilefacenet.pointwise_as_matmul(x, w3, (1, 1), ((1, 1), (1, 1)),
                                          dimension_numbers=dimensions)
  np.testing.assert_array_equal(got, jax.lax.conv_general_dilated(
      x, w3, (1, 1), ((1, 1), (1, 1)), dimension_numbers=dimensions))


def test_input_side_must_be_divisible_by_16():
  model = models.get_model('tiny')
  with pytest.raises(ValueError, match='divisible by 16'):
    model.init(jax.random.key(0), jnp.zeros((1, 40, 40, 3)), train=False)


def test_unknown_model_name():
  with pytest.raises(ValueError, match='unknown model'):
    models.get_model('r51')


def test_bfloat16_computation_float32_params_and_outputs():
  model32 = models.get_model('tiny')
  model16 = models.get_model('tiny', dtype='bfloat16')
  images, variables = _init(model32, 32, batch=4)
  abstract16 = models.abstract_variables(model16, 32)
  assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(abstract16)} == {
      jnp.dtype(jnp.float32)}
  embeddings32, _ = _apply(model32)(variables, images)
  embeddings16, norms16 = _apply(model16)(variables, images)
  assert embeddings16.dtype == jnp.float32 and norms16.dtype == jnp.float32
  relative = jnp.linalg.norm(embeddings16 - embeddings32) / jnp.linalg.norm(embeddings32)
  assert 0 < relative < 0.05  # bf16 has an 8-bit mantissa: different, but close
  hlo = jax.jit(lambda v, x: model16.apply(v, x, train=False)).lower(variables,
                                                                      images).as_text()
  assert 'bf16' in hlo and 'convolution' in hlo


def test_dropout_uses_dropout_rng_and_only_when_training():
  model = models.get_model('tiny', dropout=0.5)
  images, variables = _init(model, 32)
  evaluate = _apply(model)
  np.testing.assert_array_equal(evaluate(variables, images)[0],
                                evaluate(variables, images)[0])

  @jax.jit
  def train_embeddings(seed):
    (embeddings, _), _ = model.apply(variables, images, train=True, mutable=['batch_stats'],
                                     rngs={'dropout': jax.random.key(seed)})
    return embeddings

  def train(seed):
    return np.asarray(train_embeddings(seed))
  assert not np.allclose(train(0), train(1))
  np.testing.assert_array_equal(train(0), train(0))


def test_embedding_batch_norm_scale_is_frozen():
  """arcface_torch's `features.weight.requires_grad = False`: zero gradient here."""
  model = models.get_model('tiny')
  images, variables = _init(model, 32, batch=4)

  def loss(params):
    (embeddings, norms), _ = model.apply({**variables, 'params': params}, images,
                                         train=True, mutable=['batch_stats'])
    return jnp.sum(embeddings * jnp.arange(embeddings.shape[1])) + jnp.sum(norms)
  grads = jax.jit(jax.grad(loss))(variables['params'])
  assert not np.any(np.asarray(grads['features']['scale']))
  assert np.any(np.asarray(grads['features']['bias']))
  assert np.any(np.asarray(grads['conv1']['kernel']))


SHARDED_BN = textwrap.dedent('''
    import jax, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from sface_jax import models
    assert len(jax.devices()) == 8
    model = models.get_model('tiny')
    images = np.random.RandomState(0).normal(size=(16, 32, 32, 3)).astype(np.float32)
    images[:2] += 3.0  # shards differ, so per-shard statistics would differ
    rng = np.random.RandomState(1)  # (model.init would compile for ~20 s on CI's cores)
    variables = jax.tree_util.tree_map(
        lambda leaf: rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32),
        models.abstract_variables(model, 32))

    @jax.jit
    def step(variables, images):
      (embeddings, _), updates = model.apply(variables, images, train=True,
                                             mutable=['batch_stats'])
      return embeddings, updates['batch_stats']

    single = step(variables, images)
    mesh = jax.make_mesh((8,), ('data',))
    sharded = step(jax.device_put(variables, NamedSharding(mesh, P())),
                   jax.device_put(images, NamedSharding(mesh, P('data'))))
    assert len(sharded[0].sharding.device_set) == 8
    for a, b in zip(jax.tree_util.tree_leaves(single), jax.tree_util.tree_leaves(sharded)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-5)
    first_shard = step(variables, images[:2])[1]['bn1']['mean']
    assert not np.allclose(first_shard, sharded[1]['bn1']['mean'], atol=1e-3)
    print('ok')
''')


def test_batch_norm_statistics_are_global_when_batch_is_sharded():
  result = multi_device.run_python('-c', SHARDED_BN)
  assert result.stdout.strip().endswith('ok')
