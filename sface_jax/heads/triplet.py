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

from typing import Dict, Optional, Tuple

import jax
import jax.numpy as jnp

from sface_jax.heads import common

Array = jax.Array


def batch_hard_triplet_loss(embeddings: Array, labels: Array, *, margin: float = 0.2,
                            candidates: Optional[Array] = None,
                            candidate_labels: Optional[Array] = None, anchor_offset=0,
                            axis_name: Optional[str] = None) -> Tuple[Array, Dict[str, Array]]:
  """Returns (loss, metrics); metrics are float32 scalars without gradient.

  The anchors are `embeddings`; their positives and negatives are mined among `candidates`
  (default: the anchors themselves). When the batch is split over devices, each device's
  anchors are its shard, the candidates the whole batch, `anchor_offset` the shard's first
  row in it, and `axis_name` adds the devices' sums.

  metrics: `valid_fraction` (anchors with a positive and a negative), `active_fraction`
  (valid anchors with a non-zero loss), `positive_distance` / `negative_distance` (mean
  hardest d_ap / d_an over valid anchors), `triplet_accuracy` (valid anchors whose hardest
  positive is nearer than their hardest negative).
  """
  x = common.l2_normalize(common.as_float32(embeddings), axis=-1)
  labels = jnp.asarray(labels).astype(jnp.int32)
  if candidates is None:
    everyone, everyone_labels = x, labels
  else:
    everyone = common.l2_normalize(common.as_float32(candidates), axis=-1)
    everyone_labels = jnp.asarray(candidate_labels).astype(jnp.int32)
  distances = 2.0 - 2.0 * jnp.dot(x, everyone.T, preferred_element_type=jnp.float32)
  same = labels[:, None] == everyone_labels[None, :]
  rows = jnp.arange(x.shape[0])[:, None] + anchor_offset
  not_self = rows != jnp.arange(everyone.shape[0])[None, :]
  positive_mask = same & not_self
  negative_mask = ~same
  # Squared distances of unit vectors lie in [0, 4]: −1 and 5 are safe finite sentinels.
  hardest_positive = jnp.max(jnp.where(positive_mask, distances, -1.0), axis=-1)
  hardest_negative = jnp.min(jnp.where(negative_mask, distances, 5.0), axis=-1)
  valid = jnp.any(positive_mask, axis=-1) & jnp.any(negative_mask, axis=-1)
  per_anchor = jax.nn.relu(hardest_positive - hardest_negative + margin)
  total = lambda values: common.device_sum(jnp.sum(jnp.where(valid, values, 0.0)), axis_name)
  num_valid = total(jnp.ones_like(per_anchor))
  denominator = jnp.maximum(num_valid, 1.0)
  loss = total(per_anchor) / denominator

  def valid_mean(values):
    return jax.lax.stop_gradient(total(values) / denominator)

  metrics = {
      'valid_fraction': num_valid / everyone.shape[0],
      'active_fraction': valid_mean((per_anchor > 0.0).astype(jnp.float32)),
      'positive_distance': valid_mean(hardest_positive),
      'negative_distance': valid_mean(hardest_negative),
      'triplet_accuracy': valid_mean((hardest_positive < hardest_negative).astype(jnp.float32)),
  }
  return loss, metrics
