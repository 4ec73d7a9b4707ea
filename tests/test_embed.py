"""`python -m sface_jax.embed`: folders and lists of images to an embedding array.

The reference is independent of the code under test: Pillow opens each file, converts it to
RGB and resizes it bilinearly (what evaluation's `decode` does), and the model is applied
directly, once per image and once per mirrored image for `--flip`.
"""

import json
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import multi_device
import tiny_backbone
from sface_jax import checkpoint
from sface_jax import embed
from sface_jax.evaluation import embedding

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SIZE = 32
DIM = 16
BATCH = 4


@pytest.fixture(scope='module')
def tiny_run(tmp_path_factory):
  return tiny_backbone.write_workdir(tmp_path_factory.mktemp('embed') / 'run', image_size=SIZE,
                                     embedding_dim=DIM, source='test_embed',
                                     eval_batch_size=BATCH)


def _reference(model, variables, paths, flip):
  pixels = []
  for path in paths:
    with Image.open(path) as img:
      img = img.convert('RGB')
      if img.size != (SIZE, SIZE):
        img = img.resize((SIZE, SIZE), Image.BILINEAR)
      pixels.append(np.asarray(img, np.float32))
  x = (np.stack(pixels) - 127.5) / 128.0
  out = np.asarray(model.apply(variables, jnp.asarray(x), train=False)[0], np.float64)
  if flip:
    out = out + np.asarray(model.apply(variables, jnp.asarray(x[:, :, ::-1]), train=False)[0])
  return out


def _write_images(root, count=7, seed=0):
  """Faces of mixed sizes and formats in identity folders; their paths in natural order."""
  rng = np.random.default_rng(seed)
  paths = []
  for i in range(count):
    folder = root / f'p{i % 2 + 1}'
    folder.mkdir(parents=True, exist_ok=True)
    height, width = [(SIZE, SIZE), (40, 36), (112, 112)][i % 3]
    pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    img = Image.fromarray(pixels)
    suffix = ['png', 'jpg', 'pgm'][i % 3]
    if suffix == 'pgm':
      img = img.convert('L')
    path = folder / f'{i}.{suffix}'
    img.save(path)
    paths.append(path)
  (root / '.hidden.png').write_bytes(b'not looked at')
  (root / 'notes.txt').write_text('not an image')
  return sorted(paths, key=lambda p: (p.parent.name, int(p.stem)))


def test_folder_to_array_and_list(tiny_run, tmp_path, capsys):
  workdir, model, variables = tiny_run
  paths = _write_images(tmp_path / 'faces')
  output = tmp_path / 'out' / 'emb.npy'
  for flip in (False, True):
    argv = ['--workdir', str(workdir), '--images', str(tmp_path / 'faces'),
            '--output', str(output)] + (['--flip'] if flip else [])
    assert embed.main(argv) == 0, capsys.readouterr().err
    got = np.load(output)
    assert got.dtype == np.float32 and got.shape == (len(paths), DIM)
    np.testing.assert_allclose(got, _reference(model, variables, paths, flip),
                               rtol=1e-4, atol=1e-5)
    with open(tmp_path / 'out' / 'emb.json') as f:
      record = json.load(f)
    assert record['files'] == [os.path.join(p.parent.name, p.name) for p in paths]
    assert record['flip'] is flip and record['count'] == len(paths)
    assert record['model'] == 'tiny' and record['step'] == 0 and record['image_size'] == SIZE
  assert sorted(os.listdir(tmp_path / 'out')) == ['emb.json', 'emb.npy']  # no temporaries
  assert 'wrote' in capsys.readouterr().out


def test_list_bad_input_names_the_file_and_line(tiny_run, tmp_path, capsys):
  workdir, model, variables = tiny_run
  paths = _write_images(tmp_path / 'faces', count=6)
  listing = tmp_path / 'faces' / 'list.txt'
  lines = [os.path.relpath(p, listing.parent) for p in paths[:3]] + ['', str(paths[3])]
  listing.write_text('\n'.join(lines) + '\n')
  output = tmp_path / 'emb.npy'
  argv = ['--workdir', str(workdir), '--images', str(listing), '--output', str(output)]
  assert embed.main(argv) == 0
  np.testing.assert_allclose(np.load(output), _reference(model, variables, paths[:4], False),
                             rtol=1e-4, atol=1e-5)
  good = output.read_bytes()
  with open(tmp_path / 'emb.json') as f:
    assert json.load(f)['files'] == lines[:3] + lines[4:]  # as written, blank line skipped

  listing.write_text('\n'.join(lines + ['p1/missing.jpg']) + '\n')
  assert embed.main(argv) == 1
  assert f'{listing} line 6: p1/missing.jpg: no such file' in capsys.readouterr().err

  # A corrupt image stops the run half-way: its line is named, the previous output stays.
  (listing.parent / 'p2' / 'broken.jpg').write_bytes(b'\xff\xd8\xff' + b'\0' * 50)
  listing.write_text('\n'.join(lines + ['p2/broken.jpg']) + '\n')
  assert embed.main(argv + ['--batch-size', '2']) == 1
  err = capsys.readouterr().err
  assert f'{listing} line 6: p2/broken.jpg' in err and 'cannot decode' in err
  assert output.read_bytes() == good
  # A file Pillow does not recognise is named, not Pillow's `<_io.BytesIO object at 0x…>`.
  (listing.parent / 'p2' / 'broken.pgm').write_bytes(b'no image at all')
  listing.write_text('\n'.join(lines + ['p2/broken.pgm']) + '\n')
  assert embed.main(argv) == 1
  err = capsys.readouterr().err
  assert (f'{listing} line 6: p2/broken.pgm: not an image Pillow can read (not a format '
          'Pillow recognises)') in err and 'BytesIO' not in err
  assert output.read_bytes() == good
  assert sorted(os.listdir(tmp_path)) == ['emb.json', 'emb.npy', 'faces']

  assert embed.main(argv[:-1] + [str(tmp_path / 'emb.bin')]) == 1
  assert 'expected a .npy' in capsys.readouterr().err


