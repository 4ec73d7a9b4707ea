"""The training recipes, shipped with the package: each module's `get_config(variant)`.

A recipe is named by the commands (`--config` of `sface_jax.main` and `sface_jax.plan`)
either as a packaged recipe, `demo` or `ms1mv2_r50_arcface:runlocal`, or as a file of one's
own, `path/to/recipe.py[:variant]`, which starts from `from sface_jax.configs import base`.
A path that exists wins over a packaged name.
"""

import os

_HERE = os.path.dirname(os.path.abspath(__file__))


class RecipeNotFoundError(ValueError):
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
