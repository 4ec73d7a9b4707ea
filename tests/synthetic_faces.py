"""A tiny, learnable stand-in for a face dataset, written in the real on-disk format.

Each identity is a smooth random colour pattern; its images are that pattern shifted by a
pixel or two plus noise, JPEG-encoded. A small network separates them within a few steps,
so "loss falls" means something, and everything goes through the converter's format
(TFRecord shards, sface_jax_dataset.json, a verification .npz).
"""

import io
import os

import numpy as np
from PIL import Image

from sface_jax.data import pair_sets
from sface_jax.data import tfrecord


def _pattern(rng: np.random.Generator, size: int) -> np.ndarray:
  coarse = rng.uniform(0, 255, (4, 4, 3)).astype(np.uint8)
  return np.asarray(Image.fromarray(coarse).resize((size, size), Image.BILINEAR), np.float32)


def _image(rng: np.random.Generator, pattern: np.ndarray) -> bytes:
  shifted = np.roll(pattern, tuple(rng.integers(-2, 3, 2)), axis=(0, 1))
  pixels = np.clip(shifted + rng.normal(0, 12, shifted.shape), 0, 255).astype(np.uint8)
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, format='JPEG', quality=95)
  return buffer.getvalue()


def write_dataset(directory: str, *, num_classes: int = 8, per_class: int = 8,
                  image_size: int = 32, num_shards: int = 2, num_val_identities: int = 4,
                  seed: int = 0) -> tfrecord.DatasetInfo:
  """Writes shards + sface_jax_dataset.json + verification/val.npz; returns the info."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  os.makedirs(os.path.join(directory, 'verification'), exist_ok=True)
  patterns = [_pattern(rng, image_size) for _ in range(num_classes + num_val_identities)]
  examples = [(_image(rng, patterns[c]), c) for c in range(num_classes)
              for _ in range(per_class)]
  order = rng.permutation(len(examples))
  shards = []
  for shard in range(num_shards):
    name = tfrecord.shard_name(shard, num_shards)
    members = order[shard::num_shards]
    with tf.io.TFRecordWriter(os.path.join(directory, name)) as writer:
      for index in members:
        writer.write(tfrecord.encode_example(*examples[index]))
    shards.append((name, len(members)))

  # Verification pairs among held-out identities: half same, half different people.
  val_patterns = patterns[num_classes:]
  images, issame = [], []
  for i in range(4 * num_val_identities):
    a = i % num_val_identities
    b = a if i % 2 == 0 else (a + 1) % num_val_identities
    images += [_image(rng, val_patterns[a]), _image(rng, val_patterns[b])]
    issame.append(a == b)
  pairs = pair_sets.PairSet(name='val', images=images, issame=np.array(issame))
  pair_sets.write_npz(pairs, os.path.join(directory, 'verification', 'val.npz'))

  info = tfrecord.DatasetInfo(
      directory=directory, num_classes=num_classes, num_examples=len(examples),
      image_size=(image_size, image_size), shards=tuple(shards),
      verification={'val': 'verification/val.npz'}, source='tests/synthetic_faces.py')
  tfrecord.write_info(info)
  return info
