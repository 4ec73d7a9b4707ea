"""Memory planner: what one device holds, and what a step sends, before renting the machines.

  python -m sface_jax.plan --config webface42m_r50_pfc --devices 64
  python -m sface_jax.plan --config ms1mv2_r50_arcface --num-classes 85742 \\
      --devices 8 --batch-per-device 128 --sample-rate 0.1 --json

It builds the real train step (`step.make_setup`, `step.train_step`, the shardings of
`sharding.py`) for `--devices` devices, lowers and compiles it on abstract inputs (nothing is
allocated; on a CPU the devices are forced host devices), and reads:

- per device, from the shapes and shardings of the train state: the backbone's parameters
  and batch statistics, the class centres (C'/n columns), and the optimiser state;
- per device, from XLA's `memory_analysis()` of the compiled step: arguments, outputs and
  temporaries (activations, gradients, the head's B × C'/n logits). Temporaries depend on the
  backend's fusion decisions: a CPU compile approximates a GPU/TPU one (the same partitioning,
  other kernels), good for orders of magnitude and for comparing layouts;
- per device, the same for the state's creation (`jax.jit(create_train_state,
  out_shardings=…)`, what training runs first): its outputs (the whole state) plus its
  temporaries (the random class centres before padding, ...) can exceed the step's peak
  (under Partial FC, whose step touches a fraction of the centres), so the estimated peak is
  the larger of the two, and both are reported;
- per step, from the compiled HLO: the bytes each collective (all-reduce, all-gather,
  reduce-scatter, all-to-all, collective-permute) produces on one device.

Options override the recipe (`--num-classes`, `--batch-per-device`, `--sample-rate`,
`--model`, `--dtype`), so one recipe answers "what if"; `--json` prints one JSON object.
"""

import argparse
import dataclasses
import json
import os
import re
import sys
import time

from sface_jax import cli
from sface_jax import compilation_cache
from sface_jax import configs

COLLECTIVES = ('all-reduce', 'all-gather', 'reduce-scatter', 'all-to-all', 'collective-permute')
_DTYPE_BYTES = {'pred': 1, 's8': 1, 'u8': 1, 's16': 2, 'u16': 2, 'bf16': 2, 'f16': 2,
                's32': 4, 'u32': 4, 'f32': 4, 's64': 8, 'u64': 8, 'f64': 8}
_SHAPE = re.compile(r'\b(pred|[suf]\d+|bf16)\[([0-9,]*)\]')
_COLLECTIVE = re.compile(r'= (.*?) (' + '|'.join(COLLECTIVES) + r')(?:-start)?\(')


def shape_bytes(text: str) -> int:
  """Bytes of every array shape written in an HLO type (`f32[16,512]{1,0}` or a tuple)."""
  total = 0
  for dtype, dims in _SHAPE.findall(text):
    count = 1
    for dim in filter(None, dims.split(',')):
      count *= int(dim)
    total += count * _DTYPE_BYTES[dtype]
  return total


def collective_bytes(hlo_text: str) -> dict[str, int]:
  """{collective: bytes its results hold on one device}, summed over the compiled module.
  An async pair (`-start`/`-done`) counts once, at its start."""
  totals = {name: 0 for name in COLLECTIVES}
  for result_type, op in _COLLECTIVE.findall(hlo_text):
    totals[op] += shape_bytes(result_type)
  return totals


@dataclasses.dataclass
class Plan:
  model: str
  head: str
  num_classes: int
  devices: int
  batch_size: int  # global
  sample_rate: float
  classes_per_device: int
  backbone_bytes: int  # parameters + batch statistics, replicated
  class_center_bytes: int  # this device's columns
  optimizer_bytes: int  # this device's optimiser state
  argument_bytes: int  # from memory_analysis: the train state and the batch
  output_bytes: int
  temp_bytes: int
  init_output_bytes: int  # from memory_analysis of the state's creation: the state
  init_temp_bytes: int
  collective_bytes: dict
  compile_seconds: float

  @property
  def step_peak_bytes(self) -> int:
    """Arguments + temporaries: with the state donated, outputs reuse the arguments."""
    return self.argument_bytes + self.temp_bytes

  @property
  def init_peak_bytes(self) -> int:
    """The new state + the temporaries that make it (creation takes no arguments)."""
    return self.init_output_bytes + self.init_temp_bytes

  @property
  def peak_estimate_bytes(self) -> int:
    return max(self.step_peak_bytes, self.init_peak_bytes)


