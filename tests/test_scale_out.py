"""The sharded layout (sface_jax.sharding): class centres split over devices, Partial FC, hosts.

Multi-device checks run this file as a script in a subprocess with 8 forced CPU devices
(`XLA_FLAGS` must be set before jax is imported); each check prints one JSON line, which the
tests below read. The one-device results they are compared with are themselves checked
against float64 references in test_heads.py.
"""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
DEVICES = 8
NUM_CLASSES = 37  # not a multiple of 8: padded to 40, 5 centres per device
BATCH, DIM = 16, 8


# ---- what runs in the subprocess ------------------------------------------------------------


def _head_gradients(name, devices, sample_rate=1.0, num_classes=NUM_CLASSES, scale=16.0,
                    x_scale=1.0, overrides=None):
  """Loss, gradients, metrics and new head state of head `name` laid out on `devices`;
  `x_scale` multiplies the embeddings, `overrides` are `config.head` fields."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from sface_jax.configs import base  # pylint: disable=g-import-not-at-top
  from sface_jax import heads, sharding  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(0)
  x = jnp.asarray(x_scale * rng.normal(size=(BATCH, DIM)), jnp.float32)
  # The first and the last class (the last device's block, next to the padding) are in it.
  labels = jnp.asarray(np.r_[0, num_classes - 1, rng.integers(0, num_classes, BATCH - 2)],
                       jnp.int32)
  centers = rng.normal(size=(DIM, num_classes)).astype(np.float32)
  config = base.get_config()
  config.head.name = name
  config.head.scale = scale
  config.head.update_from_flattened_dict(overrides or {})
  mesh = sharding.make_mesh(jax.devices()[:devices])
  head = heads.get_head(config.head)
  padded = sharding.padded_num_classes(num_classes, mesh)
  classifier = {'class_centers': jnp.pad(jnp.asarray(centers), ((0, 0), (0, padded - num_classes)))}
  if head.uses_bias:
    bias = np.linspace(-0.1, 0.1, num_classes, dtype=np.float32)
    classifier['bias'] = jnp.pad(jnp.asarray(bias), (0, padded - num_classes))
  state = head.init_state(padded, DIM)
  if 'centers' in state:
    state = {'centers': jnp.asarray(rng.normal(size=(padded, DIM)), jnp.float32)}
  classifier = jax.device_put(classifier, sharding.tree_shardings(mesh, classifier))
  head_loss = sharding.shard_head(head, mesh, num_classes=num_classes, sample_rate=sample_rate)

  def loss(x, classifier):
    value, new_state, metrics = head_loss(x, labels, classifier, state, jnp.int32(3),
                                          jax.random.key_data(jax.random.key(0)))
    return value, (new_state, metrics)

  (value, (new_state, metrics)), (grad_x, grad_classifier) = jax.jit(
      jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(x, classifier)
  return dict(loss=float(value), grad_x=np.asarray(grad_x).tolist(),
              grad_centers=np.asarray(grad_classifier.get('class_centers', 0.0)).tolist(),
              labels=np.asarray(labels).tolist(),
              metrics={k: float(v) for k, v in metrics.items()},
              state={k: np.asarray(v).tolist() for k, v in new_state.items()})


def check_heads():
  """Every head on 1 and on 8 devices; Partial FC keeping every column; r = 0.1."""
  from sface_jax import heads  # pylint: disable=g-import-not-at-top
  out = {name: {'one': _head_gradients(name, 1), 'many': _head_gradients(name, DEVICES)}
         for name in heads.HEAD_NAMES}
  # 0.999 keeps ceil(0.999 * 5) = 5 of 5 columns: the sampling path with nothing dropped.
  out['pfc_all'] = {'one': out['arcface']['one'],
                    'many': _head_gradients('arcface', DEVICES, sample_rate=0.999)}
  # MagFace with ‖x‖ ≈ 20·√8 ≈ 57 inside [l_a, u_a] = [10, 110], so the margin's and the
  # regulariser's gradients through the norm are compared too (at ‖x‖ ≈ 2.8 both are clamped).
  out['magface_in_range'] = {name: _head_gradients('magface', n, x_scale=20.0)
                             for name, n in (('one', 1), ('many', DEVICES))}
  # ElasticFace+: margins drawn for the global batch and sorted by every sample's cos θ_y.
  plus = {'elasticface_arc.plus': True}
  out['elasticface_plus'] = {name: _head_gradients('elasticface_arc', n, overrides=plus)
                             for name, n in (('one', 1), ('many', DEVICES))}
  # 8 × 300 classes, r = 0.1: K = max(30, B = 16) = 30 centres per device per step.
  out['pfc_tenth'] = _head_gradients('arcface', DEVICES, sample_rate=0.1, num_classes=2400)
  return out


def _tiny_setup(mesh, num_classes, **overrides):
  from sface_jax.configs import base  # pylint: disable=g-import-not-at-top
  from sface_jax import step as step_lib  # pylint: disable=g-import-not-at-top
  config = base.get_config('runlocal')
  config.schedule.name = 'constant'
  for key, value in overrides.items():
    config.update_from_flattened_dict({key: value})
  return config, step_lib.make_setup(config, num_classes=num_classes, steps_per_epoch=10,
                                     total_steps=10, mesh=mesh)


def check_layout():
  """Where the train state lives and what the compiled step communicates (C = 8 × 523)."""
  import functools  # pylint: disable=g-import-not-at-top
  import re  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from sface_jax import sharding, step as step_lib  # pylint: disable=g-import-not-at-top

  num_classes = DEVICES * 523
  mesh = sharding.make_mesh()
  config, setup = _tiny_setup(mesh, num_classes, **{'head.sample_rate': 0.1})
  init = functools.partial(step_lib.create_train_state, config.seed, setup)
  shardings = sharding.tree_shardings(mesh, jax.eval_shape(init))
  state = jax.jit(init, out_shardings=shardings)()

  def shard_shapes(leaf):
    return sorted({tuple(s.data.shape) for s in leaf.addressable_shards})

  flat = {sharding.path_name(path): leaf
          for path, leaf in jax.tree_util.tree_leaves_with_path(state)}
  layout = {name: dict(shape=list(leaf.shape), shards=[list(s) for s in shard_shapes(leaf)],
                       devices=len({s.device for s in leaf.addressable_shards}))
            for name, leaf in flat.items() if 'class_centers' in name or name.endswith(
                'features/kernel')}

  batch_sharding = sharding.batch_sharding(mesh)
  step = jax.jit(functools.partial(step_lib.train_step, setup=setup),
                 in_shardings=(shardings, batch_sharding),
                 out_shardings=(shardings, sharding.replicated(mesh)))
  size = config.data.image_size
  images = jax.device_put(
      np.random.default_rng(1).normal(size=(config.batch_size, size, size, 3)).astype(
          np.float32), batch_sharding)
  labels = jax.device_put(np.arange(config.batch_size, dtype=np.int32) * 261, batch_sharding)
  batch = {'image': images, 'label': labels}
  hlo = step.lower(state, batch).compile().as_text()
  shapes = re.findall(r'[a-z0-9]+\[([0-9,]*)\]', hlo)
  collectives = re.findall(
      r'= (\S+\[[0-9,]*\](?:\{[^}]*\})?|\([^)]*\)) (all-gather|all-reduce|reduce-scatter|all-to-all|'
      r'collective-permute)(?:-start)?\(', hlo)

  before = np.asarray(state.params['classifier']['class_centers'])
  new_state, metrics = step(state, batch)
  after = np.asarray(new_state.params['classifier']['class_centers'])
  lr, wd = float(metrics['learning_rate']), config.optimizer.weight_decay
  return dict(
      layout=layout, num_classes=num_classes, block=523, batch=config.batch_size,
      dim=config.model.embedding_dim,
      dims=sorted({int(d) for shape in shapes for d in shape.split(',') if d}),
      collectives=[[shape, op] for shape, op in collectives],
      # The first step's SGD update is −lr·(g + wd·w): a centre that was not sampled (g = 0)
      # is only decayed, by the factor 1 − lr·wd (a relative change of 5e-5, 50× the rtol).
      decayed_only=np.all(np.isclose(after, before * (1 - lr * wd), rtol=1e-6, atol=0),
                          axis=0).reshape(DEVICES, 523).sum(axis=1).tolist(),
      labels=np.asarray(labels).tolist(), loss=float(metrics['loss']))


CHECKS = {'heads': check_heads, 'layout': check_layout}


def run_check(name):
  env = dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count={DEVICES}',
             JAX_PLATFORMS='cpu', PYTHONPATH=str(REPO))
  result = subprocess.run([sys.executable, __file__, name], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900, check=False)
  assert result.returncode == 0, result.stderr[-4000:]
  return json.loads(result.stdout.strip().splitlines()[-1])


# ---- the tests ------------------------------------------------------------------------------


@pytest.fixture(scope='module')
def head_results():
  return run_check('heads')


@pytest.fixture(scope='module')
def layout():
  return run_check('layout')


def _close(many, one, what, rtol=2e-5):
  many, one = np.asarray(many), np.asarray(one)
  np.testing.assert_allclose(many, one, rtol=rtol, atol=rtol * max(np.abs(one).max(), 1e-3),
                             err_msg=what)


def test_every_head_on_eight_devices_equals_one_device(head_results):
  from sface_jax import heads  # pylint: disable=g-import-not-at-top
  for name in [*heads.HEAD_NAMES, 'pfc_all', 'magface_in_range', 'elasticface_plus']:
    one, many = head_results[name]['one'], head_results[name]['many']
    _close(many['loss'], one['loss'], f'{name} loss')
    _close(many['grad_x'], one['grad_x'], f'{name} embedding gradient')
    if one['grad_centers'] != 0.0:
      grad_one = np.asarray(one['grad_centers'])[:, :NUM_CLASSES]
      grad_many = np.asarray(many['grad_centers'])
      _close(grad_many[:, :NUM_CLASSES], grad_one, f'{name} centre gradient')
      assert np.all(grad_many[:, NUM_CLASSES:] == 0), f'{name}: padding centres moved'
    assert one['metrics'].keys() == many['metrics'].keys()
    for key in one['metrics']:
      _close(many['metrics'][key], one['metrics'][key], f'{name} metric {key}', rtol=1e-4)
    for key in one['state']:
      one_state, many_state = np.asarray(one['state'][key]), np.asarray(many['state'][key])
      if key == 'centers':  # per class, padded to 40 rows on 8 devices and 37 on one
        one_state, many_state = one_state[:NUM_CLASSES], many_state[:NUM_CLASSES]
      _close(many_state, one_state, f'{name} state {key}')


def test_heads_learn_something_different(head_results):
  """The comparison above is not vacuous: the heads' losses differ from each other."""
  losses = [head_results[name]['one']['loss'] for name in ('arcface', 'cosface', 'sface')]
  assert len({round(v, 4) for v in losses}) == 3


