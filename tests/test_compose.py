"""Averaging artifacts (compose average): exact arithmetic, refusals, and predict serving it.

One artifact is trained on the tiny demo base (LayerNorms train too: the `adapters` preset);
the others are derived from it with `artifact.save` so each differs in exactly one way.
"""

import json
import subprocess
import sys

import flax.traverse_util as tu
import jax
import numpy as np
import pytest

from adapter_tuning import compose
from adapter_tuning.data import demo
from adapter_tuning.interop import artifact
from adapter_tuning.interop.pretrained import load_pretrained
from adapter_tuning.models.heads import TaskModel
from adapter_tuning.predict import predict_rows
from adapter_tuning.serving.multi_adapter import MultiTaskModel
from adapter_tuning.training import trainable as tl
from adapter_tuning.training.trainer import train_and_evaluate
from conftest import GLUE_DIR
from helpers import ROOT, predict_main, tiny_config

ROWS = [{'text': t} for t in ('a fine film', 'dull and tedious', 'ok', 'not good at all')]


def _derived(source, out, change_meta=None, change=None):
  """A copy of artifact `source` with its tensors (flat dict) and meta changed."""
  meta, params = artifact.load(source)
  flat = {'/'.join(k): np.asarray(v) for k, v in tu.flatten_dict(params).items()}
  flat = change(flat) if change else flat
  meta = change_meta(meta) if change_meta else meta
  artifact.save(out, tu.unflatten_dict({tuple(k.split('/')): v for k, v in flat.items()}),
                {k: v for k, v in meta.items() if k != 'format_version'})
  return out


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp('compose')
  base = demo.ensure_checkpoint(root / 'base')
  config = tiny_config(base, 'glue/sst2', **{
      'data.source': 'glue_dir', 'data.data_dir': str(GLUE_DIR), 'data.max_train_examples': 64,
      'data.max_eval_examples': 32, 'data.num_buckets': 1, 'model.adapter.init_scale': 0.05})
  train_and_evaluate(config, root / 'a')
  a = root / 'a' / 'adapter'
  rng = np.random.default_rng(0)
  b = _derived(a, root / 'b', lambda m: {**m, 'peft': {'bottleneck': {
      **m['peft']['bottleneck'], 'seed': 1}}},  # another seed: still averages
               lambda f: {k: v + rng.normal(0, 0.05, v.shape).astype(np.float32)
                          for k, v in f.items()})
  return root, base, a, b


def _flat(directory):
  return {'/'.join(k): v for k, v in tu.flatten_dict(artifact.load(directory)[1]).items()}


def _by_hand(base, dirs, weights):
  """The documented rule: PEFT tensors and head sum_i w_i θ_i; base tensors (LayerNorms)
  base + sum_i w_i (θ_i - base)."""
  encoder = {'/'.join(('encoder',) + k): np.asarray(v, np.float64)
             for k, v in tu.flatten_dict(load_pretrained(base).params).items()}
  flats = [_flat(d) for d in dirs]
  out = {}
  for key in flats[0]:
    ref = encoder[key] if 'layer_norm' in key else 0.0
    out[key] = ref + sum(w * (f[key].astype(np.float64) - ref) for f, w in zip(flats, weights))
  return out


@pytest.mark.parametrize('weights', [(0.7, 0.3), (1.0, -0.5)])  # sum 1, and not
def test_average_is_the_weighted_sum_of_every_trained_tensor(runs, tmp_path, weights):
  root, base, a, b = runs
  out = tmp_path / 'avg'
  assert compose.main(['average', '--adapter', f'{a},{b}', '--weights',
                       ','.join(map(str, weights)), '--output', str(out)]) == 0
  got, want = _flat(out), _by_hand(base, [a, b], weights)
  assert sorted(got) == sorted(want)
  assert any('layer_norm' in k for k in got) and any('_adapter/' in k for k in got)
  for key in want:
    np.testing.assert_allclose(got[key], want[key], rtol=0, atol=1e-6, err_msg=key)
  meta = artifact.load(out)[0]
  assert meta['composed']['adapters'][1] == {
      'path': str(b), 'weight': weights[1],
      'weights_sha256': compose._sha256(b)}
  assert meta['task'] == 'glue/sst2' and meta['final_metrics'] == {}


def _served_logits(directory):
  mt = MultiTaskModel([directory])
  return np.array([r['logits'] for r in predict_rows(mt, ROWS, 4, 32)])


def _plain_logits(base, directory):
  """The averaged artifact's params merged into a plain TaskModel by hand."""
  meta, trained = artifact.load(directory)
  from adapter_tuning import peft
  pre = load_pretrained(base, peft.config_from_meta(meta))
  model = TaskModel(pre.config, pre.adapter, 'classification', 2)
  head = {'kernel': np.zeros((pre.config.hidden_size, 2), np.float32), 'bias': np.zeros(2)}
  params = tl.merge(trained, {'encoder': pre.params, 'head': head})
  ids, types = pre.tokenizer.tokenize([r['text'] for r in ROWS], None, 32)
  batch = pre.tokenizer.pad(ids, types)
  return np.asarray(jax.jit(model.apply)({'params': params}, batch['input_ids'],
                                         batch['attention_mask'], batch['token_type_ids']))


