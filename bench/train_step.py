"""Images/s of the whole training step, ours next to the same step in PyTorch, alternated.

  python bench/train_step.py                                # CPU: r18, r50, mbf × arcface, sface
  python bench/train_step.py --models r50 --heads arcface --batch 32 --windows 5
  python bench/train_step.py --models r50 --breakdown       # where the time goes
  python bench/train_step.py --models r50 --xla-defaults    # our compiler options vs XLA's
  python bench/train_step.py --models r50 --data DIR        # fed by the real tf.data pipeline
  python bench/train_step.py --device gpu --dtype bfloat16 --batch 128,256 \\
      --num-classes 85742 --profile /tmp/profile         # one GPU (see METHOD below)

What is timed. Ours: `sface_jax.step.train_step` itself (backbone forward and backward,
the sharded head on the device mesh, the optax SGD-momentum update with weight decay,
donated state), built by `step.make_setup` from `sface_jax/configs/base.py` with the model, head,
batch and class count of the row. PyTorch: the same architecture
(tests/torch_reference.py, arcface_torch's definitions), an insightface-style head
(arcface_torch's ArcFace: the margin applied to the target cosine without gradient;
zhongyy/SFace's loss for SFace, its sigmoid weights without gradient), `F.cross_entropy`,
and `torch.optim.SGD(momentum=0.9, weight_decay=5e-4)` over the backbone and the (C, D)
centre matrix. Both see the same random images and labels.

METHOD. The sides first run warm-up windows in alternation (our first also compiles): at
least `--warmup` rounds, and on while a side's heap is still growing (`warm_up`: more than
1,000 page faults per step, at most `--max-warmup` rounds); then windows of `--steps` steps
alternate, ours then PyTorch's, `--windows` times, so that both see the same
background load; each window ends when the device is idle (`block_until_ready`,
`torch.cuda.synchronize`). Reported: the median window, as images/s, and the ratio.
Threads on the CPU: torch gets `set_num_threads(T)`, T = the CPUs this process may use; XLA
sizes its pool from the same count. On a GPU the PyTorch side runs as arcface_torch does:
`torch.autocast(bfloat16)` with the model in `channels_last` and
`torch.backends.cudnn.benchmark` on; its loss stays float32 (arcface_torch's autocast is
float16 with a gradient scaler; bfloat16 needs none and matches our side).
Host memory: both sides share the process's malloc, so `GLIBC_TUNABLES` (which
`python -m sface_jax.main` sets on CPU runs, sface_jax/cpu_memory.py) applies to both; compare
a run under glibc's defaults with one under ours,
`GLIBC_TUNABLES=$(python -c 'from sface_jax import cpu_memory; print(cpu_memory.TUNABLES)')`.
Each row also prints every side's minor page faults per step.

`--xla-defaults` adds a third side, alternated with the other two: our step as XLA runs it
out of the box, compiled with XLA's own options instead of `sface_jax.xla_options`: the
before/after of what the options do for XLA:CPU.
`--breakdown` times the pieces of our step separately (backbone forward+backward alone; the
head's loss and gradient on fixed embeddings; the optimiser update alone) next to the whole
step, so a slow piece shows. `--data DIR` feeds our step from the real input pipeline
(`sface_jax.data.pipeline` over converted TFRecords, e.g. `python -m sface_jax.tools.convert
--input ../shared/data/orl/insightface --output /tmp/orl112`) and also times the pipeline
alone, so a slow pipeline cannot hide. `--profile DIR` writes a JAX profiler trace of one
window (TensorBoard's profile plugin reads it) and the compiled step, and prints where the
time went, by kind of operation and part of the step (bench/profile_summary.py), and
PyTorch's step by operator (`torch.profiler`, one window: self CPU time, on a GPU its
kernels' device time). On a GPU, MFU is model FLOPs (3 × 2 × dense MACs per image) over a
measured bf16 matmul rate (random 8192² operands), and both sides' peak device memory is
reported: PyTorch's per row, JAX's for the process so far, so that one row per process
(bench/gpu_session.sh) gives each row its own. JAX's preallocation is turned off there, so
the two frameworks share the GPU's memory as they need it.
"""