def test_partial_fc_samples_every_positive_and_a_fixed_number_per_device(head_results):
  result = head_results['pfc_tenth']
  grad = np.asarray(result['grad_centers'])  # (D, 2400)
  moved = np.any(grad != 0, axis=0)
  assert np.all(moved[result['labels']]), 'a positive class was not sampled'
  # K = max(ceil(0.1 · 300), B) = 30 centres per device get a gradient, the rest exactly none.
  assert moved.reshape(DEVICES, 300).sum(axis=1).tolist() == [30] * DEVICES
  assert result['metrics']['accuracy'] >= 0.0


def test_class_centers_and_their_momentum_are_split_by_class(layout):
  dim, block = layout['dim'], layout['block']
  centers = [name for name in layout['layout'] if name.endswith('class_centers')]
  assert 'params/classifier/class_centers' in centers and len(centers) >= 2  # + momentum
  for name in centers:
    entry = layout['layout'][name]
    assert entry['shape'] == [dim, layout['num_classes']], name
    assert entry['shards'] == [[dim, block]] and entry['devices'] == DEVICES, name
  kernel = [name for name in layout['layout'] if name.startswith('params/backbone')]
  for name in kernel:  # the backbone is replicated: every device holds all of it
    assert layout['layout'][name]['shards'] == [layout['layout'][name]['shape']], name


