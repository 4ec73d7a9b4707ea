"""Weight import from insightface arcface_torch: same embeddings on real faces, bad input.

The PyTorch models are tests/torch_reference.py (arcface_torch's architecture, with all
weights and BN statistics randomised); the faces are AT&T/ORL images.
"""

import json
import pathlib

import jax
import numpy as np
import pytest
from PIL import Image

from sface_jax import models
from sface_jax.tools import import_torch

torch = pytest.importorskip('torch')
import torch_reference  # pylint: disable=g-import-not-at-top,wrong-import-position

TOLERANCE = 1e-4  # max |embedding difference|, float32


def load_faces(shared_data: pathlib.Path, count: int, side: int = 112) -> np.ndarray:
  """`count` ORL faces (one per person) as (count, side, side, 3), (x − 127.5) / 128.

  92×112 greyscale → edge-padded to 112×112 (as the insightface copy of the set is),
  resized when `side` differs, replicated to three channels.
  """
  faces = []
  for person in range(1, count + 1):
    image = np.asarray(Image.open(shared_data / 'orl' / 'faces' / f's{person}' / '1.pgm'),
                       dtype=np.uint8)
    assert image.shape == (112, 92), image.shape
    image = np.pad(image, ((0, 0), (10, 10)), mode='edge')
    if side != 112:
      image = np.asarray(Image.fromarray(image).resize((side, side), Image.BILINEAR))
    faces.append(np.repeat(image[:, :, None], 3, axis=2))
  return (np.stack(faces).astype(np.float32) - 127.5) / 128.0


def torch_embeddings(model: 'torch.nn.Module', images: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return model(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).numpy()


def flax_embeddings(name, variables, images, **overrides):
  model = models.get_model(name, **overrides)
  embeddings, norms = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, images)
  embeddings, norms = np.asarray(embeddings), np.asarray(norms)
  assert embeddings.dtype == np.float32 and norms.dtype == np.float32
  np.testing.assert_allclose(norms, np.linalg.norm(embeddings, axis=1), rtol=1e-5)
  return embeddings


TINY = torch_reference.SMALL_IRESNETS['tiny']  # = sface_jax.models 'tiny'


def test_r18_command_line_import_matches_torch(shared_data, tmp_path):
  """Full-width r18 through the command: torch.save → convert → work directory → same
  embeddings, read back by the loader every trained model goes through."""
  torch_model = torch_reference.randomize_(torch_reference.build('r18'), seed=1).eval()
  checkpoint = tmp_path / 'backbone.pth'
  torch.save(torch_model.state_dict(), checkpoint)
  output = tmp_path / 'r18_flax'
  assert import_torch.main(['--torch-checkpoint', str(checkpoint), '--model', 'r18',
                            '--output', str(output)]) == 0
  from sface_jax import checkpoint as checkpoint_lib  # pylint: disable=g-import-not-at-top
  config, _, variables = checkpoint_lib.load_for_inference(str(output))
  assert config.model.name == 'r18' and config.data.image_size == 112
  assert config.source == str(checkpoint)
  assert sorted(path.name for path in tmp_path.iterdir()) == ['backbone.pth', 'r18_flax']
  assert sorted(path.name for path in output.iterdir()) == ['checkpoints', 'config.json']

  faces = load_faces(shared_data, 8)
  expected = torch_embeddings(torch_model, faces)
  got = flax_embeddings('r18', variables, faces)
  assert np.abs(expected).max() > 1.0  # a meaningful scale for an absolute tolerance
  np.testing.assert_array_less(np.abs(got - expected).max(), TOLERANCE)


def test_mbf_import_matches_torch(shared_data):
  torch_model = torch_reference.randomize_(torch_reference.build('mbf'), seed=2).eval()
  variables = import_torch.convert_state_dict(torch_model.state_dict(), 'mbf')
  faces = load_faces(shared_data, 6)
  expected = torch_embeddings(torch_model, faces)
  got = flax_embeddings('mbf', variables, faces)
  np.testing.assert_array_less(np.abs(got - expected).max(), TOLERANCE)


def test_small_input_and_embedding_dim(shared_data):
  """64×64 input (4×4 map, so the fc permutation is not the 7×7 one), 128-d, DDP prefix."""
  torch_model = torch_reference.IResNet(**TINY, num_features=128, image_size=64)
  torch_model = torch_reference.randomize_(torch_model, seed=3, image_size=64).eval()
  state_dict = {f'module.{key}': value for key, value in torch_model.state_dict().items()}
  variables = import_torch.convert_state_dict(state_dict, 'tiny', embedding_dim=128,
                                              image_size=64)
  assert variables['params']['fc']['kernel'].shape == (4 * 4 * 32, 128)
  faces = load_faces(shared_data, 5, side=64)
  expected = torch_embeddings(torch_model, faces)
  got = flax_embeddings('tiny', variables, faces, embedding_dim=128)
  np.testing.assert_array_less(np.abs(got - expected).max(), TOLERANCE)


@pytest.fixture
def tiny_checkpoint():
  return dict(torch_reference.randomize_(torch_reference.IResNet(**TINY)).state_dict())


