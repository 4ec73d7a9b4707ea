"""IR-50 + CosFace (m = 0.35, s = 64; Wang et al. 2018, §4.1) on MS1MV2.

Optimiser and schedule of insightface's MS1MV2 recipe (as ms1mv2_r50_arcface.py):
global batch 1024, SGD lr 0.1, weight decay 1e-4 on every parameter, 20 epochs, polynomial
decay (power 2), bf16 backbone.

  python -m sface_jax.main --config ms1mv2_r50_cosface --workdir runs/r50_cosface
"""

from sface_jax.configs import base


def get_config(variant: str | None = None):
  config = base.get_config()
  base.use_dataset(config, 'ms1mv2')
  base.arcface_torch(config)
  config.head.name = 'cosface'
  return base.finish(config, variant)
