"""Plain JAX by default, on every platform: the programs sface_jax builds (the train step,
the embedding, the exported model) hold no custom call beyond JAX's own annotations, whatever
platform, processor, jaxlib or backend they are traced on; the models export with `jax.export`
for CPU, GPU and TPU and the CPU export runs; and no source imports JAX's private modules.

Tracing on a Mac, an ARM server, Windows, a GPU or a TPU is simulated by monkeypatching what
code could branch on (`sys.platform`, `platform.system/machine`, `jaxlib.__version__`,
`jax.default_backend`); lowering itself needs no such device.
"""

import ast
import dataclasses
import functools
import pathlib
import platform
import re
import sys

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
import pytest

from sface_jax.configs import base
from sface_jax import models
from sface_jax import sharding
from sface_jax import step as step_lib
from sface_jax.evaluation import embedding

REPO = pathlib.Path(__file__).resolve().parents[1]
IMAGE_SIZE = 32
# Custom calls JAX itself emits: sharding annotations (the head's shard_map and
# with_sharding_constraint) and jax.export's shape assertions for a symbolic batch. XLA
# handles them on every platform; anything else (oneDNN's `__onednn$...`, an FFI kernel of
# ours, a Pallas kernel) would tie the program to one backend.
ALLOWED_CUSTOM_CALLS = {'Sharding', 'SPMDFullToShardShape', 'SPMDShardToFullShape',
                        'shape_assertion'}
# (sys.platform, platform.system(), platform.machine(), jaxlib.__version__ or None for this
# one's, jax.default_backend())
ENVIRONMENTS = {
    'linux-x86_64-cpu': ('linux', 'Linux', 'x86_64', None, 'cpu'),
    'macos-arm64-cpu': ('darwin', 'Darwin', 'arm64', None, 'cpu'),
    'linux-aarch64-cpu': ('linux', 'Linux', 'aarch64', None, 'cpu'),
    'windows-amd64-cpu-new-jaxlib': ('win32', 'Windows', 'AMD64', '0.99.0', 'cpu'),
    'gpu': ('linux', 'Linux', 'x86_64', None, 'gpu'),
    'tpu': ('linux', 'Linux', 'x86_64', None, 'tpu'),
}
TINY_MBF = dict(stage_sizes=(1, 1, 1, 1), stage_widths=(8, 8, 16, 16),
                down_expansions=(16, 32, 32), residual_expansions=(16, 32, 32), stem_groups=4,
                head_width=32, embedding_dim=32)


def custom_calls(module_text: str) -> set:
  """Targets of the custom calls in a StableHLO module's text (both printed forms)."""
  return (set(re.findall(r'custom_call\s*@([\w$.\-]+)', module_text))
          | set(re.findall(r'call_target_name\s*=\s*"([^"]+)"', module_text)))


def test_custom_calls_are_found():
  """The control: the search finds a custom call where there is one (an FFI call, as the
  removed CPU kernels were, lowered without being registered or run)."""
  def kernel(x):
    return jax.ffi.ffi_call('sface_probe_kernel', jax.ShapeDtypeStruct(x.shape, x.dtype))(x)
  assert custom_calls(jax.jit(kernel).lower(jnp.ones(3)).as_text()) == {'sface_probe_kernel'}
  assert custom_calls('%1 = stablehlo.custom_call @__onednn$convolution(%0, %k)') == {
      '__onednn$convolution'}


@pytest.fixture(params=sorted(ENVIRONMENTS))
def environment(request, monkeypatch):
  system, name, machine, version, backend = ENVIRONMENTS[request.param]
  monkeypatch.setattr(sys, 'platform', system)
  monkeypatch.setattr(platform, 'system', lambda: name)
  monkeypatch.setattr(platform, 'machine', lambda: machine)
  monkeypatch.setattr(jaxlib, '__version__', version or jaxlib.__version__)
  monkeypatch.setattr(jax, 'default_backend', lambda: backend)
  return request.param


def _model(name: str):
  return (models.get_model('mbf', **TINY_MBF) if name == 'mbf'
          else models.get_model('tiny', embedding_dim=32))