def test_compiled_step_never_builds_or_moves_the_whole_classifier(layout):
  """No per-device buffer has the class count as a dimension, and no collective carries a
  block of classes: only the embeddings and labels (B × D), scalars and the backbone."""
  assert layout['num_classes'] not in layout['dims']
  assert layout['block'] in layout['dims']
  moved = ','.join(shape for shape, _ in layout['collectives'])
  assert str(layout['block']) not in moved and str(layout['num_classes']) not in moved
  gathered = [shape for shape, op in layout['collectives'] if op == 'all-gather']
  assert any(f'[{layout["batch"]},{layout["dim"]}]' in shape for shape in gathered), gathered


def test_partial_fc_step_decays_unsampled_centres(layout):
  """Documented in sface_jax/heads/partial_fc.py: weight decay (and later momentum) moves
  every centre; only the K = 53 sampled ones of each device's 523 also get a gradient (a
  sampled negative's may round to nothing at s = 64, so at least 470 are only decayed)."""
  assert all(523 - 53 <= count < 523 for count in layout['decayed_only']), layout['decayed_only']
  assert np.isfinite(layout['loss'])


def test_partition_rules_split_the_class_axis():
  from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top
  from sface_jax import sharding  # pylint: disable=g-import-not-at-top
  axis = sharding.AXIS
  assert sharding.partition_spec('params/classifier/class_centers', 2) == P(None, axis)
  assert sharding.partition_spec('params/classifier/bias', 1) == P(axis)
  assert sharding.partition_spec('head_state/centers', 2) == P(axis, None)
  assert sharding.partition_spec('params/backbone/layer1_0/conv1/kernel', 4) == P()
  # The optimiser's momentum for the centres lives under another prefix: same rule.
  assert sharding.partition_spec('opt_state/0/inner_state/1/0/trace/classifier/class_centers',
                                 2) == P(None, axis)
  # The class axes a restore re-pads for another device count (sface_jax.checkpoint).
  assert sharding.class_axis('opt_state/0/trace/classifier/class_centers', 2) == 1
  assert sharding.class_axis('params/classifier/bias', 1) == 0
  assert sharding.class_axis('head_state/centers', 2) == 0
  assert sharding.class_axis('params/backbone/fc/bias', 1) is None


