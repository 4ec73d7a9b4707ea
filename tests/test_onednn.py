"""sface_jax.models.onednn: XLA:CPU's oneDNN convolution against XLA's own and NumPy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sface_jax.models import cpu_kernels
from sface_jax.models import onednn

NHWC_HWIO = ('NHWC', 'HWIO', 'NHWC')  # what flax.linen.Conv passes
needs_onednn = pytest.mark.skipif(not onednn.available(),
                                  reason='oneDNN path: CPU with a tested jaxlib only')

# (side, C_in, C_out, kernel, stride, padding): IR-50's kinds of convolution, small.
SHAPES = [(12, 3, 8, 3, 1, ((1, 1), (1, 1))),     # the stem
          (12, 8, 8, 3, 1, ((1, 1), (1, 1))),     # the repeated 3×3
          (12, 8, 16, 3, 2, ((1, 1), (1, 1))),    # a stage's strided conv2
          (12, 8, 16, 1, 2, 'VALID'),             # the 1×1 strided shortcut
          (9, 8, 8, 3, 1, ((0, 2), (1, 0))),      # uneven padding, odd side
          (7, 4, 8, 1, 1, 'VALID'),               # a stride-1 1×1
          (8, 4, 12, 3, 1, ((1, 1), (1, 1)))]     # 12 outputs: XLA's kernel gradient


def xla_conv(x, kernel, stride, padding):
  return jax.lax.conv_general_dilated(x, kernel, (stride, stride), padding,
                                      dimension_numbers=NHWC_HWIO)


def numpy_conv(x, kernel, stride, padding):
  """float64 reference:
  y[b, p, q, o] = Σ_{i, j, c} x_pad[b, s·p + i, s·q + j, c] · kernel[i, j, c, o]."""
  if padding == 'VALID':
    padding = ((0, 0), (0, 0))
  x = np.pad(np.asarray(x, np.float64), ((0, 0), *padding, (0, 0)))
  kernel = np.asarray(kernel, np.float64)
  kh, kw = kernel.shape[:2]
  out_h = (x.shape[1] - kh) // stride + 1
  out_w = (x.shape[2] - kw) // stride + 1
  return sum(np.einsum('bhwc,co->bhwo',
                       x[:, i:i + stride * out_h:stride, j:j + stride * out_w:stride],
                       kernel[i, j]) for i in range(kh) for j in range(kw))


def random_case(side, c_in, c_out, k, seed=0):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(2, side, side, c_in)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(k, k, c_in, c_out)) / np.sqrt(k * k * c_in),
                       jnp.float32)
  return x, kernel


@needs_onednn
@pytest.mark.parametrize('side,c_in,c_out,k,stride,padding', SHAPES)
def test_forward_and_gradients_match_xla_and_numpy(side, c_in, c_out, k, stride, padding):
  x, kernel = random_case(side, c_in, c_out, k)
  ours = jax.jit(lambda x, w: onednn.conv(x, w, (stride, stride), padding,
                                               dimension_numbers=NHWC_HWIO))
  y = ours(x, kernel)
  reference = numpy_conv(x, kernel, stride, padding)
  assert y.shape == reference.shape
  np.testing.assert_allclose(np.asarray(y), reference, rtol=1e-5, atol=1e-5)

  dy = jnp.asarray(np.random.default_rng(1).normal(size=y.shape), jnp.float32)
  grads = jax.jit(lambda x, w: jax.vjp(ours, x, w)[1](dy))(x, kernel)
  expected = jax.vjp(lambda x, w: xla_conv(x, w, stride, padding), x, kernel)[1](dy)
  for got, want in zip(grads, expected):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


@needs_onednn
def test_compiles_to_the_onednn_call_forward_and_for_the_stride1_input_gradient():
  x, kernel = random_case(12, 8, 8, 3)

  def loss(x, w):
    return jnp.sum(onednn.conv(x, w, (1, 1), ((1, 1), (1, 1)),
                                    dimension_numbers=NHWC_HWIO) ** 2)

  hlo = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, kernel).compile().as_text()
  # forward, and the input gradient; the kernel gradient is our compiled kernel where it
  # builds (cpu_kernels), else XLA's convolution
  assert hlo.count('custom_call_target="__onednn$convolution"') == 2, hlo
  if cpu_kernels.available():
    assert hlo.count(f'custom_call_target="{cpu_kernels._DENSE_KERNEL_GRAD}"') == 1, hlo  # pylint: disable=protected-access
    assert ' convolution(' not in hlo
  else:
    assert ' convolution(' in hlo


def test_falls_back_to_xla_where_onednn_is_not_used():
  """Grouped, dilated and bfloat16 convolutions are XLA's, with the same result."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 8, 8, 4)), jnp.float32)
  grouped = jnp.asarray(rng.normal(size=(3, 3, 2, 4)), jnp.float32)
  cases = [
      (x, grouped, {'feature_group_count': 2}),
      (x, grouped[:, :, :1].repeat(4, 2), {'rhs_dilation': (2, 2)}),
      (x.astype(jnp.bfloat16), grouped.repeat(2, 2).astype(jnp.bfloat16), {}),
  ]
  for lhs, rhs, options in cases:
    args = (lhs, rhs, (1, 1), ((1, 1), (1, 1)))
    lowered = jax.jit(lambda x, w, o=options: onednn.conv(
        x, w, *args[2:], dimension_numbers=NHWC_HWIO, **o)).lower(lhs, rhs)
    assert '__onednn$' not in lowered.as_text()
    np.testing.assert_array_equal(
        np.asarray(onednn.conv(*args, dimension_numbers=NHWC_HWIO, **options), np.float32),
        np.asarray(jax.lax.conv_general_dilated(*args, dimension_numbers=NHWC_HWIO, **options),
                   np.float32))


