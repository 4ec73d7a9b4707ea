"""`get_head(config.head) -> Head`: one loss, chosen by name, behind one calling convention.

  head = get_head(config.head)
  state = head.init_state(padded_classes, embedding_dim)    # {} when the head has none
  inputs = head_inputs(embeddings, labels, params['classifier'], ...)
  loss, new_state, metrics = head.loss(inputs, state, step)

A head runs on every device at once (`sharding.shard_head` wraps it in `jax.shard_map`; with
one device, everything below is simply whole). On each device, `HeadInputs` holds that
device's shard of the batch, the whole batch (all-gathered: every device scores every sample
against its own classes), its block of the class centres (C/n columns, or Partial FC's
sample of them), and the step's key `rng`, the same on every device (a head that needs
per-sample randomness, ElasticFace, draws it for the whole batch from that key, so every
device draws the same numbers whatever the device count). Heads reduce over the classes with
`axis_name` (a distributed log-sum-exp, summed SFace terms, ...), so the loss and the
metrics come out the same on every device and equal to the one-device computation. The
all-gather's transpose, in the backward pass, sums each sample's embedding gradient from
every device's classes back onto the device that owns the sample (a reduce-scatter).

`loss` returns a float32 scalar to differentiate; `new_state` is computed without gradient
by the head's own rule (AdaFace running norm statistics, center-loss centres,
CurricularFace's t) and replaces `state` after the step; `metrics` are float32 scalars for
logging: `xnorm` (batch-mean ‖x‖, insightface's XNorm), and where the head has class centres
`theta_target` (batch-mean θ_y in degrees), `theta_nearest_negative` and `accuracy` (train
top-1; under Partial FC among the sampled classes), plus the head's own numbers.

The table `HEADS` builds each head from its config with keyword arguments, reading every
hyper-parameter once into Python numbers, so the loss functions close over constants and jit
with the config static.
"""

import dataclasses
from typing import Any, Callable, Dict, Optional, Tuple

import jax
import jax.numpy as jnp

from sface_jax.heads import adaface as adaface_lib
from sface_jax.heads import center as center_lib
from sface_jax.heads import common
from sface_jax.heads import curricularface as curricular_lib
from sface_jax.heads import elasticface as elastic_lib
from sface_jax.heads import lsoftmax as lsoftmax_lib
from sface_jax.heads import magface as magface_lib
from sface_jax.heads import margin as margin_lib
from sface_jax.heads import partial_fc
from sface_jax.heads import sface as sface_lib
from sface_jax.heads import softmax as softmax_lib
from sface_jax.heads import sphereface as sphereface_lib
from sface_jax.heads import triplet as triplet_lib
from sface_jax.heads.classifier import cosine_logits

Array = jax.Array
Metrics = Dict[str, Array]


@dataclasses.dataclass(frozen=True)
class HeadInputs:
  """What a head sees on one device (see the module docstring)."""
  embeddings: Array  # (b, D) float32: this device's shard of the batch, b = B / devices
  labels: Array  # (b,) int32
  all_embeddings: Array  # (B, D) float32: the whole batch
  all_labels: Array  # (B,) int32
  batch_offset: Any  # row of `embeddings[0]` in the whole batch
  class_centers: Optional[Array]  # (D, K): the columns this device scores against
  bias: Optional[Array]  # (K,)
  block_labels: Optional[Array]  # (B,): each sample's column among them, −1 elsewhere
  valid: Optional[Array]  # (K,) bool: a real class (not padding)
  row_labels: Optional[Array]  # (B,): each sample's row among this device's classes (per-
  #                              class state such as center-loss centres), −1 elsewhere
  axis_name: Optional[str]  # the mesh axis of the devices (None: one device)
  rng: Optional[Array] = None  # the step's key, the same on every device (ElasticFace's draw)


LossFn = Callable[[HeadInputs, Any, Array], Tuple[Array, Any, Metrics]]


