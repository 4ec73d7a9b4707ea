"""Convert an insightface `arcface_torch` backbone checkpoint into our Flax variables.

  python -m sface_jax.tools.import_torch --torch-checkpoint backbone.pth --model r50 --output DIR

reads a PyTorch `state_dict` (what arcface_torch saves with
`torch.save(backbone.module.state_dict(), 'model.pt')`; also accepted: its training
checkpoints' `state_dict_backbone`, and a `module.` prefix on every key) for IResNet
(r18 … r200) or MobileFaceNet (mbf), and writes DIR as a work directory (`config.json` and
one checkpoint holding the backbone's `params` and `batch_stats`, float32;
`sface_jax.checkpoint.save_backbone`), so that everything that reads trained weights
(`python -m sface_jax.evaluate --workdir DIR`, `checkpoint.load_for_inference`) reads it.
DIR is written under a temporary name beside it and renamed when complete; it must not exist.

Layout changes (the whole difficulty):
- conv kernels: torch OIHW (O, I/groups, kh, kw) → Flax HWIO (kh, kw, I/groups, O);
- dense kernels: torch (out, in) → Flax (in, out);
- IResNet `fc`: its input is the flattened 7×7×512 map, which torch flattens in
  (C, H, W) order and we in (H, W, C): the kernel's rows are permuted accordingly;
- batch norm: weight → scale, bias → bias, running_mean → mean, running_var → var (eps
  is 1e-5 on both sides); `num_batches_tracked` is not used and is ignored;
- PReLU: weight (C,) → alpha (C,).

Bad input: missing, unexpected or wrongly shaped keys raise `CheckpointError`: the count
of each kind, the first few keys with the checkpoint's and the model's shapes (in torch
layout), and which of our models (with which embedding size and input side) the checkpoint
fits instead (`guess_model`); nothing is written. The command prints it without a traceback.

torch is needed only to read `.pt` files (`torch.load(..., weights_only=True)`, which
does not run pickled code); `convert_state_dict` takes any mapping of arrays.
"""

import argparse
import dataclasses
import math
import os
import sys
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import ml_collections
import numpy as np

from sface_jax import checkpoint
from sface_jax import cli
from sface_jax import models
from sface_jax.models import iresnet
from sface_jax.models import mobilefacenet

class CheckpointError(ValueError):
  """The checkpoint does not fit the model: names each key and both shapes."""


@dataclasses.dataclass(frozen=True)
class _Entry:
  torch_key: str
  collection: str  # 'params' | 'batch_stats'
  path: Tuple[str, ...]
  kind: str  # 'conv' | 'dense' | 'flat_dense' | 'copy'


def _conv(torch_prefix: str, path: Tuple[str, ...]) -> List[_Entry]:
  return [_Entry(f'{torch_prefix}.weight', 'params', path + ('kernel',), 'conv')]


def _bn(torch_prefix: str, path: Tuple[str, ...],
        stats_path: Optional[Tuple[str, ...]] = None) -> List[_Entry]:
  stats_path = path if stats_path is None else stats_path
  return [_Entry(f'{torch_prefix}.weight', 'params', path + ('scale',), 'copy'),
          _Entry(f'{torch_prefix}.bias', 'params', path + ('bias',), 'copy'),
          _Entry(f'{torch_prefix}.running_mean', 'batch_stats', stats_path + ('mean',), 'copy'),
          _Entry(f'{torch_prefix}.running_var', 'batch_stats', stats_path + ('var',), 'copy')]


def _prelu(torch_prefix: str, path: Tuple[str, ...]) -> List[_Entry]:
  return [_Entry(f'{torch_prefix}.weight', 'params', path + ('alpha',), 'copy')]


def _iresnet_entries(model: iresnet.IResNet) -> Iterator[_Entry]:
  yield from _conv('conv1', ('conv1',))
  yield from _bn('bn1', ('bn1',))
  yield from _prelu('prelu', ('prelu',))
  for stage, (num_blocks, width) in enumerate(zip(model.stage_sizes, model.stage_widths)):
    for block in range(num_blocks):
      torch_name, name = f'layer{stage + 1}.{block}', f'layer{stage + 1}_{block}'
      yield from _bn(f'{torch_name}.bn1', (name, 'bn1'))
      yield from _conv(f'{torch_name}.conv1', (name, 'conv1'))
      yield from _bn(f'{torch_name}.bn2', (name, 'bn2'))
      yield from _prelu(f'{torch_name}.prelu', (name, 'prelu'))
      yield from _conv(f'{torch_name}.conv2', (name, 'conv2'))
      yield from _bn(f'{torch_name}.bn3', (name, 'bn3'))
      if block == 0:  # IResNet stages start with stride 2: always a projection.
        yield from _conv(f'{torch_name}.downsample.0', (name, 'downsample_conv'))
        yield from _bn(f'{torch_name}.downsample.1', (name, 'downsample_bn'))
  yield from _bn('bn2', ('bn2',))
  yield _Entry('fc.weight', 'params', ('fc', 'kernel'), 'flat_dense')
  yield _Entry('fc.bias', 'params', ('fc', 'bias'), 'copy')
  yield from _bn('features', ('features',), ('features', 'stats'))


