"""The on-disk training format: TFRecord shards of `tf.train.Example` and an info file.

One record per image:
  image/encoded      bytes  the original JPEG or PNG file bytes, never re-encoded
  image/class/label  int64  0-based, contiguous identity index in [0, num_classes)

`sface_jax_dataset.json` (written last by the converter, so its presence means "complete"):
  {"format": "sface_jax.tfrecord/1", "num_classes": C, "num_examples": N,
   "image_size": [H, W], "source": "...",
   "shards": [{"file": "train-00000-of-00016.tfrecord", "num_examples": n, "bytes": b}, ...],
   "verification": {"lfw": "verification/lfw.npz", ...}}
"bytes" (each shard's size when written) finds a truncated shard before training reads it.
Datasets converted before 2026-12 kept this file as `dataset_info.json` and have no "bytes";
they are read as they are.

TFDS. The converter also writes TensorFlow Datasets metadata beside the shards
(`write_tfds_metadata`: TFDS's own `dataset_info.json`, `features.json` and the class
names), so `tfds.builder_from_directory(dir)` reads the same files, e.g. in big_vision or
scenic. TFDS maps a nested feature dict onto '/'-joined record keys, so our records are
`{'image': {'encoded': Image, 'class': {'label': ClassLabel}}}` to it; no second copy.
"""

import dataclasses
import json
import os
import re
from typing import Any

from sface_jax import files
from sface_jax.data import images

FORMAT = 'sface_jax.tfrecord/1'
INFO_FILE = 'sface_jax_dataset.json'
LEGACY_INFO_FILE = 'dataset_info.json'  # our name before TFDS's metadata took it
IMAGE_KEY = 'image/encoded'
LABEL_KEY = 'image/class/label'
SPLIT = 'train'
# `shard_name` as a TFDS file template: SHARD_X_OF_Y is '00003-of-00016'.
TFDS_FILE_TEMPLATE = '{SPLIT}-{SHARD_X_OF_Y}.{FILEFORMAT}'


class DamagedShardError(ValueError):
  """A shard that is not what the conversion wrote; the message names it and the remedy."""


def dataset_dir(data_dir: str, workdir: str) -> str:
  """`config.data.dir`, where '' means `<workdir>/data` (the demo converts into it)."""
  return data_dir or os.path.join(workdir, 'data')


def shard_name(index: int, num_shards: int) -> str:
  return f'{SPLIT}-{index:05d}-of-{num_shards:05d}.tfrecord'


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
  shard_bytes: tuple[int, ...] = ()  # each shard's size as written; () when not recorded

  @property
  def shard_paths(self) -> list[str]:
    return [os.path.join(self.directory, name) for name, _ in self.shards]

  def verification_path(self, name: str) -> str:
    return os.path.join(self.directory, self.verification[name])

  def to_json(self) -> dict[str, Any]:
    shards = [{'file': f, 'num_examples': n} for f, n in self.shards]
    for entry, size in zip(shards, self.shard_bytes):  # none when not recorded
      entry['bytes'] = size
    return {
        'format': FORMAT,
        'num_classes': self.num_classes,
        'num_examples': self.num_examples,
        'image_size': list(self.image_size),
        'source': self.source,
        'shards': shards,
        'verification': dict(self.verification),
    }


def write_info(info: DatasetInfo) -> str:
  """Writes `sface_jax_dataset.json` atomically (temporary name, then rename), with each
  shard's size as it is on disk now."""
  info = dataclasses.replace(info, shard_bytes=tuple(os.path.getsize(p)
                                                     for p in info.shard_paths))
  path = os.path.join(info.directory, INFO_FILE)
  with files.atomic_write(path) as f:
    json.dump(info.to_json(), f, indent=1)
  return path


def info_path(directory: str) -> str | None:
  """Where `directory`'s info file is (ours, or one of ours under its old name); None when
  there is none (not converted, or not finished)."""
  path = os.path.join(directory, INFO_FILE)
  if os.path.exists(path):
    return path
  legacy = os.path.join(directory, LEGACY_INFO_FILE)
  try:
    with open(legacy) as f:
      if json.load(f).get('format') == FORMAT:
        return legacy
  except (OSError, ValueError, AttributeError):  # absent, or TFDS's file, or not JSON
    pass
  return None


