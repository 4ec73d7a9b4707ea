"""The classifier layout at scale: class centres split over devices vs replicated, 8 devices.

  python bench/classifier.py                       # 125k / 500k / 2M classes, markdown table
  python bench/classifier.py --classes 125000 --repeats 5

For each class count it compiles, on 8 forced CPU devices, the part of the train step that
depends on the classifier: ArcFace on the embeddings (B × D, split by batch), its gradient
with respect to the embeddings and the class centres, and the SGD-momentum update of the
centres. Three layouts:

- `split`: sface_jax's (sharding.shard_head): centres and momentum split by class, C/8 per
  device; the embeddings all-gathered, the loss reduced with psum/pmax.
- `split + PFC 0.1`: the same with Partial FC keeping 10% of each device's centres per step.
- `replicated`: the layout before it (a `data` mesh axis only): centres and momentum on every
  device, the batch split, XLA's partitioner left to all-reduce the C × D gradient.

Per device it reports XLA's `memory_analysis()` (arguments + temporaries) and the bytes of
every collective in the compiled HLO; the step time is the median of `--repeats` runs,
alternating layouts, measured only where the whole layout fits in this machine's memory (8
forced devices share one host: 8 replicated copies of 2 M × 512 centres do not). The 8
devices share this machine's cores, so times compare layouts, not hardware.
"""

import argparse
import datetime
import os
import pathlib
import platform
import statistics
import sys
import time

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '')
                           + ' --xla_force_host_platform_device_count=8')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from sface_jax.configs import base
from sface_jax import heads
from sface_jax import plan
from sface_jax import sharding

HOST_MEMORY_FRACTION = 0.5  # run a layout only if all 8 devices' bytes fit in this much RAM


def _host_memory_bytes() -> int:
  return os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')


def build(layout: str, num_classes: int, batch: int, dim: int, mesh):
  """(jitted step, its abstract arguments, concrete-argument factory) for one layout."""
  config = base.get_config()
  head = heads.get_head(config.head)  # ArcFace, s = 64, m = 0.5
  momentum_rule = optax.trace(decay=0.9)  # SGD momentum; the step below applies lr = 0.1
  padded = sharding.padded_num_classes(num_classes, mesh)
  sample_rate = 0.1 if layout == 'split + PFC 0.1' else 1.0
  if layout == 'replicated':
    center_sharding = NamedSharding(mesh, P())

    def head_loss(x, labels, classifier, rng_data):
      inputs = heads.head_inputs(x, labels, classifier, num_classes=num_classes,
                                 sample_rate=1.0, rng=jax.random.wrap_key_data(rng_data),
                                 axis_name=None)
      return head.loss(inputs, {}, jnp.int32(0))[0]
  else:
    center_sharding = NamedSharding(mesh, P(None, sharding.AXIS))
    sharded = sharding.shard_head(head, mesh, num_classes=num_classes, sample_rate=sample_rate)

    def head_loss(x, labels, classifier, rng_data):
      return sharded(x, labels, classifier, {}, jnp.int32(0), rng_data)[0]

  def step(x, labels, centers, momentum, rng_data):
    loss, (grad_x, grad_centers) = jax.value_and_grad(
        lambda x, c: head_loss(x, labels, {'class_centers': c}, rng_data), argnums=(0, 1))(
            x, centers)
    direction, momentum = momentum_rule.update(grad_centers, momentum)
    return loss, grad_x, centers - 0.1 * direction, momentum

  batch_sharding = sharding.batch_sharding(mesh)
  replicated = sharding.replicated(mesh)
  momentum_sharding = optax.TraceState(trace=center_sharding)
  jitted = jax.jit(step, in_shardings=(batch_sharding, batch_sharding, center_sharding,
                                       momentum_sharding, replicated),
                   out_shardings=(replicated, batch_sharding, center_sharding,
                                  momentum_sharding),
                   donate_argnums=(2, 3))
  abstract = (jax.ShapeDtypeStruct((batch, dim), jnp.float32, sharding=batch_sharding),
              jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=batch_sharding),
              jax.ShapeDtypeStruct((dim, padded), jnp.float32, sharding=center_sharding),
              optax.TraceState(trace=jax.ShapeDtypeStruct((dim, padded), jnp.float32,
                                                          sharding=center_sharding)),
              jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=replicated))

  def arguments(seed=0):
    rng = np.random.default_rng(seed)
    x = jax.device_put(rng.normal(size=(batch, dim)).astype(np.float32), batch_sharding)
    labels = jax.device_put(rng.integers(0, num_classes, batch).astype(np.int32),
                            batch_sharding)
    make_centers = jax.jit(
        lambda key: jnp.pad(0.01 * jax.random.normal(key, (dim, num_classes)),
                            ((0, 0), (0, padded - num_classes))),
        out_shardings=center_sharding)
    centers = make_centers(jax.random.key(seed))
    momentum = optax.TraceState(trace=jax.jit(jnp.zeros_like,
                                              out_shardings=center_sharding)(centers))
    rng_data = jax.device_put(jax.random.key_data(jax.random.key(seed)), replicated)
    return x, labels, centers, momentum, rng_data

  return jitted, abstract, arguments


