"""PyTorch baselines: insightface arcface_torch's IResNet, MobileFaceNet and training step,
rewritten here.

Written from the architecture description (ArcFace paper; arcface_torch
`backbones/iresnet.py` and `backbones/mobilefacenet.py`, whose module names, and so
state_dict keys, we reproduce) and from what arcface_torch's `train_v2.py`, `partial_fc_v2.py`,
`losses.py` and `lr_scheduler.py` compute (`ArcFaceTorchStep`), not copied. Used by
tests/test_import_torch.py (weight import must give the same embeddings), tests/test_models.py
(parameter counts), tests/test_parity.py and bench/parity.py (the same training step) and
bench/backbone.py (CPU speed side by side). Importing this module imports torch.
"""

import copy
from typing import Sequence, Tuple

import torch
from torch import nn
from torch.nn import functional as F

EPS = 1e-5


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
  return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


class IBasicBlock(nn.Module):
  """BN - conv3×3 - BN - PReLU - conv3×3(stride) - BN, plus (projected) identity."""

  def __init__(self, cin: int, cout: int, stride: int):
    super().__init__()
    self.bn1 = nn.BatchNorm2d(cin, eps=EPS)
    self.conv1 = _conv3x3(cin, cout)
    self.bn2 = nn.BatchNorm2d(cout, eps=EPS)
    self.prelu = nn.PReLU(cout)
    self.conv2 = _conv3x3(cout, cout, stride)
    self.bn3 = nn.BatchNorm2d(cout, eps=EPS)
    self.downsample = None
    if stride != 1 or cin != cout:
      self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False),
                                      nn.BatchNorm2d(cout, eps=EPS))

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    y = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
    return y + (x if self.downsample is None else self.downsample(x))


class IResNet(nn.Module):
  """arcface_torch's IResNet; `image_size` replaces its hard-coded 7×7 fc_scale."""

  def __init__(self, layers: Sequence[int], widths: Sequence[int] = (64, 128, 256, 512),
               stem: int = 64, num_features: int = 512, dropout: float = 0.0,
               image_size: int = 112):
    super().__init__()
    self.conv1 = nn.Conv2d(3, stem, 3, stride=1, padding=1, bias=False)
    self.bn1 = nn.BatchNorm2d(stem, eps=EPS)
    self.prelu = nn.PReLU(stem)
    cin = stem
    for index, (blocks, width) in enumerate(zip(layers, widths)):
      stage = [IBasicBlock(cin, width, 2)] + [IBasicBlock(width, width, 1)
                                              for _ in range(blocks - 1)]
      setattr(self, f'layer{index + 1}', nn.Sequential(*stage))
      cin = width
    self.num_stages = len(layers)
    side = image_size // 2 ** len(layers)
    self.bn2 = nn.BatchNorm2d(cin, eps=EPS)
    self.dropout = nn.Dropout(p=dropout)
    self.fc = nn.Linear(cin * side * side, num_features)
    self.features = nn.BatchNorm1d(num_features, eps=EPS)
    nn.init.constant_(self.features.weight, 1.0)
    self.features.weight.requires_grad = False
    for module in self.modules():  # arcface_torch's initialisation (fc keeps torch's)
      if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.1)
      elif isinstance(module, nn.BatchNorm2d):
        nn.init.constant_(module.weight, 1.0)
        nn.init.constant_(module.bias, 0.0)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = self.prelu(self.bn1(self.conv1(x)))
    for index in range(self.num_stages):
      x = getattr(self, f'layer{index + 1}')(x)
    x = torch.flatten(self.bn2(x), 1)  # (C, H, W) order
    return self.features(self.fc(self.dropout(x)))


IRESNET_LAYERS = {'r18': (2, 2, 2, 2), 'r34': (3, 4, 6, 3), 'r50': (3, 4, 14, 3),
                  'r100': (3, 13, 30, 3), 'r200': (6, 26, 60, 6)}
# Our small presets (sface_jax.models 'r18_small', 'tiny'): not arcface_torch models.
SMALL_IRESNETS = {'r18_small': dict(layers=(2, 2, 2, 2), widths=(16, 32, 64, 128), stem=16),
                  'tiny': dict(layers=(1, 1, 1, 1), widths=(8, 16, 16, 32), stem=8)}


