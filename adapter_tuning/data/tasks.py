"""From `config.data` to tokenized splits: the one place that knows every data source.

Readers (GLUE TSV/TFDS, generic text files, SQuAD, plain text for MLM, the demo task) return raw examples;
this module tokenises them once with the checkpoint's tokenizer and keeps token ids as
ragged numpy arrays. Batching (buckets, shuffling, sharding) is `data.batching`'s job.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any, Optional

import numpy as np

from adapter_tuning.errors import UsageError
from adapter_tuning.models.heads import head_kind

SOURCES = ('tfds', 'glue_dir', 'squad_json', 'files', 'generated')


@dataclasses.dataclass
class Split:
  """One tokenized split. For QA, rows are context windows and `qa` holds what maps them back."""

  name: str
  input_ids: list
  token_type_ids: list
  labels: dict[str, np.ndarray]  # 'labels' or 'start_positions'/'end_positions'
  examples: list  # the raw examples (for predictions and QA post-processing)
  qa: Optional[dict] = None

  def __len__(self):
    return len(self.input_ids)


@dataclasses.dataclass
class TaskData:
  task: str
  head: str  # classification | regression | span
  label_names: tuple
  metric_names: tuple
  train: Optional[Split]
  evals: dict[str, Split]
  report: dict = dataclasses.field(default_factory=dict)  # counts worth printing (skips, etc.)
  # data.task=mlm: every batch is masked on the host (data/mlm.Masking), train and eval
  masking: Optional[Any] = None

  @property
  def num_outputs(self) -> int:
    return head_kind(self.head).num_outputs(self.label_names)


def _limit(examples, n):
  return examples[:n] if n and n > 0 else examples


def _tokenize(name, examples, tokenizer, max_len, label_dtype):
  if not examples:
    raise UsageError(f'split {name!r} is empty; check the data files or data.max_*_examples')
  texts = [e['text'] for e in examples]
  pairs = [e['text_pair'] for e in examples]
  has_pairs = any(p is not None for p in pairs)
  if has_pairs and any(p is None for p in pairs):
    raise UsageError(f'split {name!r} mixes examples with and without a text pair')
  ids, types = tokenizer.tokenize(texts, pairs if has_pairs else None, max_len)
  labels = np.asarray([e['label'] for e in examples], label_dtype)
  return Split(name, ids, types, {'labels': labels}, examples)


def _classification_task(config, tokenizer, *, train_examples, eval_examples, task, label_names,
                         metric_names, regression, with_train=True) -> TaskData:
  kind = head_kind('regression' if regression else 'classification')
  dtype = kind.label_dtype
  max_len = config.data.max_seq_length
  train = None
  if with_train:
    train = _tokenize('train', _limit(train_examples(), config.data.max_train_examples),
                      tokenizer, max_len, dtype)
    if not regression and np.any(train.labels['labels'] < 0):
      raise UsageError('training split has unlabeled rows (label -1); train on a labeled split')
  evals = {name: _tokenize(name, _limit(fn(), config.data.max_eval_examples), tokenizer,
                           max_len, dtype) for name, fn in eval_examples.items()}
  return TaskData(task, kind.name, tuple(label_names),
                  tuple(metric_names), train, evals)


def load_task_data(config, tokenizer, with_train: bool = True) -> TaskData:
  """Reads and tokenises the task that `config.data` names."""
  data = config.data
  if data.source not in SOURCES:
    raise UsageError(f'unknown data.source {data.source!r}; use one of {", ".join(SOURCES)}')
  if data.task.startswith('glue/'):
    return _glue(config, tokenizer, with_train)
  if data.task == 'squad':
    from adapter_tuning.data import squad_task as qa_data
    return qa_data.load_squad(config, tokenizer, with_train)
  if data.task == 'text':
    return _text(config, tokenizer, with_train)
  if data.task == 'mlm':
    from adapter_tuning.data import mlm
    return mlm.load_mlm(config, tokenizer, with_train)
  if data.task == 'demo':
    from adapter_tuning.data import demo
    return _classification_task(
        config, tokenizer, train_examples=lambda: demo.make_examples('train', config.seed),
        eval_examples={'validation': lambda: demo.make_examples('validation', config.seed)},
        task='demo', label_names=demo.LABELS, metric_names=('accuracy',), regression=False,
        with_train=with_train)
  raise UsageError(f'unknown data.task {data.task!r}; use glue/<task>, squad, text, mlm or demo')


def _glue(config, tokenizer, with_train):
  from adapter_tuning.data import glue
  spec = glue.get_task(config.data.task)
  source = config.data.source
  if source == 'glue_dir':
    if not config.data.data_dir:
      raise UsageError('data.source=glue_dir needs data.data_dir: the folder with SST-2/, '
                       'MNLI/, ... (GLUE download layout)')
    directory = pathlib.Path(config.data.data_dir).expanduser()
    if not directory.is_dir():
      raise UsageError(f'data.data_dir {directory} does not exist; point it at the GLUE folder')
    read = lambda split: glue.read_glue_dir(spec, directory, split)
  elif source == 'tfds':
    read = lambda split: glue.read_tfds(spec, split, config.data.data_dir or None)
  else:
    raise UsageError(f'data.source={source!r} does not serve GLUE; use glue_dir or tfds')
  evals = {split: (lambda s=split: read(s)) for split in spec.eval_splits}
  return _classification_task(
      config, tokenizer, train_examples=lambda: read(spec.train_split), eval_examples=evals,
      task=spec.name, label_names=spec.label_names, metric_names=spec.metric_names,
      regression=spec.is_regression, with_train=with_train)


def _text(config, tokenizer, with_train):
  from adapter_tuning.data import text_files
  data = config.data
  pair_key = data.text_pair_key or None
  if data.source == 'files':
    for key in ('train_file', 'eval_file'):
      if not getattr(data, key) and (with_train or key == 'eval_file'):
        raise UsageError(f'data.source=files needs data.{key} (CSV, TSV or JSONL)')
    label_names = None
    train_examples = []
    if with_train:
      train_examples, label_names = text_files.read_text_file(
          data.train_file, data.text_key, pair_key, data.label_key)
    eval_examples, label_names = text_files.read_text_file(
        data.eval_file, data.text_key, pair_key, data.label_key, label_names=label_names)
    name = pathlib.Path(data.train_file or data.eval_file).resolve().parent.name
  elif data.source == 'tfds':
    if not data.tfds_name:
      raise UsageError('data.task=text with data.source=tfds needs data.tfds_name')
    read = lambda split: text_files.read_tfds_text(data.tfds_name, split, data.text_key, pair_key,
                                                   data.label_key, data.data_dir or None)
    train_examples, label_names = read('train') if with_train else ([], None)
    eval_examples, label_names = read('test')
    name = data.tfds_name
  else:
    raise UsageError(f'data.task=text reads data.source=files or tfds, not {data.source!r}')
  return _classification_task(
      config, tokenizer, train_examples=lambda: train_examples,
      eval_examples={'validation': lambda: eval_examples}, task=f'text/{data.name or name}',
      label_names=label_names, metric_names=('accuracy',), regression=False,
      with_train=with_train)


def padding_report(split: Split, boundaries) -> dict[str, Any]:
  """Real vs computed token positions under bucketing: what the buckets save."""
  lengths = np.asarray([len(x) for x in split.input_ids])
  padded = np.asarray(boundaries)[np.searchsorted(boundaries, lengths)]
  return {'real_tokens': int(lengths.sum()), 'bucketed_tokens': int(padded.sum()),
          'max_len_tokens': int(len(lengths) * boundaries[-1])}

