"""The commands read alike, and a mistake in one is a line that names it.

- Every argparse command: flags spelled with dashes, help text on every flag, defaults shown,
  and `--workdir` / `--checkpoint` meaning one thing each (sface_jax/cli.py).
- `python -m sface_jax.main`: `--help` answers without importing jax and exits 0; an unknown
  recipe, field, head or model, or a value of the wrong type is one line and exit status 2,
  before anything is written or converted.
- `python -m sface_jax.evaluate`: a report per step that never replaces a later step's, two
  sets of one name refused, progress with images/s and ETA.
"""

import argparse
import importlib
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

import tiny_backbone
from sface_jax import checkpoint
from sface_jax import cli
from sface_jax import evaluate
from sface_jax import progress
from sface_jax.evaluation import report
from sface_jax.evaluation import verification

REPO = pathlib.Path(__file__).resolve().parents[1]
COMMANDS = ('sface_jax.embed', 'sface_jax.evaluate', 'sface_jax.evaluation.identification',
            'sface_jax.evaluation.ijb', 'sface_jax.experiments.degraded_quality',
            'sface_jax.experiments.label_noise', 'sface_jax.models.__main__', 'sface_jax.plan',
            'sface_jax.tools.convert', 'sface_jax.tools.export', 'sface_jax.tools.import_torch')
# Modules that build the parser of other commands: the studies share study.py's.
SHARED_PARSERS = {'sface_jax.experiments.study': ('sface_jax.experiments.degraded_quality',
                                                  'sface_jax.experiments.label_noise')}


class _Parsed(Exception):
  """Raised instead of parsing: the parser a command built is all these tests need."""


def _parser_of(module_name, monkeypatch) -> argparse.ArgumentParser:
  captured = []

  def capture(self, args=None, namespace=None):
    captured.append(self)
    raise _Parsed

  monkeypatch.setattr(argparse.ArgumentParser, 'parse_args', capture)
  monkeypatch.setenv('XLA_FLAGS', os.environ.get('XLA_FLAGS', ''))  # plan sets these first
  monkeypatch.setenv('JAX_PLATFORMS', os.environ.get('JAX_PLATFORMS', ''))
  with pytest.raises(_Parsed):
    importlib.import_module(module_name).main([])
  return captured[0]


def test_every_argparse_command_is_listed():
  found = {'.'.join(path.relative_to(REPO).with_suffix('').parts)
           for path in (REPO / 'sface_jax').rglob('*.py')
           if 'argparse.ArgumentParser(' in path.read_text(encoding='utf-8')}
  served = {command for commands in SHARED_PARSERS.values() for command in commands}
  assert found == (set(COMMANDS) - served) | set(SHARED_PARSERS)


@pytest.mark.parametrize('module_name', COMMANDS)
def test_flags_have_one_spelling_help_and_their_default(module_name, monkeypatch):
  parser = _parser_of(module_name, monkeypatch)
  assert issubclass(parser.formatter_class, cli.HelpFormatter)
  text = ''.join(parser.format_help().split())  # wherever the lines wrap
  for action in parser._actions:  # pylint: disable=protected-access
    if isinstance(action, argparse._HelpAction):  # pylint: disable=protected-access
      continue
    if action.help == argparse.SUPPRESS:  # an old spelling kept as an alias
      assert any(flag.replace('_', '-') in text for flag in action.option_strings)
      continue
    assert action.help, f'{action.option_strings} has no help text'
    for flag in action.option_strings:
      assert flag.startswith('--') and '_' not in flag, flag
    if not (action.default is None or action.default is False or action.default == ''
            or action.required):
      assert f'(default:{action.default})'.replace(' ', '') in text, action.option_strings
  sources = {flag: action.type for action in parser._actions  # pylint: disable=protected-access
             for flag in action.option_strings if flag in ('--workdir', '--checkpoint')}
  if '--checkpoint' in sources:  # one meaning: a step; a work directory is --workdir
    assert sources == {'--workdir': checkpoint._workdir_argument,  # pylint: disable=protected-access
                       '--checkpoint': checkpoint._checkpoint_argument}  # pylint: disable=protected-access


def test_models_summary_takes_the_dashed_and_the_old_spelling(capsys):
  from sface_jax.models import __main__ as models_cli  # pylint: disable=g-import-not-at-top
  for flag in ('--image-size', '--image_size'):
    models_cli.main(['--summary', '--models', 'tiny', flag, '32'])
    assert 'image 32×32' in capsys.readouterr().out


