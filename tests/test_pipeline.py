"""Tests of sface_jax.data.pipeline on TFRecord shards written here.

The synthetic fixture stores PNGs (lossless) whose pixels carry the record's id: pixel (0, 0)
holds (id // 256, id % 256, label) and pixel (1, 0) a marker that moves to the right edge when
the image is flipped, so a decoded batch says which records it holds, whether each was
flipped and whether image and label still belong together.
"""

import io
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
from PIL import Image, ImageOps
import pytest
import tensorflow as tf

from sface_jax.data import pipeline
from sface_jax.data import tfrecord

SIDE = 8  # synthetic images are SIDE x SIDE
MARKER = 250


def _write_shards(directory, shards, num_classes, verification=None):
  """shards: list of lists of (image bytes, label); returns the DatasetInfo read back."""
  os.makedirs(directory, exist_ok=True)
  entries = []
  for s, records in enumerate(shards):
    name = tfrecord.shard_name(s, len(shards))
    with tf.io.TFRecordWriter(os.path.join(directory, name)) as writer:
      for image_bytes, label in records:
        writer.write(tfrecord.encode_example(image_bytes, label))
    entries.append((name, len(records)))
  tfrecord.write_info(tfrecord.DatasetInfo(
      directory=str(directory), num_classes=num_classes,
      num_examples=sum(n for _, n in entries), image_size=(SIDE, SIDE),
      shards=tuple(entries), verification=verification or {}))
  return tfrecord.read_info(str(directory))