def _shard_bytes(tree, shardings) -> int:
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  total = 0
  for leaf, leaf_sharding in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)):
    shape = leaf_sharding.shard_shape(leaf.shape)
    total += int(np.prod(shape, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
  return total


def make_plan(config, *, num_classes: int) -> Plan:
  """Compiles the train step for every device jax sees and measures it (module docstring)."""
  import functools  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from sface_jax import sharding, step as step_lib  # pylint: disable=g-import-not-at-top

  mesh = sharding.make_mesh()
  setup = step_lib.make_setup(config, num_classes=num_classes, steps_per_epoch=1000,
                              total_steps=10_000, mesh=mesh)
  init_fn = functools.partial(step_lib.create_train_state, setup=setup)  # as train.py
  abstract_state = jax.eval_shape(init_fn, config.seed)
  shardings = sharding.tree_shardings(mesh, abstract_state)
  batch_sharding = sharding.batch_sharding(mesh)
  size = config.data.image_size
  batch = {
      'image': jax.ShapeDtypeStruct((config.batch_size, size, size, 3), jnp.float32,
                                    sharding=batch_sharding),
      'label': jax.ShapeDtypeStruct((config.batch_size,), jnp.int32, sharding=batch_sharding),
  }
  state = jax.tree.map(lambda leaf, s: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=s),
                       abstract_state, shardings)
  step = step_lib.jit_train_step(setup, shardings, mesh)
  start = time.perf_counter()
  compiled = step.lower(state, batch).compile()
  seconds = time.perf_counter() - start  # the step's compile
  init_memory = jax.jit(init_fn, out_shardings=shardings).lower(
      config.seed).compile().memory_analysis()
  memory = compiled.memory_analysis()
  params = abstract_state.params
  return Plan(
      model=config.model.name, head=config.head.name, num_classes=num_classes,
      devices=mesh.size, batch_size=config.batch_size, sample_rate=config.head.sample_rate,
      classes_per_device=setup.padded_classes // mesh.size,
      backbone_bytes=(_shard_bytes(params['backbone'], shardings.params['backbone'])
                      + _shard_bytes(abstract_state.batch_stats, shardings.batch_stats)),
      class_center_bytes=_shard_bytes(params['classifier'], shardings.params['classifier']),
      optimizer_bytes=_shard_bytes(abstract_state.opt_state, shardings.opt_state),
      argument_bytes=int(memory.argument_size_in_bytes),
      output_bytes=int(memory.output_size_in_bytes),
      temp_bytes=int(memory.temp_size_in_bytes),
      init_output_bytes=int(init_memory.output_size_in_bytes),
      init_temp_bytes=int(init_memory.temp_size_in_bytes),
      collective_bytes=collective_bytes(compiled.as_text()),
      compile_seconds=seconds)


def _gb(value: int) -> str:
  return f'{value / 1e9:.3g} GB' if value >= 1e8 else f'{value / 1e6:.3g} MB'


def format_plan(plan: Plan) -> str:
  rate = f', Partial FC {plan.sample_rate:g}' if plan.sample_rate < 1 else ''
  lines = [
      f'{plan.model} + {plan.head}, {plan.num_classes:,} classes on {plan.devices} devices '
      f'({plan.classes_per_device:,} each{rate}), global batch {plan.batch_size} '
      f'({plan.batch_size // plan.devices} per device); compiled in {plan.compile_seconds:.0f} s',
      'per device:',
      f'  backbone parameters + statistics  {_gb(plan.backbone_bytes)}',
      f'  class centres                     {_gb(plan.class_center_bytes)}',
      f'  optimiser state                   {_gb(plan.optimizer_bytes)}',
      f'  step arguments (state + batch)    {_gb(plan.argument_bytes)}',
      f'  step temporaries                  {_gb(plan.temp_bytes)}',
      f'  step peak (arguments + temps)     {_gb(plan.step_peak_bytes)}',
      f'  state creation peak (+ temps)     {_gb(plan.init_peak_bytes)}',
      f'  estimated peak (the larger)       {_gb(plan.peak_estimate_bytes)}',
      'collectives per step, per device:',
  ]
  lines += [f'  {name:<32s}  {_gb(value)}'
            for name, value in plan.collective_bytes.items() if value]
  return '\n'.join(lines)


def _parse_args(argv):
  parser = argparse.ArgumentParser(
      prog='python -m sface_jax.plan', formatter_class=cli.HelpFormatter, description=(
          "Per-device memory and per-step communication of a recipe's train step on N "
          'devices.'))
  parser.add_argument('--config', required=True,
                      help='a packaged recipe (demo, ms1mv2_r50_arcface, ...) or a recipe file, '
                           'with an optional :variant')
  parser.add_argument('--devices', type=int, required=True,
                      help='devices to plan for (forced host devices on a CPU)')
  parser.add_argument('--num-classes', type=int, default=None,
                      help="default: the recipe's config.data.num_classes")
  parser.add_argument('--batch-per-device', type=int, default=None,
                      help="default: the recipe's global batch / devices")
  parser.add_argument('--sample-rate', type=float, default=None,
                      help="Partial FC r; default: the recipe's config.head.sample_rate")
  parser.add_argument('--model', default=None,
                      help="backbone (r50, mbf, ...); default: the recipe's config.model.name")
  parser.add_argument('--dtype', default=None,
                      help="float32 | bfloat16; default: the recipe's config.model.dtype")
  parser.add_argument('--json', action='store_true', help='print one JSON object')
  compilation_cache.add_arguments(parser)  # --compilation-cache-dir, --no-compilation-cache
  return parser.parse_args(argv)


def main(argv=None) -> int:
  args = _parse_args(argv)
  if args.devices <= 0:
    print(f'error: --devices={args.devices}', file=sys.stderr)
    return 1
  # Before jax creates its backend: on a CPU, one forced host device per planned device.
  flags = os.environ.get('XLA_FLAGS', '')
  flags = re.sub(r'--xla_force_host_platform_device_count=\d+', '', flags)
  os.environ['XLA_FLAGS'] = f'{flags} --xla_force_host_platform_device_count={args.devices}'
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  try:
    config = configs.load(args.config)
  except configs.RecipeNotFoundError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  num_classes = args.num_classes or config.data.num_classes
  if num_classes <= 0:
    print(f'error: {args.config} does not name its class count: pass --num-classes',
          file=sys.stderr)
    return 1
  if args.batch_per_device:
    config.batch_size = args.batch_per_device * args.devices
  if args.sample_rate is not None:
    config.head.sample_rate = args.sample_rate
  if args.model:
    config.model.name = args.model
  if args.dtype:
    config.model.dtype = args.dtype
  import jax  # pylint: disable=g-import-not-at-top
  if jax.device_count() != args.devices:
    print(f'error: jax sees {jax.device_count()} {jax.default_backend()} devices, not '
          f'{args.devices}: plan on a CPU (JAX_PLATFORMS=cpu) or on that many accelerators',
          file=sys.stderr)
    return 1
  try:
    plan = make_plan(config, num_classes=num_classes)
  except ValueError as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  if args.json:
    print(json.dumps({**dataclasses.asdict(plan), 'step_peak_bytes': plan.step_peak_bytes,
                      'init_peak_bytes': plan.init_peak_bytes,
                      'peak_estimate_bytes': plan.peak_estimate_bytes}))
  else:
    print(format_plan(plan))
  return 0


if __name__ == '__main__':
  sys.exit(main())
