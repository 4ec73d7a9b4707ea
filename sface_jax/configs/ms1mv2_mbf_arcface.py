"""MobileFaceNet + ArcFace on MS1MV2, insightface arcface_torch's configs/ms1mv2_mbf.py.

Global batch 1024, SGD lr 0.1, weight decay 1e-4 on every parameter, polynomial decay, 40
epochs (the small model wants more than IR-50's 20), bf16 backbone.

  python -m sface_jax.main --config ms1mv2_mbf_arcface --workdir runs/mbf_arcface
"""

from sface_jax.configs import base


def get_config(variant: str | None = None):
  config = base.get_config()
  base.use_dataset(config, 'ms1mv2')
  base.arcface_torch(config)
  config.model.name = 'mbf'
  config.num_epochs = 40.0  # the small model wants more than IR-50's 20
  return base.finish(config, variant)
