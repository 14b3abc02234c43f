"""Every file a user hands us is checked: a damaged artifact, AdapterHub folder or workdir
config gives one line `error: <path>: <what>; <fix>`, exit 2, no traceback, and never a
silent stand-in for a missing weight."""

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from helpers import ROOT, predict_main, run_main, run_train

DEMO = ('--config', 'configs/demo.py', '--config.num_train_steps=4',
        '--config.data.max_train_examples=64')
ROWS = [{'text': 'a good film'}, {'text': 'a bad one'}]
ENV = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'ADAPTER_TUNING_NO_REEXEC': '1'}


@pytest.fixture(scope='module')
def trained(demo_reference_run, tmp_path_factory):
  """A demo run's adapter/ (a copy of conftest's shared run; its base stays where the run
  made it) beside rows.jsonl to predict on."""
  workdir = tmp_path_factory.mktemp('demo')
  shutil.copytree(demo_reference_run / 'adapter', workdir / 'adapter')
  rows = workdir / 'rows.jsonl'
  rows.write_text(''.join(json.dumps(r) + '\n' for r in ROWS))
  return workdir


def _predict(adapter, rows, out, *extra):
  return subprocess.run([sys.executable, '-m', 'adapter_tuning.predict', '--adapter', str(adapter),
                         '--input', str(rows), '--output', str(out), *extra], cwd=ROOT,
                        capture_output=True, text=True, timeout=300, env=ENV)


def _damaged(trained, tmp_path, damage):
  copy = tmp_path / 'adapter'
  shutil.copytree(trained / 'adapter', copy)
  damage(copy)
  return copy


