"""bench/profile_summary.py on a hand-written compiled module and trace, with known answers.

The module mimics what XLA makes of a train step: a scoped forward convolution, a batch-minor
copy of its output and a kernel-gradient convolution that XLA created without scopes, a
scoped backward reduction and an optimiser fusion. The trace has CPU thunks (a convolution
that completes asynchronously at its `end:` mark, two fusions overlapping on two threads) and,
in a second case, a GPU device's kernels next to the host's launch events for them.
"""

import gzip
import json
import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / 'bench'))
import profile_summary  # pylint: disable=g-import-not-at-top,wrong-import-position

HLO = """HloModule jit_train_step, entry_computation_layout={...}

%fused_reduce (p0: f32[8,4]) -> f32[4] {
  %p0 = f32[8,4]{1,0} parameter(0)
  %c = f32[] constant(0)
  ROOT %r = f32[4]{0} reduce(f32[8,4]{1,0} %p0, f32[] %c), dimensions={0}, to_apply=%add
}

%fused_transpose (p0.1: f32[8,4]) -> f32[4,8] {
  %p0.1 = f32[8,4]{1,0} parameter(0)
  %m = f32[8,4]{1,0} multiply(f32[8,4]{1,0} %p0.1, f32[8,4]{1,0} %p0.1)
  ROOT %t = f32[4,8]{1,0} transpose(f32[8,4]{1,0} %m), dimensions={1,0}
}

%fused_update (p0.2: f32[3,3,4,4], p1.2: f32[3,3,4,4]) -> f32[3,3,4,4] {
  %p0.2 = f32[3,3,4,4]{3,2,1,0} parameter(0)
  %p1.2 = f32[3,3,4,4]{3,2,1,0} parameter(1)
  ROOT %s = f32[3,3,4,4]{3,2,1,0} subtract(f32[3,3,4,4]{3,2,1,0} %p0.2, f32[3,3,4,4]{3,2,1,0} %p1.2)
}

ENTRY %main (x: f32[8,4], w: f32[3,3,4,4]) -> f32[3,3,4,4] {
  %x = f32[8,4]{1,0} parameter(0)
  %w = f32[3,3,4,4]{3,2,1,0} parameter(1)
  %conv.1 = f32[8,4]{1,0} convolution(f32[8,4]{1,0} %x, f32[3,3,4,4]{3,2,1,0} %w), dim_labels=b01f_01io->b01f, metadata={op_name="jit(train_step)/jvp(backbone)/IResNet/conv1/conv_general_dilated"}
  %dy = f32[8,4]{1,0} multiply(f32[8,4]{1,0} %conv.1, f32[8,4]{1,0} %conv.1), metadata={op_name="jit(train_step)/transpose(jvp(backbone))/IResNet/prelu/mul"}
  %reduce_fusion = f32[4]{0} fusion(f32[8,4]{1,0} %dy), kind=kInput, calls=%fused_reduce, metadata={op_name="jit(train_step)/transpose(jvp(backbone))/IResNet/bn1/reduce_sum"}
  %transpose_fusion = f32[4,8]{1,0} fusion(f32[8,4]{1,0} %conv.1), kind=kLoop, calls=%fused_transpose
  %convolution.2 = f32[3,3,4,4]{3,2,1,0} convolution(f32[4,8]{1,0} %transpose_fusion, f32[8,4]{1,0} %dy), dim_labels=b01f_01io->b01f
  ROOT %update_fusion = f32[3,3,4,4]{3,2,1,0} fusion(f32[3,3,4,4]{3,2,1,0} %w, f32[3,3,4,4]{3,2,1,0} %convolution.2), kind=kLoop, calls=%fused_update, metadata={op_name="jit(train_step)/optimiser/sub"}
}
"""


def test_kinds_and_parts_of_the_instructions():
  module, ops = profile_summary.parse_hlo(HLO)
  assert module == 'jit_train_step'
  expected = {
      'conv.1': ('convolution', 'backbone forward'),
      'reduce_fusion': ('reduction', 'backbone backward'),
      # made by XLA: read forward values, used only by the kernel gradient
      'transpose_fusion': ('transpose/layout copy', 'backbone backward'),
      'convolution.2': ('convolution', 'backbone backward'),  # reads a backward value
      'update_fusion': ('element-wise', 'optimiser'),
  }
  assert {name: (ops[name].kind, ops[name].part) for name in expected} == expected


