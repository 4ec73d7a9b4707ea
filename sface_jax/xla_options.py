"""XLA compiler options for our jitted computations, per platform.

On the CPU, jaxlib 0.10's XLA hands convolutions to YNNPACK by default. For the
convolutions of a face-recognition backbone that is the slow choice: the weight gradient
of a 3×3 convolution at 56×56×64 (batch 32) takes 119–180 ms through YNNPACK and 32–59 ms
through XLA's Eigen kernels (PyTorch/oneDNN: 23–26 ms), and IR-50's forward+backward at
batch 32 drops from 9.1 s to 6.9 s on two cores when convolutions go to Eigen
(BENCHMARKS.md § Whole training step, "What we tried"). YNNPACK stays on for the
reductions (batch-norm statistics: turning it off everywhere costs 1.2 s per IR-50 step)
and for single matmuls.

The options are passed per computation (`jax.jit(..., compiler_options=...)`) rather than
through the XLA_FLAGS environment variable, so that importing sface_jax changes nothing for
other code in the process, and only when the computation runs on the CPU (other
platforms' compilers may not know the option), and only where this jaxlib's XLA:CPU knows
the option (`_cpu_accepts`; it is an experimental one, tested with jaxlib 0.10.2, 0.11.2 and
0.12.0.1 on x86-64 Linux). Where it does not (a jaxlib built without YNNPACK, such as a
macOS or ARM build may be, or a later one that renamed the option) the computation compiles
with XLA's own options, and that is logged once at INFO level: it costs CPU speed only.
"""

import functools
import logging
from typing import Optional

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

_logger = logging.getLogger(__name__)

# DebugOptions.xla_cpu_experimental_ynn_fusion_type: what XLA:CPU may give to YNNPACK.
CPU_COMPILER_OPTIONS = {
    'xla_cpu_experimental_ynn_fusion_type':
        'LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE',
}


@functools.cache
def _cpu_accepts(options: tuple[tuple[str, str], ...]) -> bool:
  """Whether this jaxlib's XLA:CPU knows `options`. The option is experimental: a jaxlib that
  renamed or dropped it would fail every compile that passes it ("No such compile option"),
  so it is tried once on a one-line computation, and a refusal is logged and falls back."""
  cpu = jax.sharding.SingleDeviceSharding(jax.devices('cpu')[0])
  try:
    jax.jit(lambda x: x + 1, compiler_options=dict(options)).lower(
        jax.ShapeDtypeStruct((2,), jnp.float32, sharding=cpu)).compile()
  except Exception as error:  # pylint: disable=broad-exception-caught  # XLA's error type varies
    _logger.info('jaxlib %s refuses our CPU compiler options (%s); compiling with XLA\'s '
                 'own, whose convolutions are slower on x86-64 (BENCHMARKS.md § Whole training '
                 'step)', jax.__version__, error)
    return False
  return True


def compiler_options(platform: str) -> Optional[dict[str, str]]:
  """The options for a computation on `platform` ('cpu', 'gpu', 'tpu'); None: XLA's own
  (other platforms, or a jaxlib whose XLA:CPU does not know ours)."""
  if platform != 'cpu' or not _cpu_accepts(tuple(sorted(CPU_COMPILER_OPTIONS.items()))):
    return None
  return dict(CPU_COMPILER_OPTIONS)


def for_mesh(mesh: Mesh) -> Optional[dict[str, str]]:
  """`compiler_options` for a computation laid out on `mesh`."""
  return compiler_options(mesh.devices.flat[0].platform)
