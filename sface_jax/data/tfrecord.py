"""The on-disk training format: TFRecord shards of `tf.train.Example` plus `dataset_info.json`.

One record per image:
  image/encoded      bytes  the original JPEG or PNG file bytes, never re-encoded
  image/class/label  int64  0-based, contiguous identity index in [0, num_classes)

`dataset_info.json` (written last by the converter, so its presence means "complete"):
  {"format": "sface_jax.tfrecord/1", "num_classes": C, "num_examples": N,
   "image_size": [H, W], "source": "...",
   "shards": [{"file": "train-00000-of-00016.tfrecord", "num_examples": n}, ...],
   "verification": {"lfw": "verification/lfw.npz", ...}}
"""

import dataclasses
import json
import os
from typing import Any

from sface_jax import files

FORMAT = 'sface_jax.tfrecord/1'
INFO_FILE = 'dataset_info.json'
IMAGE_KEY = 'image/encoded'
LABEL_KEY = 'image/class/label'


def dataset_dir(data_dir: str, workdir: str) -> str:
  """`config.data.dir`, where '' means `<workdir>/data` (the demo converts into it)."""
  return data_dir or os.path.join(workdir, 'data')


def shard_name(index: int, num_shards: int) -> str:
  return f'train-{index:05d}-of-{num_shards:05d}.tfrecord'


def encode_example(image_bytes: bytes, label: int) -> bytes:
  """Serialises one image and its label as a `tf.train.Example`."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  feature = {
      IMAGE_KEY: tf.train.Feature(bytes_list=tf.train.BytesList(value=[image_bytes])),
      LABEL_KEY: tf.train.Feature(int64_list=tf.train.Int64List(value=[int(label)])),
  }
  return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def parse_example(serialized):
  """tf.data map function: serialised Example -> {'image/encoded', 'image/class/label'}."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  features = {
      IMAGE_KEY: tf.io.FixedLenFeature([], tf.string),
      LABEL_KEY: tf.io.FixedLenFeature([], tf.int64),
  }
  return tf.io.parse_single_example(serialized, features)


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What `dataset_info.json` says about a converted dataset."""
  directory: str
  num_classes: int
  num_examples: int
  image_size: tuple[int, int]
  shards: tuple[tuple[str, int], ...]  # (file name, number of examples)
  verification: dict[str, str]  # set name -> path relative to `directory`
  source: str = ''

  @property
  def shard_paths(self) -> list[str]:
    return [os.path.join(self.directory, name) for name, _ in self.shards]

  def verification_path(self, name: str) -> str:
    return os.path.join(self.directory, self.verification[name])

  def to_json(self) -> dict[str, Any]:
    return {
        'format': FORMAT,
        'num_classes': self.num_classes,
        'num_examples': self.num_examples,
        'image_size': list(self.image_size),
        'source': self.source,
        'shards': [{'file': f, 'num_examples': n} for f, n in self.shards],
        'verification': dict(self.verification),
    }


def write_info(info: DatasetInfo) -> str:
  """Writes `dataset_info.json` atomically (temporary name, then rename)."""
  path = os.path.join(info.directory, INFO_FILE)
  with files.atomic_write(path) as f:
    json.dump(info.to_json(), f, indent=1)
  return path


def read_info(directory: str) -> DatasetInfo:
  """Reads and checks `directory/dataset_info.json`; errors name the file and the field."""
  path = os.path.join(directory, INFO_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(
        f'{path} not found: {directory} is not a converted dataset (or its conversion did '
        'not finish). Run python -m sface_jax.tools.convert --input ... --output '
        f'{directory}')
  try:
    with open(path) as f:
      raw = json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f'{path}: not valid JSON ({e})') from e
  if raw.get('format') != FORMAT:
    raise ValueError(f'{path}: field "format" is {raw.get("format")!r}, expected {FORMAT!r}')
  try:
    shards = tuple((s['file'], int(s['num_examples'])) for s in raw['shards'])
    info = DatasetInfo(
        directory=directory,
        num_classes=int(raw['num_classes']),
        num_examples=int(raw['num_examples']),
        image_size=tuple(int(v) for v in raw['image_size']),
        shards=shards,
        verification=dict(raw.get('verification', {})),
        source=str(raw.get('source', '')),
    )
  except (KeyError, TypeError, ValueError) as e:
    raise ValueError(f'{path}: missing or malformed field {e}') from e
  if sum(n for _, n in shards) != info.num_examples:
    raise ValueError(f'{path}: shard example counts sum to {sum(n for _, n in shards)}, '
                     f'field "num_examples" says {info.num_examples}')
  for shard in info.shard_paths:
    if not os.path.exists(shard):
      raise FileNotFoundError(f'{path} lists {shard}, which does not exist')
  return info
