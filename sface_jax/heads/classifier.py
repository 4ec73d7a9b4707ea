"""The class-centre matrix (the only parameters a head has) and cosine logits.

`ClassCenters` owns `class_centers` of shape (embedding_dim, num_classes) — class axis last,
so the sharding rule that matches the name `class_centers` splits classes over the `model`
mesh axis — and, for plain softmax and center loss, a `bias` of shape (num_classes,).
Everything computed from them (cosines, margins, losses) is a pure function elsewhere.
"""

from typing import Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from sface_jax.heads import common

Array = jax.Array


class ClassCenters(nn.Module):
  """Owns W (embedding_dim, num_classes) and, with `use_bias`, b (num_classes,); float32.

  W is initialised N(0, 0.01²), as insightface's Partial FC does; the scale does not matter
  for normalised heads, and keeps plain-softmax logits small at the start.
  """
  num_classes: int
  embedding_dim: int
  use_bias: bool = False

  @nn.compact
  def __call__(self) -> Tuple[Array, Optional[Array]]:
    class_centers = self.param('class_centers', nn.initializers.normal(stddev=0.01),
                               (self.embedding_dim, self.num_classes), jnp.float32)
    bias = None
    if self.use_bias:
      bias = self.param('bias', nn.initializers.zeros, (self.num_classes,), jnp.float32)
    return class_centers, bias


def cosine_logits(embeddings: Array, class_centers: Array, *, precision=None) -> Array:
  """cos θ_ij = <x_i/‖x_i‖, W_j/‖W_j‖>: (B, D) × (D, C) → (B, C) float32.

  Both sides are cast to float32 and normalised before the product (the raw embedding may be
  bf16). `precision` goes to `jnp.dot` (None: the backend's default for float32).
  """
  x = common.l2_normalize(common.as_float32(embeddings), axis=-1)
  w = common.l2_normalize(common.as_float32(class_centers), axis=0)
  return jnp.dot(x, w, precision=precision, preferred_element_type=jnp.float32)