def test_padded_num_classes():
  import jax  # pylint: disable=g-import-not-at-top
  from sface_jax import sharding  # pylint: disable=g-import-not-at-top
  mesh = sharding.make_mesh()
  n = mesh.size
  assert sharding.padded_num_classes(37, mesh) == -(-37 // n) * n
  with pytest.raises(ValueError, match='0 classes'):
    sharding.padded_num_classes(0, mesh)
  assert mesh.axis_names == (sharding.AXIS,) and mesh.size == jax.device_count()


def test_partial_fc_sampling_is_static_and_keeps_positives():
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from sface_jax.heads import partial_fc  # pylint: disable=g-import-not-at-top
  assert partial_fc.num_sampled(300, 0.1, 16) == 30
  assert partial_fc.num_sampled(300, 0.01, 16) == 16  # room for every positive
  assert partial_fc.num_sampled(10, 0.5, 16) == 10
  valid = jnp.arange(50) < 47  # three padding columns
  block_labels = jnp.asarray([3, -1, 46, 3, 0, -1], jnp.int32)
  picks = []
  for seed in range(5):
    columns = np.asarray(partial_fc.sample_columns(block_labels, valid, 12,
                                                   jax.random.key(seed)))
    assert len(columns) == len(set(columns)) == 12 and np.all(np.diff(columns) > 0)
    assert {0, 3, 46} <= set(columns.tolist()) and columns.max() < 47
    relabelled = np.asarray(partial_fc.relabel(block_labels, jnp.asarray(columns)))
    for label, new in zip(np.asarray(block_labels), relabelled):
      assert (new == -1) if label < 0 else columns[new] == label
    picks.append(tuple(columns))
  assert len(set(picks)) > 1, 'the negatives should change with the key'


@pytest.mark.parametrize('field, value, match', [
    ('batch_size', 12, 'multiple of the 8 devices'),
    ('head.sample_rate', 0.0, 'sample_rate=0.0'),
    ('head.sample_rate', 1.5, 'sample_rate=1.5'),
    ('head.center_init', 'zeros', 'center_init'),
])
def test_bad_layouts_fail_naming_the_field(field, value, match):
  from sface_jax.configs import base  # pylint: disable=g-import-not-at-top
  from sface_jax import step as step_lib  # pylint: disable=g-import-not-at-top
  config = base.get_config('runlocal')
  config.update_from_flattened_dict({field: value})
  with pytest.raises(ValueError, match=match):
    step_lib.check_config(config, num_classes=100, num_devices=8)


def test_more_devices_than_classes_fails():
  from sface_jax.configs import base  # pylint: disable=g-import-not-at-top
  from sface_jax import step as step_lib  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match='fewer than the 8 devices'):
    step_lib.check_config(base.get_config('runlocal'), num_classes=5, num_devices=8)




