"""Where a compiled step's time goes, from a JAX profiler trace and the step's compiled HLO.

  python bench/profile_summary.py TRACE_DIR STEP.hlo [--steps N]

bench/train_step.py --profile DIR writes both (DIR/train_step.hlo next to the trace) and
prints this summary itself. Two tables, in milliseconds per step:

- by kind of operation (convolution, matmul, reduction, transpose/layout copy, element-wise,
  collective, other) and by part of the step (backbone forward, backbone backward, head
  forward, head backward, optimiser, other), from the `jax.named_scope`s that
  `step.train_step` opens and the `jvp`/`transpose` names autodiff gives the backward;
- the slowest single operations, with their shapes and scopes.

How an operation's time is measured: on a GPU, each kernel's own span on the device. On the
CPU, XLA's thunk executor records a span when it launches an operation and an `end: NAME`
mark when the operation completes; convolutions run asynchronously on the intra-op thread
pool, so their launch span is short and the end mark is what bounds them, unless an
operation reading the result starts earlier (`bound_by_users`). Operations that
run at the same time (two CPU threads, several GPU streams) share each instant equally, so the
table adds up to the time at least one operation of the step was running ("covered"); the
rest of the wall time is the gaps between them (host dispatch, waiting).
"""

import argparse
import bisect
import collections
import dataclasses
import glob
import gzip
import json
import os
import re
from typing import Dict, Iterable, List, Tuple

KINDS = ('convolution', 'matmul', 'reduction', 'transpose/layout copy', 'element-wise',
         'collective', 'other')
PARTS = ('backbone forward', 'backbone backward', 'head forward', 'head backward',
         'optimiser', 'other')
# The order in which a step's parts run: an operation depends on no part later than its own.
_PART_ORDER = ('other', 'backbone forward', 'head forward', 'head backward',
               'backbone backward', 'optimiser')
_COLLECTIVES = ('all-reduce', 'all-gather', 'reduce-scatter', 'all-to-all',
                'collective-permute')
# name = shape opcode(operands…; a tuple shape is parenthesised and may hold parenthesised
# layout details, one level deep.
_INSTRUCTION = re.compile(
    r'^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(\((?:[^()]|\([^()]*\))*\)|\S+)\s+([\w\-]+)\(')
# Instructions whose thunks enclose the thunks of the computations they run (which the trace
# records too): counting both would count that time twice.
_CONTAINERS = ('conditional', 'while', 'call')
_COMPUTATION = re.compile(r'^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$')


@dataclasses.dataclass(frozen=True)
class Op:
  """One HLO instruction of the step: what it is (kind), where it comes from (part)."""
  name: str
  shape: str
  kind: str
  part: str
  scope: str
  container: bool = False
  users: Tuple[str, ...] = ()  # the instructions that read its result


def _part(scope: str) -> str:
  """The step's part from an op_name such as 'jit(train_step)/transpose(jvp(backbone))/…'."""
  for component in scope.split('/'):
    if component == 'optimiser':
      return 'optimiser'
    match = re.fullmatch(r'(transpose\()?(?:jvp\()?(backbone|head)\)*', component)
    if match:
      return f'{match.group(2)} {"backward" if match.group(1) else "forward"}'
  return 'other'


def _kind(opcode: str, line: str, called_opcodes: set) -> str:
  """Classifies by the instruction and, for fusions, every opcode of the computation it calls."""
  opcodes = {opcode} | called_opcodes
  target = re.search(r'custom_call_target="([^"]*)"', line)
  target = target.group(1).lower() if target else ''
  if 'convolution' in opcodes or 'conv' in target:
    return 'convolution'
  if 'dot' in opcodes or 'gemm' in target or 'matmul' in target:
    return 'matmul'
  if any(op.startswith(_COLLECTIVES) for op in opcodes):
    return 'collective'
  if opcodes & {'reduce', 'reduce-window', 'select-and-scatter'}:
    return 'reduction'
  if opcodes & {'transpose', 'copy'}:
    return 'transpose/layout copy'
  if opcode == 'fusion':
    return 'element-wise'
  return 'other'


