"""Plain softmax logits (W x + b) and the cross-entropy every softmax-type head uses.

Softmax: logit_j = W_jᵀ x + b_j on the raw embedding, no normalisation (the baseline of Wen
et al. 2016 and of Liu et al. 2017). The cross-entropy is the batch mean of
logsumexp_j(logit_j) − logit_y, in float32, over every class: when the classes are split over
devices, the normaliser is a distributed log-sum-exp (the max and the sum of exponentials
reduced across the blocks) and the target logit comes from the block that holds it.
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


def logsumexp(logits: Array, axis_name: Optional[str] = None) -> Array:
  """log Σ_j e^{z_ij} over the class blocks of all devices: (B, C_block) → (B,).

  m_i = max over all blocks (a `pmax` of the blocks' maxima, not differentiated), then
  log Σ_blocks Σ_j e^{z_ij − m_i} + m_i. −inf entries (masked columns) contribute nothing.
  """
  if axis_name is None:
    return jax.nn.logsumexp(logits, axis=-1)
  block_max = jax.lax.stop_gradient(jnp.max(logits, axis=-1))
  shift = jax.lax.pmax(block_max, axis_name)
  total = jax.lax.psum(jnp.sum(jnp.exp(logits - shift[:, None]), axis=-1), axis_name)
  return jnp.log(total) + shift


def cross_entropy(logits: Array, labels: Array, *, target_logits: Optional[Array] = None,
                  valid: Optional[Array] = None, axis_name: Optional[str] = None) -> Array:
  """Batch-mean softmax cross-entropy, mean_i [logsumexp_j z_ij − z_iy], float32 scalar.

  Args:
    logits: (B, C_block) this block's logits.
    labels: (B,) block labels (`common.take_target`: −1 where the class is elsewhere).
    target_logits: z_iy (B,) when the caller wrote it into `logits` and has it already (the
      margin heads), which saves reading it back and that read's scatter in the backward
      pass; entries of samples whose class is not in this block are ignored.
    valid: (C_block,) bool, False for columns that are not real classes (padding).
    axis_name: the mesh axis the classes are split over (None: all classes here).
  """
  logits = common.as_float32(logits)
  if target_logits is None:
    target_logits = common.take_target(logits, labels)
  else:
    target_logits = jnp.where(common.in_block(labels, logits.shape[-1]),
                              common.as_float32(target_logits), 0.0)
  target_logits = common.device_sum(target_logits, axis_name)
  normaliser = logsumexp(common.mask_invalid(logits, valid, -jnp.inf), axis_name)
  return jnp.mean(normaliser - target_logits)