def test_orl_faces_and_progress_line(tiny_run, shared_data, tmp_path):
  workdir, model, variables = tiny_run
  _, model, variables = checkpoint.load_for_inference(str(workdir))
  paths = [shared_data / 'orl' / 'faces' / f's{p}' / f'{i}.pgm' for p in (1, 2) for i in (1, 2, 3)]
  listing = tmp_path / 'orl.txt'
  listing.write_text('\n'.join(map(str, paths)))
  image_list = embed.list_images(str(listing))
  lines = []
  count, dim = embed.embed_files(model, variables, image_list, image_size=SIZE,
                                 batch_size=BATCH, output=str(tmp_path / 'orl.npy'),
                                 flip=True, log=lines.append, progress_seconds=0)
  assert (count, dim) == (6, DIM)
  np.testing.assert_allclose(np.load(tmp_path / 'orl.npy'),
                             _reference(model, variables, paths, True), rtol=1e-4, atol=1e-5)
  assert 'images/s' in lines[0] and 'ETA' in lines[0] and lines[0].startswith('embed: 4/6')
  assert 'images/s overall' in lines[-1]


MESH_SCRIPT = textwrap.dedent('''
    import jax, jax.numpy as jnp, numpy as np
    import flax.linen as nn
    from sface_jax import sharding
    from sface_jax.evaluation import embedding
    assert jax.device_count() == 8

    class Tiny(nn.Module):
      @nn.compact
      def __call__(self, images, train=False):
        return nn.Dense(8)(images.reshape(images.shape[0], -1)), None

    model = Tiny()
    variables = model.init(jax.random.key(0), jnp.zeros((1, 6, 6, 3)))
    images = np.random.default_rng(0).integers(0, 256, (21, 6, 6, 3), dtype=np.uint8)
    batches = lambda: (images[i:i + 5] for i in range(0, 21, 5))  # 5 -> padded to 8
    for flip in (False, True):
      one = np.concatenate(list(embedding.embed_batches(model, variables, batches(),
                                                        batch_size=5, flip=flip)))
      many = np.concatenate(list(embedding.embed_batches(
          model, variables, batches(), batch_size=5, flip=flip, mesh=sharding.make_mesh())))
      np.testing.assert_allclose(many, one, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(one, embedding.embed(model, variables, images, batch_size=5),
                               rtol=1e-6, atol=1e-6)
    print('MESH-OK')
''')


def test_embed_batches_on_8_devices_equals_one():
  assert 'MESH-OK' in multi_device.run_python('-c', MESH_SCRIPT).stdout


def test_embed_batches_without_flip_is_the_plain_embedding(tiny_run):
  _, model, variables = tiny_run
  images = np.random.default_rng(1).integers(0, 256, (6, SIZE, SIZE, 3), dtype=np.uint8)
  batches = [images[:BATCH], images[BATCH:]]
  plain = np.concatenate(list(embedding.embed_batches(model, variables, batches,
                                                      batch_size=BATCH, flip=False)))
  summed = np.concatenate(list(embedding.embed_batches(model, variables, batches,
                                                       batch_size=BATCH, flip=True)))
  np.testing.assert_allclose(summed, embedding.embed(model, variables, images,
                                                     batch_size=BATCH), rtol=1e-6, atol=1e-6)
  direct = model.apply(variables, (images.astype(np.float32) - 127.5) / 128, train=False)[0]
  np.testing.assert_allclose(plain, direct, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match='a batch of 6 images'):
    list(embedding.embed_batches(model, variables, [images], batch_size=BATCH))


@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGINT])
def test_an_interrupted_run_leaves_no_temporary_file(tiny_run, tmp_path, signum):
  """Killed while the array is half-written (its temporary exists), the command removes it
  on the way out, says so, and leaves a previous output as it was."""
  workdir, _, _ = tiny_run
  rng = np.random.default_rng(2)
  for i in range(400):  # one image a batch: hundreds of steps after the temporary appears
    Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(
        tmp_path / f'{i}.png')
  output = tmp_path / 'out' / 'emb.npy'
  output.parent.mkdir()
  output.write_bytes(b'previous')
  env = dict(os.environ, PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get('PYTHONPATH', ''))
  process = subprocess.Popen(
      [sys.executable, '-m', 'sface_jax.embed', '--workdir', str(workdir), '--images',
       str(tmp_path), '--output', str(output), '--batch-size', '1'],
      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    deadline = time.monotonic() + 240
    while not list(output.parent.glob('emb.npy.tmp-*')):
      assert process.poll() is None, process.communicate()
      assert time.monotonic() < deadline, 'the temporary never appeared'
      time.sleep(0.01)
    process.send_signal(signum)
    _, err = process.communicate(timeout=120)
  finally:
    process.kill()
  assert process.returncode == 128 + signum, err
  assert 'interrupted' in err and 'Traceback' not in err
  assert sorted(p.name for p in output.parent.iterdir()) == ['emb.npy']
  assert output.read_bytes() == b'previous'