import argparse
import datetime
import functools
import os
import pathlib
import platform
import resource
import statistics
import sys
from typing import Callable, Dict, List

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / 'tests'))  # torch_reference.py
sys.path.insert(0, str(REPO_ROOT / 'bench'))  # backbone.py

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
import optax  # pylint: disable=g-import-not-at-top,wrong-import-position

from backbone import measured_bf16_peak, paired_medians  # pylint: disable=g-import-not-at-top,wrong-import-position
import profile_summary  # pylint: disable=g-import-not-at-top,wrong-import-position
from sface_jax.configs import base  # pylint: disable=g-import-not-at-top,wrong-import-position
from sface_jax import models, sharding, step as step_lib, xla_options  # pylint: disable=g-import-not-at-top,wrong-import-position

Window = Callable[[], None]  # runs `--steps` steps and waits for the device


def counting_faults(window: Window, counts: List[int]) -> Window:
  """`window`, appending the minor page faults the process took during it to `counts`
  (fresh pages the kernel had to map and zero: see sface_jax/cpu_memory.py)."""
  def run():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    window()
    counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
  return run


# Minor page faults per step below which a side's heap counts as settled (4 MiB of fresh pages).
SETTLED_FAULTS = 1_000


def warm_up(windows: Dict[str, Window], faults: Dict[str, List[int]], steps: int,
            min_rounds: int, max_rounds: int) -> int:
  """Runs the sides' windows in alternation, as they will be timed: at least `min_rounds`
  rounds, and on until a round in which no side faulted more than SETTLED_FAULTS pages per
  step, or `max_rounds`. Returns the rounds run.

  Why: on the CPU both sides share one malloc heap (sface_jax/cpu_memory.py's tunables), and
  the heap keeps growing, each new page a page fault, for the first few alternations of
  XLA's and PyTorch's step buffers: on 2026-12-02 an IR-50 step faulted 1.0 M, 0.55 M and
  0.10 M pages in its first three rounds, then none, with the heap settled at 8.2 GiB (5.4
  without PyTorch in the process). A fixed single warm-up left that growth in the timed
  windows of some runs.
  """
  rounds = 0
  while rounds < max_rounds:
    for window in windows.values():
      window()
    rounds += 1
    if rounds >= min_rounds and all(counts[-1] <= SETTLED_FAULTS * steps
                                    for counts in faults.values()):
      break
  return rounds


def step_config(model: str, head: str, batch: int, dtype: str, image_size: int):
  config = base.get_config()
  config.model.name = model
  config.model.dtype = dtype
  config.head.name = head
  config.batch_size = batch
  config.data.image_size = image_size
  return config


def random_batch(batch: int, image_size: int, num_classes: int, seed: int = 1):
  rng = np.random.default_rng(seed)
  return {'image': rng.normal(size=(batch, image_size, image_size, 3)).astype(np.float32),
          'label': rng.integers(0, num_classes, batch).astype(np.int32)}


