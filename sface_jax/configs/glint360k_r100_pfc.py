"""IR-100 + CosFace (m = 0.4) on Glint360K, insightface arcface_torch's configs/glint360k_r100.py.

Their step (`base.arcface_torch`: global batch 1024 (128 × 8 GPUs), SGD lr 0.1, backbone
gradient clipped to 5, 20 epochs of polynomial decay with power 1, PyTorch's batch-norm
running variance; bf16 backbone where theirs runs fp16 autocast) with that config's margins
(1, 0, 0.4) and weight decay, 1e-4 on every parameter. Meant for 8 devices (any count
works): the 360,232 × 512 class-centre matrix is split by class over all of them (45,029
rows, 92 MB each, with its momentum 184 MB). insightface's recipe keeps every class every
step (sample_rate 1.0); Partial FC's --config.head.sample_rate=0.1 cuts the head's compute
and memory tenfold (README § Large classifiers: how to pick it).

  python -m sface_jax.main --config glint360k_r100_pfc --workdir runs/glint_r100
"""

from sface_jax.configs import base


def get_config(variant: str | None = None):
  config = base.get_config()
  base.use_dataset(config, 'glint360k')
  base.arcface_torch(config)
  config.model.name = 'r100'
  config.head.name = 'cosface'
  config.head.cosface.m = 0.4
  config.optimizer.weight_decay = 1e-4
  return base.finish(config, variant)
