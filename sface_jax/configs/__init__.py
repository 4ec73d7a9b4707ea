"""The training recipes, shipped with the package: each module's `get_config(variant)`.

A recipe is named by the commands (`--config` of `sface_jax.main` and `sface_jax.plan`)
either as a packaged recipe, `demo` or `ms1mv2_r50_arcface:runlocal`, or as a file of one's
own, `path/to/recipe.py[:variant]`, which starts from `from sface_jax.configs import base`.
A path that exists wins over a packaged name. `validate` checks a config before any work.
"""

import os

_HERE = os.path.dirname(os.path.abspath(__file__))


class ConfigError(ValueError):
  """A config value that cannot work (unknown name, impossible setting); names the field."""


class RecipeNotFoundError(ConfigError):
  """--config names neither an existing file nor a packaged recipe."""


def names() -> list[str]:
  """The packaged recipes (`base` included: the defaults are a recipe too)."""
  return sorted(name[:-len('.py')] for name in os.listdir(_HERE)
                if name.endswith('.py') and not name.startswith('_'))


def resolve(spec: str) -> str:
  """`name[:variant]` or `path.py[:variant]` → `file.py[:variant]`, the file existing.

  Raises RecipeNotFoundError, one line listing the packaged recipes, when neither exists.
  """
  path, colon, variant = spec.partition(':')
  if os.path.isfile(path):
    return spec
  name = path[:-len('.py')] if path.endswith('.py') else path
  if name in names():
    return os.path.join(_HERE, f'{name}.py') + colon + variant
  stem = os.path.basename(name)
  hint = f' (did you mean --config {stem}{colon}{variant}?)' if stem in names() else ''
  raise RecipeNotFoundError(f'--config {spec}: no such file and no packaged recipe of that '
                            f'name{hint}; recipes: {", ".join(names())}')


def load(spec: str):
  """The ConfigDict of `spec` (as `resolve` takes it): its module's get_config(variant)."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  path, _, variant = resolve(spec).partition(':')
  module_spec = importlib.util.spec_from_file_location(
      f'sface_jax_recipe_{os.path.basename(path)[:-len(".py")]}', path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(variant or None)


def validate(config) -> None:
  """What can be checked without the data, before any is converted: every name (model, head,
  optimiser, schedule, centre initialisation) and the settings `step.check_config` checks.

  It builds what the train step will build (model, head, schedule, optimiser), so the
  checks are the constructors' own. The class count is checked only where the recipe
  states it (`data.num_classes > 0`); training checks it against the data. Raises
  ConfigError naming the field.
  """
  # pylint: disable=g-import-not-at-top
  import jax
  import jax.numpy as jnp
  from sface_jax import heads, models, optim, step
  from sface_jax.models import iresnet
  if config.model.name not in models.MODELS:
    raise ConfigError(f'config.model.name={config.model.name!r} is not a model; choose one of '
                      f'{tuple(models.MODELS)}')
  if config.model.bn_running_var not in iresnet.BN_RUNNING_VARS:
    raise ConfigError(f'config.model.bn_running_var={config.model.bn_running_var!r}: choose one '
                      f'of {iresnet.BN_RUNNING_VARS}')
  try:
    jnp.dtype(config.model.dtype)
  except TypeError:
    raise ConfigError(f'config.model.dtype={config.model.dtype!r} is not a dtype (float32 | '
                      'bfloat16 | float16)') from None
  devices = jax.device_count()
  num_classes = config.data.num_classes if config.data.num_classes > 0 else devices
  try:
    heads.get_head(config.head)
    schedule = optim.learning_rate_schedule(config.schedule, steps_per_epoch=1, total_steps=1)
    optim.make_optimizer(config.optimizer, schedule)
    step.check_config(config, num_classes=num_classes, num_devices=devices)
  except (ValueError, TypeError) as e:
    raise ConfigError(str(e)) from e