def measure(layout, num_classes, batch, dim, mesh, repeats):
  jitted, abstract, arguments = build(layout, num_classes, batch, dim, mesh)
  compiled = jitted.lower(*abstract).compile()
  memory = compiled.memory_analysis()
  per_device = memory.argument_size_in_bytes + memory.temp_size_in_bytes
  row = dict(layout=layout, classes=num_classes, per_device=per_device,
             collectives=sum(plan.collective_bytes(compiled.as_text()).values()), times=[])
  if per_device * mesh.size > HOST_MEMORY_FRACTION * _host_memory_bytes():
    return row, None
  args = list(arguments())

  def run_once():
    start = time.perf_counter()
    loss, _, centers, momentum = compiled(*args)
    jax.block_until_ready(loss)
    args[2], args[3] = centers, momentum  # donated: carry the new ones
    return time.perf_counter() - start

  run_once()  # warm-up
  return row, run_once


def _size(value: float) -> str:
  return f'{value / 1e9:.2f} GB' if value >= 1e9 else f'{value / 1e6:.1f} MB'


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--classes', default='125000,500000,2000000')
  parser.add_argument('--batch', type=int, default=64, help='global batch (8 per device)')
  parser.add_argument('--dim', type=int, default=512)
  parser.add_argument('--repeats', type=int, default=3)
  args = parser.parse_args()
  mesh = sharding.make_mesh()
  assert mesh.size == 8, mesh
  layouts = ('split', 'split + PFC 0.1', 'replicated')
  print(f'# classifier layouts on {mesh.size} forced CPU devices: ArcFace loss + gradient + '
        f'SGD-momentum update of the centres, global batch {args.batch}, D = {args.dim}; '
        f'{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, '
        f'{_host_memory_bytes() / 2**30:.0f} GiB, jax {jax.__version__}, '
        f'{datetime.date.today()}; median of {args.repeats}')
  print()
  print('| classes | layout | per-device memory (args + temps) | collectives / step / device '
        '| step time | vs replicated |')
  print('|---|---|---|---|---|---|')
  for num_classes in (int(c) for c in args.classes.split(',')):
    rows, runners = [], []
    for layout in layouts:
      row, runner = measure(layout, num_classes, args.batch, args.dim, mesh, args.repeats)
      rows.append(row)
      runners.append(runner)
    for _ in range(args.repeats):  # alternate layouts so that load changes hit all of them
      for row, runner in zip(rows, runners):
        if runner is not None:
          row['times'].append(runner())
    replicated = rows[-1]
    for row in rows:
      time_text = (f'{statistics.median(row["times"]) * 1e3:.0f} ms' if row['times']
                   else 'not run (does not fit 8× in host memory)')
      ratio = ''
      if row['times'] and replicated['times'] and row is not replicated:
        ratio = (f'{statistics.median(replicated["times"]) / statistics.median(row["times"]):.2f}'
                 '× faster, ')
      ratio += f'{replicated["per_device"] / row["per_device"]:.1f}× less memory'
      if row is replicated:
        ratio = ''
      print(f'| {num_classes:,} | {row["layout"]} | {_size(row["per_device"])} | '
            f'{_size(row["collectives"])} | {time_text} | {ratio} |', flush=True)


if __name__ == '__main__':
  main()