class JaxStep:
  """Our jitted train step on every device of `device`'s kind, with its state."""

  def __init__(self, config, num_classes: int, device: str, compiler_options=None):
    # compiler_options {}: XLA's own (`step.jit_train_step`)
    self.mesh = sharding.make_mesh(jax.devices(device))
    self.setup = step_lib.make_setup(config, num_classes=num_classes, steps_per_epoch=1000,
                                     total_steps=1_000_000, mesh=self.mesh)
    init = functools.partial(step_lib.create_train_state, config.seed, self.setup)
    self.state_shardings = sharding.tree_shardings(self.mesh, jax.eval_shape(init))
    self.batch_sharding = sharding.batch_sharding(self.mesh)
    self.state = jax.jit(init, out_shardings=self.state_shardings)()
    self.step = step_lib.jit_train_step(self.setup, self.state_shardings, self.mesh,
                                        compiler_options)
    self.metrics = None  # the last step's (`window`)

  def put(self, batch):
    return jax.device_put(batch, self.batch_sharding)

  def window(self, batches, steps: int) -> Window:
    """`batches()` gives the next device batch (a fixed one, or the pipeline's next). The
    last step's metrics stay in `self.metrics`: a fast step that has diverged counts for
    nothing, so each row shows its loss."""
    def run():
      for _ in range(steps):
        self.state, self.metrics = self.step(self.state, batches())
      jax.block_until_ready((self.state, self.metrics))
    return run

  def pieces(self, batch, steps: int) -> Dict[str, Window]:
    """The step's parts as separate jitted calls (`--breakdown`). They read `self.state` at
    each call: the whole step, timed alongside, donates and replaces it."""
    setup = self.setup

    def backbone_loss(params, batch_stats, images):
      (embeddings, _), _ = setup.model.apply({'params': params, 'batch_stats': batch_stats},
                                             images, train=True, mutable=['batch_stats'])
      return jnp.mean(embeddings.astype(jnp.float32) ** 2)

    def head_loss(x, classifier, head_state, step):
      loss, _, _ = setup.head_loss(x, batch['label'], classifier, head_state, step,
                                   jax.random.key_data(jax.random.key(0)))
      return loss

    jit = functools.partial(jax.jit, compiler_options=xla_options.for_mesh(self.mesh))
    backbone = jit(jax.grad(backbone_loss))
    head = jit(jax.grad(head_loss, argnums=(0, 1)))
    update = jit(lambda g, o, p: optax.apply_updates(p, setup.optimizer.update(g, o, p)[0]))
    embed = jit(lambda p, s, x: setup.model.apply({'params': p, 'batch_stats': s}, x,
                                                  train=False)[0])
    state = self.state
    embeddings = embed(state.params['backbone'], state.batch_stats, batch['image'])
    grads = jax.tree.map(jnp.zeros_like, state.params)
    calls = {
        'backbone fwd+bwd': lambda s: backbone(s.params['backbone'], s.batch_stats,
                                               batch['image']),
        'head fwd+bwd': lambda s: head(embeddings, s.params['classifier'], s.head_state, s.step),
        'optimiser update': lambda s: update(grads, s.opt_state, s.params),
    }

    def repeat(call):
      def run():
        out = None
        for _ in range(steps):
          out = call(self.state)
        jax.block_until_ready(out)
      return run

    return {name: repeat(call) for name, call in calls.items()}


def torch_window(model_name: str, head: str, batch, num_classes: int, steps: int,
                 device: str, dtype: str, threads: int, embedding_dim: int = 512) -> Window:
  """The same step in PyTorch (module docstring)."""
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top
  import torch_reference  # pylint: disable=g-import-not-at-top

  torch.set_num_threads(threads)
  target = torch.device('cuda' if device == 'gpu' else 'cpu')
  image_size = batch['image'].shape[1]
  model = torch_reference.build(model_name, image_size=image_size).to(target)
  images = torch.from_numpy(batch['image'].transpose(0, 3, 1, 2).copy()).to(target)
  if device == 'gpu':  # as arcface_torch's train_v2.py runs: cuDNN autotuned, channels last
    torch.backends.cudnn.benchmark = True
    model = model.to(memory_format=torch.channels_last)
    images = images.contiguous(memory_format=torch.channels_last)
  labels = torch.from_numpy(batch['label'].astype(np.int64)).to(target)
  centers = torch.nn.Parameter(0.01 * torch.randn(num_classes, embedding_dim, device=target))
  optimizer = torch.optim.SGD([*model.parameters(), centers], lr=0.1, momentum=0.9,
                              weight_decay=5e-4)
  scale, margin, k, a, b = 64.0, 0.5, 80.0, 0.8, 1.23
  autocast = torch.autocast(target.type, dtype=torch.bfloat16,
                            enabled=device == 'gpu' and dtype == 'bfloat16')
  rows = torch.arange(labels.shape[0], device=target)

  def loss_of(cos_theta):
    if head == 'arcface':  # arcface_torch: arccos, + m, cos on the target, without gradient
      logits = cos_theta.clone()
      with torch.no_grad():
        target_logit = torch.cos(torch.acos(cos_theta[rows, labels].clamp(-1, 1)) + margin)
      logits[rows, labels] = target_logit
      return F.cross_entropy(scale * logits, labels)
    # SFace (zhongyy/SFace): sigmoid weights of θ, without gradient.
    target_cos = cos_theta[rows, labels]
    with torch.no_grad():
      theta = torch.acos(cos_theta.clamp(-1, 1))
      weight_intra = torch.sigmoid(k * (theta[rows, labels] - a))
      weight_inter = torch.sigmoid(-k * (theta - b))
      weight_inter[rows, labels] = 0.0
    intra = -(weight_intra * scale * target_cos).mean()
    inter = (weight_inter * scale * cos_theta).sum(dim=1).mean()
    return intra + inter

  def step():
    optimizer.zero_grad(set_to_none=True)
    with autocast:
      embeddings = model(images)
    cos_theta = F.linear(F.normalize(embeddings.float()), F.normalize(centers))
    loss_of(cos_theta).backward()
    optimizer.step()

  def run():
    for _ in range(steps):
      step()
    if device == 'gpu':
      torch.cuda.synchronize()
  return run


