"""Many tasks on one frozen base: mixed batches, wrong base, sequential tasks, GLUE files."""

import csv
import hashlib
import json
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from adapter_tuning.data import demo
from adapter_tuning.errors import UsageError
from adapter_tuning.interop import artifact
from adapter_tuning.models.heads import TaskModel
from adapter_tuning.predict import predict_rows, write_glue_submission
from adapter_tuning.serving.multi_adapter import MultiTaskModel
from adapter_tuning.training import trainable as tl
from adapter_tuning.training.trainer import train_and_evaluate
from conftest import GLUE_DIR
from helpers import ROOT, tiny_config


def _config(base, task, source, **overrides):
  return tiny_config(base, task, **{
      'data.source': source, 'data.data_dir': str(GLUE_DIR) if source == 'glue_dir' else '',
      'data.max_train_examples': 128, 'data.max_eval_examples': 64, **overrides})


RTE_ROWS = [{'text': f'premise number {i}', 'text_pair': 'a hypothesis', 'task': 'glue/rte'}
            for i in range(10)]


def _digest(directory):
  return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(directory.iterdir())}


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """Four tasks trained one after another on one tiny base; A's artifact is watched."""
  root = tmp_path_factory.mktemp('tasks')
  base = demo.ensure_checkpoint(root / 'base')
  train_and_evaluate(_config(base, 'glue/rte', 'glue_dir'), root / 'rte')
  rte_digest = _digest(root / 'rte' / 'adapter')
  rte_preds = predict_rows(MultiTaskModel([root / 'rte' / 'adapter']), RTE_ROWS, 8, 32)
  train_and_evaluate(_config(base, 'glue/stsb', 'glue_dir', learning_rate=1e-3), root / 'stsb')
  train_and_evaluate(_config(base, 'glue/sst2', 'glue_dir', seed=3), root / 'sst2')
  import tensorflow_datasets.text  # noqa: F401
  with tfds.testing.mock_data(num_examples=64):
    train_and_evaluate(_config(base, 'glue/mnli', 'tfds'), root / 'mnli')
  return root, base, rte_digest, rte_preds


def test_sequential_tasks_leave_earlier_artifacts_untouched(runs):
  root, _, rte_digest, rte_preds = runs
  assert _digest(root / 'rte' / 'adapter') == rte_digest
  assert predict_rows(MultiTaskModel([root / 'rte' / 'adapter']), RTE_ROWS, 8, 32) == rte_preds


def _reference(adapter_dir):
  """One task alone, with the plain TaskModel (no routing machinery): a logits function."""
  import jax
  from adapter_tuning.interop.pretrained import load_pretrained
  from adapter_tuning.peft.bottleneck import AdapterConfig
  meta, trained = artifact.load(adapter_dir)
  pre = load_pretrained(meta['base']['path'], AdapterConfig.from_any(meta['adapter']))
  model = TaskModel(pre.config, pre.adapter, 'classification', meta['num_outputs'])
  head = {'kernel': np.zeros((pre.config.hidden_size, meta['num_outputs']), np.float32),
          'bias': np.zeros(meta['num_outputs'], np.float32)}
  params = tl.merge(trained, {'encoder': pre.params, 'head': head})
  apply = jax.jit(lambda b: model.apply({'params': params}, b['input_ids'], b['attention_mask'],
                                        b['token_type_ids']))
  return lambda batch: np.asarray(apply(batch))


def test_mixed_task_batches_equal_single_task_results(runs):
  root = runs[0]
  names = ['rte', 'stsb', 'sst2', 'mnli']
  mixed = MultiTaskModel([root / n / 'adapter' for n in names])
  rng = np.random.default_rng(0)
  words = ['the film', 'a great movie', 'it was dull', 'nothing else', 'quite long and bland']
  rows = []
  for i in range(24):
    task = mixed.tasks[i % 4].name
    pair = None if task == 'glue/sst2' else str(rng.choice(words))
    rows.append({'text': str(rng.choice(words)) + f' {i}', 'text_pair': pair, 'task': task})
  out = predict_rows(mixed, rows, batch_size=8, max_seq_length=32)
  tok = mixed.pretrained.tokenizer
  references = {n: _reference(root / n / 'adapter') for n in names}
  alone_models = {n: MultiTaskModel([root / n / 'adapter']) for n in names}
  for row, pred in zip(rows, out):
    name = row['task'].split('/')[1]
    ids, types = tok.tokenize([row['text']], [row['text_pair']] if row['text_pair'] else None, 32)
    batch = tok.pad(ids, types, 32)
    ref = references[name](batch)[0]
    got = pred['score'] if name == 'stsb' else pred['logits']
    np.testing.assert_allclose(np.atleast_1d(got), ref[:np.size(got)], atol=1e-5)
    alone = predict_rows(alone_models[name], [row], 8, 32)[0]
    assert alone.keys() == pred.keys() and alone.get('label') == pred.get('label')
    for key in ('logits', 'score'):
      if key in alone:
        np.testing.assert_allclose(alone[key], pred[key], atol=1e-5)


