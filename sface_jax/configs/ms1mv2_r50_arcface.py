"""IR-50 + ArcFace on MS1MV2, insightface arcface_torch's recipe (configs/ms1mv2_r50.py).

Their training step (`base.arcface_torch`; docs/parity.md compares the two step by step):
global batch 1024 (128 per GPU × 8), SGD lr 0.1 momentum 0.9, weight decay 5e-4 on every
parameter (class centres included), the backbone's gradient clipped to norm 5, 20 epochs of
polynomial decay with power 1 and no warm-up (train_v2.py's PolynomialLRWarmup; their train.py
before April 2023 used power 2: --config.schedule.power=2), margins (1, 0.5, 0) with their
gradient (the margin outside autograd), s = 64, PyTorch's batch-norm running variance.
Changed: bf16 backbone with a float32 head where theirs runs fp16 autocast (fp16 = True);
batch-norm statistics over the global batch where theirs are per GPU (128); every class
centre each step as theirs (sample_rate 1). Any number of devices: the batch and the
85,742 class centres are split over all of them.

  python -m sface_jax.main --config ms1mv2_r50_arcface --workdir runs/r50_arcface
  python -m sface_jax.main --config ms1mv2_r50_arcface:runlocal --workdir /tmp/r
"""

from sface_jax.configs import base


def get_config(variant: str | None = None):
  config = base.get_config()
  base.use_dataset(config, 'ms1mv2')
  base.arcface_torch(config)
  return base.finish(config, variant)