@dataclasses.dataclass(frozen=True)
class Head:
  """A loss and what it needs: see the module docstring for the calling convention."""
  loss: LossFn
  name: str = ''
  uses_classifier: bool = True
  uses_bias: bool = False
  init_state: Callable[[int, int], Any] = lambda padded_classes, embedding_dim: {}


def head_inputs(embeddings: Array, labels: Array, classifier: Dict[str, Array], *,
                num_classes: int, sample_rate: float, rng: Array,
                axis_name: Optional[str]) -> HeadInputs:
  """Gathers the batch, finds this device's block of classes and samples it (Partial FC).

  embeddings, labels: this device's shard of the batch. classifier: this device's block of
  `params['classifier']` (`class_centers` (D, C_block), maybe `bias`), {} for heads
  without one. rng: a key shared by all devices (each folds in its index to sample).
  """
  x = common.as_float32(embeddings)
  labels = jnp.asarray(labels).astype(jnp.int32)
  if axis_name is None:
    device, all_x, all_labels = 0, x, labels
  else:
    device = jax.lax.axis_index(axis_name)
    all_x = jax.lax.all_gather(x, axis_name, tiled=True)
    all_labels = jax.lax.all_gather(labels, axis_name, tiled=True)
  inputs = dict(embeddings=x, labels=labels, all_embeddings=all_x, all_labels=all_labels,
                batch_offset=device * x.shape[0], axis_name=axis_name, class_centers=None,
                bias=None, block_labels=None, valid=None, row_labels=None, rng=rng)
  centers = classifier.get('class_centers')
  if centers is None:
    return HeadInputs(**inputs)
  bias = classifier.get('bias')
  block_classes = centers.shape[1]
  first = device * block_classes
  mine = (all_labels >= first) & (all_labels < first + block_classes)
  row_labels = jnp.where(mine, all_labels - first, -1)
  valid = first + jnp.arange(block_classes) < num_classes
  block_labels = row_labels
  if sample_rate < 1.0:
    keep = partial_fc.num_sampled(block_classes, sample_rate, all_x.shape[0])
    columns = partial_fc.sample_columns(row_labels, valid, keep,
                                        jax.random.fold_in(rng, device))
    centers, valid = centers[:, columns], valid[columns]
    bias = None if bias is None else bias[columns]
    block_labels = partial_fc.relabel(row_labels, columns)
  inputs.update(class_centers=centers, bias=bias, block_labels=block_labels, valid=valid,
                row_labels=row_labels)
  return HeadInputs(**inputs)


# ---- metrics ------------------------------------------------------------------------------


def _batch_mean(values: Array, inputs: HeadInputs) -> Array:
  """Mean over the whole batch of per-sample values of this device's shard (no gradient)."""
  total = common.device_sum(jnp.sum(jax.lax.stop_gradient(values)), inputs.axis_name)
  return total / inputs.all_embeddings.shape[0]


def _base_metrics(inputs: HeadInputs) -> Metrics:
  return {'xnorm': _batch_mean(common.row_norms(inputs.embeddings), inputs)}


def _sample_sum(values: Array, inputs: HeadInputs) -> Array:
  """Σ over the whole batch of per-sample values of this device's shard, *with* gradient:
  each sample is counted once, on the device that owns it (MagFace's regulariser)."""
  return common.device_sum(jnp.sum(values), inputs.axis_name)


def _every_target_cosine(inputs: HeadInputs, cos_theta: Array) -> Array:
  """cos θ_y (B,) of every sample of the batch on every device, no gradient: the block that
  holds the class reads it, the others read 0, and a psum adds them."""
  cos_theta = jax.lax.stop_gradient(common.clip_unit(cos_theta))
  return common.device_sum(common.take_target(cos_theta, inputs.block_labels),
                           inputs.axis_name)


def _cosine_metrics(inputs: HeadInputs, cos_theta: Array) -> Metrics:
  metrics = _base_metrics(inputs)
  metrics.update(common.angle_stats(cos_theta, inputs.block_labels, valid=inputs.valid,
                                    axis_name=inputs.axis_name))
  metrics['accuracy'] = common.accuracy(cos_theta, inputs.block_labels, valid=inputs.valid,
                                        axis_name=inputs.axis_name)
  return metrics