def _thunk(name, ts, dur, tid, run=1, **extra):
  return {'ph': 'X', 'pid': 1, 'tid': tid, 'ts': ts, 'dur': dur, 'name': name,
          'args': {'hlo_op': name, 'hlo_module': 'jit_train_step', 'run_id': str(run), **extra}}


def _end(name, ts, tid):
  return {'ph': 'X', 'pid': 1, 'tid': tid, 'ts': ts, 'dur': 0.5, 'name': f'end: {name}'}


def _write_trace(folder: pathlib.Path, events) -> str:
  run = folder / 'plugins' / 'profile' / 'run'
  run.mkdir(parents=True)
  with gzip.open(run / 'host.trace.json.gz', 'wt') as f:
    json.dump({'traceEvents': events}, f)
  return str(folder)


def test_cpu_trace_shares_overlapping_time_and_bounds_async_thunks(tmp_path):
  events = [{'ph': 'M', 'pid': 1, 'name': 'process_name', 'args': {'name': '/host:CPU'}}]
  ms = 1e3  # the trace's unit is the microsecond
  for run, t0 in ((1, 0.0), (2, 25 * ms)):  # two steps back to back, the same timeline each
    events += [
        _thunk('conv.1', t0, 1 * ms, tid=1, run=run),                     # launched, 0–1
        _end('conv.1', t0 + 10 * ms, tid=2),                                # completes at 10
        _thunk('reduce_fusion', t0 + 10 * ms, 4 * ms, tid=1, run=run),      # 10–14
        _thunk('transpose_fusion', t0 + 12 * ms, 4 * ms, tid=2, run=run),   # 12–16
        _end('transpose_fusion', t0 + 20 * ms, tid=2),  # a late mark: its user starts at 16
        _thunk('convolution.2', t0 + 16 * ms, 8 * ms, tid=1, run=run),      # 16–24
        _thunk('update_fusion', t0 + 24 * ms, 1 * ms, tid=1, run=run),      # 24–25
        _thunk('other_op', t0 + 5 * ms, 10 * ms, tid=3, run=run, hlo_module='jit_other'),
    ]
  trace = _write_trace(tmp_path, events)
  module, ops = profile_summary.parse_hlo(HLO)
  spans, runs = profile_summary.op_spans(profile_summary.load_trace(trace), module)
  assert runs == 2 and len(spans) == 10  # the other module's operation is left out
  per_op = profile_summary.exclusive_times(profile_summary.bound_by_users(spans, ops))
  # 12–14 is shared by the reduction and the copy: 2 + 1 and 1 + 2 ms per step each
  assert per_op == pytest.approx({'conv.1': 20 * ms, 'reduce_fusion': 6 * ms,
                                  'transpose_fusion': 6 * ms, 'convolution.2': 16 * ms,
                                  'update_fusion': 2 * ms})
  text = profile_summary.summarize(trace, HLO)
  assert text.startswith('jit_train_step: 2 step(s), 25.0 ms wall per step, 25.0 ms covered '
                         'by its operations (100%)'), text
  rows = {line.split('|')[1].strip(): [c.strip() for c in line.split('|')[2:-1]]
          for line in text.splitlines() if line.startswith('| ') and '---' not in line}
  # columns: backbone forward, backbone backward, head forward, head backward, optimiser,
  # other, all, share
  assert rows['convolution'] == ['10.0', '8.0', '0.0', '0.0', '0.0', '0.0', '18.0', '72%']
  assert rows['reduction'] == ['0.0', '3.0', '0.0', '0.0', '0.0', '0.0', '3.0', '12%']
  assert rows['transpose/layout copy'][1] == '3.0'
  assert rows['element-wise'][4] == '1.0'
  assert rows['**all**'] == ['10.0', '14.0', '0.0', '0.0', '1.0', '0.0', '25.0', '100%']
  assert rows['conv.1'][:3] == ['convolution', '`f32[8,4]{1,0}`', '10.0']


def test_gpu_trace_counts_device_kernels_not_host_launches(tmp_path):
  events = [{'ph': 'M', 'pid': 1, 'name': 'process_name', 'args': {'name': '/host:CPU'}},
            {'ph': 'M', 'pid': 7, 'name': 'process_name', 'args': {'name': '/device:GPU:0'}}]
  host_launch = _thunk('conv.1', 0.0, 3.0, tid=1)
  kernel = {**_thunk('conv.1', 5.0, 2.0, tid=9), 'pid': 7, 'name': 'sm90_xmma_fprop_kernel'}
  spans, _ = profile_summary.op_spans(events + [host_launch, kernel], 'jit_train_step')
  assert spans == [('conv.1', 5.0, 7.0)]
