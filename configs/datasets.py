"""Training sets: identity and image counts, written once.

Counts are those of the insightface releases (the `property` file and `train.idx` of each),
as listed in insightface's arcface_torch recipes. `dir` is where `python -m
sface_jax.tools.convert` wrote the TFRecords; override it with `--config.data.dir=...`.
"""

import ml_collections


def _dataset(directory: str, num_classes: int, num_images: int) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(
      dict(dir=directory, num_classes=num_classes, num_images=num_images))


# insightface "faces_emore" (MS1M-ArcFace): arcface_torch configs/ms1mv2_r50.py
MS1MV2 = _dataset('data/ms1mv2', num_classes=85_742, num_images=5_822_653)
# insightface "glint360k": arcface_torch configs/glint360k_r100.py
GLINT360K = _dataset('data/glint360k', num_classes=360_232, num_images=17_091_657)
# insightface "faces_webface_112x112" (CASIA-WebFace, cleaned)
CASIA = _dataset('data/casia', num_classes=10_572, num_images=494_414)


def use(config: ml_collections.ConfigDict, dataset: ml_collections.ConfigDict) -> None:
  """Points `config.data` at `dataset` (directory and the identity count it must hold)."""
  config.data.dir = dataset.dir
  config.data.num_classes = dataset.num_classes


def epochs(steps: int, batch_size: int, dataset: ml_collections.ConfigDict) -> float:
  """An iteration count from a paper, as epochs of `dataset` at `batch_size`."""
  return steps * batch_size / dataset.num_images