def parse_hlo(text: str) -> Tuple[str, Dict[str, Op]]:
  """(module name, {instruction name: Op}) for every instruction of a compiled module's text."""
  module = re.search(r'^HloModule\s+([\w.\-]+)', text, re.MULTILINE)
  computations: Dict[str, List[Tuple[str, str, str, str]]] = collections.defaultdict(list)
  current = ''
  for line in text.splitlines():
    instruction = _INSTRUCTION.match(line)
    if instruction:
      computations[current].append((instruction.group(1), instruction.group(2),
                                    instruction.group(3), line))
      continue
    computation = _COMPUTATION.match(line)
    if computation:
      current = computation.group(1)

  def opcodes_under(computation: str, seen: set) -> set:
    found = set()
    for _, _, opcode, line in computations.get(computation, ()):
      found.add(opcode)
      for callee in re.findall(r'(?:calls|to_apply)=%?([\w.\-]+)', line):
        if callee not in seen:
          seen.add(callee)
          found |= opcodes_under(callee, seen)
    return found

  # An instruction XLA made itself has no scope (the kernel gradients it rewrites as
  # convolutions, the layout copies they read). It belongs to the latest part any of its
  # operands comes from; and where that is not a backward part while all its users come
  # later (a batch-minor copy of forward activations that only a kernel gradient reads, a
  # flipped kernel for an input gradient), to the earliest part of its users.
  ops, users = {}, collections.defaultdict(list)
  for instructions in computations.values():
    for name, shape, opcode, line in instructions:  # operands come before their users
      callees = re.findall(r'calls=%?([\w.\-]+)', line) if opcode == 'fusion' else []
      called = set().union(*(opcodes_under(c, {c}) for c in callees)) if callees else set()
      scope = re.search(r'op_name="([^"]*)"', line)
      scope = scope.group(1) if scope else ''
      operands = re.findall(r'%([\w.\-]+)', line.split(f'{opcode}(', 1)[1].split(')', 1)[0])
      for operand in operands:
        users[operand].append(name)
      part = _part(scope) if scope else max(
          (ops[o].part for o in operands if o in ops), key=_PART_ORDER.index, default='other')
      ops[name] = Op(name, shape, _kind(opcode, line, called), part, scope,
                     opcode in _CONTAINERS)
  ops = {name: dataclasses.replace(op, users=tuple(users[name])) for name, op in ops.items()}
  for instructions in computations.values():
    for name, _, _, _ in reversed(instructions):
      op = ops[name]
      if op.scope or op.part.endswith('backward') or not users[name]:
        continue
      first_use = min((ops[u].part for u in users[name]), key=_PART_ORDER.index)
      if _PART_ORDER.index(first_use) > _PART_ORDER.index(op.part):
        ops[name] = dataclasses.replace(op, part=first_use)
  return (module.group(1) if module else ''), ops


def load_trace(trace_dir: str) -> List[dict]:
  """The events of the newest `*.trace.json.gz` under `trace_dir` (jax.profiler's output)."""
  files = sorted(glob.glob(os.path.join(trace_dir, '**', '*.trace.json.gz'), recursive=True),
                 key=os.path.getmtime)
  if not files:
    raise FileNotFoundError(f'{trace_dir}: no *.trace.json.gz (was the trace written with '
                            'jax.profiler.trace(..., create_perfetto_trace=True)?)')
  with gzip.open(files[-1]) as f:
    return json.load(f)['traceEvents']


def op_spans(events: Iterable[dict], module: str) -> Tuple[List[Tuple[str, float, float]], int]:
  """([(instruction, start µs, end µs)], runs of `module`) for the module's operations.

  A span ends at the operation's `end: NAME` mark where there is one (the CPU's asynchronous
  thunks), else at its own end. Where the trace has an accelerator (a `/device:GPU:0`
  process), only its kernels count: the host's launch events name the same operations.
  """
  events = list(events)
  accelerators = {e['pid'] for e in events if e.get('ph') == 'M' and e['name'] == 'process_name'
                  and e['args']['name'].startswith('/device:')
                  and not e['args']['name'].startswith('/device:CPU')}
  events = sorted((e for e in events if e.get('ph') == 'X'
                   and (not accelerators or e['pid'] in accelerators)), key=lambda e: e['ts'])
  pending = collections.defaultdict(collections.deque)  # name -> spans awaiting an end mark
  spans, runs = [], set()
  for event in events:
    args = event.get('args', {})
    if event['name'].startswith('end: ') and pending[event['name'][5:]]:
      span = pending[event['name'][5:]].popleft()
      span[2] = max(span[2], event['ts'])
    elif 'hlo_op' in args and args.get('hlo_module', module) == module:
      span = [args['hlo_op'], event['ts'], event['ts'] + event['dur']]
      spans.append(span)
      runs.add(args.get('run_id'))
      if event['name'] == args['hlo_op']:  # a CPU thunk: an end mark may follow
        pending[event['name']].append(span)
  return [tuple(span) for span in spans], len(runs)