def _norm_quality(inputs: HeadInputs, state, step, momentum: float, h: float,
                  first_batch_stats: bool):
  """AdaFace's running norm statistics, updated with the global batch, and ẑ of every sample.

  With `first_batch_stats`, the first step (step 0) sets the statistics to its batch's own
  mean and std instead of moving 20 and 100 by `momentum`: otherwise σ keeps ≈ 100·(1 −
  momentum)^step of its arbitrary start (still ~5 after 300 steps at 0.01), so |ẑ| stays near
  0 and the quality signal is off for most of a short run. Off by default for AdaFace, whose
  official code starts from 20 and 100.
  """
  if first_batch_stats:
    momentum = jnp.where(step == 0, 1.0, momentum)
  state = adaface_lib.update_norm_stats(common.row_norms(inputs.embeddings), state,
                                        momentum=momentum, axis_name=inputs.axis_name)
  quality = adaface_lib.norm_quality(common.row_norms(inputs.all_embeddings), state, h=h)
  own_quality = adaface_lib.norm_quality(common.row_norms(inputs.embeddings), state, h=h)
  return state, quality, {**state, 'quality': _batch_mean(own_quality, inputs)}


# ---- the losses ---------------------------------------------------------------------------


def _margin_loss(scale, m1=1.0, m2=0.0, m3=0.0, easy_margin=False,
                 insightface_grad=False) -> LossFn:
  margins = dict(scale=float(scale), m1=float(m1), m2=float(m2), m3=float(m3),
                 easy_margin=bool(easy_margin), insightface_grad=bool(insightface_grad))

  def loss(inputs, state, step):
    del step
    cos_theta = cosine_logits(inputs.all_embeddings, inputs.class_centers)
    logits, target = margin_lib.margin_logits_with_target(cos_theta, inputs.block_labels,
                                                          **margins)
    value = softmax_lib.cross_entropy(logits, inputs.block_labels, target_logits=target,
                                      valid=inputs.valid, axis_name=inputs.axis_name)
    return value, state, _cosine_metrics(inputs, cos_theta)
  return loss


def _softmax_theta_target(inputs: HeadInputs, raw_logits: Array) -> Array:
  """θ_y = arccos(x·W_y / (‖x‖‖W_y‖)) from the bias-free logits, batch mean in degrees."""
  labels = inputs.block_labels
  raw_logits = jax.lax.stop_gradient(raw_logits)
  centers = jax.lax.stop_gradient(inputs.class_centers)
  column_norms = common.row_norms(centers.T)[jnp.clip(labels, 0, centers.shape[1] - 1)]
  denominator = common.row_norms(jax.lax.stop_gradient(inputs.all_embeddings)) * column_norms
  cos_target = common.take_target(raw_logits, labels) / jnp.maximum(denominator, 1e-12)
  cos_target = common.device_sum(cos_target, inputs.axis_name)
  return jnp.degrees(jnp.mean(jnp.arccos(common.clip_unit(cos_target))))


def _softmax_loss(weight=0.0, alpha=0.0, with_centers=False) -> LossFn:
  """Plain softmax; with `with_centers`, center loss (weight λ, centre rate α) on top."""
  weight, alpha = float(weight), float(alpha)

  def loss(inputs, state, step):
    del step
    raw_logits = softmax_lib.linear_logits(inputs.all_embeddings, inputs.class_centers)
    logits = raw_logits + common.as_float32(inputs.bias)
    value = softmax_lib.cross_entropy(logits, inputs.block_labels, valid=inputs.valid,
                                      axis_name=inputs.axis_name)
    metrics = _base_metrics(inputs)
    metrics['accuracy'] = common.accuracy(logits, inputs.block_labels, valid=inputs.valid,
                                          axis_name=inputs.axis_name)
    metrics['theta_target'] = _softmax_theta_target(inputs, raw_logits)
    if with_centers:
      centers = state['centers']
      pull = center_lib.center_loss(inputs.all_embeddings, inputs.row_labels, centers,
                                    axis_name=inputs.axis_name)
      metrics['cross_entropy'] = jax.lax.stop_gradient(value)
      metrics['center_loss'] = jax.lax.stop_gradient(pull)
      value = value + weight * pull
      state = {'centers': center_lib.update_centers(inputs.all_embeddings, inputs.row_labels,
                                                    centers, alpha=alpha)}
    return value, state, metrics
  return loss


