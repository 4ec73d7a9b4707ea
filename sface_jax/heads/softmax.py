"""Plain softmax logits (W x + b) and the cross-entropy every softmax-type head uses.

Softmax: logit_j = W_jᵀ x + b_j on the raw embedding, no normalisation (the baseline of Wen
et al. 2016 and of Liu et al. 2017). The cross-entropy is the batch mean of
logsumexp_j(logit_j) − logit_y, in float32.
"""

from typing import Optional

import jax
import jax.numpy as jnp

from sface_jax.heads import common

Array = jax.Array


def linear_logits(embeddings: Array, class_centers: Array,
                  bias: Optional[Array] = None) -> Array:
  """xᵀW + b: (B, D) × (D, C) (+ (C,)) → (B, C) float32."""
  logits = jnp.dot(common.as_float32(embeddings), common.as_float32(class_centers),
                   preferred_element_type=jnp.float32)
  if bias is not None:
    logits = logits + common.as_float32(bias)
  return logits


def cross_entropy(logits: Array, labels: Array, *,
                  target_logits: Optional[Array] = None) -> Array:
  """Batch-mean softmax cross-entropy, mean_i [logsumexp_j z_ij − z_iy], float32 scalar.

  The target logit z_iy is read from `logits` (a gather, or a masked row sum when the class
  axis is explicitly sharded: `common.take_target`) unless the caller, who wrote it there,
  passes it as `target_logits` (B,): the margin heads do, which saves reading it back and
  the scatter that reading costs in the backward pass (−30% of a margin head on XLA:CPU).
  `target_logits` must equal logits[i, labels[i]].
  """
  logits = common.as_float32(logits)
  if target_logits is None:
    target_logits = common.take_target(logits, labels)
  per_sample = jax.nn.logsumexp(logits, axis=-1) - common.as_float32(target_logits)
  return jnp.mean(per_sample)
