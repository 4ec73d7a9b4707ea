"""Triplet loss (Schroff et al. 2015, FaceNet) with batch-hard online mining.

Embeddings are L2-normalised, distances squared: d_ij = ‖x̂_i − x̂_j‖² = 2 − 2·x̂_iᵀx̂_j
(no square root, so no NaN gradient for coinciding points). Each sample is an anchor; its
hardest positive is the farthest same-identity sample, its hardest negative the nearest
other-identity sample (the "batch hard" mining of Hermans et al. 2017, "In defense of the
triplet loss"):

  L = mean over valid anchors of max(0, max_{p: y_p = y_a, p ≠ a} d_ap
                                         − min_{n: y_n ≠ y_a} d_an + margin).

An anchor is valid when the batch holds at least one positive and one negative for it;
a batch with no valid anchor gives loss 0 (and zero gradient), never NaN. Batches must
be sampled as P identities × K images for this loss to see positives.
"""

from typing import Dict, Tuple

import jax
import jax.numpy as jnp

from sface_jax.heads import common

Array = jax.Array


def batch_hard_triplet_loss(embeddings: Array, labels: Array, *,
                            margin: float = 0.2) -> Tuple[Array, Dict[str, Array]]:
  """Returns (loss, metrics); metrics are float32 scalars without gradient.

  metrics: `valid_fraction` (anchors with a positive and a negative), `active_fraction`
  (valid anchors with a non-zero loss), `positive_distance` / `negative_distance` (mean
  hardest d_ap / d_an over valid anchors), `triplet_accuracy` (valid anchors whose hardest
  positive is nearer than their hardest negative).
  """
  x = common.l2_normalize(common.as_float32(embeddings), axis=-1)
  labels = jnp.asarray(labels).astype(jnp.int32)
  batch = x.shape[0]
  # Every anchor is compared with the whole batch: the second operand is gathered in full.
  everyone, everyone_labels = common.replicate(x), common.replicate(labels)
  distances = 2.0 - 2.0 * jnp.dot(x, everyone.T, preferred_element_type=jnp.float32)
  same = labels[:, None] == everyone_labels[None, :]
  not_self = ~jnp.eye(batch, dtype=bool)
  positive_mask = same & not_self
  negative_mask = ~same
  # Squared distances of unit vectors lie in [0, 4]: −1 and 5 are safe finite sentinels.
  hardest_positive = jnp.max(jnp.where(positive_mask, distances, -1.0), axis=-1)
  hardest_negative = jnp.min(jnp.where(negative_mask, distances, 5.0), axis=-1)
  valid = jnp.any(positive_mask, axis=-1) & jnp.any(negative_mask, axis=-1)
  per_anchor = jax.nn.relu(hardest_positive - hardest_negative + margin)
  num_valid = jnp.sum(valid.astype(jnp.float32))
  denominator = jnp.maximum(num_valid, 1.0)
  loss = jnp.sum(jnp.where(valid, per_anchor, 0.0)) / denominator

  def valid_mean(values):
    return jax.lax.stop_gradient(jnp.sum(jnp.where(valid, values, 0.0)) / denominator)

  metrics = {
      'valid_fraction': num_valid / batch,
      'active_fraction': valid_mean((per_anchor > 0.0).astype(jnp.float32)),
      'positive_distance': valid_mean(hardest_positive),
      'negative_distance': valid_mean(hardest_negative),
      'triplet_accuracy': valid_mean((hardest_positive < hardest_negative).astype(jnp.float32)),
  }
  return loss, metrics
