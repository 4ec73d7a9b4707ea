"""When the backbones may trace the CPU custom calls that make their step fast there.

Two kinds exist: XLA:CPU's own oneDNN calls (`onednn.py`) and our compiled kernels
(`cpu_kernels.py`). Both are opaque to XLA, so they are used only where that costs nothing:

- on the CPU backend, with one device: XLA's SPMD partitioner cannot split a custom call,
  so with the batch sharded over several devices it would gather every call's operands
  onto each device (the planner's test on 8 forced CPU devices counted 3.4 MB of
  all-gathers per step where the layout needs 2 KB). A CPU run is one device unless forced
  otherwise;
- outside `disabled()`: programs that leave this process (a SavedModel's module runs in
  TensorFlow's own XLA, which has neither our kernels nor the same reading of oneDNN's
  configuration) and programs XLA must cost (`models.xla_macs`) trace with XLA's own
  operations only.
"""

import contextlib

import jax

_enabled = [True]


@contextlib.contextmanager
def disabled():
  """Trace with XLA's own convolutions, dots and reductions only (module docstring)."""
  _enabled.append(False)
  try:
    yield
  finally:
    _enabled.pop()


def allowed() -> bool:
  """Whether custom calls may be traced now: the CPU backend, one device, not `disabled()`."""
  return _enabled[-1] and jax.default_backend() == 'cpu' and jax.device_count() == 1
