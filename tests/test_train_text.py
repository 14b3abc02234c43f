"""Any text-classification set: local CSV/JSONL files with named columns, labels inferred."""

import json

from adapter_tuning.data import demo
from adapter_tuning.training.trainer import train_and_evaluate
from helpers import tiny_config


def test_csv_task_end_to_end(tmp_path):
  base = demo.ensure_checkpoint(tmp_path / 'base')
  rows = demo.make_examples('train')[:256]
  names = {0: 'thumbs down', 1: 'thumbs up'}
  with open(tmp_path / 'train.csv', 'w') as f:
    f.write('review,verdict\n')
    for r in rows[:200]:
      f.write(f'"{r["text"]}",{names[r["label"]]}\n')
  with open(tmp_path / 'eval.jsonl', 'w') as f:
    for r in rows[200:]:
      f.write(json.dumps({'review': r['text'], 'verdict': names[r['label']]}) + '\n')
  config = tiny_config(base, 'text', **{
      'data.source': 'files', 'data.train_file': str(tmp_path / 'train.csv'),
      'data.eval_file': str(tmp_path / 'eval.jsonl'), 'data.text_key': 'review',
      'data.label_key': 'verdict', 'data.name': 'reviews', 'num_train_steps': 5})
  metrics = train_and_evaluate(config, tmp_path / 'run')
  assert 'eval/accuracy' in metrics
  meta = json.loads((tmp_path / 'run' / 'adapter' / 'config.json').read_text())
  assert meta['label_names'] == ['thumbs down', 'thumbs up']
  assert meta['task'] == 'text/reviews'
