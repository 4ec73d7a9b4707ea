"""MobileFaceNet + ArcFace on MS1MV2, insightface arcface_torch's configs/ms1mv2_mbf.py.

As configs/ms1mv2_r50_arcface.py but 40 epochs (the small model wants more).

  python -m sface_jax.main --config configs/ms1mv2_mbf_arcface.py --workdir runs/mbf_arcface
"""

from configs import ms1mv2_r50_arcface


def get_config():
  config = ms1mv2_r50_arcface.get_config()
  config.model.name = 'mbf'
  config.num_epochs = 40.0
  return config
