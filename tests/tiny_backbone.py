"""A tiny backbone saved as a work directory, as `tools.import_torch` writes one: what the
evaluation, embedding, export and IJB tests load their weights from."""

import pathlib

import jax
import jax.numpy as jnp

from sface_jax import checkpoint
from sface_jax import models
from sface_jax.tools import import_torch


def write_workdir(workdir: pathlib.Path, *, image_size: int, embedding_dim: int, source: str,
                  variables=None, eval_batch_size: int | None = None):
  """Saves the 'tiny' backbone (`variables`, or its seed-0 initialisation) at `workdir`;
  returns (workdir, model, variables)."""
  model = models.get_model('tiny', embedding_dim=embedding_dim)
  if variables is None:
    variables = model.init(jax.random.key(0), jnp.zeros((1, image_size, image_size, 3)),
                           train=False)
  config = import_torch.imported_config('tiny', embedding_dim=embedding_dim,
                                        image_size=image_size, source=source)
  if eval_batch_size is not None:
    config.eval.batch_size = eval_batch_size
  checkpoint.save_backbone(str(workdir), config, variables)
  return workdir, model, variables
