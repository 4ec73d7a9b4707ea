"""sface_jax.models.cpu_kernels (our compiled CPU kernels) and custom_calls (where custom calls
are traced): the grouped and dense convolutions' kernel gradients against float64 NumPy, the
compiled gradients' calls, the fallbacks."""

import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import multi_device

from sface_jax.models import cpu_kernels
from sface_jax.models import custom_calls
from sface_jax.models import mobilefacenet
from sface_jax.models import onednn

needs_kernels = pytest.mark.skipif(not cpu_kernels.available(),
                                   reason='our CPU kernels: CPU, one device, a C++ compiler')
KERNEL_GRAD = cpu_kernels._KERNEL_GRAD  # pylint: disable=protected-access


def numpy_kernel_grad(x, dy, kernel_shape, stride, padding, groups):
  """float64: dkernel[i, j, c, o] = Σ_{b,p,q} x_pad[b, s·p + i, s·q + j, g(o)·group_in + c]
  · dy[b, p, q, o], negative padding cropping."""
  kh, kw, group_in, out_channels = kernel_shape
  group_out = out_channels // groups
  x = np.asarray(x, np.float64)
  crop = [(max(-lo, 0), x.shape[d + 1] - max(-hi, 0)) for d, (lo, hi) in enumerate(padding)]
  x = x[:, crop[0][0]:crop[0][1], crop[1][0]:crop[1][1]]
  x = np.pad(x, ((0, 0), *[(max(lo, 0), max(hi, 0)) for lo, hi in padding], (0, 0)))
  dy = np.asarray(dy, np.float64)
  out_h, out_w = dy.shape[1:3]
  dkernel = np.zeros(kernel_shape)
  for o in range(out_channels):
    g = o // group_out
    for i in range(kh):
      for j in range(kw):
        window = x[:, i:i + stride * (out_h - 1) + 1:stride, j:j + stride * (out_w - 1) + 1:stride,
                   g * group_in:(g + 1) * group_in]
        dkernel[i, j, :, o] = np.einsum('bpqc,bpq->c', window, dy[..., o])
  return dkernel


@pytest.mark.skipif(cpu_kernels.compiler() is None, reason='no C++ compiler here')
def test_builds_where_a_compiler_exists():
  """Where a C++ compiler exists, the kernels build and load: a silent fallback would hide a
  broken build behind the slower reductions."""
  assert cpu_kernels._load()  # pylint: disable=protected-access
  assert cpu_kernels.available() == custom_calls.allowed()


@needs_kernels
@pytest.mark.parametrize('batch,side,cin,cout,groups,kernel,stride,padding', [
    (5, 9, 32, 32, 32, 3, 1, ((1, 1), (1, 1))),    # depthwise, two blocks of 16 groups
    (3, 8, 20, 20, 20, 3, 2, ((1, 1), (1, 1))),    # depthwise, stride 2, 16 + 4 groups
    (2, 6, 16, 16, 8, 3, 1, ((1, 1), (1, 1))),     # 2 in / 2 out per group (mbf's stem)
    (4, 7, 8, 12, 4, 3, 2, ((1, 1), (1, 1))),      # 2 in / 3 out per group, odd side
    (3, 4, 24, 24, 24, 4, 1, ((0, 0), (0, 0))),    # global depthwise (GDC) on a 4×4 map
    (2, 5, 6, 9, 3, 3, 1, ((0, 2), (1, 0))),       # asymmetric padding
    (2, 3, 4, 4, 4, 3, 1, ((3, 3), (3, 3))),       # padding past k − 1
    (2, 9, 4, 4, 4, 3, 2, ((-1, 0), (0, -2))),     # negative padding crops
    (1, 6, 17, 17, 17, 3, 1, ((1, 1), (1, 1))),    # one image: one chunk of work
])
def test_kernel_grad_matches_numpy(batch, side, cin, cout, groups, kernel, stride, padding):
  rng = np.random.default_rng(side * cin + stride)
  x = rng.normal(size=(batch, side, side, cin)).astype(np.float32)
  kernel_shape = (kernel, kernel, cin // groups, cout)
  out_h = (side + sum(padding[0]) - kernel) // stride + 1
  out_w = (side + sum(padding[1]) - kernel) // stride + 1
  dy = rng.normal(size=(batch, out_h, out_w, cout)).astype(np.float32)
  got = jax.jit(lambda x, dy: cpu_kernels.grouped_conv_kernel_grad(
      x, dy, kernel_shape, stride, padding, groups))(x, dy)
  expected = numpy_kernel_grad(x, dy, kernel_shape, stride, padding, groups)
  assert got.dtype == jnp.float32 and got.shape == kernel_shape
  # float32 sums of at most 5·9·9 products of unit normals: ~1e-6 relative to the largest
  np.testing.assert_allclose(np.asarray(got), expected, rtol=0, atol=1e-5 * np.abs(expected).max())
  bf16 = cpu_kernels.grouped_conv_kernel_grad(jnp.asarray(x, jnp.bfloat16), jnp.asarray(
      dy, jnp.bfloat16), kernel_shape, stride, padding, groups)
  assert bf16.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(bf16, np.float32), expected,
                             atol=0.03 * np.abs(expected).max())