def _lsoftmax_loss(m, base, gamma, power, lambda_min) -> LossFn:
  schedule = dict(base=float(base), gamma=float(gamma), power=float(power),
                  lambda_min=float(lambda_min))

  def loss(inputs, state, step):
    lambda_ = sphereface_lib.sphereface_lambda(step, **schedule)
    logits, target = lsoftmax_lib.lsoftmax_logits_with_target(
        inputs.all_embeddings, inputs.class_centers, inputs.block_labels, m=int(m),
        lambda_=lambda_)
    value = softmax_lib.cross_entropy(logits, inputs.block_labels, target_logits=target,
                                      valid=inputs.valid, axis_name=inputs.axis_name)
    raw_logits = softmax_lib.linear_logits(jax.lax.stop_gradient(inputs.all_embeddings),
                                           jax.lax.stop_gradient(inputs.class_centers))
    metrics = _base_metrics(inputs)
    metrics['accuracy'] = common.accuracy(raw_logits, inputs.block_labels, valid=inputs.valid,
                                          axis_name=inputs.axis_name)
    metrics['theta_target'] = _softmax_theta_target(inputs, raw_logits)
    metrics['lambda'] = lambda_
    return value, state, metrics
  return loss


def _curricular_loss(scale, m, momentum) -> LossFn:
  def loss(inputs, state, step):
    del step
    cos_theta = cosine_logits(inputs.all_embeddings, inputs.class_centers)
    cos_target = _every_target_cosine(inputs, cos_theta)
    t = curricular_lib.update_t(cos_target, state['t'], momentum=float(momentum))
    logits, target = curricular_lib.curricular_logits_with_target(
        cos_theta, inputs.block_labels, t, scale=float(scale), m=float(m),
        cos_target=cos_target)
    value = softmax_lib.cross_entropy(logits, inputs.block_labels, target_logits=target,
                                      valid=inputs.valid, axis_name=inputs.axis_name)
    metrics = _cosine_metrics(inputs, cos_theta)
    metrics['t'] = t
    return value, {'t': t}, metrics
  return loss


def _magface_loss(scale, l_a, u_a, l_margin, u_margin, lambda_g, easy_margin) -> LossFn:
  bounds = dict(l_a=float(l_a), u_a=float(u_a))

  def loss(inputs, state, step):
    del step
    cos_theta = cosine_logits(inputs.all_embeddings, inputs.class_centers)
    logits, target = magface_lib.magface_logits_with_target(
        cos_theta, inputs.block_labels, common.row_norms(inputs.all_embeddings),
        scale=float(scale), l_margin=float(l_margin), u_margin=float(u_margin),
        easy_margin=bool(easy_margin), **bounds)
    cross_entropy = softmax_lib.cross_entropy(logits, inputs.block_labels,
                                              target_logits=target, valid=inputs.valid,
                                              axis_name=inputs.axis_name)
    own_magnitude = magface_lib.magnitude(common.row_norms(inputs.embeddings), **bounds)
    regularizer = _sample_sum(magface_lib.magface_regularizer(own_magnitude, u_a=float(u_a)),
                              inputs) / inputs.all_embeddings.shape[0]
    metrics = _cosine_metrics(inputs, cos_theta)
    metrics['cross_entropy'] = jax.lax.stop_gradient(cross_entropy)
    metrics['regularizer'] = jax.lax.stop_gradient(regularizer)
    metrics['margin'] = _batch_mean(magface_lib.magface_margin(
        own_magnitude, l_margin=float(l_margin), u_margin=float(u_margin), **bounds), inputs)
    return cross_entropy + float(lambda_g) * regularizer, state, metrics
  return loss


