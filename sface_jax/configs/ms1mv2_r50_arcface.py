"""IR-50 + ArcFace on MS1MV2, insightface arcface_torch's recipe (configs/ms1mv2_r50.py).

Global batch 1024 (128 per GPU × 8), SGD lr 0.1 momentum 0.9 weight decay 1e-4 on every
parameter, 20 epochs, polynomial decay (power 2) with no warm-up, margins (1, 0.5, 0),
s = 64, bf16 backbone with a float32 head (insightface: fp16 = True). Any number of devices:
the batch and the 85,742 class centres are split over all of them.

  python -m sface_jax.main --config ms1mv2_r50_arcface --workdir runs/r50_arcface
  python -m sface_jax.main --config ms1mv2_r50_arcface:runlocal --workdir /tmp/r
"""

from sface_jax.configs import base


def get_config(variant: str | None = None):
  config = base.get_config()
  base.use_dataset(config, 'ms1mv2')
  base.arcface_torch(config)
  return base.finish(config, variant)
