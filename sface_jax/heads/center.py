"""Center loss (Wen et al. 2016): softmax cross-entropy plus a pull towards running centres.

  L = CE(Wx + b) + (λ/2)·mean_i ‖x_i − c_{y_i}‖²

on the raw (un-normalised) embeddings. Wen et al. write both terms as sums over the
mini-batch, L_S + λ·L_C with L_C = ½Σ_i‖x_i − c_{y_i}‖²; dividing both by the batch size gives
the batch means used here, so λ keeps the paper's meaning (0.003–0.01) and does not have to be
re-tuned when the batch size changes.

The centres c_j (num_classes, embedding_dim) are state, not parameters: the loss sees them as
constants and they move by Wen et al.'s running-average rule with rate α,

  Δc_j = Σ_{i: y_i = j} (c_j − x_i) / (1 + n_j),   c_j ← c_j − α·Δc_j,

n_j the number of samples of class j in the batch (classes absent from the batch stay put).
They start at zero (a centre reaches its class mean within a few visits at α = 0.5).
"""

import jax
import jax.numpy as jnp

from sface_jax.heads import common

Array = jax.Array


def center_loss(embeddings: Array, labels: Array, centers: Array) -> Array:
  """½·mean_i ‖x_i − c_{y_i}‖² (float32 scalar; centres not differentiated)."""
  x = common.as_float32(embeddings)
  centers = jax.lax.stop_gradient(common.as_float32(centers))
  labels = jnp.asarray(labels).astype(jnp.int32)
  # c_{y_i}, laid out like x (explicit meshes ask for the output sharding of a gather).
  assigned = centers.at[labels].get(out_sharding=jax.typeof(x).sharding)
  return 0.5 * jnp.mean(jnp.sum(jnp.square(x - assigned), axis=-1))


def update_centers(embeddings: Array, labels: Array, centers: Array, *,
                   alpha: float = 0.5) -> Array:
  """c_j − α·Σ_{i:y_i=j}(c_j − x_i)/(1 + n_j) for every class j; (C, D) float32."""
  x = jax.lax.stop_gradient(common.as_float32(embeddings))
  centers = common.as_float32(centers)
  labels = jnp.asarray(labels).astype(jnp.int32)
  # Only the classes in the batch move, so the rule is applied sample by sample —
  # c_{y_i} −= α·(c_{y_i} − x_i)/(1 + n_{y_i}) summed over i by a scatter-add of B rows —
  # instead of over the whole (C, D) table. The (small) batch is gathered in full and each
  # device holding a slice of the centres adds the rows that fall into it.
  x, labels = common.replicate(x), common.replicate(labels)
  counts = jnp.sum((labels[:, None] == labels[None, :]).astype(jnp.float32), axis=1)
  assigned = centers.at[labels].get(out_sharding=jax.typeof(x).sharding)
  step = alpha * (assigned - x) / (1.0 + counts)[:, None]
  return centers.at[labels].add(-step, out_sharding=jax.typeof(centers).sharding)
