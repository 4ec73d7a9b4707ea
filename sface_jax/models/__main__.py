"""`python -m sface_jax.models --summary`: parameters and MACs next to published figures.

Published figures (None: none found):
- MACs: insightface `recognition/arcface_torch/README.md` (ViT table, "FLOPs" column:
  r18 2.6, r50 6.3, r100 12.1, r200 23.5 G; its model-zoo table names the MobileFaceNet
  "mobilefacenet-0.45G"). arcface_torch's `flops.py` computes these with ptflops'
  `get_model_complexity_info`, which returns MACs, so they are MACs.
- Parameters: insightface `challenges/mfr/README.md` baselines list the float32 ONNX
  model sizes r18 91.658, r34 130.245, r50 166.305, r100 248.590 MB (MiB); ÷ 4 bytes gives
  24.03, 34.14, 43.60, 65.17 M weights. (OpenVINO's model card for the MXNet
  LResNet100E-IR, face-recognition-resnet100-arcface-onnx, gives 65.1320 M params and
  24.2115 GFLOPs = 12.1 G MACs.) SPEC.md: IR-50 ≈ 43.6 M.
- mbf: insightface publishes no parameter count for its 512-d `get_mbf` (2.06 M here,
  equal to a PyTorch build of arcface_torch's definition, tests/test_models.py). The
  "≈ 1 M parameters" often quoted is Chen et al.'s 128-d MobileFaceNet (0.99 M, ~0.22 G
  MAdds), a narrower model.
"""

import argparse
import time
from typing import Optional, Sequence

import sface_jax.models as models
from sface_jax import cli

PUBLISHED = {  # name: (parameters, MACs at 112×112)
    'r18': (91.658 * 2**20 / 4, 2.6e9),
    'r34': (130.245 * 2**20 / 4, None),
    'r50': (166.305 * 2**20 / 4, 6.3e9),
    'r100': (248.590 * 2**20 / 4, 12.1e9),
    'r200': (None, 23.5e9),
    'mbf': (None, 0.45e9),
}


def _deviation(value: float, published: Optional[float]) -> str:
  return '—' if published is None else f'{100 * (value / published - 1):+.2f}%'


def _millions(value: Optional[float]) -> str:
  return '—' if value is None else f'{value / 1e6:.3f} M'


def _giga(value: Optional[float]) -> str:
  return '—' if value is None else f'{value / 1e9:.3f} G'


def summary(names: Sequence[str], image_size: int = 112) -> str:
  """A markdown table: parameters and MACs (XLA and dense count) vs published."""
  rows = ['| model | parameters | published | Δ | MACs (XLA) | MACs (dense) | published '
          '| Δ dense | Δ XLA | seconds |',
          '|---|---|---|---|---|---|---|---|---|---|']
  for name in names:
    start = time.perf_counter()
    model = models.get_model(name)
    params = models.count_parameters(model, image_size)
    xla = models.xla_macs(model, image_size)
    dense = models.dense_macs(model, image_size)
    published_params, published_macs = PUBLISHED.get(name, (None, None))
    if image_size != 112:
      published_params = published_macs = None
    rows.append(
        f'| {name} | {_millions(params)} | {_millions(published_params)} '
        f'| {_deviation(params, published_params)} | {_giga(xla)} | {_giga(dense)} '
        f'| {_giga(published_macs)} | {_deviation(dense, published_macs)} '
        f'| {_deviation(xla, published_macs)} | {time.perf_counter() - start:.1f} |')
  return '\n'.join(rows)


def main(argv: Optional[Sequence[str]] = None) -> None:
  parser = argparse.ArgumentParser(prog='python -m sface_jax.models', description=__doc__,
                                   formatter_class=cli.RawDescriptionHelpFormatter)
  parser.add_argument('--summary', action='store_true', help='print the table')
  parser.add_argument('--models', default=','.join(models.MODELS),
                      help='comma-separated names')
  parser.add_argument('--image-size', type=int, default=112, help='input side')
  parser.add_argument('--image_size', type=int, dest='image_size', default=argparse.SUPPRESS,
                      help=argparse.SUPPRESS)  # the spelling it once took
  args = parser.parse_args(argv)
  if not args.summary:
    parser.print_help()
    return
  print(f'image {args.image_size}×{args.image_size}, 512-d embedding, batch 1, float32. '
        'MACs (XLA): compiled cost_analysis()["flops"] / 2 (skips taps over zero '
        'padding; counts element-wise ops). MACs (dense): conv/dense MACs with every '
        'tap, the ptflops convention of the published figures.')
  print(summary(args.models.split(','), args.image_size))


if __name__ == '__main__':
  main()
