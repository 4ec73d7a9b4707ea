"""MXNet RecordIO without MXNet: framing, split records, the insightface layout, bad input.

The byte layouts are checked two ways: against bytes built by hand here (from the dmlc-core
format description, not from our writer), and against files MXNet 1.9.1 itself wrote
(`../shared/data/orl/insightface`), which our writer must reproduce byte for byte.
"""

import io
import os
import pathlib
import shutil
import struct

import numpy as np
import pytest
from PIL import Image

import recordio_writer
from sface_jax.data import recordio

MAGIC = struct.pack('<I', 0xCED7230A)


def frame(flag, data):
  """One part, built by hand: magic, lrec = flag << 29 | len, data, zero pad to 4."""
  return MAGIC + struct.pack('<I', flag << 29 | len(data)) + data + b'\0' * (-len(data) % 4)


def write_rec(tmp_path, payloads, keys=None):
  rec, idx = str(tmp_path / 'x.rec'), str(tmp_path / 'x.idx')
  keys = list(range(len(payloads))) if keys is None else keys
  with recordio_writer.RecordIOWriter(rec, idx) as w:
    for key, p in zip(keys, payloads):
      w.write(p, key=key)
  return rec, idx


def jpeg(value, size=(8, 8)):
  buf = io.BytesIO()
  Image.new('RGB', size, (value, 255 - value, 3 * value % 256)).save(buf, 'JPEG', quality=90)
  return buf.getvalue()


def test_hand_built_layout_and_split_record(tmp_path):
  # Magic at aligned offsets 0 and 8 -> three parts (flags 1, 2, 3), the magics dropped;
  # the one at the unaligned offset 13 stays inside the data.
  payload = MAGIC + b'wxyz' + MAGIC + b'a' + MAGIC + b'bc'
  whole = b'hello'
  expected = (frame(0, whole) + frame(1, b'') + frame(2, b'wxyz') + frame(3, b'a' + MAGIC + b'bc'))
  rec, idx = write_rec(tmp_path, [whole, payload])
  assert pathlib.Path(rec).read_bytes() == expected
  assert pathlib.Path(idx).read_text() == f'0\t0\n1\t{len(frame(0, whole))}\n'
  with recordio.IndexedRecordIO(rec) as r:
    assert r.read(0) == whole and r.read(1) == payload
  assert [p for _, p in recordio_writer.iter_records(rec)] == [whole, payload]


@pytest.mark.parametrize('payload', [
    MAGIC, MAGIC * 3, b'abcd' + MAGIC, MAGIC + b'x', b'abcd' + MAGIC + MAGIC + b'efgh' + MAGIC,
    b'ab' + MAGIC + b'cd', b'', b'a', b'abc', b'abcde'])
def test_split_and_padding_round_trip(tmp_path, payload):
  rec, _ = write_rec(tmp_path, [payload, b'next'])
  with recordio.IndexedRecordIO(rec) as r:
    assert r.read(0) == payload and r.read(1) == b'next'
  assert os.path.getsize(rec) % 4 == 0


def test_every_record_reads_back(tmp_path):
  rng = np.random.default_rng(0)
  records = []
  for key in range(60):
    image = rng.bytes(int(rng.integers(0, 300)))
    if key % 7 == 0:  # plant the magic at an aligned offset of the whole payload
      image = image[:16] + MAGIC + image[16:]
    label = float(key % 5) if key % 3 else [key % 5, 7.5, -1.0]
    records.append((label, image, key * 11))
  keys = [3 * k + 5 for k in range(60)]  # sparse keys: the .idx lookup is a search
  rec, _ = write_rec(tmp_path, [recordio_writer.pack(l, im, id=i) for l, im, i in records], keys)
  with recordio.IndexedRecordIO(rec) as r:
    assert len(r) == 60 and 8 in r and 9 not in r
    for key, (label, image, id_) in reversed(list(zip(keys, records))):
      header, got = recordio.unpack(r.read(key))
      assert got == image and header.id == id_
      if isinstance(label, float):
        assert header.flag == 0 and header.label == label
      else:
        assert header.flag == 3 and header.label.tolist() == label
        assert recordio.image_label(header, 'x') == label[0]
    with pytest.raises(recordio.RecordIOError, match=r'x\.idx: no key 9'):
      r.read(9)
  seq = [p for _, p in recordio_writer.iter_records(rec)]
  assert [recordio.unpack(p)[1] for p in seq] == [im for _, im, _ in records]