# ---------------------------------------------------------------------------------------
# python -m sface_jax.main


def _main(*args, cwd):
  # GLIBC_TUNABLES set (as CI sets it): no restart line before the output under test.
  env = dict(os.environ, PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL='2',
             GLIBC_TUNABLES=os.environ.get('GLIBC_TUNABLES', ''))
  return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True,
                        text=True, timeout=300)


def test_main_help_exits_0_without_importing_jax(tmp_path):
  result = _main('-X', 'importtime', '-m', 'sface_jax.main', '--help', cwd=tmp_path)
  assert result.returncode == 0, result.stderr[-2000:]
  help_text = result.stdout
  for flag in ('--config', '--workdir', '--multihost', '--coordinator', '--num_processes',
               '--process_id'):
    assert flag in help_text
  assert 'sface_jax/configs/base.py' in help_text and 'ms1mv2_r50_arcface' in help_text
  imported = {line.rsplit('|', 1)[1].strip() for line in result.stderr.splitlines()
              if line.startswith('import time:')}
  assert 'absl.flags' in imported  # the importtime listing is there
  assert not {'jax', 'tensorflow', 'sface_jax.train'} & imported


MISTAKES = [  # (arguments after --workdir, fragments of the one line)
    (['--config', 'dmeo'], ['--config dmeo: no such file', 'recipes: base, casia_r50_sface']),
    (['--config', 'configs/demo.py'], ['did you mean --config demo?']),
    (['--config', 'demo:r100'], ["unknown config variant 'r100'", 'base.py line']),
    (['--config', 'demo', '--config.heaad.name=cosface'],
     ["--config.heaad.name: no such config field 'heaad' (did you mean 'head'?)"]),
    (['--config', 'demo', '--config.head.nmae=cosface'],
     ["--config.head.nmae: no such config field 'nmae' (did you mean 'name'?)"]),
    (['--config', 'demo', '--config.batch_size=many'], ['--config.batch_size=many', 'int']),
    (['--config', 'demo', '--config.head.name=arcfce'],
     ["config.head.name='arcfce' is not a head", "'arcface'", "'sface'"]),
    (['--config', 'demo', '--config.model.name=r51'],
     ["config.model.name='r51' is not a model", "'r50'"]),
    (['--config', 'demo', '--config.model.bn_running_var=pytorch'],
     ["config.model.bn_running_var='pytorch'", "'unbiased'"]),
    (['--config', 'demo', '--config.schedule.name=cos'], ["config.schedule.name", "cosine"]),
]


@pytest.mark.parametrize('args, fragments', MISTAKES, ids=lambda x: ' '.join(x)[-40:])
def test_main_mistake_is_one_line_and_exit_2(args, fragments, tmp_path):
  workdir = tmp_path / 'run'
  result = _main('-m', 'sface_jax.main', '--workdir', str(workdir), *args, cwd=tmp_path)
  assert result.returncode == 2, result.stderr[-3000:]
  assert 'Traceback' not in result.stderr
  errors = [line for line in result.stderr.splitlines() if 'error:' in line]
  assert len(errors) == 1 and errors[0].startswith('python -m sface_jax.main: error: '), \
      result.stderr
  for fragment in fragments:
    assert fragment in errors[0]
  assert not workdir.exists()  # nothing converted, nothing written


def test_main_requires_its_flags(tmp_path):
  result = _main('-m', 'sface_jax.main', '--config', 'demo', cwd=tmp_path)
  assert result.returncode == 2
  assert result.stderr.strip() == ('python -m sface_jax.main: error: --workdir is required '
                                   '(see --help)')


# ---------------------------------------------------------------------------------------
# python -m sface_jax.evaluate

SIZE, DIM = 32, 16


@pytest.fixture(scope='module')
def tiny_workdir(tmp_path_factory):
  """A work directory holding one checkpoint (step 0) of the tiny backbone."""
  return tiny_backbone.write_workdir(tmp_path_factory.mktemp('evaluate') / 'run',
                                     image_size=SIZE, embedding_dim=DIM, source='test_cli')[0]


def _metrics(seed):
  rng = np.random.default_rng(seed)
  a, b = rng.normal(size=(2, 60, 8))
  issame = np.arange(60) % 2 == 0
  b[issame] = a[issame] + 0.3 * b[issame]
  return {'set': verification.verification_metrics(a, b, issame)}


