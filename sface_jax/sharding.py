"""Where every array lives: the device mesh, the partition rules, and the sharded head.

The layout is insightface's model parallelism, for any number of devices and hosts:

- One mesh axis, `devices`, over every device of every host (each host's devices contiguous).
- The batch is split over it: the backbone is data-parallel. Its parameters, batch-norm
  statistics and their optimiser state are replicated; the step is written for global
  arrays under `jax.jit` and XLA's partitioner inserts the gradient all-reduce and the
  global batch-norm statistics (the axis is `Auto`).
- The class-centre matrix (D, C') is split by class, C'/n columns per device, C' = C padded
  to a multiple of n (`padded_num_classes`); so are its optimiser state, the softmax bias and
  center-loss centres (C', D): `PARTITION_RULES` match them by name. Their class axis
  (`class_axis`) is the one a checkpoint restore pads or truncates when a run moves to
  another device count (`sface_jax.checkpoint`).
- The head runs under `jax.shard_map` (`shard_head`), so its communication is what the code
  says: each device all-gathers the embeddings and labels (B × D), scores them against its
  own classes (B × C'/n), and the losses reduce over the class axis with psum/pmax
  (`heads.head`); in the backward pass the all-gather becomes a reduce-scatter of the
  embedding gradient. No device ever holds a B × C or C × D array.

Why one axis: with the classes split over every device, a second (`model`) axis would only
shrink the all-gather to a sub-group, at B × D = 2 MB for B = 1024 not worth a second knob
(`bench/classifier.py` measures the head's collectives).
"""

import re
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from sface_jax import heads

AXIS = 'devices'

# (regex on the '/'-joined pytree path, PartitionSpec); first match wins, default replicated.
# `class_centers` is (embedding_dim, classes), center-loss centres are (classes,
# embedding_dim): the class axis is split. Paths of the optimiser state end the same way.
PARTITION_RULES = (
    (r'(.*/)?class_centers$', P(None, AXIS)),
    (r'(.*/)?classifier/bias$', P(AXIS)),
    (r'(.*/)?centers$', P(AXIS, None)),
)


def make_mesh(devices=None) -> Mesh:
  """The one-axis mesh over `devices` (default: all), each process's devices contiguous, so
  that a host's share of the batch is one slice of it."""
  devices = list(jax.devices() if devices is None else devices)
  devices.sort(key=lambda d: (d.process_index, d.id))
  return Mesh(np.asarray(devices), (AXIS,), axis_types=(AxisType.Auto,))


def padded_num_classes(num_classes: int, mesh: Mesh) -> int:
  """C rounded up to a multiple of the device count: every device holds C'/n classes."""
  if num_classes <= 0:
    raise ValueError(f'the dataset has {num_classes} classes')
  return -(-num_classes // mesh.size) * mesh.size


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


def class_axis(name: str, ndim: int) -> int | None:
  """The class axis of the leaf at path `name` (the axis the rules split), or None: the
  leaves whose length there is the padded class count C' and so depends on the device count
  (`sface_jax.checkpoint` re-pads them on restore)."""
  spec = tuple(partition_spec(name, ndim))
  return spec.index(AXIS) if AXIS in spec else None


def tree_specs(tree: Any, prefix: str = '') -> Any:
  """PartitionSpecs for every leaf of `tree` by the rules; `prefix` is the path above it."""
  return jax.tree_util.tree_map_with_path(
      lambda path, leaf: partition_spec(prefix + path_name(path), len(leaf.shape)), tree)


def tree_shardings(mesh: Mesh, tree: Any) -> Any:
  """NamedShardings for every leaf of `tree` (arrays or ShapeDtypeStructs) by the rules."""
  return jax.tree.map(lambda spec: NamedSharding(mesh, spec), tree_specs(tree),
                      is_leaf=lambda x: isinstance(x, P))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over all devices."""
  return NamedSharding(mesh, P(AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def shard_head(head: heads.Head, mesh: Mesh, *, num_classes: int, sample_rate: float):
  """`head` on every device at once: the function the train step differentiates.

  Returns f(embeddings, labels, classifier, state, step, rng_data) -> (loss, state, metrics)
  for global arrays: `embeddings` (B, D) and `labels` (B,) split by batch, `classifier` =
  params['classifier'] and `state` the head state, split by class by the rules, `rng_data`
  the step's key data (uint32). The loss and metrics come back replicated.
  """

  def local(embeddings, labels, classifier, state, step, rng_data):
    inputs = heads.head_inputs(embeddings, labels, classifier, num_classes=num_classes,
                               sample_rate=sample_rate,
                               rng=jax.random.wrap_key_data(rng_data), axis_name=AXIS)
    return head.loss(inputs, state, step)

  def run(embeddings, labels, classifier, state, step, rng_data):
    classifier_specs = tree_specs(classifier, prefix='classifier/')
    state_specs = tree_specs(state)
    sharded = jax.shard_map(
        local, mesh=mesh,
        in_specs=(P(AXIS), P(AXIS), classifier_specs, state_specs, P(), P()),
        out_specs=(P(), state_specs, P()))
    return sharded(embeddings, labels, classifier, state, step, rng_data)

  return run
