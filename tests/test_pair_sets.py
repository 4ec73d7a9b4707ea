"""Verification pair sets: safe `.bin` loading, the `.npz` format, decoding."""

import io
import os
import pickle
import struct

import numpy as np
import pytest
from PIL import Image

from sface_jax.data import images as images_lib
from sface_jax.data import pair_sets


def encoded(value, size=(6, 5), fmt='JPEG', mode='RGB'):
  buf = io.BytesIO()
  Image.new(mode, size, value).save(buf, fmt)
  return buf.getvalue()


def py2_pickle(images, issame_opcodes):
  """A pickle as Python 2's cPickle (protocol 2) writes `(images, issame)`: `str` images as
  SHORT_BINSTRING/BINSTRING, so Python 3 sees them only with encoding='bytes'."""
  out = b'\x80\x02]q\x00('
  for im in images:
    if len(im) < 256:
      out += b'U' + bytes([len(im)]) + im  # SHORT_BINSTRING
    else:
      out += b'T' + struct.pack('<i', len(im)) + im  # BINSTRING
  return out + b'e' + issame_opcodes + b'\x86q\x02.'


PY2_BOOL_LIST = b']q\x01(\x88\x89e'  # [True, False]
# numpy.core.multiarray._reconstruct(ndarray, (0,), 'b') + BUILD (1, (2,), dtype('b1'), False,
# '\x01\x00'), byte for byte what Python 2 NumPy writes for np.array([True, False]).
PY2_NUMPY_BOOL_ARRAY = (
    b'cnumpy.core.multiarray\n_reconstruct\nq\x01cnumpy\nndarray\nq\x02K\x00\x85U\x01b\x87R'
    b'(K\x01K\x02\x85cnumpy\ndtype\nU\x02b1K\x00K\x01\x87R(K\x03U\x01|NNNJ\xff\xff\xff\xff'
    b'J\xff\xff\xff\xffK\x00tb\x89U\x02\x01\x00tb')


def test_real_orl_val_bin(shared_data, tmp_path):
  pairs = pair_sets.read_pairs(shared_data / 'orl' / 'insightface' / 'orl_val.bin')
  assert pairs.name == 'orl_val'
  assert pairs.num_pairs == 900 and len(pairs.images) == 1800 and pairs.issame.sum() == 450
  assert pairs.issame.dtype == bool
  assert all(images_lib.image_format(im) == 'jpeg' for im in pairs.images)
  faces = images_lib.decode_all(pairs.images[:4], 112, name=pairs.name)
  assert faces.shape == (4, 112, 112, 3) and faces.dtype == np.uint8
  assert np.array_equal(faces[..., 0], faces[..., 2])  # greyscale faces stored as RGB
  again = pair_sets.read_pairs(pair_sets.write_npz(pairs, str(tmp_path / 'orl_val.npz')))
  assert again.name == 'orl_val' and again.images == pairs.images
  assert np.array_equal(again.issame, pairs.issame)


@pytest.mark.parametrize('protocol', [0, 2, 4, 5])
@pytest.mark.parametrize('issame', [
    [True, False], np.array([True, False]), [np.bool_(True), np.bool_(False)],
    np.array([1, 0], np.int64), (1, 0)], ids=['list', 'array', 'npbool', 'int64', 'tuple'])
def test_python3_pickles(tmp_path, protocol, issame):
  images = [encoded(i) for i in range(4)]
  path = tmp_path / 'x.bin'
  path.write_bytes(pickle.dumps((images, issame), protocol=protocol))
  pairs = pair_sets.read_bin(path)
  assert pairs.images == images and pairs.issame.tolist() == [True, False]


@pytest.mark.parametrize('issame', [PY2_BOOL_LIST, PY2_NUMPY_BOOL_ARRAY], ids=['list', 'numpy'])
def test_python2_pickle(tmp_path, issame):
  images = [encoded(1), b'\xff\xd8\xff' + bytes(range(256)) * 2, encoded(3, fmt='PNG'), b'\x80']
  path = tmp_path / 'py2.bin'
  path.write_bytes(py2_pickle(images, issame))
  assert pickle.loads(path.read_bytes(), encoding='bytes')[0] == images  # the fixture is real
  pairs = pair_sets.read_bin(path)
  assert pairs.images == images and pairs.issame.tolist() == [True, False]


class _System:
  def __init__(self, command):
    self.command = command

  def __reduce__(self):
    return os.system, (self.command,)


class _Eval:
  def __reduce__(self):
    return eval, ('1 + 1',)