def torch_profile(window: Window, device: str, steps: int, top: int = 12) -> str:
  """Where PyTorch's step spends its time: one window under `torch.profiler`, its operators
  by self time (the span on the calling thread, which waits for the intra-op threads; on a
  GPU, their kernels' device time), as a table like ours."""
  import torch  # pylint: disable=g-import-not-at-top
  activities = [torch.profiler.ProfilerActivity.CPU]
  if device == 'gpu':
    activities.append(torch.profiler.ProfilerActivity.CUDA)
  with torch.profiler.profile(activities=activities) as profiler:
    window()

  def self_us(event) -> float:
    return event.self_device_time_total if device == 'gpu' else event.self_cpu_time_total

  events = sorted(profiler.key_averages(), key=lambda event: -self_us(event))
  total = sum(self_us(event) for event in events)
  ms = profile_summary.ms
  lines = [f'PyTorch step: {ms(total / steps)} ms per step of its operators\' '
           f'{"device" if device == "gpu" else "CPU"} time', '',
           '| operator | calls per step | ms per step | share |', '|---|---:|---:|---:|']
  lines += [f'| {event.key} | {event.count // steps} | {ms(self_us(event) / steps)} | '
            f'{100 * self_us(event) / total:.0f}% |' for event in events[:top]]
  return '\n'.join(lines)


def torch_peak_memory() -> int:
  """Bytes PyTorch's caching allocator has held at most on the GPU, since the last call."""
  import torch  # pylint: disable=g-import-not-at-top
  peak = torch.cuda.max_memory_allocated()
  torch.cuda.reset_peak_memory_stats()
  return peak


