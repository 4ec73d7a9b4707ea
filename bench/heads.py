"""Forward + backward time of every loss head, next to plain softmax cross-entropy.

  python -m bench.heads                      # batch 512 × 85,742 classes (MS1MV2), CPU
  python -m bench.heads --batch 64 --classes 10000 --repeats 3   # quick look

What is timed: `jax.jit(jax.value_and_grad(loss))` with respect to the (B, C) cosine matrix —
the part that differs between heads. The backbone and the (B, D) × (D, C) product that makes
the cosines are the same for every head and are left out. Per-sample vectors a head needs
besides the cosines (SphereFace's ‖x‖, AdaFace's and quality-SFace's ẑ) are inputs held
constant; MagFace's ‖x‖ is an input too, differentiated (its margin and regulariser depend on
it), CurricularFace's t a constant, ElasticFace's margins drawn inside the timed function from
a fixed key (the draw, and for ElasticFace+ the sort, included). Three heads do not take
cosines: center loss is timed on the raw logits plus the (B, D) embeddings, its running-centre
update of the (C, D) centres included; triplet on the (B, D) embeddings alone (its cost does
not depend on C); L-Softmax on the raw (B, D) embeddings and (D, C) centres, since its logits
are W_jᵀx, so its row includes the (B, D) × (D, C) product the other rows leave out. The baseline, "softmax CE", is
`cross_entropy(s·cos θ)` on the same cosines in the same run; `optax CE` is optax's
`softmax_cross_entropy_with_integer_labels` on the same logits, as a check on ours.

Each function is compiled and run twice before timing (warm-up excluded), then run `--repeats`
times with `block_until_ready`, round-robin over the heads; the table reports the median in
milliseconds and the ratio to the baseline's median.
"""

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sface_jax import heads


def machine_line() -> str:
  model = platform.processor() or 'unknown CPU'
  try:
    text = subprocess.run(['lscpu'], capture_output=True, text=True, check=True).stdout
    for line in text.splitlines():
      if line.startswith('Model name:'):
        model = line.split(':', 1)[1].strip()
  except (OSError, subprocess.CalledProcessError):
    pass
  return (f'{model}, {os.cpu_count()} CPU cores visible (nproc), {platform.system()} '
          f'{platform.machine()}, Python {platform.python_version()}, jax {jax.__version__}, '
          f'backend {jax.default_backend()}')


