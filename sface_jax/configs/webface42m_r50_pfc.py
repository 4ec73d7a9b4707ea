"""IR-50 + CosFace (m = 0.4) with Partial FC 0.2 on WebFace42M, insightface arcface_torch's
configs/wf42m_pfc02_8gpus_r50_bs4k.py.

2,059,906 identities, 42.5 M images. Their step (`base.arcface_torch`: SGD momentum 0.9,
weight decay 5e-4 on every parameter, backbone gradient clipped to 5, polynomial decay with
power 1, PyTorch's batch-norm running variance; bf16 backbone where theirs runs fp16
autocast) with that config's values: 8 GPUs × batch 512 (global 4096), sample_rate 0.2, lr
0.4, 20 epochs with 2 warm-up epochs, whose first step runs at the peak lr 0.4 as
PolynomialLRWarmup's does (then lr·1/W, lr·2/W, …). Partial FC's negatives are drawn by our
own sampler (the same rule, different draws). Assumes 8 devices or more: each of 8 holds
257,489 class centres (527 MB, 1.05 GB with momentum) and samples 51,498 of them per step;
on 64 devices, 32,187 each (README § Large classifiers; `python -m sface_jax.plan` prints
the memory for your device count before you rent them).

  python -m sface_jax.main --config webface42m_r50_pfc --workdir runs/wf42m_r50
"""

from sface_jax.configs import base


def get_config(variant: str | None = None):
  config = base.get_config()
  base.use_dataset(config, 'webface42m')
  base.arcface_torch(config)
  config.head.name = 'cosface'
  config.head.cosface.m = 0.4
  config.head.sample_rate = 0.2
  config.batch_size = 4096
  config.schedule.learning_rate = 0.4
  config.schedule.warmup_epochs = 2.0
  return base.finish(config, variant)
