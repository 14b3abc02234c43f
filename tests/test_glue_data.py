"""GLUE task specs, the GLUE-TSV reader on the real files in ../shared, and the TFDS reader."""

import collections
import pathlib

import pytest

from adapter_tuning.data import glue
from adapter_tuning.errors import UsageError

GLUE_DIR = pathlib.Path(__file__).resolve().parents[1].parent / 'shared' / 'data' / 'glue'

# Official split sizes (PROVENANCE.md) and label counts of the shared copies.
SIZES = {
    ('glue/sst2', 'train'): 67349, ('glue/sst2', 'validation'): 872, ('glue/sst2', 'test'): 1821,
    ('glue/cola', 'train'): 8551, ('glue/cola', 'validation'): 1043, ('glue/cola', 'test'): 1063,
    ('glue/mrpc', 'train'): 3668, ('glue/mrpc', 'validation'): 408, ('glue/mrpc', 'test'): 1725,
    ('glue/stsb', 'train'): 5749, ('glue/stsb', 'validation'): 1500, ('glue/stsb', 'test'): 1379,
    ('glue/rte', 'train'): 2490, ('glue/rte', 'validation'): 277, ('glue/rte', 'test'): 3000,
    ('glue/wnli', 'train'): 635, ('glue/wnli', 'validation'): 71, ('glue/wnli', 'test'): 146,
    ('glue/qnli', 'validation'): 5463, ('glue/qnli', 'test'): 5463,
}
LABEL_COUNTS = {
    ('glue/sst2', 'validation'): {0: 428, 1: 444},
    ('glue/cola', 'train'): {0: 2528, 1: 6023}, ('glue/cola', 'validation'): {0: 322, 1: 721},
    ('glue/mrpc', 'validation'): {0: 129, 1: 279},
    ('glue/rte', 'validation'): {0: 146, 1: 131},  # entailment=0
    ('glue/wnli', 'validation'): {0: 40, 1: 31},  # not_entailment=0 (the file's 0)
    ('glue/qnli', 'validation'): {0: 2702, 1: 2761},
}


def _read(task, split):
  return glue.read_glue_dir(glue.get_task(task), GLUE_DIR, split)


def test_specs():
  assert sorted(glue.GLUE_TASKS) == sorted(f'glue/{t}' for t in (
      'cola', 'sst2', 'mrpc', 'stsb', 'qqp', 'mnli', 'qnli', 'rte', 'wnli'))
  mnli = glue.get_task('glue/mnli')
  assert mnli.label_names == ('entailment', 'neutral', 'contradiction')
  assert mnli.eval_splits == ('validation_matched', 'validation_mismatched')
  assert mnli.test_splits == ('test_matched', 'test_mismatched')
  assert mnli.text_keys == ('premise', 'hypothesis') and mnli.num_outputs == 3
  stsb = glue.get_task('glue/stsb')
  assert stsb.is_regression and stsb.num_outputs == 1 and stsb.label_names == ()
  assert glue.get_task('glue/wnli').label_names == ('not_entailment', 'entailment')
  assert glue.get_task('glue/rte').label_names == ('entailment', 'not_entailment')
  assert glue.get_task('glue/cola').metric_names == ('matthews_corr',)
  assert glue.get_task('glue/qqp').metric_names == ('f1', 'accuracy')
  assert glue.get_task('glue/qnli').text_keys == ('question', 'sentence')
  assert glue.split_file(mnli, 'validation_mismatched') == 'dev_mismatched.tsv'
  with pytest.raises(ValueError, match="unknown GLUE task 'glue/sst'.*glue/sst2") as e:
    glue.get_task('glue/sst')
  assert '\n' not in str(e.value)


@pytest.mark.parametrize('task,split', sorted(SIZES))
def test_row_counts_and_labels(task, split):
  spec = glue.get_task(task)
  examples = _read(task, split)
  assert len(examples) == SIZES[task, split]
  assert [e['idx'] for e in examples] == list(range(len(examples)))
  assert all(isinstance(e['text'], str) and e['text'] for e in examples)
  pairs = [e['text_pair'] for e in examples]
  assert all(p is None for p in pairs) if len(spec.text_keys) == 1 else all(
      isinstance(p, str) for p in pairs)
  labels = [e['label'] for e in examples]
  if split == 'test':
    assert set(labels) == {-1}
  elif spec.is_regression:
    assert all(isinstance(x, float) and 0 <= x <= 5 for x in labels)
  else:
    assert set(labels) <= set(range(len(spec.label_names)))
  if (task, split) in LABEL_COUNTS:
    assert dict(collections.Counter(labels)) == LABEL_COUNTS[task, split]


def test_known_rows():
  cola = _read('glue/cola', 'validation')[0]  # header-less file
  assert cola == {'text': 'The sailors rode the breeze clear of the rocks.', 'text_pair': None,
                  'label': 1, 'idx': 0}
  mrpc = _read('glue/mrpc', 'validation')[0]  # header starts with a BOM
  assert mrpc['label'] == 1 and mrpc['text'].startswith('He said the foodservice pie')
  assert mrpc['text_pair'].startswith('" The foodservice pie')  # quotes kept (QUOTE_NONE)
  qnli = _read('glue/qnli', 'validation')[0]
  assert qnli['text'] == 'What came into force after the new constitution was herald?'
  assert qnli['label'] == 0  # entailment
  assert _read('glue/stsb', 'test')[0]['label'] == -1.0


def _write(path, text):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(text)