def test_adapter_for_another_base_is_refused(runs, tmp_path):
  root = runs[0]
  other = demo.ensure_checkpoint(tmp_path / 'other', seed=99)
  with pytest.raises(UsageError, match='was trained on base'):
    MultiTaskModel([root / 'rte' / 'adapter'], base_path=other)


def test_several_adapters_need_a_task_per_row(runs):
  root = runs[0]
  mt = MultiTaskModel([root / 'rte' / 'adapter', root / 'sst2' / 'adapter'])
  with pytest.raises(UsageError, match='need a "task"'):
    predict_rows(mt, [{'text': 'x'}], 8, 32)
  with pytest.raises(UsageError, match="no adapter for task 'glue/cola'"):
    predict_rows(mt, [{'text': 'x', 'task': 'glue/cola'}], 8, 32)


def _write_tsv(path, header, rows):
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, 'w', newline='') as f:
    w = csv.writer(f, delimiter='\t', quoting=csv.QUOTE_NONE, escapechar='\\')
    w.writerow(header)
    w.writerows(rows)


def test_glue_submission_files(runs, tmp_path):
  root = runs[0]
  glue = tmp_path / 'glue'
  for task in ('RTE', 'STS-B', 'SST-2'):
    (glue / task).mkdir(parents=True)
    (glue / task / 'test.tsv').write_bytes((GLUE_DIR / task / 'test.tsv').read_bytes())
  # MNLI test files are not in ../shared: small ones in the GLUE layout, plus the AX set.
  for name, n in (('test_matched.tsv', 30), ('test_mismatched.tsv', 20)):
    _write_tsv(glue / 'MNLI' / name, ['index', 'sentence1', 'sentence2'],
               [[i, f'premise {i}', f'hypothesis {i}'] for i in range(n)])
  _write_tsv(glue / 'diagnostic' / 'diagnostic.tsv', ['index', 'sentence1', 'sentence2'],
             [[i, f'a {i}', f'b {i}'] for i in range(12)])
  mt = MultiTaskModel([root / n / 'adapter' for n in ('rte', 'stsb', 'sst2', 'mnli')])
  written = write_glue_submission(mt, glue, tmp_path / 'sub', 64, 32)
  assert sorted(written) == ['AX.tsv', 'MNLI-m.tsv', 'MNLI-mm.tsv', 'RTE.tsv', 'SST-2.tsv',
                             'STS-B.tsv']
  def read(name):
    lines = (tmp_path / 'sub' / name).read_text().splitlines()
    assert lines[0] == 'index\tprediction'
    return [line.split('\t') for line in lines[1:]]
  rte = read('RTE.tsv')
  assert len(rte) == 3000 and {p for _, p in rte} <= {'entailment', 'not_entailment'}
  assert [int(i) for i, _ in rte] == list(range(3000))
  stsb = read('STS-B.tsv')
  assert len(stsb) == 1379 and all(0.0 <= float(p) <= 5.0 for _, p in stsb)
  sst2 = read('SST-2.tsv')
  assert len(sst2) == 1821 and {p for _, p in sst2} <= {'0', '1'}
  assert len(read('MNLI-m.tsv')) == 30 and len(read('MNLI-mm.tsv')) == 20
  assert {p for _, p in read('AX.tsv')} <= {'entailment', 'neutral', 'contradiction'}


def test_predict_command_line_jsonl(runs, tmp_path):
  root = runs[0]
  rows = [{'text': 'a great movie', 'task': 'glue/sst2'},
          {'text': 'a man', 'text_pair': 'a person', 'task': 'glue/stsb'}]
  (tmp_path / 'in.jsonl').write_text('\n'.join(json.dumps(r) for r in rows) + '\n')
  adapters = ','.join(str(root / n / 'adapter') for n in ('sst2', 'stsb'))
  result = subprocess.run([sys.executable, '-m', 'adapter_tuning.predict', f'--adapter={adapters}',
                           f'--input={tmp_path / "in.jsonl"}', f'--output={tmp_path / "out.jsonl"}'],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  out = [json.loads(line) for line in (tmp_path / 'out.jsonl').read_text().splitlines()]
  assert out[0]['task'] == 'glue/sst2' and out[0]['label'] in ('negative', 'positive')
  assert len(out[0]['logits']) == 2
  assert out[1]['task'] == 'glue/stsb' and isinstance(out[1]['score'], float)
  bad = subprocess.run([sys.executable, '-m', 'adapter_tuning.predict', f'--adapter={adapters}',
                        f'--input={tmp_path / "nope.jsonl"}', f'--output={tmp_path / "o.jsonl"}'],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert bad.returncode == 2 and 'does not exist' in bad.stderr.splitlines()[-1]
