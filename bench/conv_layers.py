"""A backbone's convolutions one by one: forward, input gradient, kernel gradient, JAX next to PyTorch.

  python bench/conv_layers.py                    # IR-50, batch 32, CPU, our compiler options
  python bench/conv_layers.py --xla-defaults     # the same as XLA runs it out of the box
  python bench/conv_layers.py --model mbf        # MobileFaceNet (its grouped convolutions
                                                 # as the model computes them on the CPU)
  python bench/conv_layers.py --model mbf --xla-transpose   # the tap sums' gradient left
                                                 # to XLA's autodiff instead of our VJP

Where a backbone's step goes on the CPU, below the whole-model figures of train_step.py:
every distinct convolution shape of the model at 112×112 (for IR-50: the stem, the four
stages' first blocks with their stride-2 conv2 and 1×1 downsample, the repeated 3×3
blocks; for MobileFaceNet: the stem, the 1×1 expand/project convolutions, the grouped stem,
the depthwise 3×3s and the 7×7 GDC), each timed as three jitted JAX calls (y, dx and dkernel
through `jax.vjp`) and the three matching PyTorch calls (`F.conv2d`,
`aten.convolution_backward` for the input and for the weight), then summed with each
shape's multiplicity in the network. Every convolution runs as the model runs it on the CPU:
IR-50's as XLA's convolution, MobileFaceNet's 1×1 as matmuls (`pointwise_as_matmul`), its
grouped ones as `mobilefacenet.grouped_conv_taps`; `--xla-defaults` compiles them with XLA's
own options instead of `sface_jax.xla_options`. Best of
`--repeats` after one untimed call; JAX and PyTorch run in the same process on the same
threads.
"""

import argparse
import functools
import os
import pathlib
import sys
import time

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from sface_jax import xla_options  # pylint: disable=g-import-not-at-top,wrong-import-position
from sface_jax.models import mobilefacenet  # pylint: disable=g-import-not-at-top,wrong-import-position

# (input side, C_in, C_out, kernel, stride, groups, how many times the model has it); the
# padding is kernel // 2, except for the GDC (a 7×7 kernel over the 7×7 map, no padding).
CONVOLUTIONS = {
    'r50': [
        (112, 3, 64, 3, 1, 1, 1), (112, 64, 64, 3, 1, 1, 1), (112, 64, 64, 3, 2, 1, 1),
        (112, 64, 64, 1, 2, 1, 1), (56, 64, 64, 3, 1, 1, 4), (56, 64, 128, 3, 1, 1, 1),
        (56, 128, 128, 3, 2, 1, 1), (56, 64, 128, 1, 2, 1, 1), (28, 128, 128, 3, 1, 1, 6),
        (28, 128, 256, 3, 1, 1, 1), (28, 256, 256, 3, 2, 1, 1), (28, 128, 256, 1, 2, 1, 1),
        (14, 256, 256, 3, 1, 1, 26), (14, 256, 512, 3, 1, 1, 1), (14, 512, 512, 3, 2, 1, 1),
        (14, 256, 512, 1, 2, 1, 1), (7, 512, 512, 3, 1, 1, 4),
    ],
    'mbf': [
        (112, 3, 128, 3, 2, 1, 1), (56, 128, 128, 3, 1, 64, 1),  # stem, grouped stem
        (56, 128, 128, 1, 1, 1, 1), (56, 128, 128, 3, 2, 128, 1),  # stage 1
        (28, 128, 128, 1, 1, 1, 9), (28, 128, 128, 3, 1, 128, 4),
        (28, 128, 256, 1, 1, 1, 1), (28, 256, 256, 3, 2, 256, 1),  # stage 2
        (14, 256, 256, 1, 1, 1, 13), (14, 256, 256, 3, 1, 256, 6),
        (14, 256, 512, 1, 1, 1, 1), (14, 512, 512, 3, 2, 512, 1),  # stage 3
        (7, 512, 256, 1, 1, 1, 1), (7, 256, 256, 1, 1, 1, 4), (7, 256, 256, 3, 1, 256, 2),
        (7, 256, 512, 1, 1, 1, 1), (7, 512, 512, 7, 1, 512, 1),  # conv_sep, GDC
    ],
}
# What each model passes nn.Conv as its `conv_general_dilated`.
DENSE_CONVOLUTION = {'r50': jax.lax.conv_general_dilated,
                     'mbf': mobilefacenet.pointwise_as_matmul}
PASSES = ('forward', 'input grad', 'kernel grad')


