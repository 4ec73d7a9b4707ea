"""Backbone throughput: our Flax models next to the same architecture in PyTorch.

  python bench/backbone.py                       # r50 and mbf, batch 64, CPU, both frameworks
  python bench/backbone.py --models mbf --iterations 10

Measures images/s of the forward pass (inference mode: BN running statistics, no
gradient) and of forward+backward (training mode: batch statistics, gradient of a scalar
loss with respect to every parameter, no optimiser update), at 112×112, float32. Each
number is the median over `--iterations` timed calls after `--warmup` untimed ones (the
first JAX call also compiles); JAX and PyTorch calls alternate, so that both see the same
background load on a shared machine. The PyTorch models are tests/torch_reference.py
(arcface_torch's definitions), run in the same process.

Threads: PyTorch gets `torch.set_num_threads(T)` with T = the CPUs this process may use
(`os.sched_getaffinity`; restrict both frameworks with `taskset -c ...`); XLA's CPU
backend sizes its Eigen thread pool from the same schedulable-CPU count, so both use T
threads. `--threads` overrides torch's count only.

GPU (`--device gpu --dtype bfloat16`): times only the JAX side and reports MFU = model
FLOPs / time / measured peak, where model FLOPs = 2 × dense MACs (every conv tap, the
convention of the published 6.3 G) per image for the forward pass and 3× that for
forward+backward, and the peak is measured with a large bf16 matmul. UNTESTED: no GPU
was available when this was written; treat its first run as a debugging session.
"""

import argparse
import datetime
import os
import pathlib
import platform
import statistics
import sys
import time
from typing import Callable, Dict, List

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / 'tests'))  # torch_reference.py

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from sface_jax import models, xla_options  # pylint: disable=g-import-not-at-top,wrong-import-position


def timed(call: Callable[[], None]) -> float:
  start = time.perf_counter()
  call()
  return time.perf_counter() - start


def paired_medians(calls: Dict[str, Callable[[], None]], warmup: int,
                   iterations: int) -> Dict[str, float]:
  """Median seconds per call for each of `calls`, timed in alternation.

  Alternating (JAX, PyTorch, JAX, PyTorch, …) rather than one framework after the other
  lets both see the same background load: the CI machine is shared, and a run where
  one framework happens to get a quiet minute would otherwise decide the ratio.
  """
  for call in calls.values():
    for _ in range(warmup):
      call()
  times: Dict[str, List[float]] = {name: [] for name in calls}
  for _ in range(iterations):
    for name, call in calls.items():
      times[name].append(timed(call))
  return {name: statistics.median(values) for name, values in times.items()}


def random_variables(model, image_size: int, seed: int = 0):
  """Variables filled on the host (compiling model.init is slow on CPU, and irrelevant)."""
  rng = np.random.RandomState(seed)

  def fill(path, leaf):
    name = path[-1].key
    if name in ('var', 'scale'):
      return np.ones(leaf.shape, np.float32)
    if name == 'kernel':
      fan_in = int(np.prod(leaf.shape[:-1]))
      return (rng.normal(size=leaf.shape) * np.sqrt(2 / fan_in)).astype(np.float32)
    if name == 'alpha':
      return np.full(leaf.shape, 0.25, np.float32)
    return np.zeros(leaf.shape, np.float32)
  return jax.tree_util.tree_map_with_path(fill, models.abstract_variables(model, image_size))


def jax_calls(name: str, batch: int, image_size: int, dtype: str, device: str,
              grouped_conv: str = 'auto') -> Dict[str, Callable[[], None]]:
  """{'forward': …, 'forward+backward': …}: one timed JAX call each."""
  overrides = {'grouped_conv': grouped_conv} if name == 'mbf' else {}
  model = models.get_model(name, dtype=dtype, **overrides)
  target = jax.devices(device)[0]
  variables = jax.device_put(random_variables(model, image_size), target)
  images = jax.device_put(
      np.random.RandomState(1).normal(size=(batch, image_size, image_size, 3)).astype(
          np.float32), target)
  options = xla_options.compiler_options(target.platform)
  forward = jax.jit(lambda v, x: model.apply(v, x, train=False)[0], compiler_options=options)

  def loss(params, batch_stats, x):
    (embeddings, norms), updates = model.apply({'params': params, 'batch_stats': batch_stats},
                                               x, train=True, mutable=['batch_stats'])
    return jnp.mean(embeddings ** 2) + jnp.mean(norms), updates['batch_stats']

  train = jax.jit(jax.grad(loss, has_aux=True), compiler_options=options)
  return {
      'forward': lambda: forward(variables, images).block_until_ready(),
      'forward+backward': lambda: jax.block_until_ready(
          train(variables['params'], variables['batch_stats'], images))}