@needs_onednn
@pytest.mark.parametrize('rows,inner,cols', [(300, 8, 12), (7, 64, 3), (1, 5, 1)])
def test_matmul_and_its_gradients_match_numpy_and_are_onednn_calls(rows, inner, cols):
  rng = np.random.default_rng(rows)
  a, b, dy = (rng.normal(size=shape).astype(np.float32)
              for shape in ((rows, inner), (inner, cols), (rows, cols)))

  def value_and_vjp(a, b, dy):
    value, vjp = jax.vjp(onednn.matmul, a, b)
    return (value, *vjp(dy))

  compiled = jax.jit(value_and_vjp).lower(a, b, dy).compile()
  a64, b64, dy64 = (x.astype(np.float64) for x in (a, b, dy))
  for got, want in zip(compiled(a, b, dy), (a64 @ b64, dy64 @ b64.T, a64.T @ dy64)):
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
  hlo = compiled.as_text()
  # the product, dy·bᵀ and aᵀ·dy, with no transpose of an operand and no XLA dot
  assert hlo.count('custom_call_target="__onednn$matmul"') == 3, hlo
  assert ' dot(' not in hlo and ' transpose(' not in hlo, hlo


def test_matmul_falls_back_to_jnp_dot():
  """bfloat16, and operands that are not matrices, are XLA's dot, with the same result."""
  rng = np.random.default_rng(0)
  cases = [(rng.normal(size=(4, 3)), rng.normal(size=(3, 5)), jnp.bfloat16),
           (rng.normal(size=(2, 4, 3)), rng.normal(size=(3, 5)), jnp.float32),
           (rng.normal(size=(3,)), rng.normal(size=(3, 5)), jnp.float32)]
  for a, b, dtype in cases:
    a, b = jnp.asarray(a, dtype), jnp.asarray(b, dtype)
    assert '__onednn$' not in jax.jit(onednn.matmul).lower(a, b).as_text()
    np.testing.assert_array_equal(np.asarray(onednn.matmul(a, b), np.float32),
                                  np.asarray(jnp.dot(a, b), np.float32))


@needs_onednn
def test_grouped_forward_conv_matches_xla_and_refuses_what_it_cannot_run():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 9, 9, 8)), jnp.float32)
  for groups, stride in ((8, 1), (8, 2), (4, 1), (1, 1)):
    kernel = jnp.asarray(rng.normal(size=(3, 3, 8 // groups, 8)), jnp.float32)
    padding = ((1, 1), (0, 2))
    got = jax.jit(lambda x, w, g=groups, s=stride: onednn.forward_conv(
        x, w, (s, s), padding, g))(x, kernel)
    want = jax.lax.conv_general_dilated(x, kernel, (stride, stride), padding,
                                        dimension_numbers=NHWC_HWIO,
                                        feature_group_count=groups)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match='padding'):
    onednn.forward_conv(x, kernel, (1, 1), ((-1, 1), (1, 1)), 1)
  with pytest.raises(ValueError, match='bfloat16'):
    onednn.forward_conv(x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16), (1, 1),
                        ((1, 1), (1, 1)), 1)