def best_ms(call, repeats: int) -> float:
  call()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    call()
    times.append(time.perf_counter() - start)
  return 1e3 * min(times)


def jax_calls(model, x, w, stride, pad, groups, options, xla_transpose=False):
  padding = ((pad, pad), (pad, pad))
  taps = mobilefacenet._tap_sum if xla_transpose else mobilefacenet.grouped_conv_taps  # pylint: disable=protected-access
  dense = DENSE_CONVOLUTION[model]

  def conv(x, w):
    if groups > 1:
      return taps(x, w, stride, padding, groups)
    return dense(x, w, (stride, stride), padding, dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  g = np.ones(jax.eval_shape(conv, x, w).shape, np.float32)
  jit = functools.partial(jax.jit, compiler_options=options)
  forward = jit(conv)
  input_grad = jit(lambda x, w, g: jax.vjp(lambda x: conv(x, w), x)[1](g)[0])
  kernel_grad = jit(lambda x, w, g: jax.vjp(lambda w: conv(x, w), w)[1](g)[0])
  return (lambda: forward(x, w).block_until_ready(),
          lambda: input_grad(x, w, g).block_until_ready(),
          lambda: kernel_grad(x, w, g).block_until_ready())


def torch_calls(batch, side, c_in, c_out, kernel, stride, pad, groups):
  import torch  # pylint: disable=g-import-not-at-top
  x = torch.randn(batch, c_in, side, side)
  w = torch.randn(c_out, c_in // groups, kernel, kernel)
  conv = functools.partial(torch.nn.functional.conv2d, stride=stride, padding=pad,
                           groups=groups)
  g = torch.ones_like(conv(x, w))

  def backward(mask):
    return lambda: torch.ops.aten.convolution_backward(
        g, x, w, None, [stride] * 2, [pad] * 2, [1, 1], False, [0, 0], groups, mask)
  return (lambda: conv(x, w),
          backward([True, False, False]), backward([False, True, False]))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--model', default='r50', choices=sorted(CONVOLUTIONS))
  parser.add_argument('--batch', type=int, default=32)
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--threads', type=int, default=len(os.sched_getaffinity(0)))
  parser.add_argument('--xla-defaults', action='store_true',
                      help="XLA as it comes: its own options instead of sface_jax.xla_options")
  parser.add_argument('--xla-transpose', action='store_true',
                      help="grouped convolutions: XLA's autodiff of the tap sum, not our VJP")
  args = parser.parse_args()
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(args.threads)
  options = {} if args.xla_defaults else xla_options.compiler_options('cpu')
  print(f'jax {jax.__version__}, torch {torch.__version__} ({args.threads} threads), '
        f'{args.model}, batch {args.batch}, compiler options {options or "XLA defaults"}; '
        f'load average {os.getloadavg()[0]:.1f}\n')
  print('| conv (side, C_in→C_out, k, s, groups) | × | ' + ' | '.join(
      f'JAX {p} ms | PyTorch {p} ms' for p in PASSES) + ' |')
  print('|---|---|' + '---:|' * 6)
  rng = np.random.default_rng(0)
  totals = np.zeros((2, 3))
  for side, c_in, c_out, kernel, stride, groups, count in CONVOLUTIONS[args.model]:
    pad = 0 if kernel == side else kernel // 2
    x = rng.normal(size=(args.batch, side, side, c_in)).astype(np.float32)
    w = (0.05 * rng.normal(size=(kernel, kernel, c_in // groups, c_out))).astype(np.float32)
    ours = [best_ms(call, args.repeats)
            for call in jax_calls(args.model, x, w, stride, pad, groups, options,
                                  args.xla_transpose)]
    theirs = [best_ms(call, args.repeats) for call in
              torch_calls(args.batch, side, c_in, c_out, kernel, stride, pad, groups)]
    totals += count * np.array([ours, theirs])
    cells = ' | '.join(f'{a:.1f} | {b:.1f}' for a, b in zip(ours, theirs))
    print(f'| {side}, {c_in}→{c_out}, {kernel}, {stride}, {groups} | {count} | {cells} |',
          flush=True)
  cells = ' | '.join(f'**{a:.0f}** | **{b:.0f}**' for a, b in zip(*totals))
  print(f'| **{args.model} total** | | {cells} |')
  print(f'\nall three passes: JAX {totals[0].sum():.0f} ms, PyTorch {totals[1].sum():.0f} ms, '
        f'JAX / PyTorch time {totals[0].sum() / totals[1].sum():.2f}')


if __name__ == '__main__':
  main()