class ConvBlock(nn.Module):
  """conv - BN [- PReLU] in an inner `layers` Sequential (arcface_torch key layout)."""

  def __init__(self, cin, cout, kernel=1, stride=1, padding=0, groups=1, activation=True):
    super().__init__()
    modules = [nn.Conv2d(cin, cout, kernel, stride, padding, groups=groups, bias=False),
               nn.BatchNorm2d(cout)]
    if activation:
      modules.append(nn.PReLU(cout))
    self.layers = nn.Sequential(*modules)

  def forward(self, x):
    return self.layers(x)


class DepthWise(nn.Module):

  def __init__(self, cin, cout, expanded, stride=1, residual=False):
    super().__init__()
    self.residual = residual
    self.layers = nn.Sequential(
        ConvBlock(cin, expanded),
        ConvBlock(expanded, expanded, 3, stride, 1, groups=expanded),
        ConvBlock(expanded, cout, activation=False))

  def forward(self, x):
    return x + self.layers(x) if self.residual else self.layers(x)


class Residual(nn.Module):

  def __init__(self, width, num_blocks, expanded):
    super().__init__()
    self.layers = nn.Sequential(*[DepthWise(width, width, expanded, residual=True)
                                  for _ in range(num_blocks)])

  def forward(self, x):
    return self.layers(x)


class GDC(nn.Module):

  def __init__(self, num_features, side=7):
    super().__init__()
    self.layers = nn.Sequential(
        ConvBlock(512, 512, side, groups=512, activation=False), nn.Flatten(),
        nn.Linear(512, num_features, bias=False), nn.BatchNorm1d(num_features))

  def forward(self, x):
    return self.layers(x)


