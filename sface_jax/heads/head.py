"""`get_head(config.head) -> Head`: one loss, chosen by name, behind one calling convention.

  head = get_head(config.head)
  state = head.init_state(num_classes, embedding_dim)      # {} when the head has none
  loss, new_state, metrics = head.loss(embeddings, labels, class_centers, bias, state, step)

`embeddings` are the raw backbone embeddings (B, D), any float dtype (cast to float32 here);
`class_centers` (D, C) and `bias` (C,) come from `ClassCenters` (None when the head does not
use them); `labels` (B,) int; `step` an int32 scalar (SphereFace's λ schedule). The loss is a
float32 scalar to differentiate; `new_state` is computed without gradient by the head's own
rule (AdaFace running norm statistics, center-loss centres) and replaces `state` after the
step; `metrics` are float32 scalars for logging: `theta_target` (batch-mean θ_y in degrees)
and `theta_nearest_negative` (batch-mean min_{j≠y} θ_j) where the head has class centres,
`accuracy` (train top-1 of the argmax of cos θ, or of the logits for plain softmax),
`xnorm` (batch-mean ‖x‖, insightface's XNorm), and the head's own numbers.

All hyper-parameters are read here, once, into Python numbers, so the returned functions
close over constants and jit with the config static.
"""

import dataclasses
from typing import Any, Callable, Dict, Tuple

import jax
import jax.numpy as jnp

from sface_jax.heads import adaface as adaface_lib
from sface_jax.heads import center as center_lib
from sface_jax.heads import common
from sface_jax.heads import margin as margin_lib
from sface_jax.heads import sface as sface_lib
from sface_jax.heads import softmax as softmax_lib
from sface_jax.heads import sphereface as sphereface_lib
from sface_jax.heads import triplet as triplet_lib
from sface_jax.heads.classifier import cosine_logits

Array = jax.Array
Metrics = Dict[str, Array]
LossFn = Callable[[Array, Array, Any, Any, Any, Array], Tuple[Array, Any, Metrics]]

HEAD_NAMES = ('softmax', 'normface', 'sphereface', 'cosface', 'arcface', 'combined', 'sface',
              'quality_sface', 'adaface', 'center', 'triplet')


@dataclasses.dataclass(frozen=True)
class Head:
  """A loss and what it needs: see the module docstring for the calling convention."""
  name: str
  uses_classifier: bool
  uses_bias: bool
  init_state: Callable[[int, int], Any]
  loss: LossFn


def _no_state(num_classes: int, embedding_dim: int) -> Dict[str, Array]:
  del num_classes, embedding_dim
  return {}


def _norm_stats_state(num_classes: int, embedding_dim: int) -> Dict[str, Array]:
  del num_classes, embedding_dim
  return adaface_lib.init_norm_stats()


def _center_state(num_classes: int, embedding_dim: int) -> Dict[str, Array]:
  return {'centers': jnp.zeros((num_classes, embedding_dim), jnp.float32)}


def _base_metrics(x: Array) -> Metrics:
  return {'xnorm': jnp.mean(common.row_norms(jax.lax.stop_gradient(x)))}


def _cosine_metrics(x: Array, cos_theta: Array, labels: Array) -> Metrics:
  metrics = _base_metrics(x)
  metrics.update(common.angle_stats(cos_theta, labels))
  metrics['accuracy'] = common.accuracy(jax.lax.stop_gradient(cos_theta), labels)
  return metrics


def _softmax_theta_target(x: Array, raw_logits: Array, class_centers: Array,
                          labels: Array) -> Array:
  """θ_y = arccos(x·W_y / (‖x‖‖W_y‖)) from the bias-free logits, batch mean in degrees.

  Masks, not gathers, so that the class axis may be sharded.
  """
  x, raw_logits = jax.lax.stop_gradient(x), jax.lax.stop_gradient(raw_logits)
  mask = common.target_mask(labels, raw_logits.shape[-1])
  column_norms = common.row_norms(jax.lax.stop_gradient(common.as_float32(class_centers)).T)
  denominator = common.row_norms(x) * common.target_values(column_norms[None, :], mask)
  cos_target = common.target_values(raw_logits, mask) / jnp.maximum(denominator, 1e-12)
  return jnp.degrees(jnp.mean(jnp.arccos(common.clip_unit(cos_target))))