def test_predict_serves_the_averaged_artifact(runs, tmp_path):
  root, base, a, b = runs
  out = tmp_path / 'avg'
  cli = [sys.executable, '-m', 'adapter_tuning.compose', 'average', '--adapter', f'{a},{b}',
         '--weights', '0.5,0.5', '--output', str(out)]
  done = subprocess.run(cli, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-2000:]
  rows = tmp_path / 'rows.jsonl'
  rows.write_text(''.join(json.dumps(r) + '\n' for r in ROWS))
  # predict's command line in this process (test_predict.py runs the real one)
  done = predict_main('--adapter', out, '--input', rows, '--output', tmp_path / 'p.jsonl')
  assert done.returncode == 0, done.stderr[-2000:]
  cli_logits = [json.loads(line)['logits']
                for line in (tmp_path / 'p.jsonl').read_text().splitlines()]
  np.testing.assert_allclose(cli_logits, _plain_logits(base, out), atol=1e-5)
  assert not np.allclose(_served_logits(out), _served_logits(a), atol=1e-4)  # it changed


def _size_4(flat):
  """Adapters cut to 4 bottleneck units (a consistent size-4 artifact)."""
  cut = {'down/kernel': np.s_[:, :4], 'down/bias': np.s_[:4], 'up/kernel': np.s_[:4, :]}
  return {k: next((v[s] for end, s in cut.items() if '_adapter/' in k and k.endswith(end)), v)
          for k, v in flat.items()}


MISMATCHES = {
    'base': (lambda m: {**m, 'base': {**m['base'], 'name': 'other', 'sha256': 'c' * 64}}, None,
             ['trained on different bases', "'other'"]),
    'size': (lambda m: {**m, 'peft': {'bottleneck': {**m['peft']['bottleneck'], 'size': 4}}},
             _size_4, ['differ in bottleneck size (8 vs 4)']),
    'rules': (lambda m: {**m, 'trainable_rules': [[r'_adapter/', 'train'], ['^head/', 'train'],
                                                  ['.*', 'freeze']]},
              lambda f: {k: v for k, v in f.items() if 'layer_norm' not in k},
              ['trains encoder/', 'layer_norm', 'different trainable rules']),
    'head': (lambda m: {**m, 'label_names': ['no', 'yes']}, None,
             ['have different heads', 'pass --head N']),
    'pooling': (lambda m: {**m, 'pooling': 'mean'}, None, ['differ in head pooling']),
}


@pytest.mark.parametrize('kind', sorted(MISMATCHES))
def test_mismatched_artifacts_are_refused_with_one_line(runs, tmp_path, capsys, kind):
  root, base, a, b = runs
  change_meta, change, needles = MISMATCHES[kind]
  c = _derived(a, tmp_path / kind, change_meta, change)
  out = tmp_path / 'avg'
  assert compose.main(['average', '--adapter', f'{a},{c}', '--weights', '0.5,0.5',
                       '--output', str(out)]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith('error: '), err
  for needle in needles:
    assert needle in err[0], err[0]
  assert not out.exists()


def test_head_option_keeps_one_artifacts_head_and_task(runs, tmp_path):
  root, base, a, b = runs
  c = _derived(b, tmp_path / 'c', lambda m: {**m, 'task': 'text', 'label_names': ['no', 'yes']})
  out = tmp_path / 'avg'
  assert compose.main(['average', '--adapter', f'{a},{c}', '--weights', '0.5,0.5',
                       '--head', '2', '--output', str(out)]) == 0
  meta, got = artifact.load(out)[0], _flat(out)
  assert meta['task'] == 'text' and meta['label_names'] == ['no', 'yes']
  np.testing.assert_array_equal(got['head/kernel'], _flat(c)['head/kernel'])


def test_existing_output_and_bad_arguments_are_refused(runs, tmp_path, capsys):
  root, base, a, b = runs
  out = tmp_path / 'taken'
  out.mkdir()
  (out / 'keep.txt').write_text('mine')
  cases = [(['--weights', '0.5,0.5', '--output', str(out)], '--overwrite'),
           (['--weights', '1', '--output', str(tmp_path / 'x')], '2 adapter(s) but 1 weight'),
           (['--weights', '1,nan', '--output', str(tmp_path / 'x')], 'finite'),
           (['--weights', '1,1', '--head', '3', '--output', str(tmp_path / 'x')], '1..2')]
  for args, needle in cases:
    assert compose.main(['average', '--adapter', f'{a},{b}', *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err
  assert (out / 'keep.txt').read_text() == 'mine' and not (tmp_path / 'x').exists()