def torch_calls(name: str, batch: int, image_size: int,
                threads: int) -> Dict[str, Callable[[], None]]:
  """The same two calls on arcface_torch's architecture (tests/torch_reference.py)."""
  import torch  # pylint: disable=g-import-not-at-top
  import torch_reference  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(threads)
  model = torch_reference.build(name)
  images = torch.from_numpy(np.random.RandomState(1).normal(
      size=(batch, 3, image_size, image_size)).astype(np.float32))

  def forward():
    model.eval()
    with torch.no_grad():
      model(images)

  def train():
    model.train()
    model.zero_grad(set_to_none=True)
    embeddings = model(images)
    loss = (embeddings ** 2).mean() + embeddings.norm(dim=1).mean()
    loss.backward()

  return {'forward': forward, 'forward+backward': train}


def measured_bf16_peak(device: str) -> float:
  """FLOP/s of a large bf16 matmul on `device` (the peak MFU is relative to), on random
  data: constant operands run faster than real ones (an 8192³ bf16 product on an H200 ran
  13% faster on zeros than on random data, 2026-10)."""
  size = 8192
  target = jax.devices(device)[0]
  a = jax.device_put(np.random.default_rng(0).standard_normal((size, size), np.float32)
                     .astype(jnp.bfloat16), target)
  matmul = jax.jit(lambda a: a @ a)
  seconds = paired_medians({'matmul': lambda: matmul(a).block_until_ready()}, 3, 10)['matmul']
  return 2 * size ** 3 / seconds


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--models', default='r50,mbf')
  parser.add_argument('--batch', type=int, default=64)
  parser.add_argument('--image_size', type=int, default=112)
  parser.add_argument('--warmup', type=int, default=1)
  parser.add_argument('--iterations', type=int, default=3)
  parser.add_argument('--device', default='cpu', choices=['cpu', 'gpu'])
  parser.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'])
  parser.add_argument('--threads', type=int, default=len(os.sched_getaffinity(0)))
  parser.add_argument('--no_torch', action='store_true')
  parser.add_argument('--grouped_conv', default='auto', choices=['auto', 'taps', 'xla'],
                      help="mbf's depthwise convolutions (sface_jax/models/mobilefacenet.py)")
  args = parser.parse_args()

  with_torch = args.device == 'cpu' and not args.no_torch
  print(f'date {datetime.date.today()}  host {platform.node()}  '
        f'cpus {len(os.sched_getaffinity(0))}  jax {jax.__version__} '
        f'({jax.devices(args.device)[0].device_kind})')
  if with_torch:
    import torch  # pylint: disable=g-import-not-at-top
    print(f'torch {torch.__version__}, torch.set_num_threads({args.threads})')
  print(f'batch {args.batch}, {args.image_size}×{args.image_size}, {args.dtype}, '
        f'median of {args.iterations} after {args.warmup} warm-up call(s), '
        f'load average {os.getloadavg()[0]:.1f}\n')

  peak = measured_bf16_peak(args.device) if args.device == 'gpu' else None
  rows: List[str] = ['| model | pass | JAX img/s | PyTorch img/s | JAX / PyTorch |'
                     + (' MFU |' if peak else ''),
                     '|---|---|---|---|---|' + ('---|' if peak else '')]
  for name in args.models.split(','):
    jax_side = jax_calls(name, args.batch, args.image_size, args.dtype, args.device,
                         args.grouped_conv)
    torch_side = (torch_calls(name, args.batch, args.image_size, args.threads)
                  if with_torch else {})
    flops_per_image = 2 * models.dense_macs(models.get_model(name), args.image_size)
    for stage in ('forward', 'forward+backward'):
      calls = {'jax': jax_side[stage]}
      if stage in torch_side:
        calls['torch'] = torch_side[stage]
      seconds = paired_medians(calls, args.warmup, args.iterations)
      jax_rate = args.batch / seconds['jax']
      torch_rate = args.batch / seconds['torch'] if 'torch' in seconds else None
      row = (f'| {name} | {stage} | {jax_rate:.1f} | '
             f'{"—" if torch_rate is None else f"{torch_rate:.1f}"} | '
             f'{"—" if torch_rate is None else f"{jax_rate / torch_rate:.2f}"} |')
      if peak:
        multiple = 3 if stage == 'forward+backward' else 1
        row += f' {100 * multiple * flops_per_image * jax_rate / peak:.1f}% |'
      rows.append(row)
      print(rows[-1], f'  (load average {os.getloadavg()[0]:.1f})', flush=True)
  print()
  print('\n'.join(rows))
  if peak:
    print(f'\nmeasured bf16 peak: {peak / 1e12:.0f} TFLOP/s')


if __name__ == '__main__':
  main()