def _margin_loss(scale, m1, m2, m3, easy_margin, insightface_grad) -> LossFn:
  def loss(embeddings, labels, class_centers, bias, state, step):
    del bias, step
    x = common.as_float32(embeddings)
    cos_theta = cosine_logits(x, class_centers)
    logits, target = margin_lib.margin_logits_with_target(
        cos_theta, labels, scale=scale, m1=m1, m2=m2, m3=m3, easy_margin=easy_margin,
        insightface_grad=insightface_grad)
    return (softmax_lib.cross_entropy(logits, labels, target_logits=target), state,
            _cosine_metrics(x, cos_theta, labels))
  return loss


def _softmax_loss(with_centers: bool = False, center_weight: float = 0.0,
                  center_alpha: float = 0.0) -> LossFn:
  def loss(embeddings, labels, class_centers, bias, state, step):
    del step
    x = common.as_float32(embeddings)
    labels = jnp.asarray(labels).astype(jnp.int32)
    raw_logits = softmax_lib.linear_logits(x, class_centers)
    logits = raw_logits + common.as_float32(bias)
    value = softmax_lib.cross_entropy(logits, labels)
    metrics = _base_metrics(x)
    metrics['accuracy'] = common.accuracy(jax.lax.stop_gradient(logits), labels)
    metrics['theta_target'] = _softmax_theta_target(x, raw_logits, class_centers, labels)
    if with_centers:
      centers = state['centers']
      pull = center_lib.center_loss(x, labels, centers)
      metrics['cross_entropy'] = jax.lax.stop_gradient(value)
      metrics['center_loss'] = jax.lax.stop_gradient(pull)
      value = value + center_weight * pull
      state = {'centers': center_lib.update_centers(x, labels, centers, alpha=center_alpha)}
    return value, state, metrics
  return loss


def _sphereface_loss(m, base, gamma, power, lambda_min) -> LossFn:
  def loss(embeddings, labels, class_centers, bias, state, step):
    del bias
    x = common.as_float32(embeddings)
    cos_theta = cosine_logits(x, class_centers)
    lambda_ = sphereface_lib.sphereface_lambda(step, base=base, gamma=gamma, power=power,
                                               lambda_min=lambda_min)
    logits, target = sphereface_lib.sphereface_logits_with_target(
        cos_theta, common.row_norms(x), labels, m=m, lambda_=lambda_)
    metrics = _cosine_metrics(x, cos_theta, labels)
    metrics['lambda'] = lambda_
    return softmax_lib.cross_entropy(logits, labels, target_logits=target), state, metrics
  return loss


def _sface_loss(scale, k, a, b, shift=None, h=None, momentum=None) -> LossFn:
  quality_aware = shift is not None

  def loss(embeddings, labels, class_centers, bias, state, step):
    del bias, step
    x = common.as_float32(embeddings)
    cos_theta = cosine_logits(x, class_centers)
    metrics = _cosine_metrics(x, cos_theta, labels)
    quality = None
    if quality_aware:
      norms = common.row_norms(x)
      state = adaface_lib.update_norm_stats(norms, state, momentum=momentum)
      quality = adaface_lib.norm_quality(norms, state, h=h)
      metrics.update(state)
      metrics['quality'] = jnp.mean(quality)
    intra, inter = sface_lib.sface_loss_terms(cos_theta, labels, scale=scale, k=k, a=a, b=b,
                                              quality=quality,
                                              shift=shift if quality_aware else 0.0)
    metrics['intra_loss'] = jax.lax.stop_gradient(intra)
    metrics['inter_loss'] = jax.lax.stop_gradient(inter)
    return intra + inter, state, metrics
  return loss