def pipeline_batches(data_dir: str, runner: JaxStep, batch_size: int, image_size: int):
  """`() -> device batch` from the real tf.data pipeline over `data_dir`, and the iterator."""
  from sface_jax.data import pipeline, tfrecord  # pylint: disable=g-import-not-at-top
  info = tfrecord.read_info(data_dir)
  host_batches = pipeline.train_dataset(info, batch_size=batch_size, image_size=image_size,
                                        seed=0, start_step=0, random_flip=True,
                                        augmentation=pipeline.Augmentation(),
                                        shuffle_buffer=1000, prefetch=2, host_split='records')
  return (lambda: pipeline.global_batch(next(host_batches), runner.batch_sharding)), (
      lambda: next(host_batches))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--models', default='r18,r50,mbf')
  parser.add_argument('--heads', default='arcface,sface')
  parser.add_argument('--batch', default='32', help='comma-separated global batch sizes')
  parser.add_argument('--num-classes', type=int, default=10_000)
  parser.add_argument('--image-size', type=int, default=112)
  parser.add_argument('--steps', type=int, default=2, help='steps per timed window')
  parser.add_argument('--windows', type=int, default=3)
  parser.add_argument('--warmup', type=int, default=1, help='warm-up rounds, at least')
  parser.add_argument('--max-warmup', type=int, default=6,
                      help='warm-up rounds at most, while a side keeps faulting (warm_up)')
  parser.add_argument('--device', default='cpu', choices=['cpu', 'gpu'])
  parser.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'])
  parser.add_argument('--threads', type=int, default=len(os.sched_getaffinity(0)))
  parser.add_argument('--no-torch', action='store_true')
  parser.add_argument('--breakdown', action='store_true')
  parser.add_argument('--xla-defaults', action='store_true',
                      help="also time our step compiled with XLA's own options, alternated")
  parser.add_argument('--data', default='', help='converted TFRecords to feed the step from')
  parser.add_argument('--profile', default='',
                      help='write a JAX trace of a window and the compiled step under this '
                      'folder, and print where the time went (bench/profile_summary.py)')
  parser.add_argument('--profile-steps', type=int, default=0,
                      help='steps in the JAX trace (default --steps): a GPU trace of many '
                      'steps runs to tens of MB')
  args = parser.parse_args()
  if args.profile_steps < 0:
    parser.error(f'--profile-steps {args.profile_steps}: expected 0 (as --steps) or more')
  if args.device == 'gpu' and not args.no_torch:
    # Before JAX's first device call: JAX takes 75% of the GPU's memory up front by default,
    # which would leave PyTorch's side, in the same process, too little.
    os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')

  print(f'date {datetime.date.today()}  host {platform.node()}  '
        f'cpus {len(os.sched_getaffinity(0))}  jax {jax.__version__} '
        f'({jax.device_count(args.device)} × {jax.devices(args.device)[0].device_kind})')
  if not args.no_torch:
    import torch  # pylint: disable=g-import-not-at-top
    print(f'torch {torch.__version__}, torch.set_num_threads({args.threads})')
  print(f'GLIBC_TUNABLES: {os.environ.get("GLIBC_TUNABLES", "unset (glibc defaults)")}')
  print(f'{args.num_classes} classes, {args.image_size}×{args.image_size}, {args.dtype}; '
        f'median of {args.windows} windows of {args.steps} steps after {args.warmup}–'
        f'{args.max_warmup} warm-up rounds; '
        f'load average {os.getloadavg()[0]:.1f}\n')
  peak = measured_bf16_peak(args.device) if args.device == 'gpu' else None
  header = '| model | head | batch | ours img/s | PyTorch img/s | ours / PyTorch |'
  rule = '|---|---|---|---|---|---|'
  if args.xla_defaults:
    header, rule = header + ' ours, XLA defaults img/s | ours / XLA defaults |', rule + '---|---|'
  if peak:
    header, rule = (header + ' MFU | peak memory | PyTorch peak memory |',
                    rule + '---|---|---|')
  rows = [header, rule]
  for model_name in args.models.split(','):
    flops = 3 * 2 * models.dense_macs(models.get_model(model_name), args.image_size)
    for head in args.heads.split(','):
      for batch_size in (int(b) for b in args.batch.split(',')):
        config = step_config(model_name, head, batch_size, args.dtype, args.image_size)
        runner = JaxStep(config, args.num_classes, args.device)
        batch = random_batch(batch_size, args.image_size, args.num_classes)
        device_batch = runner.put(batch)
        windows = {'ours': runner.window(lambda: device_batch, args.steps)}
        if not args.no_torch:
          windows['torch'] = torch_window(model_name, head, batch, args.num_classes, args.steps,
                                          args.device, args.dtype, args.threads)
        if args.xla_defaults:
          defaults = JaxStep(config, args.num_classes, args.device, compiler_options={})
          defaults_batch = defaults.put(batch)
          windows['XLA defaults'] = defaults.window(lambda: defaults_batch, args.steps)
        faults = {name: [] for name in windows}
        counted = {name: counting_faults(window, faults[name])
                   for name, window in windows.items()}
        rounds = warm_up(counted, faults, args.steps, args.warmup, args.max_warmup)
        for counts in faults.values():
          counts.clear()
        seconds = paired_medians(counted, 0, args.windows)
        ours = batch_size * args.steps / seconds['ours']
        theirs = batch_size * args.steps / seconds['torch'] if 'torch' in seconds else None
        row = (f'| {model_name} | {head} | {batch_size} | {ours:.1f} | '
               + ('— | — |' if theirs is None else f'{theirs:.1f} | {ours / theirs:.2f} |'))
        if args.xla_defaults:
          before = batch_size * args.steps / seconds['XLA defaults']
          row += f' {before:.1f} | {ours / before:.2f} |'
          del defaults
        if peak:  # JAX's peak is the process's so far: one row per process for a row's own
          memory = jax.devices(args.device)[0].memory_stats() or {}
          row += (f' {100 * flops * ours / peak / runner.mesh.size:.1f}% | '
                  f'{memory.get("peak_bytes_in_use", 0) / 2**30:.1f} GiB | '
                  + ('— |' if theirs is None else f'{torch_peak_memory() / 2**30:.1f} GiB |'))
        rows.append(row)
        print(row, f'  (load average {os.getloadavg()[0]:.1f})', flush=True)
        loss = float(runner.metrics['loss'])
        print(f'    warm-up: {rounds} round(s); our loss after {int(runner.state.step)} steps '
              f'{loss:.3f}{"" if np.isfinite(loss) else " (NOT FINITE)"}; minor page faults '
              'per timed step: ' + ', '.join(f'{name} {statistics.median(counts) / args.steps:,.0f}'
                                             for name, counts in faults.items()))
        if args.breakdown:
          parts = paired_medians({'whole step': windows['ours'],
                                  **runner.pieces(device_batch, args.steps)},
                                 args.warmup, args.windows)
          for name, value in parts.items():
            print(f'    {name:<18s} {1e3 * value / args.steps:8.1f} ms/step '
                  f'({100 * value / parts["whole step"]:.0f}% of the step)')
        if args.data:
          from_pipeline, host_next = pipeline_batches(args.data, runner, batch_size,
                                                      args.image_size)
          fed = paired_medians({'pipeline alone': lambda: [host_next()
                                                           for _ in range(args.steps)],
                                'step fed by it': runner.window(from_pipeline, args.steps),
                                'step, fixed batch': windows['ours']},
                               args.warmup, args.windows)
          for name, value in fed.items():
            print(f'    {name:<18s} {batch_size * args.steps / value:8.1f} img/s')
        if args.profile:
          trace_dir = os.path.join(args.profile, f'{model_name}_{head}_{batch_size}')
          profile_steps = args.profile_steps or args.steps
          with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            runner.window(lambda: device_batch, profile_steps)()
          hlo = runner.step.lower(runner.state, device_batch).compile().as_text()
          with open(os.path.join(trace_dir, 'train_step.hlo'), 'w') as f:
            f.write(hlo)
          print(f'    trace and compiled step written to {trace_dir}\n')
          try:  # the GPU trace's layout is untested here: a surprise must not end the run
            print(profile_summary.summarize(trace_dir, hlo, profile_steps) + '\n')
          except Exception as error:  # pylint: disable=broad-exception-caught
            print(f'    no summary of the trace ({error!r}); TensorBoard still reads it\n')
          if 'torch' in windows:  # on a GPU both profilers use CUPTI: untried in one process
            try:
              print(torch_profile(windows['torch'], args.device, args.steps) + '\n')
            except Exception as error:  # pylint: disable=broad-exception-caught
              print(f'    no PyTorch profile ({error!r})\n')
        del runner
  print()
  print('\n'.join(rows))


if __name__ == '__main__':
  main()
