"""IR-50 + SFace on CASIA-WebFace: a = 0.87, b = 1.2 (zhongyy/SFace SFace_torch/train.sh).

train.sh: batch 256, lr 0.1 ÷10 at epochs 50, 70 and 80; the script's default 125 epochs
(train.sh does not override it); no warm-up, no gradient clipping. Optimiser: the base one
(zhongyy/SFace's: SGD momentum 0.9, weight decay 5e-4 except on batch-norm parameters), with
PyTorch's batch-norm running variance. The seed reproduction (seed 000) ran the same command
with b = 1.22.

Not zhongyy's (train_SFace_torch.py): the backbone is insightface's IResNet-50, where theirs
is face.evoLVe's IR_50 (no batch norm between a block's first convolution and its PReLU,
dropout 0.5 before the embedding layer, a learnable last γ; Xavier-normal initialisation,
PReLU slopes 1); the class centres start from N(0, 0.01²) (insightface's), where theirs are
Xavier-normal with std 2·√(2/C), ‖W_j‖ ≈ 0.6 (--config.head.center_init=xavier is close:
2·√(2/(D + C))); the embedding layer's bias is not decayed (theirs is).

  python -m sface_jax.main --config casia_r50_sface --workdir runs/casia_sface
"""

from sface_jax.configs import base


def get_config(variant: str | None = None):
  config = base.get_config()
  base.use_dataset(config, 'casia')
  base.zhongyy_sface(config, a=0.87, b=1.2)
  config.batch_size = 256
  config.num_epochs = 125.0
  config.schedule.boundaries_epochs = (50.0, 70.0, 80.0)
  return base.finish(config, variant)