def test_refuses_code_execution(tmp_path):
  marker = tmp_path / 'pwned'
  for payload in ([_System(f'touch {marker}'), b'x'], [_Eval(), b'x']):
    for protocol in (0, 2, 5):
      path = tmp_path / 'evil.bin'
      path.write_bytes(pickle.dumps((payload, [True]), protocol=protocol))
      with pytest.raises(pair_sets.PairSetError, match=r'evil\.bin: not a safe .*refused'):
        pair_sets.read_bin(path)
  # protocol 0's INST opcode imports too
  path.write_bytes(b'(ios\nsystem\n(S"touch ' + str(marker).encode() + b'"\ntR.')
  with pytest.raises(pair_sets.PairSetError, match=r'refused to import os\.system'):
    pair_sets.read_bin(path)
  assert not marker.exists()


def test_refuses_abuse_of_allowed_names(tmp_path):
  path = tmp_path / 'evil.bin'
  # _codecs.encode with another codec
  path.write_bytes(b'\x80\x02c_codecs\nencode\nX\x02\x00\x00\x00hiX\x05\x00\x00\x00rot13'
                   b'\x86R]\x88a\x86.')
  with pytest.raises(pair_sets.PairSetError, match='only'):
    pair_sets.read_bin(path)
  # an object array (could hold anything) is refused at its dtype
  path.write_bytes(pickle.dumps(([b'a', b'b'], np.array([True], dtype=object)), protocol=2))
  with pytest.raises(pair_sets.PairSetError, match=r"dtype 'O8?' refused"):
    pair_sets.read_bin(path)


def test_count_mismatch_and_bad_types(tmp_path):
  path = tmp_path / 'lfw.bin'
  path.write_bytes(pickle.dumps(([b'\xff\xd8\xff'] * 5, [True, False, True]), protocol=2))
  with pytest.raises(pair_sets.PairSetError, match=r'lfw\.bin: 5 images for 3 pairs .* 6'):
    pair_sets.read_bin(path)
  path.write_bytes(pickle.dumps(([b'a', 'b'], [True]), protocol=4))
  with pytest.raises(pair_sets.PairSetError, match=r'lfw\.bin: image 1 is a str'):
    pair_sets.read_bin(path)
  path.write_bytes(pickle.dumps(([b'a', b'b'], [2]), protocol=4))
  with pytest.raises(pair_sets.PairSetError, match='other than True/False'):
    pair_sets.read_bin(path)
  path.write_bytes(b'not a pickle')
  with pytest.raises(pair_sets.PairSetError, match=r'lfw\.bin: not a safe'):
    pair_sets.read_bin(path)


def test_npz_round_trip_and_checks(tmp_path):
  images = [encoded(i) for i in range(5)] + [b'']
  pairs = pair_sets.PairSet('cfp_fp', images, np.array([True, False, True]))
  path = str(tmp_path / 'cfp_fp.npz')
  assert pair_sets.write_npz(pairs, path) == path
  assert os.listdir(tmp_path) == ['cfp_fp.npz']  # no temporary left
  with np.load(path, allow_pickle=False) as z:
    assert z['offsets'].dtype == np.int64 and z['images'].dtype == np.uint8
  again = pair_sets.read_pairs(path)
  assert again.images == images and again.issame.tolist() == [True, False, True]
  np.savez(tmp_path / 'bad.npz', images=np.zeros(3, np.uint8), offsets=np.array([0, 1, 2, 3]),
           issame=np.array([True, False]))
  with pytest.raises(pair_sets.PairSetError, match=r'bad\.npz: 3 images for 2 pairs'):
    pair_sets.read_npz(tmp_path / 'bad.npz')
  np.savez(tmp_path / 'obj.npz', images=np.array([b'x'], dtype=object),
           offsets=np.array([0, 1]), issame=np.array([True]))
  with pytest.raises(pair_sets.PairSetError, match=r'obj\.npz: not a pair-set'):
    pair_sets.read_npz(tmp_path / 'obj.npz')
  with pytest.raises(pair_sets.PairSetError, match="unknown pair-set extension '.pkl'"):
    pair_sets.read_pairs(tmp_path / 'x.pkl')


def test_decode_images():
  images = [encoded((200, 10, 30), size=(112, 112)), encoded(77, size=(92, 112), fmt='PNG',
                                                              mode='L')]
  out = images_lib.decode_all(images, 112)
  assert out.shape == (2, 112, 112, 3)
  assert np.abs(out[0].astype(int) - [200, 10, 30]).max() <= 3  # JPEG of a flat colour
  assert (out[1] == 77).all()  # greyscale -> 3 channels, resized from 92 wide
  with pytest.raises(images_lib.ImageError, match=r'lfw: image 1: cannot decode'):
    images_lib.decode_all([images[0], b'\xff\xd8\xff garbage'], 112, name='lfw')
  with pytest.raises(images_lib.ImageError,
                     match=r'lfw: image 0: not a JPEG or PNG file \(starts with 42 4d'):
    images_lib.decode_all([encoded(1, fmt='BMP')], 112, name='lfw')
