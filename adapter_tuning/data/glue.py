"""GLUE task specifications and the two ways to read them: TFDS and GLUE-layout TSV folders.

Both readers return the same raw examples, plain dicts
`{'text': str, 'text_pair': str | None, 'label': int | float, 'idx': int}`, so the rest of
the pipeline never knows where the data came from. Label ids follow the TFDS `glue`
builder (e.g. RTE/QNLI entailment=0, WNLI not_entailment=0) so that a model trained from
TSV files and one trained from TFDS agree on what class 0 means. Unlabeled (test) rows
carry label -1 (-1.0 for STS-B), as in TFDS.

TSV files are parsed the way the TFDS loader parses them: tab-separated with
`csv.QUOTE_NONE` (STS-B and RTE contain unbalanced double quotes that would otherwise
swallow lines), `idx` = 0-based data row number (equal to GLUE's `index` column where a
file has one; for MRPC train/dev TFDS instead numbers rows of the raw Microsoft file).
"""

from __future__ import annotations

import csv
import dataclasses
import pathlib
from typing import Optional

from adapter_tuning.errors import UsageError


@dataclasses.dataclass(frozen=True, kw_only=True)
class TaskSpec:
  """What a GLUE task is: TFDS names (features, splits, labels), metrics and TSV layout."""

  name: str  # TFDS name, e.g. 'glue/sst2'
  text_keys: tuple[str, ...]  # TFDS feature names of the one or two text fields
  label_names: tuple[str, ...]  # class names in id order; () for regression
  is_regression: bool
  metric_names: tuple[str, ...]  # for metrics.compute_metrics; the first is the headline
  train_split: str = 'train'
  eval_splits: tuple[str, ...] = ('validation',)
  test_splits: tuple[str, ...] = ('test',)
  # GLUE download layout (read_glue_dir): folder, header names of the text and label columns.
  glue_dir: str = ''
  tsv_text_columns: tuple[str, ...] = ()
  tsv_label_column: str = ''
  # Column names of header-less train/dev files (only CoLA has them).
  tsv_headerless_columns: tuple[str, ...] = ()

  @property
  def num_outputs(self) -> int:
    return 1 if self.is_regression else len(self.label_names)

  @property
  def splits(self) -> tuple[str, ...]:
    return (self.train_split,) + self.eval_splits + self.test_splits


_NLI3 = ('entailment', 'neutral', 'contradiction')

GLUE_TASKS: dict[str, TaskSpec] = {spec.name: spec for spec in [
    TaskSpec(name='glue/cola', text_keys=('sentence',),
             label_names=('unacceptable', 'acceptable'), is_regression=False,
             metric_names=('matthews_corr',), glue_dir='CoLA',
             tsv_text_columns=('sentence',), tsv_label_column='label',
             tsv_headerless_columns=('source', 'label', 'star', 'sentence')),
    TaskSpec(name='glue/sst2', text_keys=('sentence',), label_names=('negative', 'positive'),
             is_regression=False, metric_names=('accuracy',), glue_dir='SST-2',
             tsv_text_columns=('sentence',), tsv_label_column='label'),
    TaskSpec(name='glue/mrpc', text_keys=('sentence1', 'sentence2'),
             label_names=('not_equivalent', 'equivalent'), is_regression=False,
             metric_names=('f1', 'accuracy'), glue_dir='MRPC',
             tsv_text_columns=('#1 String', '#2 String'), tsv_label_column='Quality'),
    TaskSpec(name='glue/stsb', text_keys=('sentence1', 'sentence2'), label_names=(),
             is_regression=True, metric_names=('pearson', 'spearman'), glue_dir='STS-B',
             tsv_text_columns=('sentence1', 'sentence2'), tsv_label_column='score'),
    TaskSpec(name='glue/qqp', text_keys=('question1', 'question2'),
             label_names=('not_duplicate', 'duplicate'), is_regression=False,
             metric_names=('f1', 'accuracy'), glue_dir='QQP',
             tsv_text_columns=('question1', 'question2'), tsv_label_column='is_duplicate'),
    TaskSpec(name='glue/mnli', text_keys=('premise', 'hypothesis'), label_names=_NLI3,
             is_regression=False, metric_names=('accuracy',),
             eval_splits=('validation_matched', 'validation_mismatched'),
             test_splits=('test_matched', 'test_mismatched'), glue_dir='MNLI',
             tsv_text_columns=('sentence1', 'sentence2'), tsv_label_column='gold_label'),
    TaskSpec(name='glue/qnli', text_keys=('question', 'sentence'),
             label_names=('entailment', 'not_entailment'), is_regression=False,
             metric_names=('accuracy',), glue_dir='QNLI',
             tsv_text_columns=('question', 'sentence'), tsv_label_column='label'),
    TaskSpec(name='glue/rte', text_keys=('sentence1', 'sentence2'),
             label_names=('entailment', 'not_entailment'), is_regression=False,
             metric_names=('accuracy',), glue_dir='RTE',
             tsv_text_columns=('sentence1', 'sentence2'), tsv_label_column='label'),
    TaskSpec(name='glue/wnli', text_keys=('sentence1', 'sentence2'),
             label_names=('not_entailment', 'entailment'), is_regression=False,
             metric_names=('accuracy',), glue_dir='WNLI',
             tsv_text_columns=('sentence1', 'sentence2'), tsv_label_column='label'),
]}