def test_planner_reports_the_split_layout():
  """`python -m sface_jax.plan` on 8 forced devices: the centre bytes per device are
  D × C/8 × 4, and the head's collectives are exactly the embedding and label all-gather
  (B × D + B values) and the embedding-gradient reduce-scatter (B/8 × D). The estimated
  peak is the larger of the step's and the state creation's, which under Partial FC here is
  the creation's (it holds the whole new state beside the random centres it pads)."""
  env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS='cpu')
  result = subprocess.run(
      [sys.executable, '-m', 'sface_jax.plan', '--config', 'base:runlocal',
       '--devices', str(DEVICES), '--num-classes', '100000', '--sample-rate', '0.1', '--json'],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  plan = json.loads(result.stdout.strip().splitlines()[-1])
  batch, dim = 16, 32  # sface_jax/configs/base.py runlocal
  assert plan['devices'] == DEVICES and plan['classes_per_device'] == 12_500
  assert plan['class_center_bytes'] == dim * 12_500 * 4
  assert plan['optimizer_bytes'] >= plan['class_center_bytes']  # + the backbone's momentum
  assert plan['collective_bytes']['all-gather'] == batch * dim * 4 + batch * 4
  assert plan['collective_bytes']['reduce-scatter'] == batch // DEVICES * dim * 4
  assert plan['collective_bytes']['all-to-all'] == 0
  assert plan['step_peak_bytes'] == plan['argument_bytes'] + plan['temp_bytes']
  assert plan['init_peak_bytes'] == plan['init_output_bytes'] + plan['init_temp_bytes']
  assert plan['init_output_bytes'] >= plan['optimizer_bytes'] + plan['class_center_bytes']
  assert plan['peak_estimate_bytes'] == max(plan['step_peak_bytes'], plan['init_peak_bytes'])
  assert plan['init_peak_bytes'] > plan['step_peak_bytes']
  assert plan['argument_bytes'] > plan['class_center_bytes']


def test_planner_rejects_a_layout_that_cannot_work():
  env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS='cpu')
  result = subprocess.run(
      [sys.executable, '-m', 'sface_jax.plan', '--config', 'base:runlocal',
       '--devices', '8', '--num-classes', '5'],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 1 and 'fewer than the 8 devices' in result.stderr


def test_hlo_byte_counting():
  from sface_jax import plan  # pylint: disable=g-import-not-at-top
  assert plan.shape_bytes('f32[16,512]{1,0}') == 16 * 512 * 4
  assert plan.shape_bytes('(bf16[8]{0}, s32[2,3]{1,0}, f32[])') == 16 + 24 + 4
  hlo = ('  %ag = f32[16,32]{1,0} all-gather(f32[2,32]{1,0} %x), dimensions={0}\n'
         '  %ar = (f32[8]{0}, f32[4]{0}) all-reduce(%a, %b), to_apply=%sum\n'
         '  %rs-start = f32[2,32]{1,0} reduce-scatter-start(f32[16,32]{1,0} %g)\n')
  totals = plan.collective_bytes(hlo)
  assert totals['all-gather'] == 2048 and totals['all-reduce'] == 48
  assert totals['reduce-scatter'] == 256


if __name__ == '__main__':
  sys.path.insert(0, str(REPO))
  print(json.dumps(CHECKS[sys.argv[1]]()))
