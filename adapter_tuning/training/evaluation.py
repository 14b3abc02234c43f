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

from adapter_tuning import fileio
from adapter_tuning.data import batching, packing
from adapter_tuning.models.heads import head_kind
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
        fileio.write_atomic(workdir / name, json.dumps(preds, ensure_ascii=False))
        continue
      examples = self.data.evals[split].examples
      names, kind = self.data.label_names, head_kind(self.data.head)
      rows = [json.dumps({'idx': ex['idx'], 'label': ex['label'],
                          'prediction': kind.prediction(p, names)}) + '\n'
              for ex, p in zip(examples, preds)]
      fileio.write_atomic(workdir / f'predictions_{split}.jsonl', ''.join(rows))


def run_split(eval_step, params, split, batch_size, boundaries, shard, pad_id=0, masking=None):
  """Runs eval_step over a split; returns {output name: [N, ...] host arrays} in split order.
  `masking` (data.task=mlm, data/mlm.Masking): each batch gets the split's fixed masks."""
  labels = np.zeros(len(split), np.int32)
  outputs: dict[str, list] = {}
  indices = []
  mine = parallel.local_rows(batch_size)
  if isinstance(boundaries, packing.Packed):
    source = packing.eval_batches(split.input_ids, split.token_type_ids, labels, batch_size,
                                  boundaries, pad_id=pad_id)
  else:
    source = batching.eval_batches(split.input_ids, split.token_type_ids, labels, batch_size,
                                   boundaries, pad_id=pad_id)
  for batch in source:
    index, mask = batch.pop('index'), batch.pop('mask')
    batch.pop('labels')
    if masking is not None:
      batch = masking.evaluate(batch, index)
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
  kind = head_kind(data.head)
  metrics, predictions, warnings = {}, {}, []
  for i, (name, split) in enumerate(data.evals.items()):
    out = run_split(eval_step, params, split, config.eval_batch_size, boundaries[name], shard,
                    pad_id, data.masking)
    prefix = 'eval/' if i == 0 else f'eval/{name}/'
    predictions[name], scores = kind.score(split, out, data, config)
    warning = kind.constant_warning(name, predictions[name], data.label_names)
    if warning:
      warnings.append(warning)
    if scores is None:
      continue  # an unlabeled (test) split: predictions only
    metrics.update({prefix + k: float(v) for k, v in scores.items()})
  return Results(metrics, predictions, data, warnings)