def _elastic_loss(scale, m, std, plus, variant) -> LossFn:
  def loss(inputs, state, step):
    del step
    if inputs.rng is None:
      raise ValueError('elasticface draws its margins from HeadInputs.rng: pass rng= to '
                       'head_inputs')
    cos_theta = cosine_logits(inputs.all_embeddings, inputs.class_centers)
    cos_target = _every_target_cosine(inputs, cos_theta) if plus else None
    margins = elastic_lib.elastic_margins(inputs.rng, cos_target,
                                          inputs.all_embeddings.shape[0], m=float(m),
                                          std=float(std), plus=bool(plus))
    logits, target = elastic_lib.elastic_logits_with_target(
        cos_theta, inputs.block_labels, margins, scale=float(scale), variant=variant)
    value = softmax_lib.cross_entropy(logits, inputs.block_labels, target_logits=target,
                                      valid=inputs.valid, axis_name=inputs.axis_name)
    metrics = _cosine_metrics(inputs, cos_theta)
    metrics['margin'] = jnp.mean(margins)
    return value, state, metrics
  return loss


def _sphereface_loss(m, base, gamma, power, lambda_min, official_backward) -> LossFn:
  schedule = dict(base=float(base), gamma=float(gamma), power=float(power),
                  lambda_min=float(lambda_min))

  def loss(inputs, state, step):
    cos_theta = cosine_logits(inputs.all_embeddings, inputs.class_centers)
    lambda_ = sphereface_lib.sphereface_lambda(step, **schedule)
    if official_backward:
      logits, target = sphereface_lib.sphereface_logits_official_backward(
          inputs.all_embeddings, inputs.class_centers, cos_theta, inputs.block_labels,
          m=int(m), lambda_=lambda_)
    else:
      logits, target = sphereface_lib.sphereface_logits_with_target(
          cos_theta, common.row_norms(inputs.all_embeddings), inputs.block_labels, m=int(m),
          lambda_=lambda_)
    metrics = _cosine_metrics(inputs, cos_theta)
    metrics['lambda'] = lambda_
    value = softmax_lib.cross_entropy(logits, inputs.block_labels, target_logits=target,
                                      valid=inputs.valid, axis_name=inputs.axis_name)
    return value, state, metrics
  return loss


def _sface_loss(scale, k, a, b, shift=0.0, gamma=0.0, h=None, momentum=None,
                first_batch_stats=False) -> LossFn:
  """SFace; with `h`, quality-aware SFace: ẑ from running norm statistics (h, momentum,
  first_batch_stats), v1 moving r_intra's centre by −shift·ẑ, v2 scaling its height by
  1 + gamma·ẑ (sface.py)."""
  sigmoids = dict(scale=float(scale), k=float(k), a=float(a), b=float(b))
  quality_weights = dict(shift=float(shift), gamma=sface_lib.check_gamma(gamma))

  def loss(inputs, state, step):
    cos_theta = cosine_logits(inputs.all_embeddings, inputs.class_centers)
    metrics = _cosine_metrics(inputs, cos_theta)
    quality = None
    if h is not None:
      state, quality, quality_metrics = _norm_quality(inputs, state, step, float(momentum),
                                                      float(h), bool(first_batch_stats))
      metrics.update(quality_metrics)
    intra, inter = sface_lib.sface_loss_terms(
        cos_theta, inputs.block_labels, quality=quality, valid=inputs.valid,
        axis_name=inputs.axis_name, **quality_weights, **sigmoids)
    metrics['intra_loss'] = jax.lax.stop_gradient(intra)
    metrics['inter_loss'] = jax.lax.stop_gradient(inter)
    return intra + inter, state, metrics
  return loss