def get_task(name: str) -> TaskSpec:
  if name not in GLUE_TASKS:
    raise UsageError(f'unknown GLUE task {name!r}; use one of {", ".join(GLUE_TASKS)}')
  return GLUE_TASKS[name]


def _check_split(spec: TaskSpec, split: str):
  if split not in spec.splits:
    raise UsageError(f'{spec.name} has no split {split!r}; use one of {", ".join(spec.splits)}')


def _unlabeled(spec: TaskSpec):
  return -1.0 if spec.is_regression else -1


# ----------------------------------------------------------------------------- TSV folders


def split_file(spec: TaskSpec, split: str) -> str:
  """GLUE file name of a split: validation -> dev.tsv, test_matched -> test_matched.tsv."""
  _check_split(spec, split)
  return split.replace('validation', 'dev') + '.tsv'


def _task_dir(spec: TaskSpec, data_dir) -> pathlib.Path:
  root = pathlib.Path(data_dir).expanduser()
  task_dir = root / spec.glue_dir
  if not task_dir.is_dir() and root.name == spec.glue_dir and root.is_dir():
    return root  # data_dir already names the task folder
  if not task_dir.is_dir():
    raise UsageError(f'GLUE folder {task_dir} not found; the glue_dir layout is '
                     f'<data_dir>/{spec.glue_dir}/{{train,dev,test}}.tsv as written by GLUE\'s '
                     'download script')
  return task_dir


def _parse_label(spec: TaskSpec, value: str, where: str):
  """A label string -> id (class name or integer id) or float score; errors name the row."""
  if spec.is_regression:
    try:
      return float(value)
    except ValueError:
      raise UsageError(f'{where}: score {value!r} is not a number') from None
  if value in spec.label_names:
    return spec.label_names.index(value)
  if value.strip().lstrip('-').isdigit() and 0 <= int(value) < len(spec.label_names):
    return int(value)
  valid = ', '.join(f'{i}/{n}' for i, n in enumerate(spec.label_names))
  raise UsageError(f'{where}: label {value!r} is not one of {spec.name}\'s labels ({valid})')


def _columns(spec: TaskSpec, path, first_row: list[str], labeled: bool):
  """-> (column index of each needed field, whether first_row is a header, row width)."""
  needed = spec.tsv_text_columns + ((spec.tsv_label_column,) if labeled else ())
  header = [c.strip() for c in first_row]
  if all(c in header for c in needed):
    return [header.index(c) for c in needed], True, len(header)
  if spec.tsv_headerless_columns and len(first_row) == len(spec.tsv_headerless_columns):
    names = spec.tsv_headerless_columns
    return [names.index(c) for c in needed], False, len(names)
  missing = [c for c in needed if c not in header]
  raise UsageError(f'{path}: header lacks column(s) {missing} (found {header}); expected the '
                   f'GLUE {spec.glue_dir} file layout')


