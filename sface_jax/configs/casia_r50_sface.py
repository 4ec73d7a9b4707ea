"""IR-50 + SFace on CASIA-WebFace: a = 0.87, b = 1.2 (zhongyy/SFace SFace_torch/train.sh).

train.sh: batch 256, lr 0.1 ÷10 at epochs 50, 70 and 80; the script's default 125 epochs
(train.sh does not override it). Optimiser: the base one (zhongyy/SFace's: weight decay 5e-4
except on batch-norm parameters). The seed reproduction (seed 000) ran the same command with
b = 1.22.

  python -m sface_jax.main --config casia_r50_sface --workdir runs/casia_sface
"""

from sface_jax.configs import base


def get_config(variant: str | None = None):
  config = base.get_config()
  base.use_dataset(config, 'casia')
  config.model.dtype = 'bfloat16'
  config.head.name = 'sface'
  config.head.sface.a = 0.87
  config.head.sface.b = 1.2
  config.batch_size = 256
  config.num_epochs = 125.0
  config.schedule.boundaries_epochs = (50.0, 70.0, 80.0)
  return base.finish(config, variant)
