"""XLA compiler options for our jitted computations, per platform.

On the CPU, jaxlib 0.10's XLA hands convolutions to YNNPACK by default. For the
convolutions of a face-recognition backbone that is the slow choice: the weight gradient
of a 3×3 convolution at 56×56×64 (batch 32) takes 119–180 ms through YNNPACK and 32–59 ms
through XLA's Eigen kernels (PyTorch/oneDNN: 23–26 ms), and IR-50's forward+backward at
batch 32 drops from 9.1 s to 6.9 s on two cores when convolutions go to Eigen
(BENCHMARKS.md § Whole training step, "What we tried"). YNNPACK stays on for the
reductions (batch-norm statistics: turning it off everywhere costs 1.2 s per IR-50 step)
and for single matmuls. (IResNet's forward convolutions and stride-1 input gradients do not
reach either library: they are oneDNN calls, sface_jax/models/onednn.py.)

The options are passed per computation (`jax.jit(..., compiler_options=...)`) rather than
through the XLA_FLAGS environment variable, so that importing sface_jax changes nothing for
other code in the process, and only when the computation runs on the CPU (other
platforms' compilers may not know the option).
"""

from typing import Optional

from jax.sharding import Mesh

# DebugOptions.xla_cpu_experimental_ynn_fusion_type: what XLA:CPU may give to YNNPACK.
CPU_COMPILER_OPTIONS = {
    'xla_cpu_experimental_ynn_fusion_type':
        'LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE',
}


def compiler_options(platform: str) -> Optional[dict[str, str]]:
  """The options for a computation on `platform` ('cpu', 'gpu', 'tpu'); None: XLA's own."""
  return dict(CPU_COMPILER_OPTIONS) if platform == 'cpu' else None


def for_mesh(mesh: Mesh) -> Optional[dict[str, str]]:
  """`compiler_options` for a computation laid out on `mesh`."""
  return compiler_options(mesh.devices.flat[0].platform)
