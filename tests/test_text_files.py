"""Generic CSV/TSV/JSONL classification files and TFDS classification builders."""

import json

import pytest

from adapter_tuning.data import text_files
from adapter_tuning.errors import UsageError


def _write(path, text):
  path.write_text(text, encoding='utf-8')
  return path


def test_csv_with_quotes_and_inferred_labels(tmp_path):
  path = _write(tmp_path / 'train.csv',
                'review,stars\n"Great, really ""great""",pos\nmeh,neg\n"multi\nline",pos\n')
  examples, names = text_files.read_text_file(path, 'review', label_key='stars')
  assert names == ('neg', 'pos')
  assert examples == [
      {'text': 'Great, really "great"', 'text_pair': None, 'label': 1, 'idx': 0},
      {'text': 'meh', 'text_pair': None, 'label': 0, 'idx': 1},
      {'text': 'multi\nline', 'text_pair': None, 'label': 1, 'idx': 2}]


def test_tsv_pairs_keep_quotes_and_given_labels(tmp_path):
  path = _write(tmp_path / 'dev.tsv', 'a\tb\tlabel\n"unbalanced\tsecond\tyes\nx\ty\tno\n')
  examples, names = text_files.read_text_file(path, 'a', 'b', label_names=('yes', 'no'))
  assert names == ('yes', 'no')
  assert [(e['text'], e['text_pair'], e['label']) for e in examples] == [
      ('"unbalanced', 'second', 0), ('x', 'y', 1)]


def test_jsonl_integer_labels_sort_numerically(tmp_path):
  rows = [{'t': f'row {i}', 'y': y} for i, y in enumerate([10, 2, 0, 2.0, '10'])]
  path = _write(tmp_path / 'train.jsonl', '\n'.join(json.dumps(r) for r in rows) + '\n\n')
  examples, names = text_files.read_text_file(path, 't', label_key='y')
  assert names == ('0', '2', '10')
  assert [e['label'] for e in examples] == [2, 1, 0, 1, 2]


def test_eval_file_validated_against_training_labels(tmp_path):
  train = _write(tmp_path / 'train.csv', 'text,label\na,spam\nb,ham\n')
  dev = _write(tmp_path / 'dev.csv', 'text,label\na,ham\nb,spma\n')
  _, names = text_files.read_text_file(train, 'text')
  with pytest.raises(ValueError, match=r"dev.csv:3: label 'spma' is not in the training labels "
                     r'\(ham, spam\)'):
    text_files.read_text_file(dev, 'text', label_names=names)


@pytest.mark.parametrize('name,text,kwargs,match', [
    ('x.csv', 'text,label\na,1\n', {'text_key': 'sentence'},
     r"x.csv:2: no column 'sentence' \(columns: text, label\)"),
    ('x.csv', 'text,label\na,1,extra\n', {}, r'x.csv:2: 3 fields, the header has 2'),
    ('x.csv', 'text,label\na,\n', {}, r'x.csv:2: empty label'),
    ('x.csv', 'text,label\n', {}, r'x.csv has no data rows'),
    ('x.jsonl', '{"text": "a", "label": 1}\n{"text": "b"\n', {}, r'x.jsonl:2: not valid JSON'),
    ('x.jsonl', '{"text": 3, "label": 1}\n', {}, r"x.jsonl:1: column 'text' holds int"),
    ('x.parquet', '', {}, r"unknown file type '.parquet'"),
])
def test_errors(tmp_path, name, text, kwargs, match):
  path = _write(tmp_path / name, text)
  with pytest.raises(UsageError, match=match) as e:
    text_files.read_text_file(path, kwargs.get('text_key', 'text'))
  assert '\n' not in str(e.value)


def test_missing_file(tmp_path):
  with pytest.raises(ValueError, match='not found'):
    text_files.read_text_file(tmp_path / 'nope.csv', 'text')


def test_read_tfds_text_with_mock_data():
  import tensorflow_datasets as tfds
  with tfds.testing.mock_data(num_examples=5):
    examples, names = text_files.read_tfds_text('imdb_reviews', 'test', 'text')
    assert names == ('neg', 'pos')  # from the builder's ClassLabel feature
    assert len(examples) == 5
    assert all(isinstance(e['text'], str) and e['label'] in (0, 1) and e['text_pair'] is None
               for e in examples)
    with pytest.raises(ValueError, match=r"no feature 'review'.*text"):
      text_files.read_tfds_text('imdb_reviews', 'test', 'review')
  with pytest.raises(ValueError, match='data.source=files'):
    text_files.read_tfds_text('no_such_dataset_xyz', 'train', 'text')