@needs_kernels
@pytest.mark.parametrize('batch,side,cin,cout,kernel,stride,padding', [
    (3, 12, 3, 16, 3, 1, ((1, 1), (1, 1))),       # IResNet's stem: a 3-channel tile
    (2, 40, 13, 24, 3, 1, ((1, 1), (1, 1))),      # rows of one image per block, the last
                                                  # block short; 6 + 6 + 1 in, 16 + 8 out
    (5, 12, 20, 8, 3, 1, ((1, 1), (1, 1))),       # whole images per block (2 of 12×12)
    (3, 26, 8, 16, 3, 2, ((1, 1), (1, 1))),       # stride 2: four phase planes (rows of 13)
    (3, 11, 8, 16, 1, 2, ((0, 0), (0, 0))),       # IResNet's 1×1 stride-2 shortcut, odd side
    (2, 9, 6, 32, 3, 1, ((0, 2), (1, 0))),        # asymmetric padding
    (2, 4, 5, 8, 3, 1, ((3, 3), (3, 3))),         # padding past k − 1
    (2, 29, 7, 16, 5, 2, ((-1, 2), (2, -2))),     # 5×5, negative padding crops
    (2, 13, 7, 16, 5, 2, ((-1, 2), (2, -2))),     # the same on rows of 5: taps packed alone
    (1, 40, 130, 8, 3, 1, ((1, 1), (1, 1))),      # one image; input channels in two blocks
])
def test_dense_kernel_grad_matches_numpy(batch, side, cin, cout, kernel, stride, padding):
  rng = np.random.default_rng(side * cin + stride)
  x = rng.normal(size=(batch, side, side, cin)).astype(np.float32)
  kernel_shape = (kernel, kernel, cin, cout)
  out_h = (side + sum(padding[0]) - kernel) // stride + 1
  out_w = (side + sum(padding[1]) - kernel) // stride + 1
  dy = rng.normal(size=(batch, out_h, out_w, cout)).astype(np.float32)
  got = jax.jit(lambda x, dy: cpu_kernels.conv_kernel_grad(
      x, dy, kernel_shape, stride, padding))(x, dy)
  expected = numpy_kernel_grad(x, dy, kernel_shape, stride, padding, groups=1)
  assert got.dtype == jnp.float32 and got.shape == kernel_shape
  # fixed chunks of images per thread, summed in a fixed order: the same bits every call
  # (a resumed run replays its steps exactly)
  np.testing.assert_array_equal(got, jax.jit(lambda x, dy: cpu_kernels.conv_kernel_grad(
      x, dy, kernel_shape, stride, padding))(x, dy))
  # float32 sums of at most 2·40·40 products of unit normals: ~1e-6 relative to the largest
  np.testing.assert_allclose(np.asarray(got), expected, rtol=0, atol=1e-5 * np.abs(expected).max())