def read_info(directory: str, check_sizes: bool = True) -> DatasetInfo:
  """Reads and checks `directory/sface_jax_dataset.json`; errors name the file and the field.

  With `check_sizes`, a shard whose size differs from the one recorded is a
  `DamagedShardError` naming it and saying how to recover.
  """
  path = info_path(directory)
  if path is None:
    raise FileNotFoundError(
        f'{os.path.join(directory, INFO_FILE)} not found: {directory} is not a converted '
        'dataset (or its conversion did not finish). Run python -m sface_jax.tools.convert '
        f'--input ... --output {directory}')
  try:
    with open(path) as f:
      raw = json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f'{path}: not valid JSON ({e})') from e
  if raw.get('format') != FORMAT:
    raise ValueError(f'{path}: field "format" is {raw.get("format")!r}, expected {FORMAT!r}')
  try:
    shards = tuple((s['file'], int(s['num_examples'])) for s in raw['shards'])
    sizes = [s.get('bytes') for s in raw['shards']]
    info = DatasetInfo(
        directory=directory,
        num_classes=int(raw['num_classes']),
        num_examples=int(raw['num_examples']),
        image_size=tuple(int(v) for v in raw['image_size']),
        shards=shards,
        verification=dict(raw.get('verification', {})),
        source=str(raw.get('source', '')),
        shard_bytes=tuple(int(b) for b in sizes) if None not in sizes else (),
    )
  except (KeyError, TypeError, ValueError, AttributeError) as e:
    raise ValueError(f'{path}: missing or malformed field {e}') from e
  if sum(n for _, n in shards) != info.num_examples:
    raise ValueError(f'{path}: shard example counts sum to {sum(n for _, n in shards)}, '
                     f'field "num_examples" says {info.num_examples}')
  for shard in info.shard_paths:
    if not os.path.exists(shard):
      raise FileNotFoundError(f'{path} lists {shard}, which does not exist')
  if check_sizes:
    for shard, what in shards_of_wrong_size(info).items():
      raise _damaged(info, shard, what)
  return info


def _damaged(info: DatasetInfo, shard: str, what: str) -> DamagedShardError:
  """The error for a damaged shard: what is wrong, and the remedy."""
  return DamagedShardError(
      f'{shard}: {what}. To recover, delete that file and run the conversion again, with '
      f'the same arguments (python -m sface_jax.tools.convert --input SOURCE --output '
      f'{info.directory} ...; this dataset was made from {info.source or "an unnamed source"}'
      '): it writes the missing shard and keeps the others.')


def shards_of_wrong_size(info: DatasetInfo) -> dict[str, str]:
  """{shard path: what is wrong} for each shard whose size on disk is not the recorded one
  (cheap: a stat per shard; nothing to check when no sizes are recorded)."""
  wrong = {}
  for shard, expected in zip(info.shard_paths, info.shard_bytes):
    actual = os.path.getsize(shard)
    if actual != expected:
      wrong[shard] = (f'{actual:,} bytes, but {INFO_FILE} records {expected:,}: the file is '
                      'truncated or damaged')
  return wrong


def find_damaged_shard(info: DatasetInfo) -> DamagedShardError | None:
  """Reads every record of every shard to find one that TensorFlow cannot read
  (truncated, or failing its CRC) or that holds another number of records than recorded.

  The slow path, for a read error that names no file: it reads each shard once, in C++.
  """
  tf = images.tensorflow()
  counts = dict(zip(info.shard_paths, (n for _, n in info.shards)))
  for shard in info.shard_paths:
    try:
      found = int(tf.data.TFRecordDataset(shard).reduce(
          tf.constant(0, tf.int64), lambda n, _: n + 1))
    except tf.errors.OpError as e:
      return _damaged(info, shard, f'unreadable ({images.tf_error_reason(e)})')
    if found != counts.get(shard, found):
      return _damaged(info, shard, f'{found:,} records, but {INFO_FILE} records '
                                   f'{counts[shard]:,}')
  return None


def write_tfds_metadata(info: DatasetInfo, class_names: list[str] | None = None) -> None:
  """Writes TFDS's metadata for `info`'s shards (module docstring), so that
  `tfds.builder_from_directory(info.directory).as_dataset(split='train')` reads them.

  Its `dataset_info.json` names the dataset after the folder and records the shard
  lengths and sizes (TFDS does not read the shards to find them). Labels are a
  `ClassLabel` with `class_names` (the identity folders) when given, else with
  `num_classes`.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (slow to import)
  features = tfds.features
  label = (features.ClassLabel(names=list(class_names)) if class_names
           else features.ClassLabel(num_classes=info.num_classes))
  spec = features.FeaturesDict({'image': features.FeaturesDict({
      'encoded': features.Image(shape=(None, None, 3)),
      'class': features.FeaturesDict({'label': label})})})
  name = re.sub(r'\W+', '_', os.path.basename(os.path.abspath(info.directory))).strip('_')
  template = tfds.core.ShardedFileTemplate(
      data_dir=info.directory, template=TFDS_FILE_TEMPLATE, dataset_name=name or 'faces',
      split=SPLIT, filetype_suffix='tfrecord')
  split = tfds.core.SplitInfo(
      name=SPLIT, shard_lengths=[n for _, n in info.shards],
      num_bytes=sum(os.path.getsize(p) for p in info.shard_paths), filename_template=template)
  tfds.folder_dataset.write_metadata(
      data_dir=info.directory, features=spec, split_infos=[split], filename_template=template,
      check_data=False, description=f'Faces converted by sface_jax from {info.source}.')
