"""The CPU compiler options (sface_jax/xla_options.py): convolutions stay on XLA's Eigen
kernels, reductions and matmuls on YNNPACK, and nothing changes on other platforms."""

import logging
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sface_jax import xla_options

DN = ('NHWC', 'HWIO', 'NHWC')


def _ynn_fused_ops(hlo_text: str) -> set[str]:
  """The ops inside the YNNPACK fusions of a compiled module."""
  bodies = {m.group(1): m.group(2)
            for m in re.finditer(r'^%([\w.\-]+) .*?\{\n(.*?)\n\}', hlo_text, re.M | re.S)}
  ops = set()
  for line in hlo_text.splitlines():
    if '__ynn_fusion' in line:
      body = bodies[re.search(r'calls=%([\w.\-]+)', line).group(1)]
      ops |= set(re.findall(r'= \S+ ([a-z\-]+)\(', body))
  return ops


def test_cpu_compiler_options_keep_convolutions_off_ynnpack():
  x = jnp.ones((8, 28, 28, 16))
  w = jnp.ones((3, 3, 16, 16))

  def step(x, w):
    y = jax.lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=DN)
    return jnp.sum(jax.grad(lambda w: jnp.sum(jax.lax.conv_general_dilated(
        x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=DN) ** 2))(w)) + jnp.mean(y)

  ours = jax.jit(step, compiler_options=xla_options.compiler_options('cpu'))
  hlo = ours.lower(x, w).compile().as_text()
  fused = _ynn_fused_ops(hlo)
  assert 'convolution' not in fused
  assert 'reduce' in fused  # batch-norm statistics stay on YNNPACK
  assert 'convolution(' in hlo
  assert float(ours(x, w)) == pytest.approx(float(jax.jit(step)(x, w)), rel=1e-5)


def test_compiler_options_only_for_the_cpu():
  assert xla_options.compiler_options('gpu') is None
  assert xla_options.compiler_options('tpu') is None
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ('devices',))
  assert xla_options.for_mesh(mesh) == xla_options.CPU_COMPILER_OPTIONS


def test_options_a_jaxlib_refuses_fall_back_to_xlas_own(monkeypatch, caplog):
  """A jaxlib without the experimental option (a later one, or one built without YNNPACK)
  must not break every CPU compile: it compiles with XLA's own options, logged at INFO only,
  and no warning reaches the user."""
  monkeypatch.setattr(xla_options, 'CPU_COMPILER_OPTIONS',
                      {'xla_cpu_experimental_ynn_fusion_type': 'LIBRARY_FUSION_TYPE_BOGUS'})
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    with caplog.at_level(logging.INFO, logger='sface_jax.xla_options'):
      assert xla_options.compiler_options('cpu') is None
      monkeypatch.setattr(xla_options, 'CPU_COMPILER_OPTIONS', {'xla_cpu_no_such_option': 'x'})
      assert xla_options.compiler_options('cpu') is None
      assert xla_options.compiler_options('cpu') is None  # tried once, logged once
  refusals = [r for r in caplog.records if 'refuses our CPU compiler options' in r.getMessage()]
  assert [r.levelno for r in refusals] == [logging.INFO, logging.INFO]
  assert 'No such compile option' in refusals[1].getMessage()
  assert jax.jit(lambda x: 2 * x, compiler_options=xla_options.compiler_options('cpu'))(
      jnp.ones(2)).tolist() == [2.0, 2.0]