def test_real_mxnet_train_rec(shared_data):
  folder = shared_data / 'orl' / 'insightface'
  with recordio.InsightFaceRecord(str(folder / 'train.rec')) as data:
    assert data.property == (30, 112, 112) and data.num_classes == 30
    assert data.num_images == 300 and data.image_keys.tolist() == list(range(1, 301))
    assert data.identity_table.tolist() == [[1 + 10 * i, 11 + 10 * i] for i in range(30)]
    data.check_identity_table()
    labels = {}
    for key, image, label in data.iter_images():
      labels[key] = label
      assert image[:3] == b'\xff\xd8\xff'
      if key in (1, 300):
        assert Image.open(io.BytesIO(image)).size == (112, 112)
    for identity, (first, end) in enumerate(data.identity_table):
      assert {labels[k] for k in range(first, end)} == {identity}


def test_writer_reproduces_mxnet_bytes(shared_data, tmp_path):
  """Our writer, given the payloads, writes MXNet's own .rec and .idx byte for byte."""
  folder = shared_data / 'orl' / 'insightface'
  with recordio.InsightFaceRecord(str(folder / 'train.rec')) as data:
    images = [(image, label) for _, image, label in data.iter_images()]
  recordio_writer.write_insightface(str(tmp_path), images)
  for name in ('train.rec', 'train.idx', 'property'):
    assert (tmp_path / name).read_bytes() == (folder / name).read_bytes(), name
  assert recordio_writer.build_index(str(folder / 'train.rec'), str(tmp_path / 'rebuilt.idx')) == 331
  assert (tmp_path / 'rebuilt.idx').read_bytes() == (folder / 'train.idx').read_bytes()


def small_dataset(tmp_path, num_classes=3, per_class=2):
  images = [(jpeg(40 * c + i), c) for c in range(num_classes) for i in range(per_class)]
  recordio_writer.write_insightface(str(tmp_path), images)
  return str(tmp_path / 'train.rec'), str(tmp_path / 'train.idx'), images


def test_insightface_layout_from_fixture(tmp_path):
  rec, _, images = small_dataset(tmp_path)
  with recordio.InsightFaceRecord(rec) as data:
    assert data.num_images == 6 and data.num_classes == 3
    assert [(im, l) for _, im, l in data.iter_images()] == images
    assert data.identity_table.tolist() == [[1, 3], [3, 5], [5, 7]]


def test_plain_record_list_without_insightface_header(tmp_path):
  rec, idx = write_rec(tmp_path, [recordio_writer.pack(k % 2, jpeg(k)) for k in range(4)])
  with recordio.InsightFaceRecord(rec, idx, property_path=str(tmp_path / 'none')) as data:
    assert data.identity_table is None and data.image_keys.tolist() == [0, 1, 2, 3]
    assert data.num_classes is None
    assert [l for _, _, l in data.iter_images()] == [0, 1, 0, 1]


# ---- bad input: each error names the file and the key or byte offset ---------------------


def test_missing_idx(tmp_path):
  rec, idx, _ = small_dataset(tmp_path)
  os.remove(idx)
  with pytest.raises(recordio.RecordIOError, match=r'train\.idx not found.*train\.rec'):
    recordio.InsightFaceRecord(rec)
  assert len(list(recordio_writer.iter_records(rec))) == 10  # sequential reading needs no index


def test_wrong_magic(tmp_path):
  rec, _, _ = small_dataset(tmp_path)
  with recordio.IndexedRecordIO(rec) as r:
    offset = r.offset(4)
  data = bytearray(pathlib.Path(rec).read_bytes())
  data[offset] ^= 0xFF
  pathlib.Path(rec).write_bytes(bytes(data))
  with recordio.InsightFaceRecord(rec) as d:
    with pytest.raises(recordio.RecordIOError,
                       match=rf'train\.rec: record key 4: wrong magic .* byte offset {offset}'):
      d.read_image(4)
  with pytest.raises(recordio.RecordIOError, match=rf'wrong magic .* byte offset {offset}'):
    list(recordio_writer.iter_records(rec))


def test_not_a_recordio_file(tmp_path):
  (tmp_path / 'train.rec').write_bytes(b'\xff\xd8\xff\xe0' + b'\0' * 60)
  (tmp_path / 'train.idx').write_text('0\t0\n')
  with pytest.raises(recordio.RecordIOError, match=r'train\.rec: record key 0: wrong magic'):
    recordio.InsightFaceRecord(str(tmp_path / 'train.rec'))


