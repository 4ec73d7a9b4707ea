"""IR-100 + CosFace (m = 0.4) on Glint360K, insightface arcface_torch's configs/glint360k_r100.py.

Global batch 1024 (128 × 8 GPUs), SGD lr 0.1, weight decay 1e-4 on every parameter, 20
epochs, polynomial decay. The 360,232 × 512 class-centre matrix (0.7 GB in float32, 2.1 GB
with gradient and momentum) is replicated on each device for now; the scale-out work splits
it by class across devices, with Partial FC's negative-class sampling (insightface's recipe
itself uses sample_rate = 1.0: every class, every step).

  python -m sface_jax.main --config configs/glint360k_r100_pfc.py --workdir runs/glint_r100
"""

from configs import datasets
from configs import ms1mv2_r50_arcface


def get_config():
  config = ms1mv2_r50_arcface.get_config()
  datasets.use(config, datasets.GLINT360K)
  config.model.name = 'r100'
  config.head.name = 'cosface'
  config.head.cosface.m = 0.4
  return config