def _mbf_entries(model: mobilefacenet.MobileFaceNet) -> Iterator[_Entry]:
  def conv_block(torch_prefix, name, activation=True):
    yield from _conv(f'{torch_prefix}.layers.0', (*name, 'conv'))
    yield from _bn(f'{torch_prefix}.layers.1', (*name, 'bn'))
    if activation:
      yield from _prelu(f'{torch_prefix}.layers.2', (*name, 'prelu'))

  def depthwise(torch_prefix, name):
    yield from conv_block(f'{torch_prefix}.layers.0', (name, 'expand'))
    yield from conv_block(f'{torch_prefix}.layers.1', (name, 'depthwise'))
    yield from conv_block(f'{torch_prefix}.layers.2', (name, 'project'), activation=False)

  yield from conv_block('layers.0', ('stem',))
  yield from conv_block('layers.1', ('stem_dw',))
  for stage in range(1, 4):  # torch: layers.2/.3, .4/.5, .6/.7 = down block, Residual
    yield from depthwise(f'layers.{2 * stage}', f'stage{stage}_down')
    for index in range(model.stage_sizes[stage]):
      yield from depthwise(f'layers.{2 * stage + 1}.layers.{index}', f'stage{stage}_{index}')
  yield from conv_block('conv_sep', ('conv_sep',))
  yield from conv_block('features.layers.0', ('gdc',), activation=False)
  yield _Entry('features.layers.2.weight', 'params', ('fc', 'kernel'), 'dense')
  yield from _bn('features.layers.3', ('features',))


def _entries(model: Any) -> List[_Entry]:
  if isinstance(model, iresnet.IResNet):
    return list(_iresnet_entries(model))
  if isinstance(model, mobilefacenet.MobileFaceNet):
    return list(_mbf_entries(model))
  raise ValueError(f'no PyTorch layout known for {type(model).__name__}')


def _torch_shape(kind: str, flax_shape: Tuple[int, ...]) -> Tuple[int, ...]:
  """The shape the torch tensor must have for a Flax leaf of `flax_shape`."""
  if kind == 'conv':
    height, width, cin, cout = flax_shape
    return (cout, cin, height, width)
  if kind in ('dense', 'flat_dense'):
    return (flax_shape[1], flax_shape[0])
  return tuple(flax_shape)


def _to_numpy(value: Any) -> np.ndarray:
  if hasattr(value, 'detach'):  # a torch tensor; no torch import needed for this
    value = value.detach().cpu().float().numpy()
  return np.asarray(value, dtype=np.float32)


