"""python -m adapter_tuning.predict: run one or several task adapters on new text.

  --adapter runs/sst2/adapter,runs/rte/adapter --input rows.jsonl --output out.jsonl

Input rows are JSONL {"text": ..., "text_pair": ..., "task": ...} ("task" = the adapter's
data.task, needed when several adapters are loaded) or a TSV split of a GLUE task.
Rows of different tasks share batches: each example is routed to its own adapters and
head inside one jitted forward pass (see multitask.py). Output: one JSON line per input
row with `task`, `label` and `logits` (or `score` for regression).

  --glue_submission OUT --glue_dir ../shared/data/glue

writes the GLUE server's test-set files (CoLA.tsv, SST-2.tsv, MNLI-m.tsv, MNLI-mm.tsv,
AX.tsv, ...) for every loaded GLUE adapter.
"""

from __future__ import annotations

import json
import pathlib
import sys

import numpy as np
from absl import flags

from adapter_tuning import fileio

FLAGS = flags.FLAGS
flags.DEFINE_string('adapter', None, 'Adapter artifact folder(s), comma-separated.')
flags.DEFINE_string('input', None, 'JSONL rows, or a GLUE TSV split (e.g. SST-2/test.tsv).')
flags.DEFINE_string('output', None, 'Output JSONL file.')
flags.DEFINE_string('base', None, 'Base checkpoint (default: the path recorded in the artifact).')
flags.DEFINE_string('glue_submission', None, 'Write GLUE test-server files to this folder.')
flags.DEFINE_string('glue_dir', None, 'GLUE-layout TSV folder (for --glue_submission).')
flags.DEFINE_integer('batch_size', 64, 'Examples per forward pass.')
flags.DEFINE_integer('max_seq_length', 0, 'Truncation length (0 = what the adapter trained with).')
flags.DEFINE_bool('verbose', False, 'Show tracebacks for errors.')

# The GLUE server's file names, and how each task's predictions are written.
SUBMISSION_FILES = {
    'glue/cola': ('CoLA.tsv', 'test'), 'glue/sst2': ('SST-2.tsv', 'test'),
    'glue/mrpc': ('MRPC.tsv', 'test'), 'glue/stsb': ('STS-B.tsv', 'test'),
    'glue/qqp': ('QQP.tsv', 'test'), 'glue/qnli': ('QNLI.tsv', 'test'),
    'glue/rte': ('RTE.tsv', 'test'), 'glue/wnli': ('WNLI.tsv', 'test'),
}
MNLI_FILES = {'test_matched': 'MNLI-m.tsv', 'test_mismatched': 'MNLI-mm.tsv'}
STRING_LABEL_TASKS = ('glue/mnli', 'glue/qnli', 'glue/rte')  # the server wants label names


def predict_rows(mt, rows: list[dict], batch_size: int, max_seq_length: int) -> list[dict]:
  """rows: {'text', 'text_pair', 'task'} -> {'task', 'label' and 'logits' | 'score'}."""
  from adapter_tuning.serving.multi_adapter import (bucket_length, output_fields,
                                                    padded_logits, tokenize_rows)
  task_ids = np.asarray([mt.task_index(r.get('task')) for r in rows], np.int32)
  limit = min(max_seq_length, mt.pretrained.config.max_seq_length)
  ids = tokenize_rows(mt.pretrained.tokenizer, rows, limit)
  order = np.argsort([len(x[0]) for x in ids], kind='stable')  # similar lengths together
  out: list[dict | None] = [None] * len(rows)
  for start in range(0, len(rows), batch_size):
    chunk = order[start:start + batch_size]
    length = bucket_length(max(len(ids[i][0]) for i in chunk), limit)
    logits = padded_logits(mt, task_ids[chunk], [ids[i] for i in chunk], length, batch_size)
    for row, i in zip(logits, chunk):
      out[i] = output_fields(mt, task_ids[i], row)
  return out  # type: ignore[return-value]


def read_jsonl(path: pathlib.Path) -> list[dict]:
  """Input rows from JSONL (or CSV) with a "text" column; line numbers in errors."""
  from adapter_tuning.data.text_files import read_rows
  from adapter_tuning.errors import UsageError
  rows = []
  for n, row in read_rows(path):
    if not isinstance(row.get('text'), str):
      raise UsageError(f'{path}:{n}: each row needs a "text" string')
    rows.append(row)
  if not rows:
    raise UsageError(f'{path} has no rows')
  return rows


def read_glue_tsv(path: pathlib.Path, task: str) -> list[dict]:
  """A GLUE TSV split (e.g. .../SST-2/test.tsv) as rows for the given task."""
  from adapter_tuning.data import glue
  spec = glue.get_task(task)
  split = {'dev.tsv': 'validation', 'dev_matched.tsv': 'validation_matched',
           'dev_mismatched.tsv': 'validation_mismatched', 'test_matched.tsv': 'test_matched',
           'test_mismatched.tsv': 'test_mismatched', 'train.tsv': 'train'}.get(path.name, 'test')
  examples = glue.read_glue_dir(spec, path.parent.parent, split)
  return [{'text': e['text'], 'text_pair': e['text_pair'], 'task': task, 'idx': e['idx']}
          for e in examples]