def test_dense_kernel_grad_takes_float32_and_whole_vectors_only():
  """What the dense kernel cannot run is refused by `takes_dense` (and the IResNet gradient
  falls back to XLA's, tests/test_onednn.py): other dtypes, output channels not a multiple of
  8."""
  x, dy = jnp.ones((1, 4, 4, 3)), jnp.ones((1, 4, 4, 12))
  assert not cpu_kernels.takes_dense(x, dy)
  assert not cpu_kernels.takes_dense(x.astype(jnp.bfloat16), dy[..., :8].astype(jnp.bfloat16))
  assert cpu_kernels.takes_dense(x, dy[..., :8]) == cpu_kernels.available()
  with pytest.raises(ValueError, match='takes_dense'):
    cpu_kernels.conv_kernel_grad(x, dy, (3, 3, 3, 12), 1, ((1, 1), (1, 1)))


@needs_kernels
def test_grouped_conv_gradient_compiles_to_our_kernel_and_falls_back_when_disabled():
  """MobileFaceNet's grouped-convolution VJP calls the kernel once per kernel gradient; inside
  `custom_calls.disabled()` it is XLA's reductions again, with the same result."""
  def loss(x, w):
    return jnp.sum(mobilefacenet.grouped_conv_taps(x, w, 1, ((1, 1), (1, 1)), 8) ** 2)
  rng = np.random.default_rng(0)
  x, w = rng.normal(size=(2, 6, 6, 8)), rng.normal(size=(3, 3, 1, 8))
  x, w = jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32)
  ours = jax.jit(jax.grad(loss, argnums=1)).lower(x, w)  # a new jit: tracing reads the switch
  assert ours.as_text().count(KERNEL_GRAD) == 1
  with custom_calls.disabled():
    xla = jax.jit(jax.grad(loss, argnums=1)).lower(x, w)
  assert KERNEL_GRAD not in xla.as_text()
  np.testing.assert_allclose(ours.compile()(x, w), xla.compile()(x, w), rtol=1e-5, atol=1e-5)


def test_custom_calls_only_on_one_cpu_device():
  """XLA's partitioner cannot split a custom call, so a mesh of CPU devices keeps XLA's own
  operations (oneDNN's and ours alike)."""
  code = ('from sface_jax.models import cpu_kernels, custom_calls, onednn; import jax; '
          'print(jax.device_count(), custom_calls.allowed(), cpu_kernels.available(), '
          'onednn.available())')
  assert multi_device.run_python('-c', code, devices=2).stdout.split() == ['2'] + ['False'] * 3
  assert multi_device.run_python('-c', code, devices=1).stdout.split() == [
      '1', str(custom_calls.allowed()), str(cpu_kernels.available()), str(onednn.available())]


def test_a_failed_build_warns_leaves_nothing_and_falls_back(tmp_path, monkeypatch):
  """A compiler that fails after writing part of its output: a warning naming the source,
  `available()` false, nothing left in the cache, and MobileFaceNet's gradient still computed
  (by XLA's reductions)."""
  compiler = tmp_path / 'broken-c++'
  compiler.write_text(textwrap.dedent('''\
      #!/bin/sh
      [ "$1" = --version ] && { echo broken-c++ 1.0; exit 0; }
      for output; do :; done
      echo half > "$output"; echo 'error: out of memory' >&2; exit 1
  '''))
  compiler.chmod(0o755)
  monkeypatch.setenv('CXX', str(compiler))
  monkeypatch.setenv('SFACE_JAX_CACHE', str(tmp_path / 'cache'))
  code = textwrap.dedent('''
      import warnings
      import jax, jax.numpy as jnp
      from sface_jax.models import cpu_kernels, mobilefacenet
      with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        print(cpu_kernels.available())
      print(any('cpu_kernels.cc' in str(w.message) and 'out of memory' in str(w.message)
                for w in caught))
      grad = jax.grad(lambda w: mobilefacenet.grouped_conv_taps(
          jnp.ones((1, 4, 4, 2)), w, 1, ((1, 1), (1, 1)), 2).sum())(jnp.ones((3, 3, 1, 2)))
      print(float(grad[1, 1, 0, 0]))
  ''')
  done = multi_device.run_python('-c', code, devices=1)
  assert done.stdout.split() == ['False', 'True', '16.0']  # the centre tap sees all 16 ones
  assert not list((tmp_path / 'cache').iterdir())
