"""IR-50 + CosFace (m = 0.35, s = 64; Wang et al. 2018, §4.1) on MS1MV2.

arcface_torch has no MS1MV2 CosFace config: this is its ms1mv2_r50 step (as
ms1mv2_r50_arcface.py: global batch 1024, SGD lr 0.1, weight decay 5e-4 on every
parameter, backbone gradient clipped to 5, 20 epochs of polynomial decay with power 1, bf16
backbone) with CosFace's margin at the paper's 0.35 (arcface_torch's CosFace configs, e.g.
glint360k_r100, use m = 0.4: --config.head.cosface.m=0.4).

  python -m sface_jax.main --config ms1mv2_r50_cosface --workdir runs/r50_cosface
"""

from sface_jax.configs import base


def get_config(variant: str | None = None):
  config = base.get_config()
  base.use_dataset(config, 'ms1mv2')
  base.arcface_torch(config)
  config.head.name = 'cosface'
  return base.finish(config, variant)