def write_glue_submission(mt, glue_dir: pathlib.Path, out_dir: pathlib.Path, batch_size: int,
                          max_len: int) -> list[str]:
  from adapter_tuning.data import glue
  from adapter_tuning.errors import UsageError
  out_dir.mkdir(parents=True, exist_ok=True)
  written = []
  for task in mt.tasks:
    spec = glue.GLUE_TASKS.get(task.name)
    if spec is None:
      continue
    splits = MNLI_FILES if task.name == 'glue/mnli' else {
        SUBMISSION_FILES[task.name][1]: SUBMISSION_FILES[task.name][0]}
    jobs = [(glue.read_glue_dir(spec, glue_dir, split), name) for split, name in splits.items()]
    if task.name == 'glue/mnli':
      ax = _read_ax(glue_dir)
      if ax is not None:
        jobs.append((ax, 'AX.tsv'))
    for examples, name in jobs:
      rows = [{'text': e['text'], 'text_pair': e['text_pair'], 'task': task.name} for e in examples]
      preds = predict_rows(mt, rows, batch_size, max_len)
      lines = ['index\tprediction\n']
      for e, p in zip(examples, preds):
        if 'score' in p:  # STS-B, the one GLUE regression task: scores lie in [0, 5]
          value = f'{min(max(p["score"], 0.0), 5.0):.3f}'
        elif task.name in STRING_LABEL_TASKS:
          value = p['label']
        else:
          value = str(task.label_names.index(p['label']))
        lines.append(f'{e["idx"]}\t{value}\n')
      fileio.write_atomic(out_dir / name, ''.join(lines))
      written.append(name)
  if not written:
    raise UsageError('no GLUE adapter among those loaded; --glue_submission needs glue/* adapters')
  return written


def _read_ax(glue_dir: pathlib.Path):
  """The AX diagnostic set (diagnostic/diagnostic.tsv: index, sentence1, sentence2)."""
  import csv
  for path in (glue_dir / 'diagnostic' / 'diagnostic.tsv', glue_dir / 'AX' / 'test.tsv'):
    if path.exists():
      with open(path, newline='') as f:
        reader = csv.reader(f, delimiter='\t', quoting=csv.QUOTE_NONE)
        header = next(reader)
        i, a, b = header.index('index'), header.index('sentence1'), header.index('sentence2')
        return [{'idx': int(r[i]), 'text': r[a], 'text_pair': r[b]} for r in reader if r]
  print(f'note: no AX diagnostic file under {glue_dir} (diagnostic/diagnostic.tsv); '
        'AX.tsv not written', file=sys.stderr)
  return None


def _run():
  from adapter_tuning.errors import UsageError
  from adapter_tuning.serving.multi_adapter import MultiTaskModel
  if not FLAGS.adapter:
    raise UsageError('--adapter is required (one artifact folder, or several comma-separated)')
  if not FLAGS.glue_submission and not (FLAGS.input and FLAGS.output):
    raise UsageError('give --input and --output, or --glue_submission with --glue_dir')
  mt = MultiTaskModel([d for d in FLAGS.adapter.split(',') if d], FLAGS.base)
  max_len = FLAGS.max_seq_length or max(t.meta.get('max_seq_length', 128) for t in mt.tasks)
  if FLAGS.glue_submission:
    if not FLAGS.glue_dir:
      raise UsageError('--glue_submission needs --glue_dir (the GLUE TSV folder with test files)')
    written = write_glue_submission(mt, pathlib.Path(FLAGS.glue_dir),
                                    pathlib.Path(FLAGS.glue_submission), FLAGS.batch_size, max_len)
    print(f'wrote {", ".join(written)} to {FLAGS.glue_submission}')
  if FLAGS.input:
    path = pathlib.Path(FLAGS.input)
    if not path.exists():
      raise UsageError(f'--input {path} does not exist')
    if path.suffix == '.tsv':
      if len(mt.tasks) != 1:
        raise UsageError('a TSV input belongs to one task: pass a single --adapter')
      rows = read_glue_tsv(path, mt.tasks[0].name)
    else:
      rows = read_jsonl(path)
    preds = predict_rows(mt, rows, FLAGS.batch_size, max_len)
    out = pathlib.Path(FLAGS.output)
    fileio.write_atomic(out, ''.join(json.dumps(p) + '\n' for p in preds))
    print(f'wrote {len(preds)} predictions to {out}')


def main(argv=None) -> int:
  from adapter_tuning.cli import flags_main
  return flags_main(FLAGS, _run, list(sys.argv if argv is None else argv))


if __name__ == '__main__':
  from adapter_tuning.training import hugepages
  hugepages.reexec()
  sys.exit(main())