def _truncate(a):
  data = (a / 'weights.safetensors').read_bytes()
  (a / 'weights.safetensors').write_bytes(data[:len(data) // 2])


def _edit_config(change):
  def damage(a):
    meta = json.loads((a / 'config.json').read_text())
    change(meta)
    (a / 'config.json').write_text(json.dumps(meta))
  return damage


def _edit_weights(change):
  def damage(a):
    tensors = load_file(str(a / 'weights.safetensors'))
    change(tensors)
    save_file(tensors, str(a / 'weights.safetensors'))
  return damage


def _drop_one(t):
  del t[sorted(t)[0]]


def _nan(t):
  t['head/bias'][0] = np.nan


def _reshape(t):
  t['head/bias'] = np.zeros(7, np.float32)


def _extra(t):
  t['encoder/layer_0/mystery/kernel'] = np.zeros(3, np.float32)


def _ints(t):
  t['head/bias'] = t['head/bias'].astype(np.int32)


CASES = {
    'truncated weights': (_truncate, r'weights\.safetensors: not a readable safetensors file'),
    'config not JSON': (lambda a: (a / 'config.json').write_text('{head: 1'),
                        r'config\.json: not valid JSON \(.* at line 1 column 2\)'),
    'config lacks head': (_edit_config(lambda m: m.pop('head')),
                          r"config\.json: lacks the key\(s\) head"),
    'newer format': (_edit_config(lambda m: m.update(format_version=99)),
                     r'config\.json: format_version 99 is newer than this adapter_tuning reads'),
    'unknown head': (_edit_config(lambda m: m.update(head='ranking')),
                     r"config\.json: unknown head kind 'ranking'"),
    'a tensor missing': (_edit_weights(_drop_one), r"weights\.safetensors: lacks tensor\(s\)"),
    'a NaN': (_edit_weights(_nan),
              r"weights\.safetensors: tensor 'head/bias' holds 1 non-finite value"),
    'misshapen tensor': (_edit_weights(_reshape),
                         r"weights\.safetensors: tensor 'head/bias' has shape \(7,\), expected \(2,\)"),
    'unexpected tensor': (_edit_weights(_extra), r"weights\.safetensors: holds tensor\(s\) this "
                          r"model has no place for: 'encoder/layer_0/mystery/kernel'"),
    'integer tensor': (_edit_weights(_ints),
                       r"weights\.safetensors: tensor 'head/bias' has dtype int32"),
    'base moved': (_edit_config(lambda m: m['base'].update(path='/nonexistent/base')),
                   r'config\.json: its base /nonexistent/base is gone .*; pass --base'),
    'empty folder': (lambda a: [f.unlink() for f in a.iterdir()], r'adapter: an empty folder'),
}


# One case runs `python -m adapter_tuning.predict` in a subprocess, the others its main() in
# this process (helpers.run_main): the same code and messages, without a new interpreter each.
SUBPROCESS_CASE = 'a NaN'


@pytest.mark.parametrize('case', sorted(CASES))
def test_damaged_artifact_is_one_line_exit_2_and_writes_nothing(trained, tmp_path, case):
  damage, message = CASES[case]
  adapter = _damaged(trained, tmp_path, damage)
  out = tmp_path / 'predictions.jsonl'
  if case == SUBPROCESS_CASE:
    result = _predict(adapter, trained / 'rows.jsonl', out)
  else:
    result = predict_main('--adapter', adapter, '--input', trained / 'rows.jsonl', '--output',
                          out)
  assert result.returncode == 2, result.stderr[-2000:]
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('error: '), result.stderr
  assert re.search(message, lines[0]), lines[0]
  assert 'Traceback' not in result.stderr and not out.exists()


def test_the_undamaged_artifact_predicts(trained, tmp_path):
  out = tmp_path / 'predictions.jsonl'
  result = _predict(trained / 'adapter', trained / 'rows.jsonl', out)
  assert result.returncode == 0, result.stderr[-2000:]
  assert len(out.read_text().splitlines()) == len(ROWS)


def test_base_moved_is_fixed_by_passing_base(trained, tmp_path):
  adapter = _damaged(trained, tmp_path, CASES['base moved'][0])
  base = json.loads((trained / 'adapter' / 'config.json').read_text())['base']['path']
  out = tmp_path / 'predictions.jsonl'
  result = predict_main('--adapter', adapter, '--input', trained / 'rows.jsonl', '--output', out,
                        '--base', base)
  assert result.returncode == 0, result.stderr[-2000:]
  assert len(out.read_text().splitlines()) == len(ROWS)


def _export(args):
  return subprocess.run([sys.executable, '-m', 'adapter_tuning.export', *map(str, args)],
                        cwd=ROOT, capture_output=True, text=True, timeout=300, env=ENV)


AH_CASES = {
    'config not JSON': (lambda a: (a / 'adapter_config.json').write_text('[1,'),
                        r'adapter_config\.json: not valid JSON'),
    'config a list': (lambda a: (a / 'adapter_config.json').write_text('[1]'),
                      r'adapter_config\.json: holds a JSON list, not an object'),
    'truncated weights': (lambda a: (a / 'adapter.safetensors').write_bytes(b'\x08\x00'),
                          r'adapter\.safetensors: not a readable safetensors file'),
    'no weights': (lambda a: (a / 'adapter.safetensors').unlink(),
                   r'not an AdapterHub adapter: it needs adapter_config\.json'),
}


@pytest.fixture(scope='module')
def adapterhub_export(trained, tmp_path_factory):
  """The trained artifact exported to an AdapterHub folder (safetensors only), once."""
  from adapter_tuning import export
  ah = tmp_path_factory.mktemp('ah') / 'ah'
  assert export.main(['export', '--adapter', str(trained / 'adapter'), '--format',
                      'adapterhub', '--output', str(ah)]) == 0
  for f in ah.glob('*.bin'):
    f.unlink()  # the safetensors files are what is damaged here
  return ah


AH_SUBPROCESS_CASE = 'truncated weights'  # through `python -m adapter_tuning.export`


@pytest.mark.parametrize('case', sorted(AH_CASES))
def test_damaged_adapterhub_folder_is_one_line_exit_2(trained, adapterhub_export, tmp_path,
                                                      case):
  from adapter_tuning import export
  base = json.loads((trained / 'adapter' / 'config.json').read_text())['base']['path']
  ah = tmp_path / 'ah'
  shutil.copytree(adapterhub_export, ah)
  damage, message = AH_CASES[case]
  damage(ah)
  out = tmp_path / 'imported'
  args = ['--adapter', ah, '--format', 'adapterhub', '--to_artifact', '--base', base,
          '--output', out]
  if case == AH_SUBPROCESS_CASE:
    result = _export(args)
  else:
    result = run_main(export.main, ['export', *map(str, args)])
  assert result.returncode == 2 and re.search(message, result.stderr), result.stderr[-2000:]
  assert len(result.stderr.strip().splitlines()) == 1 and not out.exists()


def test_damaged_workdir_config_is_refused_and_kept(trained, tmp_path):
  workdir = tmp_path / 'run'
  workdir.mkdir()
  (workdir / 'config.json').write_text('{"model": ')
  result = run_train(*DEMO, '--workdir', workdir)
  assert result.returncode == 2 and 'config.json: not valid JSON' in result.stderr
  assert (workdir / 'config.json').read_text() == '{"model": '
