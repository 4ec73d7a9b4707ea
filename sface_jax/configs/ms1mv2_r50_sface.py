"""IR-50 + SFace on MS1MV2: a = 0.9, b = 1.2, k = 80, s = 64 (Zhong et al. 2021, MS1MV2).

Optimiser as zhongyy/SFace (SFace_torch/config.py, train_SFace_torch.py), which is the base
one: SGD lr 0.1, momentum 0.9, weight decay 5e-4 except on batch-norm parameters; PyTorch's
batch-norm running variance (backbone and centre initialisation: configs/casia_r50_sface.py
says how they differ from zhongyy's). Schedule:
the ArcFace paper's MS1MV2 schedule (Deng et al. 2019, §3.1): batch 512, lr ÷10 at 100 k and
160 k iterations, stop at 180 k. bf16 backbone.

  python -m sface_jax.main --config ms1mv2_r50_sface --workdir runs/r50_sface
"""

from sface_jax.configs import base


def get_config(variant: str | None = None):
  config = base.get_config()
  base.use_dataset(config, 'ms1mv2')
  base.zhongyy_sface(config, a=0.9, b=1.2)
  config.num_epochs = base.epochs(180_000, config.batch_size, 'ms1mv2')
  config.schedule.boundaries_epochs = tuple(
      base.epochs(s, config.batch_size, 'ms1mv2') for s in (100_000, 160_000))
  return base.finish(config, variant)