def _step(path):
  with open(path) as f:
    return json.load(f)['step']


def test_report_per_step_never_replaces_a_later_one(tmp_path):
  eval_dir = tmp_path / 'eval'
  report.write_report(_metrics(0), str(tmp_path), step=800)
  paths = report.write_report(_metrics(1), str(tmp_path), step=600)
  assert paths == {'json': str(eval_dir / 'verification-step600.json'),
                   'roc': str(eval_dir / 'roc-step600.png')}
  assert _step(eval_dir / 'verification.json') == 800
  assert _step(eval_dir / 'verification-step600.json') == 600
  assert _step(eval_dir / 'verification-step800.json') == 800
  report.write_report(_metrics(2), str(tmp_path), step=1000)
  assert _step(eval_dir / 'verification.json') == 1000
  assert report.write_report(_metrics(3), str(tmp_path)) == {}  # a step's report stays
  assert sorted(os.listdir(eval_dir)) == [
      'roc-step1000.png', 'roc-step600.png', 'roc-step800.png', 'roc.png',
      'verification-step1000.json', 'verification-step600.json',
      'verification-step800.json', 'verification.json']


def test_evaluate_command_reports_its_step_with_progress(tiny_workdir, shared_data, tmp_path,
                                                         monkeypatch, capsys):
  bin_path = shared_data / 'orl' / 'insightface' / 'orl_val.bin'
  output = tmp_path / 'out'
  (output / 'eval').mkdir(parents=True)
  (output / 'eval' / 'verification.json').write_text(json.dumps({'step': 800}))
  monkeypatch.setattr(evaluate, 'PROGRESS_SECONDS', 0.0)
  step_dir = tiny_workdir / 'checkpoints' / '0'
  assert evaluate.main(['--checkpoint', str(step_dir), '--sets', str(bin_path),
                        '--batch-size', '128', '--output-dir', str(output)]) == 0
  captured = capsys.readouterr()
  assert re.search(r'evaluate: [\d,]+/1,800 images \([\d.]+%\)  [\d,]+ images/s  ETA \d+m\d\ds',
                   captured.err), captured.err
  assert 'orl_val: 900 pairs' in captured.err
  assert _step(output / 'eval' / 'verification-step0.json') == 0
  assert _step(output / 'eval' / 'verification.json') == 800  # a later step's, kept


def test_evaluate_refuses_two_sets_of_one_name(tiny_workdir, shared_data, tmp_path, capsys):
  bin_path = shared_data / 'orl' / 'insightface' / 'orl_val.bin'
  shutil.copyfile(bin_path, tmp_path / 'orl_val.bin')
  assert evaluate.main(['--workdir', str(tiny_workdir), '--sets', str(bin_path),
                        str(tmp_path / 'orl_val.bin')]) == 1
  error = capsys.readouterr().err
  assert "2 pair sets are named 'orl_val'" in error
  assert str(bin_path) in error and str(tmp_path / 'orl_val.bin') in error
  assert not (tiny_workdir / 'eval').exists()


def test_workdir_and_checkpoint_take_their_own_kind_of_path(tiny_workdir, capsys):
  with pytest.raises(SystemExit) as exited:
    evaluate.main(['--checkpoint', str(tiny_workdir)])
  assert exited.value.code == 2
  assert 'is not one checkpoint' in capsys.readouterr().err  # README's old spelling
  with pytest.raises(SystemExit):
    evaluate.main(['--workdir', str(tiny_workdir / 'checkpoints' / '0')])
  assert 'is one checkpoint: pass it as --checkpoint' in capsys.readouterr().err


def test_ticker_lines():
  lines = []
  ticker = progress.Ticker('embed', 1000, unit='faces', seconds=0.0, log=lines.append)
  ticker(100)  # the first batch (compilation): no rate yet
  ticker(400)
  ticker(1000)  # done: the last line is finish()'s
  ticker.finish()
  assert len(lines) == 2
  assert re.fullmatch(r'embed: 400/1,000 faces \(40\.0%\)  [\d,]+ faces/s  ETA \d+m\d\ds',
                      lines[0])
  assert re.fullmatch(r'embed: 1,000 faces in [\d.]+ s \([\d,]+ faces/s overall, compilation '
                      r'included\)', lines[1])
