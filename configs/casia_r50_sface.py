"""IR-50 + SFace on CASIA-WebFace: a = 0.87, b = 1.2 (zhongyy/SFace SFace_torch/train.sh).

train.sh: batch 256, lr 0.1 ÷10 at epochs 50, 70 and 80; the script's default 125 epochs
(train.sh does not override it). Optimiser as configs/ms1mv2_r50_sface.py (weight decay 5e-4
except on batch-norm parameters). The seed reproduction (seed 000) ran the same command with
b = 1.22.

  python -m sface_jax.main --config configs/casia_r50_sface.py --workdir runs/casia_sface
"""

from configs import datasets
from configs import ms1mv2_r50_sface


def get_config():
  config = ms1mv2_r50_sface.get_config()
  datasets.use(config, datasets.CASIA)
  config.head.sface.a = 0.87
  config.batch_size = 256
  config.num_epochs = 125.0
  config.schedule.boundaries_epochs = (50.0, 70.0, 80.0)
  return config
