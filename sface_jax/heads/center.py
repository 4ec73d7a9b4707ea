"""Center loss (Wen et al. 2016): softmax cross-entropy plus a pull towards running centres.

  L = CE(Wx + b) + (λ/2)·mean_i ‖x_i − c_{y_i}‖²

on the raw (un-normalised) embeddings. Wen et al. write both terms as sums over the
mini-batch, L_S + λ·L_C with L_C = ½Σ_i‖x_i − c_{y_i}‖²; dividing both by the batch size gives
the batch means used here, so λ keeps the paper's meaning (0.003–0.01) and does not have to be
re-tuned when the batch size changes. Wen et al.'s own Caffe code (caffe-face's center loss
layer) divides by the batch size as well, so our λ is theirs. KaiyangZhou's popular PyTorch
`CenterLoss` computes mean_i ‖x_i − c_{y_i}‖² without the ½ (twice ours) and moves the
centres by SGD on that loss instead of by the rule below: its λ must be half of ours for the
same pull on the embeddings.

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


def center_loss(embeddings: Array, labels: Array, centers: Array, *,
                axis_name: str | None = None) -> Array:
  """½·mean_i ‖x_i − c_{y_i}‖² (float32 scalar; centres not differentiated).

  `centers` may be a block of the rows, with `labels` block labels (−1 where the row lives
  on another device): each block adds its own samples' terms, `axis_name` the blocks.
  """
  x = common.as_float32(embeddings)
  centers = jax.lax.stop_gradient(common.as_float32(centers))
  labels = jnp.asarray(labels).astype(jnp.int32)
  assigned = centers[jnp.clip(labels, 0, centers.shape[0] - 1)]
  squared = jnp.where(common.in_block(labels, centers.shape[0]),
                      jnp.sum(jnp.square(x - assigned), axis=-1), 0.0)
  return 0.5 * common.device_sum(jnp.sum(squared), axis_name) / x.shape[0]


def update_centers(embeddings: Array, labels: Array, centers: Array, *,
                   alpha: float = 0.5) -> Array:
  """c_j − α·Σ_{i:y_i=j}(c_j − x_i)/(1 + n_j) for every class j of `centers`; float32.

  Only the classes in the batch move, so the rule is applied sample by sample,
  c_{y_i} −= α·(c_{y_i} − x_i)/(1 + n_{y_i}) summed over i by a scatter-add of B rows,
  rather than over the whole (C, D) table. With a block of the rows (block labels), each
  device moves its own rows; `embeddings` and `labels` are the whole batch.
  """
  x = jax.lax.stop_gradient(common.as_float32(embeddings))
  centers = common.as_float32(centers)
  labels = jnp.asarray(labels).astype(jnp.int32)
  owned = common.in_block(labels, centers.shape[0])
  rows = jnp.clip(labels, 0, centers.shape[0] - 1)
  counts = jnp.sum((labels[:, None] == labels[None, :]).astype(jnp.float32), axis=1)
  step = alpha * (centers[rows] - x) / (1.0 + counts)[:, None]
  return centers.at[rows].add(jnp.where(owned[:, None], -step, 0.0))
