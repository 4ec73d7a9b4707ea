"""The class-centre matrix (the only parameters a head has) and cosine logits.

`ClassCenters` owns `class_centers` of shape (embedding_dim, padded classes): class axis
last, so the sharding rule that matches the name `class_centers` splits classes over the
devices; and, for plain softmax and center loss, a `bias` of shape (padded classes,). The
class count is padded to a multiple of the device count (columns past `num_classes` are zero,
and every loss, metric and gradient masks them out). Everything computed from them (cosines,
margins, losses) is a pure function elsewhere.

Initialisation (`config.head.center_init`) sets the centres' norm ‖W_j‖, which matters for
SGD: the angular step a centre takes scales as lr/‖W_j‖²:
  'normal': N(0, 0.01²) per entry, insightface's Partial FC (‖W_j‖ ≈ 0.01·√D, 0.23 at 512);
  'xavier': Xavier-normal with gain 2, std = 2·√(2/(D + C)), zhongyy/SFace's re-init
            (‖W_j‖ ≈ 0.61 for CASIA's 10,572 classes);
  'unit':   every column of norm 1, AdaFace's.
"""

from typing import Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from sface_jax.heads import common

Array = jax.Array
CENTER_INITS = ('normal', 'xavier', 'unit')


def center_initializer(kind: str, num_classes: int, padded_classes: int):
  """A Flax initialiser of (D, padded_classes) centres: `kind`'s for the first
  `num_classes` columns, zeros for the padding."""
  if kind not in CENTER_INITS:
    raise ValueError(f'config.head.center_init={kind!r}; choose one of {CENTER_INITS}')

  def init(key, shape, dtype=jnp.float32):
    dim = shape[0]
    if kind == 'xavier':
      centers = 2.0 * jnp.sqrt(2.0 / (dim + num_classes)) * jax.random.normal(
          key, (dim, num_classes), dtype)
    else:
      centers = 0.01 * jax.random.normal(key, (dim, num_classes), dtype)
      if kind == 'unit':
        centers = common.l2_normalize(centers, axis=0)
    return jnp.pad(centers, ((0, 0), (0, padded_classes - num_classes)))

  return init


class ClassCenters(nn.Module):
  """Owns W (embedding_dim, padded_classes) and, with `use_bias`, b (padded_classes,)."""
  num_classes: int
  embedding_dim: int
  use_bias: bool = False
  padded_classes: Optional[int] = None  # None: num_classes (no padding)
  center_init: str = 'normal'  # see the module docstring

  @nn.compact
  def __call__(self) -> Tuple[Array, Optional[Array]]:
    padded = self.padded_classes or self.num_classes
    class_centers = self.param('class_centers',
                               center_initializer(self.center_init, self.num_classes, padded),
                               (self.embedding_dim, padded), jnp.float32)
    bias = None
    if self.use_bias:
      bias = self.param('bias', nn.initializers.zeros, (padded,), jnp.float32)
    return class_centers, bias


def cosine_logits(embeddings: Array, class_centers: Array, *, precision=None) -> Array:
  """cos θ_ij = <x_i/‖x_i‖, W_j/‖W_j‖>: (B, D) × (D, C) → (B, C) float32.

  Both sides are cast to float32 and normalised before the product (the raw embedding may be
  bf16). A zero column (padding) gives cosines of 0. `precision` goes to `jnp.dot`.
  """
  x = common.l2_normalize(common.as_float32(embeddings), axis=-1)
  w = common.l2_normalize(common.as_float32(class_centers), axis=0)
  return jnp.dot(x, w, precision=precision, preferred_element_type=jnp.float32)
