"""Every recipe in configs/ builds and takes a finite training step.

The backbone is swapped for the tiny test model at 32×32 and the class count shrunk, so
what runs is each recipe's own head, optimiser, decay mask and schedule.
"""

import importlib
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sface_jax import heads
from sface_jax import models
from sface_jax import train

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / 'configs'
RECIPES = sorted(p.stem for p in CONFIGS.glob('*.py')
                 if p.stem not in ('__init__', 'base', 'datasets'))


def test_the_recipes_the_issue_names_exist():
  assert {'ms1mv2_r50_arcface', 'ms1mv2_r50_sface', 'casia_r50_sface', 'ms1mv2_r50_cosface',
          'ms1mv2_mbf_arcface', 'glint360k_r100_pfc', 'demo'} <= set(RECIPES)


@pytest.mark.parametrize('recipe', RECIPES)
def test_recipe_takes_a_finite_step(recipe):
  config = importlib.import_module(f'configs.{recipe}').get_config()
  assert config.model.name in models.MODELS
  assert config.head.name in heads.HEAD_NAMES
  assert config.data.dir or config.data.convert.source, 'a recipe names its data'
  schedule_steps = 100
  config.model.name, config.model.embedding_dim, config.data.image_size = 'tiny', 16, 32
  setup = train.make_setup(config, num_classes=12, steps_per_epoch=10,
                           total_steps=schedule_steps)
  state = jax.jit(train.create_train_state, static_argnums=(0, 1))(config.seed, setup)
  rng = np.random.default_rng(0)
  batch = {'image': jnp.asarray(rng.normal(size=(8, 32, 32, 3)), jnp.float32),
           'label': jnp.asarray(rng.integers(0, 12, 8), jnp.int32)}
  new_state, metrics = jax.jit(train.train_step, static_argnames='setup')(
      state, batch, setup=setup)
  assert np.isfinite(float(metrics['loss'])) and np.isfinite(float(metrics['grad_norm']))
  assert int(new_state.step) == 1
  moved = optax.global_norm(jax.tree.map(lambda a, b: a - b, new_state.params['backbone'],
                                         state.params['backbone']))
  assert float(moved) > 0 or float(setup.schedule(0)) == 0.0  # warm-up starts at lr 0


def test_sface_recipes_use_the_published_hyper_parameters():
  from configs import casia_r50_sface, ms1mv2_r50_sface  # pylint: disable=g-import-not-at-top
  ms1m, casia = ms1mv2_r50_sface.get_config(), casia_r50_sface.get_config()
  assert (ms1m.head.sface.a, ms1m.head.sface.b) == (0.9, 1.2)
  assert (casia.head.sface.a, casia.head.sface.b) == (0.87, 1.2)
  assert casia.data.num_classes == 10_572 and ms1m.data.num_classes == 85_742
  # ArcFace's MS1MV2 schedule: ÷10 at 100 k and 160 k iterations of 512, 180 k in all.
  steps_per_epoch = 5_822_653 // 512
  schedule = train.optim.learning_rate_schedule(
      ms1m.schedule, steps_per_epoch=steps_per_epoch,
      total_steps=int(round(ms1m.num_epochs * steps_per_epoch)))
  assert float(schedule(99_000)) == pytest.approx(0.1)
  assert float(schedule(101_000)) == pytest.approx(0.01)
  assert float(schedule(161_000)) == pytest.approx(0.001)
  assert abs(ms1m.num_epochs * steps_per_epoch - 180_000) < 100