class MobileFaceNet(nn.Module):
  """arcface_torch's `get_mbf` (scale 2, blocks (1, 4, 6, 2))."""

  def __init__(self, num_features: int = 512, blocks=(1, 4, 6, 2), scale: int = 2,
               image_size: int = 112):
    super().__init__()
    w1, w2 = 64 * scale, 128 * scale
    self.layers = nn.ModuleList([
        ConvBlock(3, w1, 3, 2, 1),
        ConvBlock(w1, w1, 3, 1, 1, groups=64),
        DepthWise(w1, w1, 128, stride=2), Residual(w1, blocks[1], 128),
        DepthWise(w1, w2, 256, stride=2), Residual(w2, blocks[2], 256),
        DepthWise(w2, w2, 512, stride=2), Residual(w2, blocks[3], 256)])
    self.conv_sep = ConvBlock(w2, 512)
    self.features = GDC(num_features, image_size // 16)

  def forward(self, x):
    for layer in self.layers:
      x = layer(x)
    return self.features(self.conv_sep(x))


def build(name: str, **kwargs) -> nn.Module:
  """The torch baseline for one of our model names (r18…r200, mbf, r18_small, tiny)."""
  if name == 'mbf':
    return MobileFaceNet(**kwargs)
  if name in SMALL_IRESNETS:
    return IResNet(**SMALL_IRESNETS[name], **kwargs)
  return IResNet(IRESNET_LAYERS[name], **kwargs)


@torch.no_grad()
def randomize_(model: nn.Module, seed: int = 0, image_size: int = 112) -> nn.Module:
  """Every weight and BN statistic random, at a scale that keeps activations O(1).

  Conv/linear weights N(0, 2/fan_in), biases N(0, 0.1²); BN γ U(0.5, 1.5), β N(0, 0.2²);
  PReLU slopes U(0, 0.5); the frozen `features` γ too (import must not assume it is 1).
  Running statistics: drawn at random (U(0.5, 2) var, N(0, 0.2²) mean) they do not
  match the activations, which then grow layer after layer to ~1e3–1e5 and leave no
  room for a 1e-4 absolute comparison. So they are first measured (one train-mode pass
  over N(0, 0.5²) noise images, cumulative average) and then perturbed at random:
  mean + N(0, (0.2·std)²), var × U(0.5, 2).
  """
  generator = torch.Generator().manual_seed(seed)

  def uniform(shape, low, high):
    return torch.rand(shape, generator=generator) * (high - low) + low

  def normal(shape, std):
    return torch.randn(shape, generator=generator) * std

  norms = []
  for module in model.modules():
    if isinstance(module, (nn.Conv2d, nn.Linear)):
      module.weight.copy_(normal(module.weight.shape, (2.0 / module.weight[0].numel()) ** 0.5))
      if module.bias is not None:
        module.bias.copy_(normal(module.bias.shape, 0.1))
    elif isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
      module.weight.copy_(uniform(module.weight.shape, 0.5, 1.5))
      module.bias.copy_(normal(module.bias.shape, 0.2))
      module.reset_running_stats()
      module.momentum = None  # cumulative average over the calibration pass
      norms.append(module)
    elif isinstance(module, nn.PReLU):
      module.weight.copy_(uniform(module.weight.shape, 0.0, 0.5))
  was_training = model.training
  model.train()
  model(normal((8, 3, image_size, image_size), 0.5))
  model.train(was_training)
  for module in norms:
    module.momentum = 0.1
    std = module.running_var.sqrt()
    module.running_mean.add_(normal(std.shape, 1.0) * 0.2 * std)
    module.running_var.mul_(uniform(std.shape, 0.5, 2.0))
  return model


# ---- arcface_torch's training step ------------------------------------------------------------
# What train_v2.py does per batch on one process with fp16 = False and gradient_acc = 1, at
# Partial FC sample rate 1 (PartialFC_V2 then uses every class centre: no sampling).


def margin_logits(cosines: torch.Tensor, labels: torch.Tensor, *, scale: float, m1: float,
                  m2: float, m3: float) -> torch.Tensor:
  """arcface_torch's CombinedMarginLoss on (B, C) cosines clamped to [−1, 1].

  (1, m2, 0), ArcFace: under `no_grad`, in place, every cosine c becomes cos(arccos c) and the
  target's cos(arccos c_y + m2), so the value carries the margin but the backward pass sees
  s·c only. m3 > 0, CosFace: the target becomes c_y − m3, with its gradient (m2 is ignored
  there). Other margins raise, as theirs does.
  """
  rows = torch.arange(labels.shape[0])
  if m1 == 1.0 and m3 == 0.0:
    with torch.no_grad():
      cosines.arccos_()
      cosines[rows, labels] += m2
      cosines.cos_()
    return cosines * scale
  if m3 > 0.0:
    cosines[rows, labels] = cosines[rows, labels] - m3
    return cosines * scale
  raise ValueError(f'arcface_torch has no margin ({m1}, {m2}, {m3})')


class SoftmaxCrossEntropy(torch.autograd.Function):
  """partial_fc_v2's DistCrossEntropy on one process: p = softmax (max subtracted, exp,
  divided by the sum), loss = −mean log max(p_y, 1e-30); its backward is written out,
  (p − one_hot)/B.

  So the value caps each sample's loss at −log 1e-30 = 69.08 (what arcface_torch logs) while
  the gradient is the uncapped cross-entropy's: `uncapped_cross_entropy` is the loss that
  gradient belongs to.
  """

  @staticmethod
  def forward(ctx, logits, labels):  # pylint: disable=arguments-differ
    shifted = logits - logits.max(dim=1, keepdim=True).values
    probabilities = shifted.exp()
    probabilities = probabilities / probabilities.sum(dim=1, keepdim=True)
    ctx.save_for_backward(probabilities, labels)
    target = probabilities.gather(1, labels[:, None])
    return -target.clamp_min(1e-30).log().mean()

  @staticmethod
  def backward(ctx, grad):  # pylint: disable=arguments-differ
    probabilities, labels = ctx.saved_tensors
    one_hot = F.one_hot(labels, probabilities.shape[1]).to(probabilities.dtype)
    return (probabilities - one_hot) / probabilities.shape[0] * grad, None


def uncapped_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
  """mean_i [log Σ_j e^{z_ij} − z_iy], in log space (no cap, no underflow)."""
  return (torch.logsumexp(logits, dim=1) - logits.gather(1, labels[:, None])[:, 0]).mean()


class PartialFC(nn.Module):
  """PartialFC_V2 at sample rate 1 on one process: `weight` (C, D) from N(0, 0.01²); the loss
  of normalised embeddings against normalised centres, margins, softmax cross-entropy.
  `forward` returns arcface_torch's (capped) loss; `uncapped_loss` then holds the
  cross-entropy its gradient belongs to (`SoftmaxCrossEntropy`)."""

  def __init__(self, num_classes: int, embedding_dim: int, margins: Tuple[float, float, float],
               scale: float = 64.0):
    super().__init__()
    self.weight = nn.Parameter(torch.normal(0.0, 0.01, (num_classes, embedding_dim)))
    self.margins, self.scale = margins, scale

  def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    cosines = F.linear(F.normalize(embeddings), F.normalize(self.weight)).clamp(-1, 1)
    m1, m2, m3 = self.margins
    logits = margin_logits(cosines, labels, scale=self.scale, m1=m1, m2=m2, m3=m3)
    self.uncapped_loss = uncapped_cross_entropy(logits.detach(), labels).item()
    return SoftmaxCrossEntropy.apply(logits, labels)


def polynomial_lr_warmup(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                         power: float = 1.0) -> torch.optim.lr_scheduler.LambdaLR:
  """lr_scheduler.PolynomialLRWarmup's learning rates, as a LambdaLR of the step count l.

  Theirs: l = 0 (the first optimiser step) keeps the optimiser's initial lr; 1 ≤ l ≤ W gives
  lr·l/W; l > W multiplies the previous lr by ((1 − (l − W)/(T − W))/(1 − (l − 1 − W)/(T −
  W)))^power, a product that telescopes to lr·(1 − (l − W)/(T − W))^power; past T it stays 0.
  """
  def factor(step):
    if step == 0:
      return 1.0
    if step <= warmup_steps:
      return step / warmup_steps
    return (1.0 - (min(step, total_steps) - warmup_steps) / (total_steps - warmup_steps)) ** power
  return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class ArcFaceTorchStep:
  """arcface_torch's training step: forward, PartialFC loss, backward, the backbone's gradient
  clipped to norm `clip_norm`, SGD (momentum 0.9, `weight_decay` on every parameter with a
  gradient, class centres included), then the scheduler's step. `step(images, labels)` takes
  NCHW images and returns the loss before the update: the cross-entropy the gradient belongs
  to; `logged_loss` is then what train_v2.py logs (each sample's loss capped at 69.08)."""

  def __init__(self, backbone: nn.Module, classifier: PartialFC, *, learning_rate: float,
               weight_decay: float, warmup_steps: int, total_steps: int, power: float = 1.0,
               clip_norm: float = 5.0):
    self.backbone, self.classifier, self.clip_norm = backbone.train(), classifier, clip_norm
    self.optimizer = torch.optim.SGD(
        [{'params': backbone.parameters()}, {'params': classifier.parameters()}],
        lr=learning_rate, momentum=0.9, weight_decay=weight_decay)
    self.scheduler = polynomial_lr_warmup(self.optimizer, warmup_steps, total_steps, power)
    self.settings = dict(learning_rate=learning_rate, weight_decay=weight_decay,
                         warmup_steps=warmup_steps, total_steps=total_steps, power=power,
                         clip_norm=clip_norm)

  @property
  def learning_rate(self) -> float:
    """The lr the next step runs at."""
    return self.optimizer.param_groups[0]['lr']

  def step(self, images: torch.Tensor, labels: torch.Tensor) -> float:
    dtype = self.classifier.weight.dtype
    loss = self.classifier(self.backbone(images.to(dtype)), labels)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(self.backbone.parameters(), self.clip_norm)
    self.optimizer.step()
    self.optimizer.zero_grad()
    self.scheduler.step()
    self.logged_loss = loss.item()
    return self.classifier.uncapped_loss

  def copy(self, dtype: torch.dtype = torch.float32, relative_noise: float = 0.0,
           seed: int = 0) -> 'ArcFaceTorchStep':
    """The same step from the same weights, in `dtype`, each parameter optionally multiplied by
    (1 + relative_noise·N(0, 1)) (the float32 control); only before the first step (the
    optimiser state is not copied)."""
    backbone = copy.deepcopy(self.backbone).to(dtype)
    classifier = copy.deepcopy(self.classifier).to(dtype)
    if relative_noise:
      generator = torch.Generator().manual_seed(seed)
      with torch.no_grad():
        for parameter in list(backbone.parameters()) + list(classifier.parameters()):
          if parameter.requires_grad:
            noise = torch.randn(parameter.shape, generator=generator, dtype=torch.float64)
            parameter.copy_(parameter.double() * (1.0 + relative_noise * noise))
    return ArcFaceTorchStep(backbone, classifier, **self.settings)
