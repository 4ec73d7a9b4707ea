"""MobileFaceNet + ArcFace on MS1MV2, insightface arcface_torch's configs/ms1mv2_mbf.py.

Their step (`base.arcface_torch`: global batch 1024, SGD lr 0.1, backbone gradient clipped
to 5, polynomial decay with power 1, margins (1, 0.5, 0), PyTorch's batch-norm running
variance) with that config's own weight decay, 1e-4 on every parameter (ms1mv2_r50: 5e-4),
and 40 epochs (the small model wants more than IR-50's 20). bf16 backbone where theirs runs
fp16 autocast.

  python -m sface_jax.main --config ms1mv2_mbf_arcface --workdir runs/mbf_arcface
"""

from sface_jax.configs import base


def get_config(variant: str | None = None):
  config = base.get_config()
  base.use_dataset(config, 'ms1mv2')
  base.arcface_torch(config)
  config.model.name = 'mbf'
  config.optimizer.weight_decay = 1e-4
  config.num_epochs = 40.0
  return base.finish(config, variant)