def _adaface_loss(scale, m, h, momentum) -> LossFn:
  def loss(embeddings, labels, class_centers, bias, state, step):
    del bias, step
    x = common.as_float32(embeddings)
    cos_theta = cosine_logits(x, class_centers)
    norms = common.row_norms(x)
    state = adaface_lib.update_norm_stats(norms, state, momentum=momentum)
    quality = adaface_lib.norm_quality(norms, state, h=h)
    logits, target = adaface_lib.adaface_logits_with_target(cos_theta, labels, quality,
                                                            scale=scale, m=m)
    metrics = _cosine_metrics(x, cos_theta, labels)
    metrics.update(state)
    metrics['quality'] = jnp.mean(quality)
    return softmax_lib.cross_entropy(logits, labels, target_logits=target), state, metrics
  return loss


def _triplet_loss(margin) -> LossFn:
  def loss(embeddings, labels, class_centers, bias, state, step):
    del class_centers, bias, step
    x = common.as_float32(embeddings)
    value, metrics = triplet_lib.batch_hard_triplet_loss(x, labels, margin=margin)
    metrics.update(_base_metrics(x))
    return value, state, metrics
  return loss


def get_head(head_config) -> Head:
  """Builds the head named `head_config.name` from `config.head` (configs/base.py).

  Each head reads `head_config.scale` (where it has a scale) and its own sub-dict
  `head_config.<name>`; NormFace has no sub-dict (only the scale).
  """
  name = head_config.name
  scale = float(head_config.scale)
  if name == 'softmax':
    return Head(name, True, True, _no_state, _softmax_loss())
  if name == 'normface':
    return Head(name, True, False, _no_state,
                _margin_loss(scale, 1.0, 0.0, 0.0, False, False))
  if name == 'cosface':
    c = head_config.cosface
    return Head(name, True, False, _no_state,
                _margin_loss(scale, 1.0, 0.0, float(c.m), False, False))
  if name == 'arcface':
    c = head_config.arcface
    return Head(name, True, False, _no_state,
                _margin_loss(scale, 1.0, float(c.m), 0.0, bool(c.easy_margin),
                             bool(c.insightface_grad)))
  if name == 'combined':
    c = head_config.combined
    return Head(name, True, False, _no_state,
                _margin_loss(scale, float(c.m1), float(c.m2), float(c.m3), False, False))
  if name == 'sphereface':
    c = head_config.sphereface
    return Head(name, True, False, _no_state,
                _sphereface_loss(int(c.m), float(c.base), float(c.gamma), float(c.power),
                                 float(c.lambda_min)))
  if name == 'sface':
    c = head_config.sface
    return Head(name, True, False, _no_state,
                _sface_loss(scale, float(c.k), float(c.a), float(c.b)))
  if name == 'quality_sface':
    c = head_config.quality_sface
    return Head(name, True, False, _norm_stats_state,
                _sface_loss(scale, float(c.k), float(c.a), float(c.b), shift=float(c.shift),
                            h=float(c.h), momentum=float(c.momentum)))
  if name == 'adaface':
    c = head_config.adaface
    return Head(name, True, False, _norm_stats_state,
                _adaface_loss(scale, float(c.m), float(c.h), float(c.momentum)))
  if name == 'center':
    c = head_config.center
    return Head(name, True, True, _center_state,
                _softmax_loss(with_centers=True, center_weight=float(c.weight),
                              center_alpha=float(c.alpha)))
  if name == 'triplet':
    c = head_config.triplet
    return Head(name, False, False, _no_state, _triplet_loss(float(c.margin)))
  raise ValueError(f'config.head.name={name!r} is not a head; choose one of {HEAD_NAMES}')
