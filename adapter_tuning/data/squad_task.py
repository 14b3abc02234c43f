"""SQuAD v1.1 as a task of the one trainer: windows in, answers and EM/F1 out.

Reading, windowing and span post-processing live in `data.squad`; this module turns them
into the trainer's `TaskData` (rows = context windows, labels = start/end positions) and
scores an eval split's start/end logits with the official v1.1 definitions.
"""

from __future__ import annotations

import pathlib

from adapter_tuning.errors import UsageError


def _read(config, with_train):
  from adapter_tuning.data import squad
  data = config.data
  if data.source == 'tfds':
    train = squad.read_squad_tfds('train', data.data_dir or None, is_training=True)[0] \
        if with_train else []
    evals, _ = squad.read_squad_tfds('validation', data.data_dir or None)
    return train, evals, {}
  if data.source != 'squad_json':
    raise UsageError(f'data.task=squad reads data.source=tfds or squad_json, not {data.source!r}')
  if not data.eval_file:
    raise UsageError('data.source=squad_json needs data.eval_file (and data.train_file)')
  same = data.train_file and pathlib.Path(data.train_file).resolve() == \
      pathlib.Path(data.eval_file).resolve()
  if same:  # one file (e.g. dev-v1.1.json): hold out whole articles for evaluation
    if not 0 < data.holdout_articles < 1:
      raise UsageError('data.train_file equals data.eval_file: set data.holdout_articles in '
                       '(0, 1) to hold out that fraction of its articles for evaluation')
    examples, report = squad.read_squad_json(data.eval_file)
    train, evals = squad.split_by_article(examples, data.holdout_articles, config.seed)
    train, train_report = squad.check_answers(train, is_training=True, source=data.train_file)
    return (train if with_train else []), evals, {**report, **{f'train_{k}': v for k, v in
                                                                train_report.items()}}
  train, train_report = [], {}
  if with_train:
    if not data.train_file:
      raise UsageError('data.source=squad_json needs data.train_file for training')
    train, train_report = squad.read_squad_json(data.train_file, is_training=True)
  evals, eval_report = squad.read_squad_json(data.eval_file)
  return train, evals, {**{f'train_{k}': v for k, v in train_report.items()}, **eval_report}


def load_squad(config, tokenizer, with_train: bool = True):
  from adapter_tuning.data import squad
  from adapter_tuning.data.tasks import Split, TaskData
  data = config.data
  train_examples, eval_examples, report = _read(config, with_train)
  if data.max_train_examples:
    train_examples = train_examples[:data.max_train_examples]
  if data.max_eval_examples:
    eval_examples = eval_examples[:data.max_eval_examples]
  window = dict(max_seq_length=data.max_seq_length, doc_stride=data.doc_stride,
                max_query_length=data.max_query_length)
  train = None
  if with_train:
    if not train_examples:
      raise UsageError('the SQuAD training split is empty; check data.train_file')
    feats, train_report = squad.make_features(train_examples, tokenizer, is_training=True,
                                              **window)
    train = Split('train', feats['input_ids'], feats['token_type_ids'],
                  {'start_positions': feats['start_position'],
                   'end_positions': feats['end_position']}, train_examples)
    report['train_windows'] = train_report['features']
    report['train_answer_roundtrip'] = round(train_report['roundtrip_fraction'], 5)
  if not eval_examples:
    raise UsageError('the SQuAD evaluation split is empty; check data.eval_file')
  feats, eval_report = squad.make_features(eval_examples, tokenizer, is_training=False, **window)
  evals = {'validation': Split('validation', feats['input_ids'], feats['token_type_ids'], {},
                              eval_examples, qa=feats)}
  report['eval_windows'] = eval_report['features']
  report = {k: v for k, v in report.items() if not isinstance(v, (list, dict))}
  return TaskData('squad', 'span', (), ('exact_match', 'f1'), train, evals, report)


def score(split, outputs, config):
  """(answers {id: text}, {'exact_match', 'f1'}) for an eval split's start/end logits."""
  from adapter_tuning.data import squad
  from adapter_tuning.data import squad_metrics
  answers = squad.postprocess(split.examples, split.qa, outputs['start_logits'],
                              outputs['end_logits'],
                              max_answer_length=config.data.max_answer_length)
  return answers, squad_metrics.evaluate(split.examples, answers)