def _id_png(record_id, label):
  pixels = np.zeros((SIDE, SIDE, 3), np.uint8)
  pixels[0, 0] = (record_id // 256, record_id % 256, label)
  pixels[1, 0] = MARKER
  buf = io.BytesIO()
  Image.fromarray(pixels).save(buf, 'PNG')
  return buf.getvalue()


def _synthetic(directory, shard_sizes, num_classes=7):
  """Record ids are consecutive over the shards; label = id % num_classes."""
  shards, next_id = [], 0
  for size in shard_sizes:
    shards.append([(_id_png(i, i % num_classes), i % num_classes)
                   for i in range(next_id, next_id + size)])
    next_id += size
  return _write_shards(directory, shards, num_classes)


def _read_ids(images):
  """Normalised batch -> (record ids, flipped flags, labels stored in the pixels)."""
  pixels = np.rint(np.asarray(images) * 128.0 + 127.5).astype(np.int64)
  flipped = pixels[:, 1, -1, 0] == MARKER
  corner = np.where(flipped[:, None], pixels[:, 0, -1, :], pixels[:, 0, 0, :])
  return corner[:, 0] * 256 + corner[:, 1], flipped, corner[:, 2]


@pytest.fixture(scope='module')
def four_shards(tmp_path_factory):
  """40 records, 4 shards of 10: splits by files over 2 hosts."""
  return _synthetic(tmp_path_factory.mktemp('four_shards'), [10, 10, 10, 10])


@pytest.fixture(scope='module')
def uneven_shards(tmp_path_factory):
  """21 records in shards of 7, 6, 8: an epoch is no multiple of a batch."""
  return _synthetic(tmp_path_factory.mktemp('uneven_shards'), [7, 6, 8])


@pytest.fixture(scope='module')
def orl_jpegs(shared_data, tmp_path_factory):
  """Real faces: people s1-s4, padded to 112 x 112, RGB JPEG quality 90, one shard."""
  records = []
  for person in range(4):
    for shot in range(1, 11):
      face = Image.open(shared_data / 'orl' / 'faces' / f's{person + 1}' / f'{shot}.pgm')
      buf = io.BytesIO()
      ImageOps.pad(face, (112, 112)).convert('RGB').save(buf, 'JPEG', quality=90)
      records.append((buf.getvalue(), person))
  info = _write_shards(tmp_path_factory.mktemp('orl'), [records], num_classes=4)
  return info, records


def _batches(info, steps, **kwargs):
  kwargs.setdefault('seed', 0)
  kwargs.setdefault('shuffle_buffer', 16)
  kwargs.setdefault('image_size', SIDE)
  kwargs.setdefault('process_index', 0)
  kwargs.setdefault('process_count', 1)
  iterator = pipeline.train_dataset(info, **kwargs)
  return [next(iterator) for _ in range(steps)]


def _epoch_ids(info, epochs, **kwargs):
  """The ids one host reads in its first `epochs` epochs of its stream, one array per epoch."""
  kwargs.setdefault('process_index', 0)
  kwargs.setdefault('process_count', 1)
  split = pipeline.split_for_host(info, kwargs['process_index'], kwargs['process_count'],
                                  kwargs.get('host_split', 'records'))
  ds = pipeline.make_train_dataset(
      info, batch_size=kwargs['process_count'], image_size=SIDE, seed=kwargs.pop('seed', 0),
      shuffle_buffer=kwargs.pop('shuffle_buffer', 16), **kwargs).unbatch()
  images = np.stack([e['image'] for e in
                     ds.take(epochs * split.num_examples).as_numpy_iterator()])
  ids, _, _ = _read_ids(images)
  return ids.reshape(epochs, split.num_examples)


def test_real_faces_match_pil_decoding_and_formula(orl_jpegs):
  info, records = orl_jpegs
  # One shard and a one-element shuffle buffer: the file order, 16 per batch.
  batches = _batches(info, 2, batch_size=16, image_size=112, shuffle_buffer=1,
                     random_flip=False)
  for step, batch in enumerate(batches):
    assert batch['image'].shape == (16, 112, 112, 3) and batch['image'].dtype == np.float32
    assert batch['label'].shape == (16,) and batch['label'].dtype == np.int32
    for row in range(16):
      image_bytes, label = records[step * 16 + row]
      pixels = np.asarray(Image.open(io.BytesIO(image_bytes)).convert('RGB'), np.float64)
      expected = (pixels - 127.5) / 128.0
      np.testing.assert_array_equal(batch['image'][row], expected.astype(np.float32))
      assert batch['label'][row] == label


def test_real_faces_flip_is_an_exact_mirror_and_resize(orl_jpegs):
  info, records = orl_jpegs
  batch = _batches(info, 1, batch_size=40, image_size=112, shuffle_buffer=1)[0]
  flips = 0
  for row, (image_bytes, _) in enumerate(records):
    pixels = np.asarray(Image.open(io.BytesIO(image_bytes)).convert('RGB'), np.float32)
    expected = (pixels - 127.5) / 128.0
    if np.array_equal(batch['image'][row], expected[:, ::-1]):
      flips += 1
    else:
      np.testing.assert_array_equal(batch['image'][row], expected)
  assert 10 <= flips <= 30
  # image_size different from the stored size: resized (antialiased), still normalised.
  small = _batches(info, 1, batch_size=8, image_size=56, shuffle_buffer=1,
                   random_flip=False)[0]['image']
  assert small.shape == (8, 56, 56, 3) and small.dtype == np.float32
  full = _batches(info, 1, batch_size=8, image_size=112, shuffle_buffer=1,
                  random_flip=False)[0]['image']
  box = full.reshape(8, 56, 2, 56, 2, 3).mean(axis=(2, 4))
  assert np.abs(small - box).mean() < 0.02 and np.abs(small).max() <= 1.0


def test_16_bit_png_decodes_alike_in_training_and_evaluation(tmp_path):
  """One decoder for both: a 16-bit PNG keeps the high byte of each sample, ⌊v / 256⌋
  (libpng's strip, what TensorFlow's decoder does), in the training batch and in
  `images.decode` (evaluation, embed, IJB, export checks) alike."""
  from sface_jax.data import images as images_lib  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(16)
  grey = rng.integers(0, 65536, (SIDE, SIDE), dtype=np.uint16)
  grey[0, :4] = [0, 255, 256, 65535]  # the edges of the byte boundaries
  colour = rng.integers(0, 65536, (SIDE, SIDE, 3), dtype=np.uint16)
  reference = {'grey': np.repeat(np.floor(grey / 256.0)[..., None], 3, axis=2),
               'colour': np.floor(colour / 256.0)}  # float64
  encoded = {}
  buf = io.BytesIO()
  Image.fromarray(grey).save(buf, 'PNG')  # mode I;16: a 16-bit greyscale PNG
  encoded['grey'] = buf.getvalue()
  encoded['colour'] = tf.io.encode_png(tf.constant(colour)).numpy()  # 16-bit RGB PNG
  assert all(data[24] == 16 for data in encoded.values())  # IHDR bit depth
  info = _write_shards(tmp_path, [[(encoded['grey'], 0), (encoded['colour'], 1)]], 2)
  batch = _batches(info, 1, batch_size=2, shuffle_buffer=1, random_flip=False)[0]
  for row, name in enumerate(('grey', 'colour')):
    np.testing.assert_array_equal(images_lib.decode(encoded[name]), reference[name])
    np.testing.assert_array_equal(batch['image'][row],
                                  ((reference[name] - 127.5) / 128).astype(np.float32))
  # The converter keeps 16-bit greyscale (a 16-bit PGM) 16-bit: the same decoder reduces it.
  pgm = io.BytesIO()
  Image.fromarray(grey).save(pgm, 'PPM')
  stored, _ = images_lib.encode_for_storage(pgm.getvalue(), 'x.pgm')
  assert images_lib.image_format(stored) == 'png' and stored[24] == 16
  np.testing.assert_array_equal(images_lib.decode(stored), reference['grey'])


def test_labels_stay_with_their_images_and_batches_have_fixed_size(four_shards):
  # Local batch 12 does not divide the 40-record epoch: batches straddle epochs.
  for batch in _batches(four_shards, 10, batch_size=12):
    assert batch['image'].shape == (12, SIDE, SIDE, 3)
    assert batch['label'].shape == (12,)
    ids, _, pixel_labels = _read_ids(batch['image'])
    np.testing.assert_array_equal(batch['label'], ids % 7)
    np.testing.assert_array_equal(batch['label'], pixel_labels)
  # A local batch larger than an epoch still has its fixed size.
  batch = _batches(four_shards, 1, batch_size=64)[0]
  assert batch['image'].shape[0] == 64 and np.bincount(_read_ids(batch['image'])[0]).max() == 2


def test_files_split_hosts_read_disjoint_files_covering_each_epoch_once(four_shards):
  per_host = [_epoch_ids(four_shards, 2, process_index=h, process_count=2, host_split='files')
              for h in range(2)]
  for epoch in range(2):
    seen = np.concatenate([ids[epoch] for ids in per_host])
    np.testing.assert_array_equal(np.sort(seen), np.arange(four_shards.num_examples))
    assert not set(per_host[0][epoch] // 10) & set(per_host[1][epoch] // 10)  # own files
  assert not np.array_equal(per_host[0][0], per_host[0][1])  # reshuffled each epoch


@pytest.mark.parametrize('fixture,global_batch,process_count', [
    ('four_shards', 8, 2), ('uneven_shards', 8, 4), ('uneven_shards', 12, 3)])
def test_records_split_gives_the_same_global_batches_on_any_number_of_hosts(
    fixture, global_batch, process_count, request):
  """Host h's batch k is rows [h·L, (h+1)·L) of the one-host batch k, across epochs."""
  info = request.getfixturevalue(fixture)
  steps = 3 * info.num_examples // global_batch + 1  # three epochs and then some
  one_host = _batches(info, steps, batch_size=global_batch)
  hosts = [_batches(info, steps, batch_size=global_batch, process_index=h,
                    process_count=process_count) for h in range(process_count)]
  for k in range(steps):
    for key in ('image', 'label'):
      np.testing.assert_array_equal(np.concatenate([host[k][key] for host in hosts]),
                                    one_host[k][key], err_msg=f'batch {k} {key}')


def test_shuffle_mixes_shards_and_records_within_shards(four_shards):
  epochs = _epoch_ids(four_shards, 2)
  first = epochs[0]
  assert len(set(first[:8] // 10)) >= 3  # the first 8 come from at least 3 of the 4 shards
  for shard in range(4):  # and each shard's records come out of their file order
    within = first[first // 10 == shard]
    assert not np.array_equal(within, np.sort(within))
  other_seed = _epoch_ids(four_shards, 1, seed=1)[0]
  assert not np.array_equal(first, other_seed)


def test_flips_about_half_reproducible_and_seeded(four_shards):
  def flips(seed, **kwargs):
    batches = _batches(four_shards, 50, batch_size=8, seed=seed, **kwargs)
    ids, flipped, _ = _read_ids(np.concatenate([b['image'] for b in batches]))
    return ids, flipped

  ids, flipped = flips(0)
  assert 0.4 <= flipped.mean() <= 0.6
  again_ids, again = flips(0)
  np.testing.assert_array_equal(ids, again_ids)
  np.testing.assert_array_equal(flipped, again)
  assert not np.array_equal(flipped, flips(1)[1])
  # Over 10 epochs a record is not always flipped the same way.
  assert 0 < flipped[ids == 3].sum() < 10
  assert not flips(0, random_flip=False)[1].any()


@pytest.mark.parametrize('fixture,process_count,process_index,global_batch,split', [
    ('four_shards', 1, 0, 8, 'records'),  # 5 steps per epoch: k = 5 starts epoch 1 exactly
    ('four_shards', 2, 1, 12, 'files'),  # 20 per host, local batch 6: batches straddle epochs
    ('four_shards', 2, 1, 12, 'records'),  # batches 3 and 13 straddle epochs
    ('uneven_shards', 2, 0, 8, 'records'),  # an epoch of 21 is no multiple of 8
])
def test_resume_sees_the_batches_of_an_uninterrupted_run(fixture, process_count,
                                                          process_index, global_batch, split,
                                                          request):
  info = request.getfixturevalue(fixture)
  kwargs = dict(batch_size=global_batch, process_count=process_count,
                process_index=process_index, host_split=split)
  reference = _batches(info, 15, **kwargs)
  for start in (3, 5, 13):  # mid first epoch, epoch boundary (case 1), a later epoch
    resumed = _batches(info, 2, start_step=start, **kwargs)
    for offset, batch in enumerate(resumed):
      np.testing.assert_array_equal(batch['image'], reference[start + offset]['image'],
                                    err_msg=f'start_step={start}, batch {offset}')
      np.testing.assert_array_equal(batch['label'], reference[start + offset]['label'])


def test_order_ignores_threads_and_tf_global_seed(four_shards):
  reference = [b['image'] for b in _batches(four_shards, 6, batch_size=8, num_threads=1)]
  for kwargs in (dict(num_threads=2), dict(num_threads=None)):
    images = [b['image'] for b in _batches(four_shards, 6, batch_size=8, **kwargs)]
    np.testing.assert_array_equal(images, reference)
  tf.random.set_seed(1234)
  try:
    images = [b['image'] for b in _batches(four_shards, 6, batch_size=8, num_threads=2)]
  finally:
    tf.random.set_seed(None)
  np.testing.assert_array_equal(images, reference)


# ---- augmentation beyond the flip ----------------------------------------------------

FULL_AUGMENTATION = pipeline.Augmentation(scale=0.1, translate=0.1, rotate=10.0,
                                          brightness=0.2, contrast=0.3)


def test_augmentation_is_off_by_default_and_checks_its_ranges():
  assert not pipeline.Augmentation().geometric and not pipeline.Augmentation().photometric
  assert FULL_AUGMENTATION.geometric and FULL_AUGMENTATION.photometric
  for bad in (dict(scale=1.0), dict(translate=-0.1), dict(brightness=1.5),
              dict(contrast=-1.0), dict(rotate=200.0)):
    with pytest.raises(ValueError, match=next(iter(bad))):
      pipeline.Augmentation(**bad)


def test_augmentation_from_config_reads_the_random_fields():
  from sface_jax.configs import base, demo  # pylint: disable=g-import-not-at-top
  assert pipeline.Augmentation.from_config(base.get_config().data) == pipeline.Augmentation()
  data = demo.get_config().data
  data.random_rotate = 7.5
  augmentation = pipeline.Augmentation.from_config(data)
  assert augmentation.rotate == 7.5 and augmentation.scale == data.random_scale
  assert augmentation.contrast == data.random_contrast
  data.random_scale = 1.5
  with pytest.raises(ValueError, match=r'config\.data\.random_scale\) is 1\.5'):
    pipeline.Augmentation.from_config(data)


def _bilinear_reference(image, zoom, angle_degrees, shift_x, shift_y):
  """NumPy float64: output (row i, col j) samples the input at
  c + R(-angle) ((j, i) - c - shift) / zoom, coordinates clamped to the image."""
  side = image.shape[0]
  c = (side - 1) / 2
  t = np.deg2rad(angle_degrees)
  out = np.zeros(image.shape, np.float64)
  for i in range(side):
    for j in range(side):
      vx, vy = j - c - shift_x, i - c - shift_y
      x = np.clip(c + (np.cos(t) * vx + np.sin(t) * vy) / zoom, 0, side - 1)
      y = np.clip(c + (-np.sin(t) * vx + np.cos(t) * vy) / zoom, 0, side - 1)
      x0, y0 = int(np.floor(x)), int(np.floor(y))
      x1, y1 = min(x0 + 1, side - 1), min(y0 + 1, side - 1)
      fx, fy = x - x0, y - y0
      out[i, j] = ((1 - fy) * ((1 - fx) * image[y0, x0] + fx * image[y0, x1])
                   + fy * ((1 - fx) * image[y1, x0] + fx * image[y1, x1]))
  return out


def test_affine_transform_zooms_rotates_and_shifts_as_documented():
  rng = np.random.default_rng(0)
  image = rng.uniform(0, 255, (16, 16, 3)).astype(np.float32)
  # An integer shift moves the content right / down and repeats the edge it uncovers.
  moved = pipeline.affine_transform(tf.constant(image), 1.0, 0.0, 3.0, -2.0).numpy()
  np.testing.assert_allclose(moved[:14, 3:], image[2:, :13], atol=1e-4)
  np.testing.assert_allclose(moved[:14, :3], np.repeat(image[2:, :1], 3, axis=1), atol=1e-4)
  np.testing.assert_allclose(moved[14:], np.repeat(moved[13:14], 2, axis=0), atol=1e-4)
  # Zoom 2 about the centre (pixel 8 of 17): the middle half fills the image.
  odd = rng.uniform(0, 255, (17, 17, 3)).astype(np.float32)
  zoomed = pipeline.affine_transform(tf.constant(odd), 2.0, 0.0, 0.0, 0.0).numpy()
  np.testing.assert_allclose(zoomed[::2, ::2], odd[4:13, 4:13], atol=1e-3)
  # A quarter turn of a square image about its centre is exact.
  turned = pipeline.affine_transform(tf.constant(image), 1.0, 90.0, 0.0, 0.0).numpy()
  assert any(np.allclose(turned, np.rot90(image, k), atol=1e-3) for k in (1, 3))
  # Everything at once, against the formula of the docstring.
  for params in [(1.15, 12.0, 1.7, -0.6), (0.9, -7.0, -2.3, 3.1)]:
    got = pipeline.affine_transform(tf.constant(image), *params).numpy()
    np.testing.assert_allclose(got, _bilinear_reference(image.astype(np.float64), *params),
                               atol=1e-3)


BLOB_SIDE = 32


@pytest.fixture(scope='module')
def blob_shard(tmp_path_factory):
  """16 identical 32 x 32 PNGs: a bright horizontal bar (8 x 4 px) centred on a grey
  gradient, so geometric changes move/turn the bar and photometric ones change levels."""
  pixels = np.tile(np.linspace(60, 120, BLOB_SIDE)[None, :, None], (BLOB_SIDE, 1, 3))
  pixels[14:18, 12:20] = 240
  pixels = pixels.astype(np.uint8)
  buf = io.BytesIO()
  Image.fromarray(pixels).save(buf, 'PNG')
  info = _write_shards(tmp_path_factory.mktemp('blob'), [[(buf.getvalue(), 0)] * 16], 1)
  return info, pixels.astype(np.float64)


def _augmented(info, augmentation, steps=8, seed=0):
  batches = _batches(info, steps, batch_size=16, image_size=BLOB_SIDE, random_flip=False,
                     augmentation=augmentation, seed=seed)
  return np.concatenate([b['image'] for b in batches]).astype(np.float64) * 128.0 + 127.5


def _bar_moments(images):
  """Centroid (x, y), and orientation in degrees, of the bright bar in each image."""
  weights = np.clip(images[..., 0] - 180.0, 0, None)
  ys, xs = np.mgrid[:BLOB_SIDE, :BLOB_SIDE]
  total = weights.sum(axis=(1, 2))
  cx = (weights * xs).sum(axis=(1, 2)) / total
  cy = (weights * ys).sum(axis=(1, 2)) / total
  dx, dy = xs - cx[:, None, None], ys - cy[:, None, None]
  mxx, myy = (weights * dx**2).sum(axis=(1, 2)), (weights * dy**2).sum(axis=(1, 2))
  mxy = (weights * dx * dy).sum(axis=(1, 2))
  return cx, cy, np.rad2deg(0.5 * np.arctan2(2 * mxy, mxx - myy)), total


def test_geometric_augmentation_does_what_it_says(blob_shard):
  info, original = blob_shard
  cx0, cy0, angle0, _ = _bar_moments(original[None])
  # translate 0.15 of 32 px: shifts up to ±4.8 px each way, spread over that range.
  cx, cy, angle, _ = _bar_moments(_augmented(info, pipeline.Augmentation(translate=0.15)))
  for shift in (cx - cx0, cy - cy0):
    assert np.abs(shift).max() <= 4.8 + 0.2 and np.abs(shift).max() >= 3.5
    assert (shift < -1).any() and (shift > 1).any()
  assert np.abs(angle - angle0).max() <= 2.0  # sub-pixel shifts blur the bar a little
  # rotate 20°: the bar turns by up to ±20°, its centre stays.
  cx, cy, angle, _ = _bar_moments(_augmented(info, pipeline.Augmentation(rotate=20.0)))
  assert np.abs(cx - cx0).max() <= 0.3 and np.abs(cy - cy0).max() <= 0.3
  turn = angle - angle0
  assert np.abs(turn).max() <= 21.0 and np.abs(turn).max() >= 14.0
  assert (turn < -5).any() and (turn > 5).any()
  # scale 0.3: the bar stays centred; the background ramp, linear in x, spreads out by the
  # zoom factor, in [0.7, 1.3]: its slope divides by it (columns 6-25 stay inside the image).
  images = _augmented(info, pipeline.Augmentation(scale=0.3))
  cx, cy, _, _ = _bar_moments(images)
  assert np.abs(cx - cx0).max() <= 0.3 and np.abs(cy - cy0).max() <= 0.3
  columns = np.arange(6, 26)
  slope = lambda rows: np.polyfit(columns, rows[..., 2:6, 6:26, 0].mean(axis=-2).T, 1)[0]
  zoom = slope(original) / slope(images)
  assert zoom.min() >= 0.7 - 0.02 and zoom.max() <= 1.3 + 0.02
  assert zoom.min() < 0.85 and zoom.max() > 1.15


def test_photometric_augmentation_does_what_it_says(blob_shard):
  info, original = blob_shard
  below_clip = original < 150  # the gradient, which no brightness change here clips
  # brightness 0.2: one offset per image, within ±51 levels, both signs.
  images = _augmented(info, pipeline.Augmentation(brightness=0.2))
  offsets = images[:, below_clip] - original[below_clip]
  assert np.abs(offsets - offsets[:, :1]).max() <= 1e-3
  assert np.abs(offsets[:, 0]).max() <= 51.0 + 1e-3
  assert offsets[:, 0].min() < -25 and offsets[:, 0].max() > 25
  # contrast 0.4: deviations from the image mean scaled by one factor in [0.6, 1.4].
  images = _augmented(info, pipeline.Augmentation(contrast=0.4))
  mean = original.mean(axis=(0, 1))
  factors = (images[:, 0, 0, 0] - mean[0]) / (original[0, 0, 0] - mean[0])
  expected = mean + (original[None] - mean) * factors[:, None, None, None]
  np.testing.assert_allclose(images, np.clip(expected, 0, 255), atol=1e-2)
  assert factors.min() >= 0.6 - 1e-4 and factors.max() <= 1.4 + 1e-4
  assert factors.min() < 0.8 and factors.max() > 1.2


def test_augmentation_is_reproducible_seeded_and_resumes_exactly(four_shards):
  kwargs = dict(batch_size=8, augmentation=FULL_AUGMENTATION)
  reference = _batches(four_shards, 12, **kwargs)
  plain = _batches(four_shards, 12, batch_size=8)
  for batch, unaugmented in zip(reference, plain):
    # The order, the labels and the flips do not depend on the augmentation...
    np.testing.assert_array_equal(batch['label'], unaugmented['label'])
    # ...which changes the pixels.
    assert not np.allclose(batch['image'], unaugmented['image'], atol=0.05)
  threads = _batches(four_shards, 12, num_threads=1, **kwargs)
  for got, want in zip(threads, reference):
    np.testing.assert_array_equal(got['image'], want['image'])
  # Resumed mid-epoch, at an epoch boundary (5 steps of 8 per 40-record epoch), later.
  for start in (3, 5, 9):
    for offset, batch in enumerate(_batches(four_shards, 2, start_step=start, **kwargs)):
      np.testing.assert_array_equal(batch['image'], reference[start + offset]['image'],
                                    err_msg=f'start_step={start}, batch {offset}')
  other_seed = _batches(four_shards, 1, seed=1, **kwargs)[0]
  assert not np.array_equal(other_seed['image'], reference[0]['image'])
  # A record is augmented differently in each epoch (epochs 0 and 1: steps 0-4 and 5-9).
  first = np.concatenate([b['image'] for b in reference[:5]])
  second = np.concatenate([b['image'] for b in reference[5:10]])
  assert not np.array_equal(np.sort(first, axis=None), np.sort(second, axis=None))


def test_resume_position_arithmetic():
  assert pipeline.resume_position(0, 64, 1000) == (0, 0)
  assert pipeline.resume_position(15, 64, 1000) == (0, 960)
  assert pipeline.resume_position(16, 64, 1000) == (1, 24)
  assert pipeline.resume_position(125, 64, 1000) == (8, 0)


def test_bad_input_names_the_file(tmp_path, four_shards):
  with pytest.raises(ValueError, match='not divisible'):
    pipeline.train_dataset(four_shards, batch_size=9, image_size=SIDE, seed=0,
                           process_index=0, process_count=2)
  with pytest.raises(ValueError, match='cannot be split'):
    pipeline.split_for_host(four_shards, 0, 5, 'files')
  with pytest.raises(ValueError, match='config.data.host_split'):
    pipeline.split_for_host(four_shards, 0, 2, 'auto')

  bad_label = _write_shards(tmp_path / 'label', [[(_id_png(0, 0), 0), (_id_png(1, 9), 9)]],
                            num_classes=3)
  with pytest.raises(tf.errors.InvalidArgumentError,
                     match=r'(?s)image/class/label outside \[0, 3\).*train-00000-of-00001'):
    _batches(bad_label, 1, batch_size=2)

  not_image = _write_shards(tmp_path / 'bytes', [[(_id_png(0, 0), 0), (b'GIF89a....', 0)]],
                            num_classes=1)
  with pytest.raises(tf.errors.InvalidArgumentError,
                     match=r'(?s)neither JPEG nor PNG.*train-00000-of-00001.*record.*1'):
    _batches(not_image, 1, batch_size=2)

  # The info file promises more records than the shard holds: tf.data's error names no
  # file ('expected to contain 4'); ours names the shard.
  short = _write_shards(tmp_path / 'short', [[(_id_png(i, 0), 0) for i in range(3)]], 1)
  short = tfrecord.DatasetInfo(**{**short.__dict__, 'num_examples': 4,
                                  'shards': ((short.shards[0][0], 4),)})
  with pytest.raises(tfrecord.DamagedShardError,
                     match=r'short/train-00000-of-00001\.tfrecord: 3 records, but '
                           r'sface_jax_dataset\.json records 4\. To recover'):
    _batches(short, 2, batch_size=3)


def _data_sharding(mesh):
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))


def test_global_batch_one_device(four_shards):
  mesh = jax.make_mesh((1, 1), ('data', 'model'))
  local = _batches(four_shards, 1, batch_size=8)[0]
  arrays = pipeline.global_batch(local, _data_sharding(mesh))
  for name in ('image', 'label'):
    assert isinstance(arrays[name], jax.Array)
    assert arrays[name].sharding.spec == jax.sharding.PartitionSpec('data')
    np.testing.assert_array_equal(np.asarray(arrays[name]), local[name])
  assert arrays['label'].dtype == np.int32
  # process_index / process_count default to jax's (one process here).
  default = pipeline.train_dataset(four_shards, batch_size=8, image_size=SIDE, seed=0,
                                   shuffle_buffer=16)
  np.testing.assert_array_equal(next(default)['image'], local['image'])


_EIGHT_DEVICES = textwrap.dedent('''
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax
    import numpy as np
    from sface_jax.data import pipeline

    assert jax.device_count() == 8
    local = {"image": np.arange(16 * 2 * 2 * 3, dtype=np.float32).reshape(16, 2, 2, 3),
             "label": np.arange(16, dtype=np.int32)}
    for shape in [(8, 1), (4, 2)]:
      mesh = jax.make_mesh(shape, ("data", "model"))
      sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
      arrays = pipeline.global_batch(local, sharding)
      data_size = shape[0]
      per_shard = 16 // data_size
      for name, array in arrays.items():
        assert array.shape == local[name].shape, (name, array.shape)
        np.testing.assert_array_equal(np.asarray(array), local[name])
        assert len(array.addressable_shards) == 8
        for shard in array.addressable_shards:
          # the device's coordinate on the data axis picks its rows
          data_coord = int(np.argwhere(mesh.devices == shard.device)[0][0])
          rows = slice(data_coord * per_shard, (data_coord + 1) * per_shard)
          assert shard.index[0] == rows, (shape, name, shard.index, rows)
          np.testing.assert_array_equal(np.asarray(shard.data), local[name][rows])
    print("OK")
''')


def test_global_batch_eight_devices_split_over_data_axis():
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = {**os.environ, 'PYTHONPATH': root + os.pathsep + os.environ.get('PYTHONPATH', '')}
  env.pop('XLA_FLAGS', None)
  result = subprocess.run([sys.executable, '-c', _EIGHT_DEVICES], env=env, cwd=root,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0 and result.stdout.strip().endswith('OK'), result.stderr[-3000:]