def _train_step_text(name: str) -> str:
  config = base.get_config()
  config.model.name, config.model.embedding_dim = 'tiny', 32
  config.batch_size, config.data.image_size = 4, IMAGE_SIZE
  mesh = sharding.make_mesh(jax.devices()[:1])
  setup = dataclasses.replace(step_lib.make_setup(
      config, num_classes=10, steps_per_epoch=10, total_steps=100, mesh=mesh),
                              model=_model(name))
  init = functools.partial(step_lib.create_train_state, 0, setup)
  state = jax.eval_shape(init)
  shardings = sharding.tree_shardings(mesh, state)
  batch = {'image': jax.ShapeDtypeStruct((4, IMAGE_SIZE, IMAGE_SIZE, 3), jnp.float32),
           'label': jax.ShapeDtypeStruct((4,), jnp.int32)}
  return step_lib.jit_train_step(setup, shardings, mesh).lower(state, batch).as_text()


def _variables(model):
  return models.abstract_variables(model, IMAGE_SIZE)


@pytest.mark.parametrize('name', ['tiny', 'mbf'])
def test_no_custom_call_in_the_train_step_and_the_embedding(environment, name):
  found = custom_calls(_train_step_text(name))
  model = _model(name)
  images = jax.ShapeDtypeStruct((4, IMAGE_SIZE, IMAGE_SIZE, 3), jnp.uint8)
  found |= custom_calls(jax.jit(functools.partial(embedding._embed_batch, model)).lower(  # pylint: disable=protected-access
      _variables(model), images).as_text())
  assert found <= ALLOWED_CUSTOM_CALLS, (environment, found - ALLOWED_CUSTOM_CALLS)


@pytest.mark.parametrize('name', ['tiny', 'mbf'])
def test_models_export_for_every_platform_and_the_cpu_export_runs(name):
  """jax.export of the inference function for CPU, CUDA and TPU at once (a symbolic batch),
  plain StableHLO; serialised, read back and called on the CPU it gives the model's
  embeddings."""
  model = _model(name)
  rng = np.random.default_rng(0)
  images = rng.normal(size=(3, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)
  variables = jax.tree.map(lambda leaf: rng.uniform(0.5, 1.5, leaf.shape).astype(leaf.dtype),
                           _variables(model))  # positive: batch-norm variances among them

  def serve(variables, images):
    return model.apply(variables, images, train=False)[0]

  batch, = jax.export.symbolic_shape('b')
  exported = jax.export.export(jax.jit(serve), platforms=('cpu', 'cuda', 'tpu'))(
      _variables(model), jax.ShapeDtypeStruct((batch, IMAGE_SIZE, IMAGE_SIZE, 3), jnp.float32))
  found = custom_calls(exported.mlir_module())
  assert found <= ALLOWED_CUSTOM_CALLS, found - ALLOWED_CUSTOM_CALLS
  restored = jax.export.deserialize(exported.serialize())
  np.testing.assert_allclose(restored.call(variables, images),
                             jax.jit(serve)(variables, images), rtol=1e-5, atol=1e-5)


# Private imports still in the sources, each with its reason; the test fails on any other.
PRIVATE_IMPORTS_ADMITTED = {
    # the SavedModel's StableHLO cap for TensorFlow's older XLA: a guarded import inside one
    # function (`_stablehlo_readable_by`), with JAX's own behaviour where the name is gone
    ('sface_jax/tools/export.py', 'jax._src.export'),
}


def _private_imports(path: pathlib.Path):
  """(module, at import time?) for each private JAX module `path` imports or reads."""
  tree = ast.parse(path.read_text(), str(path))
  top_level = {id(node) for node in tree.body}
  for node in ast.walk(tree):
    names = []
    if isinstance(node, ast.Import):
      names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module:
      names = [node.module] + [f'{node.module}.{alias.name}' for alias in node.names
                               if node.module in ('jax', 'jaxlib')]  # from jax import _src
    elif isinstance(node, ast.Attribute) and node.attr == '_src':
      names = ['jax._src']
    for name in names:
      if name == 'jax._src' or name.startswith(('jax._src.', 'jaxlib.')):
        yield name, id(node) in top_level


def test_no_private_jax_imports():
  """`import sface_jax.<anything>` imports no private JAX module (jax._src, jaxlib's
  internals), and no function does either, but the admitted ones above."""
  found = set()
  for path in sorted((REPO / 'sface_jax').rglob('*.py')):
    relative = path.relative_to(REPO).as_posix()
    for name, at_import in _private_imports(path):
      assert not at_import, f'{relative} imports {name} at import time'
      found.add((relative, name))
  assert found <= PRIVATE_IMPORTS_ADMITTED, found - PRIVATE_IMPORTS_ADMITTED
