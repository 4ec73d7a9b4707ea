"""Backbones: `get_model(name)` → a Flax Linen module mapping faces to embeddings.

Every model is called as `model.apply(variables, images, train=...)` with `images`
(B, H, W, 3) normalised (x − 127.5) / 128, H = W divisible by 16, and returns
`(embeddings, norms)`: raw float32 embeddings (B, D) and their L2 norms (B,).

Published models: r18 r34 r50 r100 r200 (IResNet, ArcFace) and mbf (insightface's
MobileFaceNet). Small variants of the same code, not published models: `r18_small`
(the laptop-CPU demo) and `tiny` (unit tests). `python -m sface_jax.models --summary`
prints parameters and MACs next to the published figures.
"""

from typing import Any, Callable, Dict

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sface_jax.models import iresnet
from sface_jax.models import mobilefacenet

MODELS: Dict[str, Callable[..., nn.Module]] = {
    'r18': iresnet.IResNet18,
    'r34': iresnet.IResNet34,
    'r50': iresnet.IResNet50,
    'r100': iresnet.IResNet100,
    'r200': iresnet.IResNet200,
    'mbf': mobilefacenet.MobileFaceNet,
    'r18_small': iresnet.IResNet18Small,
    'tiny': iresnet.IResNetTiny,
}


def get_model(name: str, *, embedding_dim: int = 512, dropout: float = 0.0,
              dtype: Any = jnp.float32, **overrides: Any) -> nn.Module:
  """The backbone `name` (a key of MODELS); `overrides` set other module fields.

  dtype: computation dtype, a jnp dtype or its name ('bfloat16' from a config);
  parameters stay float32 and the embedding comes out float32 whatever it is.
  overrides: e.g. `stage_sizes=(1, 1, 1, 1)`, `stage_widths=(8, 16, 32, 64)`.
  """
  if name not in MODELS:
    raise ValueError(f'unknown model {name!r}; known: {", ".join(MODELS)}')
  return MODELS[name](embedding_dim=embedding_dim, dropout=dropout,
                      dtype=jnp.dtype(dtype), **overrides)


def abstract_variables(model: nn.Module, image_size: int = 112) -> Any:
  """The model's variables as ShapeDtypeStructs (jax.eval_shape: nothing computed)."""
  images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  return jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), images)


def count_parameters(model: nn.Module, image_size: int = 112) -> int:
  """Number of entries in `params` (batch-norm running statistics not included)."""
  params = abstract_variables(model, image_size)['params']
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(params))


def _with_xla_convolutions(model: nn.Module) -> nn.Module:
  """Counting needs convolutions as XLA convolutions (MobileFaceNet may use 'taps')."""
  if hasattr(model, 'grouped_conv'):
    return model.clone(grouped_conv='xla')
  return model


def xla_macs(model: nn.Module, image_size: int = 112) -> float:
  """Inference multiply-accumulates per image: XLA cost analysis 'flops' / 2.

  XLA's HloCostAnalysis counts 2 flops per multiply-add, and counts only the kernel
  taps that land on the input: taps over the zero padding are skipped (a 3×3 'SAME'
  conv on a 7×7 map counts (19/21)² = 82% of k²·H·W·C_in·C_out). Element-wise ops (batch
  norm, PReLU, adds) add one flop per element each. See `dense_macs` for the count
  papers report.
  """
  model = _with_xla_convolutions(model)
  variables = abstract_variables(model, image_size)
  images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  apply = jax.jit(lambda v, x: model.apply(v, x, train=False))
  cost = apply.lower(variables, images).compile().cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax returned one dict per device
    cost = cost[0]
  return float(cost['flops']) / 2


def dense_macs(model: nn.Module, image_size: int = 112) -> float:
  """Multiply-accumulates of the convolutions and dense layers, every tap counted.

  Σ over conv outputs of k_h·k_w·C_in/groups, plus Σ over dense outputs of the fan-in,
  read from the traced program (jaxpr). This is the convention of ptflops, which
  insightface's `flops.py` uses for its published "GFLOPs" (which are MACs): padding
  taps count, batch norm and activations are (nearly) ignored.
  """
  from jax.extend import core as jax_core  # pylint: disable=g-import-not-at-top
  model = _with_xla_convolutions(model)
  variables = abstract_variables(model, image_size)
  images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  closed = jax.make_jaxpr(lambda v, x: model.apply(v, x, train=False))(variables, images)
  total = 0

  def walk(jaxpr):
    nonlocal total
    for eqn in jaxpr.eqns:
      for sub in jax_core.jaxprs_in_params(eqn.params):
        walk(sub)
      out_size = int(np.prod(eqn.outvars[0].aval.shape)) if eqn.outvars else 0
      if eqn.primitive.name == 'conv_general_dilated':
        kernel = eqn.invars[1].aval.shape
        spec = eqn.params['dimension_numbers'].rhs_spec  # (out, in, spatial...)
        total += out_size * int(np.prod([kernel[i] for i in spec[1:]]))
      elif eqn.primitive.name == 'dot_general':
        (contracting, _), _ = eqn.params['dimension_numbers']
        lhs = eqn.invars[0].aval.shape
        total += out_size * int(np.prod([lhs[i] for i in contracting]))

  walk(closed.jaxpr)
  return float(total)
