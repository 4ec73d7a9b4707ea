"""IR-50 + SFace on MS1MV2: a = 0.9, b = 1.2, k = 80, s = 64 (Zhong et al. 2021, MS1MV2).

Optimiser as zhongyy/SFace (SFace_torch/config.py, train_SFace_torch.py): SGD lr 0.1,
momentum 0.9, weight decay 5e-4 except on batch-norm parameters (seed 000's two parameter
groups). Schedule: the ArcFace paper's MS1MV2 schedule (Deng et al. 2019, §3.1): batch 512,
lr ÷10 at 100 k and 160 k iterations, stop at 180 k.

  python -m sface_jax.main --config configs/ms1mv2_r50_sface.py --workdir runs/r50_sface
"""

from configs import base
from configs import datasets


def get_config():
  config = base.get_config()
  datasets.use(config, datasets.MS1MV2)
  config.model.name = 'r50'
  config.model.dtype = 'bfloat16'
  config.head.name = 'sface'
  config.head.sface = dict(k=80.0, a=0.9, b=1.2)
  config.batch_size = 512
  config.num_epochs = datasets.epochs(180_000, 512, datasets.MS1MV2)
  config.schedule.name = 'piecewise'
  config.schedule.learning_rate = 0.1
  config.schedule.boundaries_epochs = tuple(
      datasets.epochs(s, 512, datasets.MS1MV2) for s in (100_000, 160_000))
  config.optimizer.weight_decay = 5e-4
  return config
