"""Evaluation over every example of every eval split, with the task's official metrics.

Eval batches are padded and masked (never dropped), so each example counts exactly once.
Metric keys: `eval/<metric>` for the task's primary split (the first one, e.g. MNLI
matched) and `eval/<split>/<metric>` for the others (e.g. MNLI mismatched).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import numpy as np

from adapter_tuning.data import batching
from adapter_tuning.training import parallel


@dataclasses.dataclass
class Results:
  metrics: dict
  predictions: dict  # split -> predictions (np.ndarray, or {id: answer} for QA)
  data: object
  warnings: list = dataclasses.field(default_factory=list)  # one line each, for the run log

  def write_predictions(self, workdir: pathlib.Path):
    for split, preds in self.predictions.items():
      if isinstance(preds, dict):  # QA: the official SQuAD format
        name = 'predictions.json' if split == next(iter(self.predictions)) else \
            f'predictions_{split}.json'
        (workdir / name).write_text(json.dumps(preds, ensure_ascii=False))
        continue
      examples = self.data.evals[split].examples
      names = self.data.label_names
      with open(workdir / f'predictions_{split}.jsonl', 'w') as f:
        for ex, p in zip(examples, preds):
          row = {'idx': ex['idx'], 'label': ex['label']}
          row['prediction'] = float(p) if self.data.head == 'regression' else names[int(p)]
          f.write(json.dumps(row) + '\n')


def run_split(eval_step, params, split, batch_size, boundaries, shard, pad_id=0):
  """Runs eval_step over a split; returns {output name: [N, ...] host arrays} in split order."""
  labels = np.zeros(len(split), np.int32)
  outputs: dict[str, list] = {}
  indices = []
  mine = parallel.local_rows(batch_size)
  for batch in batching.eval_batches(split.input_ids, split.token_type_ids, labels, batch_size,
                                     boundaries, pad_id=pad_id):
    index, mask = batch.pop('index'), batch.pop('mask')
    batch.pop('labels')
    local = {k: v[mine] for k, v in batch.items()}
    out = parallel.to_host(eval_step(params, parallel.to_global(local, shard)))
    real = mask > 0
    indices.append(index[real])
    for k, v in out.items():
      outputs.setdefault(k, []).extend(list(np.asarray(v)[real]))  # one row per example
  order = np.argsort(np.concatenate(indices), kind='stable')
  result = {}
  for k, rows in outputs.items():
    rows = [rows[i] for i in order]
    # Per-example scalars/vectors stack; per-token rows (QA) keep their bucket lengths.
    result[k] = np.stack(rows) if len({np.shape(r) for r in rows}) == 1 else rows
  return result


def evaluate_all(eval_step, params, data, config, boundaries: dict, shard, pad_id=0) -> Results:
  """Runs every eval split; `boundaries` maps each split's name to its padded lengths."""
  from adapter_tuning.data import metrics as metrics_lib
  metrics, predictions, warnings = {}, {}, []
  for i, (name, split) in enumerate(data.evals.items()):
    out = run_split(eval_step, params, split, config.eval_batch_size, boundaries[name], shard,
                    pad_id)
    prefix = 'eval/' if i == 0 else f'eval/{name}/'
    if data.head == 'span':
      from adapter_tuning.data import squad_task as qa_data
      answers, scores = qa_data.score(split, out, config)
      predictions[name] = answers
    else:
      predictions[name] = out['predictions']
      warning = constant_predictions(name, out['predictions'], data.head, data.label_names)
      if warning:
        warnings.append(warning)
      labels = split.labels['labels']
      if np.all(labels == -1):
        continue  # an unlabeled (test) split: predictions only
      scores = metrics_lib.compute_metrics(data.metric_names, out['predictions'], labels)
    metrics.update({prefix + k: float(v) for k, v in scores.items()})
  return Results(metrics, predictions, data, warnings)


def constant_predictions(split: str, predictions, head: str, label_names) -> str | None:
  """One warning line when a split's predictions are (numerically) one value, else None.

  A collapsed run still produces metrics (STS-B Pearson ~0, CoLA MCC 0), so without this
  line the user finds out only from the artifact. Regression counts as constant when the
  spread is below 1e-3 of the scale; classification when every example gets one class.
  """
  preds = np.asarray(predictions)
  if preds.size < 2:
    return None
  if head == 'regression':
    center = float(np.mean(preds))
    if np.ptp(preds) > 1e-3 * max(1.0, abs(center)):
      return None
    return (f'eval split {split}: predictions are constant ({center:.5g} for all {preds.size} '
            'examples): the model learned only the label mean; try '
            'model.head.standardize_targets=True, model.head.pooling=mean (or cls), or another '
            'learning_rate')
  if len(label_names) < 2 or len(np.unique(preds)) > 1:
    return None
  return (f'eval split {split}: predictions are constant (class {label_names[int(preds[0])]!r} '
          f'for all {preds.size} examples): the model learned only the majority label; try '
          'more steps, another learning_rate or model.head.pooling=mean (or cls)')
