"""Partial FC (An et al., "Partial FC", ICCVW 2021 / "Killing two birds with one stone",
CVPR 2022): each step, each device computes its loss on a sample of its class centres.

A device holding C_block centres keeps K = min(C_block, max(⌈r·C_block⌉, B)) of them: every
class of the (global) batch it owns (the positives), then real classes drawn uniformly without
replacement up to K. K is fixed, so the step has static shapes under `jit`; the floor of B
guarantees room for every positive (insightface's partial_fc_v2 would then keep more than
⌈r·C_block⌉; we keep exactly K). The loss sees only the sampled columns: the softmax
normaliser runs over the positives and the sampled negatives, and unsampled centres get a
zero gradient. r = 1 keeps every column (no sampling at all).

What happens to the unsampled centres' optimiser state is the optimiser's business: with
our optax SGD the momentum buffer and weight decay keep moving every centre each step, as in
insightface's partial_fc_v2 (v1 updated only the sampled rows).
"""

import math

import jax
import jax.numpy as jnp

from sface_jax.heads import common

Array = jax.Array


def num_sampled(block_classes: int, sample_rate: float, batch_size: int) -> int:
  """K, the centres each device keeps per step (module docstring)."""
  if not 0.0 < sample_rate <= 1.0:
    raise ValueError(f'config.head.sample_rate={sample_rate}: expected a fraction in (0, 1]')
  return min(block_classes, max(math.ceil(sample_rate * block_classes), batch_size))


def sample_columns(block_labels: Array, valid: Array, num_keep: int, key: Array) -> Array:
  """(num_keep,) sorted column indices: every positive, then random real classes.

  block_labels: (B,) the batch's block labels (−1: the class is on another device).
  valid: (C_block,) bool, False for padding columns.
  """
  num_columns = valid.shape[0]
  owned = common.in_block(block_labels, num_columns)
  positive = jnp.zeros(num_columns, bool).at[jnp.clip(block_labels, 0, num_columns - 1)].max(
      owned)
  scores = jax.random.uniform(key, (num_columns,))
  scores = jnp.where(positive, 2.0, jnp.where(valid, scores, -1.0))
  _, index = jax.lax.top_k(scores, num_keep)
  return jnp.sort(index)


def relabel(block_labels: Array, columns: Array) -> Array:
  """Block labels → positions in the sorted `columns` (−1 where not sampled or not here)."""
  position = jnp.clip(jnp.searchsorted(columns, block_labels), 0, columns.shape[0] - 1)
  return jnp.where(columns[position] == block_labels, position, -1).astype(jnp.int32)