def _bad(key, state_dict):
  state_dict = dict(state_dict)
  if key == 'missing':
    del state_dict['layer1.0.bn1.running_mean']
    return state_dict, ["missing key 'layer1.0.bn1.running_mean'", '(8,)']
  if key == 'extra':
    state_dict['layer5.0.conv1.weight'] = torch.zeros(4, 4, 3, 3)
    return state_dict, ["unexpected key 'layer5.0.conv1.weight'", '(4, 4, 3, 3)']
  state_dict['fc.weight'] = torch.zeros(512, 32 * 4 * 4)
  return state_dict, ["key 'fc.weight'", '(512, 512)', '(512, 1568)']


@pytest.mark.parametrize('problem', ['missing', 'extra', 'shape'])
def test_bad_checkpoint_names_key_and_shapes_and_writes_nothing(tiny_checkpoint, tmp_path,
                                                                problem, capsys):
  state_dict, fragments = _bad(problem, tiny_checkpoint)
  checkpoint = tmp_path / 'bad.pth'
  torch.save(state_dict, checkpoint)
  output = tmp_path / 'out'
  assert import_torch.main(['--torch-checkpoint', str(checkpoint), '--model', 'tiny',
                            '--output', str(output)]) == 1
  message = capsys.readouterr().err
  assert message.startswith('import_torch: error: ') and 'Traceback' not in message
  assert str(checkpoint) in message
  for fragment in fragments:
    assert fragment in message, (fragment, message)
  assert [path.name for path in tmp_path.iterdir()] == ['bad.pth']  # nothing written


def test_wrong_model_is_a_summary_naming_the_model_that_fits(tmp_path, capsys):
  """An r18_small checkpoint imported as r18, then with the wrong sizes: counts, the first
  keys, and the command-line remedy, in a few lines instead of one per key."""
  torch_model = torch_reference.IResNet(**torch_reference.SMALL_IRESNETS['r18_small'],
                                        num_features=128, image_size=64)
  checkpoint = tmp_path / 'small.pth'
  torch.save(torch_model.state_dict(), checkpoint)
  assert import_torch.main(['--torch-checkpoint', str(checkpoint), '--model', 'r18',
                            '--output', str(tmp_path / 'out')]) == 1
  message = capsys.readouterr().err
  lines = message.splitlines()
  assert len(lines) <= 2 + 3 * (import_torch.SHOWN_PER_KIND + 1), message
  assert 'Traceback' not in message and 'of another shape' in lines[0]
  assert lines[-1].strip() == ('it fits r18_small (embedding_dim=128, image_size=64): '
                               '--model r18_small --embedding-dim 128 --image-size 64')
  assert not (tmp_path / 'out').exists()

  torch.save({'conv1.weight': torch.zeros(8, 3, 3, 3)}, checkpoint)  # fits no model
  assert import_torch.main(['--torch-checkpoint', str(checkpoint), '--model', 'tiny',
                            '--output', str(tmp_path / 'out')]) == 1
  assert 'it fits none of r18, r34, r50' in capsys.readouterr().err


def test_existing_output_is_not_overwritten(tiny_checkpoint, tmp_path, capsys):
  checkpoint = tmp_path / 'ok.pth'
  torch.save(tiny_checkpoint, checkpoint)
  (tmp_path / 'out').mkdir()
  assert import_torch.main(['--torch-checkpoint', str(checkpoint), '--model', 'tiny',
                            '--output', str(tmp_path / 'out')]) == 1
  assert 'exists' in capsys.readouterr().err
  assert list((tmp_path / 'out').iterdir()) == []


def test_imported_weights_evaluate_through_the_cli(shared_data, tmp_path):
  """torch.save → import CLI → evaluate CLI on the real held-out .bin: the accuracy equals
  the protocol run on PyTorch's own flip-summed embeddings of the same images."""
  from sface_jax import evaluate  # pylint: disable=g-import-not-at-top
  from sface_jax.data import images as images_lib  # pylint: disable=g-import-not-at-top
  from sface_jax.data import pair_sets  # pylint: disable=g-import-not-at-top
  from sface_jax.evaluation import verification  # pylint: disable=g-import-not-at-top
  torch_model = torch_reference.IResNet(**TINY, num_features=128, image_size=64)
  torch_model = torch_reference.randomize_(torch_model, seed=4, image_size=64).eval()
  torch.save(torch_model.state_dict(), tmp_path / 'backbone.pth')
  imported = tmp_path / 'tiny_flax'
  assert import_torch.main(['--torch-checkpoint', str(tmp_path / 'backbone.pth'), '--model',
                            'tiny', '--embedding-dim', '128', '--image-size', '64', '--output',
                            str(imported)]) == 0
  bin_path = shared_data / 'orl' / 'insightface' / 'orl_val.bin'
  assert evaluate.main(['--workdir', str(imported), '--sets', str(bin_path),
                        '--output-dir', str(tmp_path)]) == 0
  with open(tmp_path / 'eval' / 'verification.json') as f:
    reported = json.load(f)['sets']['orl_val']

  pairs = pair_sets.read_bin(str(bin_path))
  images = (images_lib.decode_all(pairs.images, 64).astype(np.float32) - 127.5) / 128.0
  summed = torch_embeddings(torch_model, images) + torch_embeddings(torch_model,
                                                                    images[:, :, ::-1])
  reference = verification.verification_metrics(summed[0::2], summed[1::2], pairs.issame)
  assert reported['num_pairs'] == 900
  # Embeddings agree to ~1e-5, which can move a pair sitting on a threshold: allow one.
  assert abs(reported['accuracy'] - reference.accuracy) <= 1 / 900 + 1e-12