def _adaface_loss(scale, m, h, momentum, official_clamp, first_batch_stats) -> LossFn:
  def loss(inputs, state, step):
    cos_theta = cosine_logits(inputs.all_embeddings, inputs.class_centers)
    state, quality, quality_metrics = _norm_quality(inputs, state, step, float(momentum),
                                                    float(h), bool(first_batch_stats))
    logits, target = adaface_lib.adaface_logits_with_target(
        cos_theta, inputs.block_labels, quality, scale=float(scale), m=float(m),
        official_clamp=bool(official_clamp))
    metrics = _cosine_metrics(inputs, cos_theta)
    metrics.update(quality_metrics)
    value = softmax_lib.cross_entropy(logits, inputs.block_labels, target_logits=target,
                                      valid=inputs.valid, axis_name=inputs.axis_name)
    return value, state, metrics
  return loss


def _triplet_loss(margin) -> LossFn:
  def loss(inputs, state, step):
    del step
    value, metrics = triplet_lib.batch_hard_triplet_loss(
        inputs.embeddings, inputs.labels, margin=float(margin),
        candidates=inputs.all_embeddings, candidate_labels=inputs.all_labels,
        anchor_offset=inputs.batch_offset, axis_name=inputs.axis_name)
    metrics.update(_base_metrics(inputs))
    return value, state, metrics
  return loss


def _norm_stats_state(padded_classes: int, embedding_dim: int) -> Dict[str, Array]:
  del padded_classes, embedding_dim
  return adaface_lib.init_norm_stats()


def _curricular_state(padded_classes: int, embedding_dim: int) -> Dict[str, Array]:
  del padded_classes, embedding_dim
  return curricular_lib.init_state()


def _center_state(padded_classes: int, embedding_dim: int) -> Dict[str, Array]:
  return {'centers': jnp.zeros((padded_classes, embedding_dim), jnp.float32)}


# name -> (config.head -> Head). Each reads `head.scale` where it has a scale and its own
# sub-dict `head.<name>` (sface_jax/configs/base.py), by keyword.
HEADS: Dict[str, Callable[[Any], Head]] = {
    'softmax': lambda c: Head(_softmax_loss(), uses_bias=True),
    'normface': lambda c: Head(_margin_loss(c.scale)),
    'cosface': lambda c: Head(_margin_loss(c.scale, m3=c.cosface.m)),
    'arcface': lambda c: Head(_margin_loss(c.scale, m2=c.arcface.m,
                                           easy_margin=c.arcface.easy_margin,
                                           insightface_grad=c.arcface.insightface_grad)),
    'combined': lambda c: Head(_margin_loss(c.scale, **c.combined)),
    'sphereface': lambda c: Head(_sphereface_loss(**c.sphereface)),
    'lsoftmax': lambda c: Head(_lsoftmax_loss(**c.lsoftmax)),
    'curricularface': lambda c: Head(_curricular_loss(c.scale, **c.curricularface),
                                     init_state=_curricular_state),
    'magface': lambda c: Head(_magface_loss(c.scale, **c.magface)),
    'elasticface_arc': lambda c: Head(_elastic_loss(c.scale, variant='arc',
                                                    **c.elasticface_arc)),
    'elasticface_cos': lambda c: Head(_elastic_loss(c.scale, variant='cos',
                                                    **c.elasticface_cos)),
    'sface': lambda c: Head(_sface_loss(c.scale, **c.sface)),
    'quality_sface': lambda c: Head(_sface_loss(c.scale, **c.quality_sface),
                                    init_state=_norm_stats_state),
    'quality_sface_v2': lambda c: Head(_sface_loss(c.scale, **c.quality_sface_v2),
                                       init_state=_norm_stats_state),
    'adaface': lambda c: Head(_adaface_loss(c.scale, **c.adaface),
                              init_state=_norm_stats_state),
    'center': lambda c: Head(_softmax_loss(with_centers=True, **c.center), uses_bias=True,
                             init_state=_center_state),
    'triplet': lambda c: Head(_triplet_loss(**c.triplet), uses_classifier=False),
}
HEAD_NAMES = tuple(HEADS)


def get_head(head_config) -> Head:
  """Builds the head named `head_config.name` from `config.head` (sface_jax/configs/base.py)."""
  name = head_config.name
  if name not in HEADS:
    raise ValueError(f'config.head.name={name!r} is not a head; choose one of {HEAD_NAMES}')
  return dataclasses.replace(HEADS[name](head_config), name=name)