def benchmark_cases(batch, num_classes, dim, scale, seed=0):
  """name → (what the gradient is taken with respect to, jitted fn, args)."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, num_classes, size=batch).astype(np.int32)
  labels[0], labels[-1] = 0, num_classes - 1
  # Cosines of a half-trained model: off-target around 0 (random directions in 512-d),
  # targets spread over [0.1, 0.9].
  cos = np.clip(rng.normal(0.0, 0.05, size=(batch, num_classes)), -1.0, 1.0)
  cos[np.arange(batch), labels] = rng.uniform(0.1, 0.9, size=batch)
  cos = jnp.asarray(cos, jnp.float32)
  norms = jnp.asarray(rng.uniform(10.0, 40.0, size=batch), jnp.float32)
  quality = jnp.asarray(rng.uniform(-1.0, 1.0, size=batch), jnp.float32)
  embeddings = jnp.asarray(rng.normal(size=(batch, dim)), jnp.float32)
  centers = jnp.asarray(rng.normal(size=(num_classes, dim)), jnp.float32)
  triplet_labels = jnp.asarray(np.repeat(np.arange(batch // 4), 4)[:batch], jnp.int32)
  labels = jnp.asarray(labels)
  ce = heads.cross_entropy

  def grad_cos(loss):
    return jax.jit(jax.value_and_grad(loss))

  def margin_ce(logits_and_target):
    """The CE the heads compute: the target logit handed over, not read back (head.py)."""
    logits, target = logits_and_target
    return ce(logits, labels, target_logits=target)

  def elastic(c, m=0.5, plus=False):
    cos_target = jnp.take_along_axis(c, labels[:, None], axis=1)[:, 0]
    return heads.elastic_margins(jax.random.key(1), cos_target, batch, m=m, std=0.05,
                                 plus=plus)

  def arc(**kwargs):
    return lambda c: margin_ce(heads.margin_logits_with_target(c, labels, scale=scale,
                                                               **kwargs))

  cases = {
      'softmax CE (baseline)': ('cos', grad_cos(lambda c: ce(scale * c, labels)), (cos,)),
      'optax CE': ('cos', grad_cos(lambda c: jnp.mean(
          optax.softmax_cross_entropy_with_integer_labels(scale * c, labels))), (cos,)),
      'normface': ('cos', grad_cos(arc()), (cos,)),
      'cosface': ('cos', grad_cos(arc(m3=0.35)), (cos,)),
      'arcface': ('cos', grad_cos(arc(m2=0.5)), (cos,)),
      'arcface (insightface_grad)': ('cos', grad_cos(arc(m2=0.5, insightface_grad=True)),
                                     (cos,)),
      'combined (1, 0.3, 0.2)': ('cos', grad_cos(arc(m1=1.0, m2=0.3, m3=0.2)), (cos,)),
      'sphereface (m=4, λ=5)': ('cos', grad_cos(lambda c: margin_ce(
          heads.sphereface_logits_with_target(c, norms, labels, m=4, lambda_=5.0))), (cos,)),
      'adaface': ('cos', grad_cos(lambda c: margin_ce(
          heads.adaface_logits_with_target(c, labels, quality, scale=scale, m=0.4))), (cos,)),
      'adaface (official_clamp=False)': ('cos', grad_cos(lambda c: margin_ce(
          heads.adaface_logits_with_target(c, labels, quality, scale=scale, m=0.4,
                                           official_clamp=False))), (cos,)),
      'curricularface (t=0.3)': ('cos', grad_cos(lambda c: margin_ce(
          heads.curricular_logits_with_target(c, labels, 0.3, scale=scale, m=0.5))), (cos,)),
      'elasticface_arc': ('cos', grad_cos(lambda c: margin_ce(
          heads.elastic_logits_with_target(c, labels, elastic(c), scale=scale))), (cos,)),
      'elasticface_arc+ (plus)': ('cos', grad_cos(lambda c: margin_ce(
          heads.elastic_logits_with_target(c, labels, elastic(c, plus=True), scale=scale))),
                                  (cos,)),
      'elasticface_cos': ('cos', grad_cos(lambda c: margin_ce(
          heads.elastic_logits_with_target(c, labels, elastic(c, m=0.35), scale=scale,
                                           variant='cos'))), (cos,)),
      'sface': ('cos', grad_cos(lambda c: heads.sface_loss(c, labels, scale=scale)), (cos,)),
      'quality_sface': ('cos', grad_cos(lambda c: heads.quality_sface_loss(
          c, labels, quality, scale=scale, shift=0.1)), (cos,)),
  }

  def magface(c, n):
    logits, target = heads.magface_logits_with_target(c, labels, n, scale=scale)
    a = jnp.clip(n, 10.0, 110.0)
    return margin_ce((logits, target)) + 35.0 * jnp.mean(a / 110.0 ** 2 + 1.0 / a)

  cases['magface'] = ('cos, ‖x‖', jax.jit(jax.value_and_grad(magface, argnums=(0, 1))),
                      (cos, norms))
  lsoftmax_centers = jnp.asarray(rng.normal(size=(dim, num_classes)), jnp.float32)
  cases['lsoftmax (m=4, λ=0)'] = ('x, W', jax.jit(jax.value_and_grad(
      lambda x, w: margin_ce(heads.lsoftmax_logits_with_target(x, w, labels, m=4,
                                                               lambda_=0.0)),
      argnums=(0, 1))), (embeddings, lsoftmax_centers))

  def center(logits, x, centers_):
    value = ce(logits, labels) + 0.005 * heads.center_loss(x, labels, centers_)
    return value, heads.update_centers(x, labels, centers_, alpha=0.5)

  cases['center (CE + centres)'] = (
      'logits, x', jax.jit(jax.value_and_grad(center, argnums=(0, 1), has_aux=True)),
      (scale * cos, embeddings, centers))
  cases['triplet (batch hard)'] = (
      'x', jax.jit(jax.value_and_grad(
          lambda x: heads.batch_hard_triplet_loss(x, triplet_labels, margin=0.2)[0])),
      (embeddings,))
  return cases


def time_cases(cases, repeats):
  """name → list of seconds. Repeats go round-robin over the heads, so that a change in the
  machine's load (shared CI runners) spreads over all rows instead of biasing one."""
  for _, fn, fn_args in cases.values():
    for _ in range(2):
      jax.block_until_ready(fn(*fn_args))
  times = {name: [] for name in cases}
  for _ in range(repeats):
    for name, (_, fn, fn_args) in cases.items():
      start = time.perf_counter()
      jax.block_until_ready(fn(*fn_args))
      times[name].append(time.perf_counter() - start)
  return times


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--batch', type=int, default=512)
  parser.add_argument('--classes', type=int, default=85_742)
  parser.add_argument('--dim', type=int, default=512)
  parser.add_argument('--scale', type=float, default=64.0)
  parser.add_argument('--repeats', type=int, default=7)
  args = parser.parse_args()

  cases = benchmark_cases(args.batch, args.classes, args.dim, args.scale)
  print(f'# heads: forward+backward, batch {args.batch} × {args.classes:,} classes, '
        f'embedding dim {args.dim}, median of {args.repeats} (after 2 warm-up calls)')
  print(f'# {machine_line()}')
  print(f'# {datetime.date.today().isoformat()}\n')
  print('| head | grad w.r.t. | median ms | min ms | ratio to CE |')
  print('|---|---|---:|---:|---:|')
  times = time_cases(cases, args.repeats)
  baseline = statistics.median(times['softmax CE (baseline)'])
  for name, (wrt, _, _) in cases.items():
    median, fastest = statistics.median(times[name]), min(times[name])
    print(f'| {name} | {wrt} | {1e3 * median:.1f} | {1e3 * fastest:.1f} | '
          f'{median / baseline:.2f} |')


if __name__ == '__main__':
  main()
