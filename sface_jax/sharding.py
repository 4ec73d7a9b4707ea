"""Where every array lives: the device mesh and the partition rules, in one place.

The mesh has two axes. `data` splits the batch (data parallelism); `model` splits the
class-centre matrix by class, so that a 2 M-identity classifier never sits whole on one
device. Everything else is replicated. Axes are `AxisType.Auto`: we annotate the inputs and
outputs of the jitted step (parameters by the rules below, the batch over `data`) and XLA's
sharding propagation inserts the collectives — the all-reduce of gradients and of batch-norm
statistics over `data`, the all-gather of embeddings and the distributed log-sum-exp over
`model` — so the backbone and the heads carry no sharding code.
"""

import re
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = 'data'
MODEL_AXIS = 'model'

# (regex on the '/'-joined pytree path, PartitionSpec); first match wins, default replicated.
# `class_centers` is (embedding_dim, num_classes), center-loss centres are
# (num_classes, embedding_dim): the class axis goes over `model`.
PARTITION_RULES = (
    (r'(.*/)?class_centers$', P(None, MODEL_AXIS)),
    (r'(.*/)?classifier/bias$', P(MODEL_AXIS)),
    (r'(.*/)?centers$', P(MODEL_AXIS, None)),
)


def make_mesh(mesh_config, devices=None) -> Mesh:
  """Builds the ('data', 'model') mesh; an axis size of -1 takes the remaining devices."""
  devices = jax.devices() if devices is None else devices
  sizes = {DATA_AXIS: int(mesh_config.data), MODEL_AXIS: int(mesh_config.model)}
  fixed = int(np.prod([s for s in sizes.values() if s != -1]))
  free = [name for name, size in sizes.items() if size == -1]
  if len(free) > 1:
    raise ValueError(f'config.mesh: only one axis may be -1, got {sizes}')
  if free:
    if len(devices) % fixed:
      raise ValueError(f'config.mesh: {len(devices)} devices are not divisible by {fixed}')
    sizes[free[0]] = len(devices) // fixed
  if int(np.prod(list(sizes.values()))) != len(devices):
    raise ValueError(f'config.mesh {sizes} does not use the {len(devices)} devices')
  return jax.make_mesh((sizes[DATA_AXIS], sizes[MODEL_AXIS]), (DATA_AXIS, MODEL_AXIS),
                       axis_types=(AxisType.Auto, AxisType.Auto), devices=devices)


def path_name(path) -> str:
  """'/'-joined names of a pytree key path: ('params', 'classifier', 'class_centers')."""
  parts = []
  for key in path:
    for attr in ('key', 'name', 'idx'):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
    else:
      parts.append(str(key))
  return '/'.join(parts)


def partition_spec(name: str, ndim: int) -> P:
  for pattern, spec in PARTITION_RULES:
    if re.fullmatch(pattern, name) and len(spec) == ndim:
      return spec
  return P()


def tree_shardings(mesh: Mesh, tree: Any) -> Any:
  """NamedShardings for every leaf of `tree` (arrays or ShapeDtypeStructs) by the rules."""
  return jax.tree_util.tree_map_with_path(
      lambda path, leaf: NamedSharding(mesh, partition_spec(path_name(path), len(leaf.shape))),
      tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis over `data`."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())