def _convert(kind: str, array: np.ndarray, flax_shape: Tuple[int, ...],
             channels: int) -> np.ndarray:
  if kind == 'conv':
    return np.ascontiguousarray(array.transpose(2, 3, 1, 0))
  if kind == 'dense':
    return np.ascontiguousarray(array.T)
  if kind == 'flat_dense':
    # torch column index c·H·W + h·W + w  →  our row index (h·W + w)·C + c.
    features, flat = array.shape
    side = math.isqrt(flat // channels)
    array = array.reshape(features, channels, side, side).transpose(2, 3, 1, 0)
    return np.ascontiguousarray(array.reshape(flax_shape))
  return array.reshape(flax_shape)


def _tensors(state_dict: Mapping[str, Any]) -> Dict[str, Any]:
  """The backbone's tensors by key, unwrapped (`_unwrap`), without BN's unused
  `num_batches_tracked`."""
  return {key: value for key, value in _unwrap(state_dict).items()
          if not key.endswith('.num_batches_tracked')}


def _unwrap(state_dict: Mapping[str, Any]) -> Dict[str, Any]:
  if 'state_dict_backbone' in state_dict:  # arcface_torch training checkpoint
    state_dict = state_dict['state_dict_backbone']
  keys = list(state_dict)
  if keys and all(key.startswith('module.') for key in keys):  # saved from DDP wrapper
    return {key[len('module.'):]: value for key, value in state_dict.items()}
  return dict(state_dict)


def _flax_shape(expected: Any, entry: _Entry) -> Tuple[int, ...]:
  node = expected[entry.collection]
  for name in entry.path:
    node = node[name]
  return tuple(node.shape)


def _problems(given: Mapping[str, Any], entries: List[_Entry], expected: Any,
              model_name: str) -> Dict[str, List[str]]:
  """{'missing' | 'unexpected' | 'shape': one description per key} of a state_dict against
  the model's conversion table."""
  problems: Dict[str, List[str]] = {'missing': [], 'unexpected': [], 'shape': []}
  wanted = {entry.torch_key: entry for entry in entries}
  for key, entry in wanted.items():
    shape = _torch_shape(entry.kind, _flax_shape(expected, entry))
    if key not in given:
      problems['missing'].append(f'missing key {key!r}: {model_name} expects shape {shape}')
    elif tuple(given[key].shape) != shape:
      problems['shape'].append(f'key {key!r} has shape {tuple(given[key].shape)} in the '
                               f'checkpoint, {model_name} expects {shape}')
  problems['unexpected'] = [f'unexpected key {key!r} with shape {tuple(given[key].shape)}: '
                            f'{model_name} has no such weight' for key in given
                            if key not in wanted]
  return problems


SHOWN_PER_KIND = 3  # keys named per kind of problem; the rest are counted


def _summary(problems: Dict[str, List[str]], given: Mapping[str, Any], *, source: str,
             model_name: str, embedding_dim: int, image_size: int) -> str:
  """A few lines: the counts, the first keys of each kind, and which model fits instead."""
  counts = ', '.join(f'{len(problems[kind])} {words}' for kind, words in
                     (('missing', 'keys missing'), ('unexpected', 'unexpected'),
                      ('shape', 'of another shape')) if problems[kind])
  lines = [f'{source} ({len(given)} tensors) does not fit {model_name} (embedding_dim='
           f'{embedding_dim}, image_size={image_size}): {counts}']
  for found in problems.values():
    lines += found[:SHOWN_PER_KIND]
    if len(found) > SHOWN_PER_KIND:
      lines.append(f'... and {len(found) - SHOWN_PER_KIND} more like it')
  lines.append(guess_model(given))
  return '\n  '.join(lines)


def _inferred_sizes(given: Mapping[str, Any]) -> Tuple[int, int]:
  """(embedding_dim, image_size) an arcface_torch state_dict was made for (512, 112 when its
  layout is not one we know): the embedding FC's output, and the side of the last feature
  map × 16."""
  if 'fc.weight' in given and 'bn2.weight' in given:  # IResNet: fc takes the C×s×s map
    features, flat = given['fc.weight'].shape
    side = math.isqrt(flat // given['bn2.weight'].shape[0])
    return int(features), 16 * side
  if 'features.layers.2.weight' in given and 'features.layers.0.layers.0.weight' in given:
    return (int(given['features.layers.2.weight'].shape[0]),  # MobileFaceNet: GDC's k×k
            16 * int(given['features.layers.0.layers.0.weight'].shape[-1]))
  return 512, 112


def guess_model(state_dict: Mapping[str, Any]) -> str:
  """One line saying which of our models (and sizes) the state_dict fits, the remedy for a
  wrong --model, or that it fits none of them and whose key layout comes closest."""
  given = _tensors(state_dict)
  embedding_dim, image_size = _inferred_sizes(given)
  mismatches = {}
  for name in models.MODELS:
    model = models.get_model(name, embedding_dim=embedding_dim)
    try:
      keys = {entry.torch_key for entry in _entries(model)}
    except ValueError:  # no torch layout known for this architecture
      continue
    mismatches[name] = len(keys ^ set(given))
  fitting = [name for name, count in mismatches.items() if count == 0]
  for name in fitting:  # the same keys: the shapes decide (r18 and r18_small differ there)
    model = models.get_model(name, embedding_dim=embedding_dim)
    expected = models.abstract_variables(model, image_size)
    if not any(_problems(given, _entries(model), expected, name).values()):
      return (f'it fits {name} (embedding_dim={embedding_dim}, image_size={image_size}): '
              f'--model {name} --embedding-dim {embedding_dim} --image-size {image_size}')
  closest = min(mismatches, key=mismatches.get)
  return (f'it fits none of {", ".join(mismatches)}; the closest key layout is {closest!r} '
          f'({mismatches[closest]} keys differ)')


def convert_state_dict(state_dict: Mapping[str, Any], model_name: str, *,
                       embedding_dim: int = 512, image_size: int = 112,
                       source: str = 'state_dict', **overrides: Any) -> Dict[str, Any]:
  """arcface_torch `state_dict` → {'params': …, 'batch_stats': …} of float32 numpy arrays.

  model_name: a name for `sface_jax.models.get_model` (an IResNet or mbf);
  embedding_dim, image_size (the input side the checkpoint was trained at: it fixes the
  fc input size) and `overrides` (module fields) must describe the checkpoint's model.
  The result feeds `get_model(model_name, embedding_dim=..., **overrides).apply`.
  Raises CheckpointError (naming `source`) on missing, unexpected or misshapen keys.
  """
  model = models.get_model(model_name, embedding_dim=embedding_dim, **overrides)
  expected = models.abstract_variables(model, image_size)
  entries = _entries(model)
  given = _tensors(state_dict)
  problems = _problems(given, entries, expected, model_name)
  if any(problems.values()):
    raise CheckpointError(_summary(problems, given, source=source, model_name=model_name,
                                   embedding_dim=embedding_dim, image_size=image_size))

  channels = model.stage_widths[-1] if isinstance(model, iresnet.IResNet) else 0
  variables: Dict[str, Any] = {'params': {}, 'batch_stats': {}}
  for entry in entries:
    node = variables[entry.collection]
    for name in entry.path[:-1]:
      node = node.setdefault(name, {})
    node[entry.path[-1]] = _convert(entry.kind, _to_numpy(given[entry.torch_key]),
                                    _flax_shape(expected, entry), channels)
  covered = sum(1 for _ in _leaves(variables))
  total = sum(1 for _ in _leaves(expected))
  if covered != total:  # a bug in the tables above, not in the checkpoint
    raise AssertionError(f'conversion table covers {covered} of {total} variables')
  return variables


def _leaves(tree: Any) -> Iterator[Any]:
  if isinstance(tree, Mapping):
    for value in tree.values():
      yield from _leaves(value)
  else:
    yield tree


def load_torch_checkpoint(path: str) -> Dict[str, Any]:
  """A `.pt`/`.pth` state_dict as a dict of tensors (needs torch; no code execution)."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as error:
    raise ImportError('reading a PyTorch checkpoint needs torch: pip install torch '
                      '(the CPU build is enough)') from error
  state = torch.load(path, map_location='cpu', weights_only=True)
  if not isinstance(state, Mapping):
    raise CheckpointError(f'{path}: expected a state_dict (a mapping of tensors), got '
                          f'{type(state).__name__}')
  return dict(state)


def imported_config(model_name: str, *, embedding_dim: int, image_size: int,
                    source: str) -> ml_collections.ConfigDict:
  """The config of an imported work directory: what inference reads (model, input size)."""
  return ml_collections.ConfigDict({
      'source': source,
      'model': {'name': model_name, 'embedding_dim': embedding_dim, 'dropout': 0.0,
                'dtype': 'float32'},
      'data': {'dir': '', 'image_size': image_size},
      'eval': {'sets': (), 'batch_size': 256}})


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(
      prog='python -m sface_jax.tools.import_torch', formatter_class=cli.HelpFormatter,
      description='Convert an insightface arcface_torch backbone state_dict to Flax.')
  parser.add_argument('--torch-checkpoint', required=True,
                      help='the torch.save()d state_dict (.pt/.pth) of the backbone')
  parser.add_argument('--model', required=True, choices=sorted(models.MODELS),
                      help='the architecture the checkpoint holds')
  parser.add_argument('--output', required=True,
                      help='work directory to create (must not exist)')
  parser.add_argument('--embedding-dim', type=int, default=512,
                      help="the checkpoint's embedding size (its fc output)")
  parser.add_argument('--image-size', type=int, default=112,
                      help='input side the checkpoint was trained at (fixes the fc size)')
  args = parser.parse_args(argv)
  try:
    state_dict = load_torch_checkpoint(args.torch_checkpoint)
    variables = convert_state_dict(state_dict, args.model, embedding_dim=args.embedding_dim,
                                   image_size=args.image_size, source=args.torch_checkpoint)
    config = imported_config(args.model, embedding_dim=args.embedding_dim,
                             image_size=args.image_size,
                             source=os.path.abspath(args.torch_checkpoint))
    checkpoint.save_backbone(args.output, config, variables)
  except (ImportError, OSError, ValueError) as e:  # CheckpointError is a ValueError
    print(f'import_torch: error: {e}', file=sys.stderr, flush=True)
    return 1
  print(f'wrote {args.output} ({args.model}, {len(state_dict)} tensors): use it as a '
        'work directory, e.g. python -m sface_jax.evaluate --workdir ' + args.output)
  return 0


if __name__ == '__main__':
  sys.exit(main())
