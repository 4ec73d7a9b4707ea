"""IR-50 + CosFace (m = 0.35, s = 64; Wang et al. 2018, §4.1) on MS1MV2.

Everything else as configs/ms1mv2_r50_arcface.py (insightface's MS1MV2 recipe).

  python -m sface_jax.main --config configs/ms1mv2_r50_cosface.py --workdir runs/r50_cosface
"""

from configs import ms1mv2_r50_arcface


def get_config():
  config = ms1mv2_r50_arcface.get_config()
  config.head.name = 'cosface'
  config.head.cosface.m = 0.35
  return config