@pytest.mark.parametrize('cut', [1, 4, 9])
def test_truncated_last_record(tmp_path, cut):
  rec, _, _ = small_dataset(tmp_path)
  with recordio.IndexedRecordIO(rec) as r:
    last = int(r.offsets.max())
  data = pathlib.Path(rec).read_bytes()
  size = len(data) - cut if cut < 9 else last + 6  # inside the payload, or the part header
  pathlib.Path(rec).write_bytes(data[:size])
  with pytest.raises(recordio.RecordIOError,
                     match=rf'train\.rec: record key 9 at byte offset {last}: truncated'):
    recordio.InsightFaceRecord(rec)
  with pytest.raises(recordio.RecordIOError, match=rf'byte offset {last}: truncated'):
    list(recordio_writer.iter_records(rec))


def test_idx_offset_past_end_of_file(tmp_path):
  rec, idx, _ = small_dataset(tmp_path)
  lines = pathlib.Path(idx).read_text().splitlines()
  lines[5] = '5\t999999'
  pathlib.Path(idx).write_text('\n'.join(lines) + '\n')
  with pytest.raises(recordio.RecordIOError,
                     match=r'train\.idx: key 5 points at byte offset 999999, past the end of'):
    recordio.InsightFaceRecord(rec)


def test_idx_malformed_line_and_duplicate_key(tmp_path):
  rec, idx, _ = small_dataset(tmp_path)
  good = pathlib.Path(idx).read_text()
  pathlib.Path(idx).write_text(good.replace('3\t', '3 x\t', 1))
  with pytest.raises(recordio.RecordIOError, match=r'train\.idx: line 4 '):
    recordio.IndexedRecordIO(rec)
  pathlib.Path(idx).write_text(good + '2\t0\n')
  with pytest.raises(recordio.RecordIOError, match=r'train\.idx: key 2 appears more than once'):
    recordio.IndexedRecordIO(rec)


def test_idx_pointing_into_a_split_record(tmp_path):
  rec, idx = write_rec(tmp_path, [b'abcd' + MAGIC + b'efgh'])
  with open(idx, 'a') as f:
    f.write('1\t12\n')  # the second part of record 0
  with recordio.IndexedRecordIO(rec) as r:
    with pytest.raises(recordio.RecordIOError, match=r'key 1: part flag 3 at byte offset 12'):
      r.read(1)


def test_property_disagrees_with_identity_table(tmp_path):
  rec, _, _ = small_dataset(tmp_path)
  (tmp_path / 'property').write_text('5,112,112')
  with pytest.raises(recordio.RecordIOError, match=r'property says 5 classes .* 3 identities'):
    recordio.InsightFaceRecord(rec)
  (tmp_path / 'property').write_text('three,112,112')
  with pytest.raises(recordio.RecordIOError, match=r'property: .* is not "num_classes,H,W"'):
    recordio.InsightFaceRecord(rec)


def test_label_errors(tmp_path):
  rec, idx = write_rec(tmp_path, [recordio_writer.pack(0.0, b''), recordio_writer.pack(1.5, jpeg(1)),
                                  recordio_writer.pack(4, jpeg(2))])
  prop = tmp_path / 'property'
  prop.write_text('3,8,8')
  with recordio.InsightFaceRecord(rec, idx, property_path=str(prop)) as data:
    with pytest.raises(recordio.RecordIOError, match=r'x\.rec: key 1: label 1\.5 is not an int'):
      data.read_image(1)
    with pytest.raises(recordio.RecordIOError, match=r'x\.rec: key 2: label 4 outside \[0, 3\)'):
      data.read_image(2)
  bad = struct.pack('<IfQQ', 5, 0.0, 0, 0) + b'\0' * 8  # announces 5 labels, has 2
  with pytest.raises(recordio.RecordIOError, match='announces 5 float32 labels'):
    recordio.unpack(bad, 'x.rec: key 7')


def test_copy_of_real_rec_truncated(shared_data, tmp_path):
  folder = shared_data / 'orl' / 'insightface'
  for name in ('train.rec', 'train.idx', 'property'):
    shutil.copy(folder / name, tmp_path / name)
  with open(tmp_path / 'train.rec', 'r+b') as f:
    f.truncate(os.path.getsize(folder / 'train.rec') - 2)
  with pytest.raises(recordio.RecordIOError, match=r'key 330 at byte offset 1268484: truncated'):
    recordio.InsightFaceRecord(str(tmp_path / 'train.rec'))