def test_task_folder_itself_is_accepted():
  assert len(glue.read_glue_dir(glue.get_task('glue/rte'), GLUE_DIR / 'RTE', 'validation')) == 277


def test_mnli_layout(tmp_path):
  header = 'index\tpromptID\tpairID\tgenre\tsentence1\tsentence2\tlabel1\tgold_label\n'
  _write(tmp_path / 'MNLI' / 'dev_mismatched.tsv',
         header + '0\t1\t1n\tfiction\tA man.\tA person.\tneutral\tneutral\n'
         '1\t2\t2c\tfiction\tA cat.\tNo cat.\tcontradiction\tcontradiction\n')
  _write(tmp_path / 'MNLI' / 'test_matched.tsv',
         'index\tpromptID\tpairID\tgenre\tsentence1\tsentence2\n0\t1\t1\tx\tA.\tB.\n')
  spec = glue.get_task('glue/mnli')
  dev = glue.read_glue_dir(spec, tmp_path, 'validation_mismatched')
  assert [e['label'] for e in dev] == [1, 2] and dev[1]['text_pair'] == 'No cat.'
  assert glue.read_glue_dir(spec, tmp_path, 'test_matched')[0]['label'] == -1


@pytest.mark.parametrize('files,split,match', [
    ({}, 'validation', r'GLUE folder .*SST-2 not found.*<data_dir>/SST-2/'),
    ({'train.tsv': 'sentence\tlabel\na\t1\n'}, 'validation', r'SST-2/dev.tsv not found'),
    ({'dev.tsv': 'sentence\tlabel\na\t1\nb\t0\textra\n'}, 'validation',
     r'dev.tsv:3: 3 tab-separated fields, expected 2'),
    ({'dev.tsv': 'sentence\tlabel\na\t1\nb\t7\n'}, 'validation',
     r"dev.tsv:3: label '7' is not one of glue/sst2's labels \(0/negative, 1/positive\)"),
    ({'dev.tsv': 'sentence\tlabel\n'}, 'validation', r'dev.tsv has no data rows'),
    ({'dev.tsv': 'text\ttarget\na\t1\n'}, 'validation', r"header lacks column\(s\) \['sentence'"),
    ({'dev.tsv': 'sentence\tlabel\na\t1\n'}, 'validation_matched', r'has no split'),
])
def test_errors(tmp_path, files, split, match):
  for name, text in files.items():
    _write(tmp_path / 'SST-2' / name, text)
  with pytest.raises(ValueError, match=match) as e:
    glue.read_glue_dir(glue.get_task('glue/sst2'), tmp_path, split)
  assert '\n' not in str(e.value)


def test_bad_score_and_string_labels(tmp_path):
  _write(tmp_path / 'RTE' / 'dev.tsv', 'index\tsentence1\tsentence2\tlabel\n0\ta\tb\tmaybe\n')
  with pytest.raises(ValueError, match=r"dev.tsv:2: label 'maybe'.*0/entailment"):
    glue.read_glue_dir(glue.get_task('glue/rte'), tmp_path, 'validation')
  _write(tmp_path / 'STS-B' / 'dev.tsv', 'sentence1\tsentence2\tscore\na\tb\thigh\n')
  with pytest.raises(ValueError, match=r"dev.tsv:2: score 'high' is not a number"):
    glue.read_glue_dir(glue.get_task('glue/stsb'), tmp_path, 'validation')


# --------------------------------------------------------------------------------- TFDS


@pytest.mark.parametrize('task,split', [('glue/sst2', 'validation'), ('glue/stsb', 'train'),
                                        ('glue/mnli', 'validation_mismatched'),
                                        ('glue/qnli', 'test')])
def test_read_tfds_with_mock_data(task, split):
  import tensorflow_datasets as tfds
  spec = glue.get_task(task)
  # mock_data serves data_source too (AUTO falls back to USE_CODE: random examples
  # generated from the builder's features, any split name accepted).
  with tfds.testing.mock_data(num_examples=6):
    examples = glue.read_tfds(spec, split)
  assert len(examples) == 6
  for e in examples:
    assert set(e) == {'text', 'text_pair', 'label', 'idx'}
    assert isinstance(e['text'], str) and isinstance(e['idx'], int)
    if len(spec.text_keys) == 2:
      assert isinstance(e['text_pair'], str)
    else:
      assert e['text_pair'] is None
    if spec.is_regression:
      assert isinstance(e['label'], float)
    else:
      assert isinstance(e['label'], int) and 0 <= e['label'] < spec.num_outputs


def test_read_tfds_errors_name_the_offline_source(monkeypatch):
  import tensorflow_datasets as tfds
  with pytest.raises(ValueError, match='has no split'):
    glue.read_tfds(glue.get_task('glue/sst2'), 'validation_matched')

  def offline(*args, **kwargs):
    raise ConnectionError('Failed to establish a new connection\nsecond line')
  monkeypatch.setattr(tfds, 'data_source', offline)
  with pytest.raises(ValueError, match=r'ConnectionError: Failed to establish.*'
                     r'data.source=glue_dir') as e:
    glue.read_tfds(glue.get_task('glue/sst2'), 'train', data_dir='/nonexistent')
  assert '\n' not in str(e.value)


def test_open_tfds_source_unknown_dataset():
  with pytest.raises(ValueError, match=r'TFDS could not open no_such_dataset_xyz.*'
                     r'DatasetNotFoundError') as e:
    glue.open_tfds_source('no_such_dataset_xyz', 'train')
  assert '\n' not in str(e.value)
