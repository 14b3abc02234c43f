"""Any text-classification data set: CSV, TSV or JSONL files, or a TFDS classification builder.

Rows become the same raw examples as GLUE's (`{'text', 'text_pair', 'label', 'idx'}`), with
the column names given by the config. Label names are strings; the training file defines
the vocabulary (sorted; numerically when every label is an integer, so '2' < '10' and
files labelled 0..K-1 keep their ids) and every other file is checked against it, so a typo
in an eval file is an error that names the row instead of a silently new class.

Formats by suffix: .csv (standard CSV quoting), .tsv/.tab (tab-separated with
`csv.QUOTE_NONE`, the GLUE convention: quotes are text), .jsonl/.json (one object a line).
"""

from __future__ import annotations

import csv
import json
import pathlib
from typing import Iterator, Optional, Sequence

from adapter_tuning.errors import UsageError

FORMATS = {'.csv': 'csv', '.tsv': 'tsv', '.tab': 'tsv', '.jsonl': 'jsonl', '.json': 'jsonl'}


def read_rows(path: pathlib.Path) -> Iterator[tuple[int, dict]]:
  """(line number, row as {column: value}) for every data row of a file."""
  kind = FORMATS.get(path.suffix.lower())
  if kind is None:
    raise UsageError(f'{path}: unknown file type {path.suffix!r}; use {", ".join(FORMATS)}')
  with open(path, encoding='utf-8-sig', newline='') as f:
    if kind == 'jsonl':
      for n, line in enumerate(f, 1):
        if not line.strip():
          continue
        try:
          row = json.loads(line)
        except json.JSONDecodeError as e:
          raise UsageError(f'{path}:{n}: not valid JSON ({e.msg}); one object per line') from None
        if not isinstance(row, dict):
          raise UsageError(f'{path}:{n}: expected a JSON object, got {type(row).__name__}')
        yield n, row
      return
    options = {'delimiter': '\t', 'quoting': csv.QUOTE_NONE} if kind == 'tsv' else {}
    reader = csv.reader(f, **options)
    header = None
    for row in reader:
      if not row:
        continue
      if header is None:
        header = [c.strip() for c in row]
        continue
      if len(row) != len(header):
        raise UsageError(f'{path}:{reader.line_num}: {len(row)} fields, the header has '
                         f'{len(header)}')
      yield reader.line_num, dict(zip(header, row))


def _label_string(value) -> str:
  if isinstance(value, bool) or value is None:
    return '' if value is None else str(value).lower()
  if isinstance(value, float) and value.is_integer():
    return str(int(value))  # JSON 1.0 and CSV "1" are the same class
  return str(value).strip()


def sorted_labels(labels) -> tuple[str, ...]:
  """Unique label strings, in numeric order if all are integers, else lexicographic."""
  unique = set(labels)
  if all(s.lstrip('-').isdigit() for s in unique):
    return tuple(sorted(unique, key=int))
  return tuple(sorted(unique))


def _field(row: dict, key: str, where: str, path) -> object:
  if key not in row:
    raise UsageError(f'{where}: no column {key!r} (columns: {", ".join(map(str, row))}); set '
                     f'the data.*_key options to the names used in {path.name}')
  return row[key]


def read_text_file(path, text_key: str, text_pair_key: Optional[str] = None,
                   label_key: str = 'label', label_names: Optional[Sequence[str]] = None):
  """-> (examples, label_names). With label_names=None the file defines the label set."""
  path = pathlib.Path(path).expanduser()
  if not path.is_file():
    raise UsageError(f'{path} not found; data files must be CSV, TSV or JSONL')
  raw = []
  for n, row in read_rows(path):
    where = f'{path}:{n}'
    texts = [_field(row, k, where, path) for k in (text_key, text_pair_key) if k]
    for k, t in zip((text_key, text_pair_key), texts):
      if not isinstance(t, str):
        raise UsageError(f'{where}: column {k!r} holds {type(t).__name__}, not text')
    label = _label_string(_field(row, label_key, where, path))
    if not label:
      raise UsageError(f'{where}: empty label in column {label_key!r}')
    raw.append((where, texts, label))
  if not raw:
    raise UsageError(f'{path} has no data rows')
  if label_names is None:
    label_names = sorted_labels(label for _, _, label in raw)
  label_names = tuple(label_names)
  ids = {name: i for i, name in enumerate(label_names)}
  examples = []
  for where, texts, label in raw:
    if label not in ids:
      raise UsageError(f'{where}: label {label!r} is not in the training labels '
                       f'({", ".join(label_names)})')
    examples.append({'text': texts[0], 'text_pair': texts[1] if len(texts) > 1 else None,
                     'label': ids[label], 'idx': len(examples)})
  return examples, label_names


def read_tfds_text(name: str, split: str, text_key: str, text_pair_key: Optional[str] = None,
                   label_key: str = 'label', data_dir: Optional[str] = None):
  """-> (examples, label_names) from a TFDS classification builder (ClassLabel feature)."""
  from adapter_tuning.data import glue
  source = glue.open_tfds_source(name, split, data_dir, offline_hint='data.source=files')
  features = source.dataset_info.features
  for key in (text_key, text_pair_key, label_key):
    if key and key not in features:
      raise UsageError(f'TFDS {name} has no feature {key!r}; its features are '
                       f'{", ".join(features.keys())}')
  label_names = getattr(features[label_key], 'names', None)
  if not label_names:
    raise UsageError(f'TFDS {name} feature {label_key!r} is not a ClassLabel; '
                     'data.task=text needs named classes')
  examples = []
  for i, record in enumerate(source):
    texts = [glue.decode_text(record[k]) for k in (text_key, text_pair_key) if k]
    examples.append({'text': texts[0], 'text_pair': texts[1] if len(texts) > 1 else None,
                     'label': int(record[label_key]), 'idx': i})
  if not examples:
    raise UsageError(f'TFDS {name} split {split!r} is empty')
  return examples, tuple(label_names)