def bound_by_users(spans: List[Tuple[str, float, float]],
                   ops: Dict[str, Op]) -> List[Tuple[str, float, float]]:
  """Each span ended no later than the first of its users' spans that starts after it.

  An `end:` mark can come long after the operation finished: the mark of a fusion split over
  the two CPU threads was recorded 317 ms late, after a reduction that ran in between (the
  step's trace of 2026-12-03), which gave the fusion half of the reduction's time. Whatever
  the marks say, an operation is done when something that reads its result starts.
  """
  starts = collections.defaultdict(list)
  for name, start, _ in spans:
    starts[name].append(start)
  for times in starts.values():
    times.sort()
  bounded = []
  for name, start, end in spans:
    for user in ops[name].users if name in ops else ():
      times = starts.get(user, [])
      first = bisect.bisect_right(times, start)  # the user's first start after this one's
      if first < len(times):
        end = min(end, times[first])
    bounded.append((name, start, max(start, end)))
  return bounded


def exclusive_times(spans: List[Tuple[str, float, float]]) -> Dict[str, float]:
  """{name: µs}, each instant shared equally by the spans running then (sums to covered time)."""
  marks = sorted([(start, 1, i) for i, (_, start, _) in enumerate(spans)]
                 + [(end, -1, i) for i, (_, _, end) in enumerate(spans)])
  active, totals, last = set(), collections.Counter(), None
  for time, delta, index in marks:
    if active and last is not None:
      share = (time - last) / len(active)
      for i in active:
        totals[spans[i][0]] += share
    (active.add if delta > 0 else active.discard)(index)
    last = time
  return totals


def ms(microseconds: float) -> str:
  """Microseconds as milliseconds for the tables, 1,234.5."""
  return f'{microseconds / 1e3:,.1f}'


def _short(shape: str) -> str:
  """A tuple shape as its first array and how many there are ('f32[64,2] and 17 more')."""
  arrays = re.findall(r'\w+\[[^\]]*\]', shape)
  return shape if len(arrays) < 2 else f'{arrays[0]} and {len(arrays) - 1} more'


def summarize(trace_dir: str, hlo_text: str, steps: int = 0, top: int = 12) -> str:
  """The two tables (markdown) for the step whose compiled text is `hlo_text`."""
  module, ops = parse_hlo(hlo_text)
  spans, runs = op_spans(load_trace(trace_dir), module)
  spans = [span for span in bound_by_users(spans, ops)
           if not (span[0] in ops and ops[span[0]].container)]
  if not spans:
    raise ValueError(f'{trace_dir}: no operation of HLO module {module!r} in the trace')
  steps = steps or runs or 1
  wall = (max(end for _, _, end in spans) - min(start for _, start, _ in spans)) / steps
  unknown = Op('?', '?', 'other', 'other', '')
  per_op = {name: us / steps for name, us in exclusive_times(spans).items()}
  table = collections.defaultdict(float)
  for name, us in per_op.items():
    op = ops.get(name, unknown)
    table[op.kind, op.part] += us
  covered = sum(per_op.values())
  lines = [f'{module}: {steps} step(s), {ms(wall)} ms wall per step, {ms(covered)} ms covered '
           f'by its operations ({100 * covered / wall:.0f}%)', '',
           '| kind \\ ms per step | ' + ' | '.join(PARTS) + ' | all | share |',
           '|---|' + '---:|' * (len(PARTS) + 2)]
  for kind in KINDS:
    row = [table[kind, part] for part in PARTS]
    if sum(row):
      lines.append(f'| {kind} | ' + ' | '.join(ms(v) for v in row)
                   + f' | {ms(sum(row))} | {100 * sum(row) / covered:.0f}% |')
  totals = [sum(table[kind, part] for kind in KINDS) for part in PARTS]
  lines += ['| **all** | ' + ' | '.join(ms(v) for v in totals) + f' | {ms(covered)} | 100% |',
            '', '| slowest operations | kind | shape | ms per step | scope |',
            '|---|---|---|---:|---|']
  for name, us in sorted(per_op.items(), key=lambda item: -item[1])[:top]:
    op = ops.get(name, unknown)
    where = op.scope or f'({op.part}: made by XLA, no scope of its own)'
    lines.append(f'| {name} | {op.kind} | `{_short(op.shape)}` | {ms(us)} | {where} |')
  return '\n'.join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('trace_dir')
  parser.add_argument('hlo', help="the step's compiled HLO text (jitted.lower(...).compile()"
                      '.as_text())')
  parser.add_argument('--steps', type=int, default=0,
                      help='steps in the trace (default: the runs of the module it records)')
  parser.add_argument('--top', type=int, default=12)
  args = parser.parse_args()
  with open(args.hlo) as f:
    print(summarize(args.trace_dir, f.read(), args.steps, args.top))


if __name__ == '__main__':
  main()