def read_glue_dir(spec: TaskSpec, data_dir, split: str) -> list[dict]:
  """Reads one split of a GLUE-layout folder (<data_dir>/SST-2/dev.tsv, ...) as raw examples."""
  path = _task_dir(spec, data_dir) / split_file(spec, split)
  if not path.is_file():
    raise UsageError(f'{path} not found; split {split!r} of {spec.name} is read from '
                     f'<data_dir>/{spec.glue_dir}/{path.name} (GLUE download layout)')
  labeled = split not in spec.test_splits
  examples = []
  # utf-8-sig: MRPC's header starts with a byte-order mark.
  with open(path, encoding='utf-8-sig', newline='') as f:
    rows = csv.reader(f, delimiter='\t', quoting=csv.QUOTE_NONE)
    columns = width = None
    for row in rows:
      if not row:
        continue  # blank line
      if columns is None:
        columns, has_header, width = _columns(spec, path, row, labeled)
        if has_header:
          continue
      where = f'{path}:{rows.line_num}'
      if len(row) != width:
        raise UsageError(f'{where}: {len(row)} tab-separated fields, expected {width}; the file '
                         'is damaged or not the GLUE version')
      fields = [row[i] for i in columns]
      texts = fields[:len(spec.tsv_text_columns)]
      label = _parse_label(spec, fields[-1], where) if labeled else _unlabeled(spec)
      examples.append({'text': texts[0], 'text_pair': texts[1] if len(texts) > 1 else None,
                       'label': label, 'idx': len(examples)})
  if not examples:
    raise UsageError(f'{path} has no data rows; re-download the GLUE {spec.glue_dir} folder')
  return examples


# ----------------------------------------------------------------------------------- TFDS


def decode_text(value) -> str:
  return value.decode('utf-8') if isinstance(value, bytes) else str(value)


def open_tfds_source(name: str, split: str, data_dir: Optional[str] = None,
                     offline_hint: str = 'data.source=glue_dir'):
  """`tfds.data_source(name, split)` with failures turned into one-line errors.

  `data_source` reads array_record files with random access and needs no TensorFlow;
  the glue builder only registers once `tensorflow_datasets.text` is imported.
  """
  import tensorflow_datasets as tfds
  import tensorflow_datasets.text  # noqa: F401  (registers the glue/imdb/... builders)
  try:
    return tfds.data_source(name, split=split, data_dir=data_dir)
  except Exception as e:  # dataset unknown, not prepared and no network, missing extras, ...
    first_line = (str(e).strip().splitlines() or [''])[0][:200]
    raise UsageError(f'TFDS could not open {name} split {split!r} ({type(e).__name__}: '
                     f'{first_line}); prepare it on a machine with network '
                     f'(tfds build {name}) or read local files with {offline_hint}') from e


def read_tfds(spec: TaskSpec, split: str, data_dir: Optional[str] = None) -> list[dict]:
  """Reads one split of the TFDS `glue/<task>` builder as raw examples.

  Records are read one at a time (`iter(source)`): the batched `__getitems__` would be
  faster, but under `tfds.testing.mock_data` (tfds 4.9.10) it raises a TypeError, and GLUE
  splits are small enough that the difference is seconds.
  """
  _check_split(spec, split)
  source = open_tfds_source(spec.name, split, data_dir)
  examples = []
  for i, record in enumerate(source):
    texts = [decode_text(record[k]) for k in spec.text_keys]
    label = record['label'].item() if hasattr(record['label'], 'item') else record['label']
    label = float(label) if spec.is_regression else int(label)
    idx = int(record['idx']) if 'idx' in record else i
    examples.append({'text': texts[0], 'text_pair': texts[1] if len(texts) > 1 else None,
                     'label': label, 'idx': idx})
  if not examples:
    raise UsageError(f'TFDS {spec.name} split {split!r} is empty')
  return examples
