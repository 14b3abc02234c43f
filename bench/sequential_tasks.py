#!/usr/bin/env python3
"""Tasks arriving one after another on one frozen MiniLM: issue 16's demonstration.

  .venv/bin/python bench/sequential_tasks.py runs/sequential [--steps_scale 1.0]

Every step is a plain command a user would type (printed as it runs); after each one, every
artifact written so far is scored again on its dev split through `predict`'s own code path
(`MultiTaskModel` + `predict_rows`), and its files' sha256 and dev logits are compared with
what they were right after that artifact was trained. Nothing learned earlier may move: the
script fails if a byte or a logit of an earlier artifact changed. Steps:

  1. SST-2 adapter (Houlsby m = 64, seed 0), and a second one with seed 1 (for step 4)
  2. CoLA adapter
  3. AdapterFusion of the SST-2 (seed 0) and CoLA adapters, trained on MRPC
     (`trainable=peft`: the fusion layers and the head, as AdapterHub's train_adapter_fusion)
  4. the average of the two SST-2 adapters (`compose average`, weights 0.5, 0.5)
  5. the SST-2 (seed 0), CoLA and MRPC-fusion artifacts served in one mixed-task model
     (one artifact per task): each task's dev logits equal that artifact's alone

Writes DIR/sequential.json (every score, hash and logit difference) and prints the markdown
table docs/sequential_tasks_minilm.md holds. Skips training runs whose artifact exists.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import pathlib
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHARED = ROOT.parent / 'shared'
CHECKPOINT = SHARED / 'models' / 'all-MiniLM-L6-v2'
GLUE = SHARED / 'data' / 'glue'
COMMON = [f'--config.model.checkpoint={CHECKPOINT}', '--config.data.source=glue_dir',
          f'--config.data.data_dir={GLUE}', '--config.data.max_seq_length=128',
          '--config.model.head.pooling=mean', '--config.progress_bar=false',
          '--config.log_every_steps=100']
# (name, config, steps, extra flags): the runs of steps 1-3.
RUNS = (
    ('sst2_s0', 'glue_sst2', 600, ['--config.learning_rate=1e-3', '--config.seed=0']),
    ('sst2_s1', 'glue_sst2', 600, ['--config.learning_rate=1e-3', '--config.seed=1']),
    ('cola', 'glue_cola', 800, ['--config.learning_rate=1e-3']),
    ('mrpc_fusion', 'glue_mrpc', 400, ['--config.learning_rate=5e-4', '--config.trainable=peft',
                                       '--config.model.adapter.placement=none']),
)
TASKS = {'sst2_s0': 'glue/sst2', 'sst2_s1': 'glue/sst2', 'cola': 'glue/cola',
         'mrpc_fusion': 'glue/mrpc', 'sst2_avg': 'glue/sst2'}


def run(cmd: list[str], log: list) -> float:
  """Runs one command from the repo root, echoing it; its wall seconds."""
  shown = ' '.join(str(c) for c in cmd).replace(str(ROOT) + '/', '')
  print(f'$ {shown}', flush=True)
  t0 = time.perf_counter()
  subprocess.run([str(c) for c in cmd], cwd=ROOT, check=True)
  log.append({'command': shown, 'wall_s': round(time.perf_counter() - t0, 1)})
  return log[-1]['wall_s']


def train(out: pathlib.Path, name: str, config: str, steps: int, extra: list, log: list):
  adapter = out / name / 'adapter'
  if adapter.exists():
    return
  flags = [*COMMON, f'--config.num_train_steps={steps}', *extra]
  if name == 'mrpc_fusion':
    flags.append(f'--config.model.fusion.adapters={out / "sst2_s0" / "adapter"},'
                 f'{out / "cola" / "adapter"}')
  run([sys.executable, '-m', 'adapter_tuning.train', '--config', f'configs/{config}.py',
       '--workdir', out / name, *flags], log)


def sha256(directory: pathlib.Path) -> str:
  digest = hashlib.sha256()
  for f in sorted(directory.iterdir()):
    digest.update(f.name.encode() + f.read_bytes())
  return digest.hexdigest()


def dev_rows(task: str) -> tuple[list[dict], list]:
  from adapter_tuning.data import glue
  spec = glue.get_task(task)
  examples = glue.read_glue_dir(spec, GLUE, spec.eval_splits[0])
  rows = [{'text': e['text'], 'text_pair': e['text_pair'], 'task': task} for e in examples]
  return rows, [e['label'] for e in examples]


def score(directories: list[pathlib.Path]) -> dict:
  """{name: (dev metrics, logits [N, C])} of artifacts served together in one model."""
  import numpy as np

  from adapter_tuning.data import glue, metrics
  from adapter_tuning.predict import predict_rows
  from adapter_tuning.serving.multi_adapter import MultiTaskModel

  mt = MultiTaskModel([str(d) for d in directories])
  out = {}
  for d, task in zip(directories, mt.tasks):
    rows, gold = dev_rows(task.name)
    preds = predict_rows(mt, rows, 128, 128)
    names = task.label_names
    predicted = [names.index(p['label']) for p in preds]
    found = metrics.compute_metrics(glue.get_task(task.name).metric_names, predicted, gold)
    out[d.parent.name] = (found, np.asarray([p['logits'] for p in preds], np.float64))
  return out


def check_unchanged(out: pathlib.Path, record: dict, stage: str):
  """Scores every artifact so far alone; earlier ones must match their first record exactly."""
  import numpy as np

  for name in list(record):
    directory = out / name / 'adapter'
    (found, logits), = score([directory]).values()
    first = record[name]
    first.setdefault('first', {'sha256': sha256(directory), 'dev': found, 'logits': logits})
    drift = float(np.abs(logits - first['first']['logits']).max())
    same_bytes = sha256(directory) == first['first']['sha256']
    first.setdefault('after', []).append({'stage': stage, 'dev': found, 'max_logit_change': drift,
                                          'same_bytes': same_bytes})
    print(f'  {name:12s} dev {fmt(found)}  bytes unchanged: {same_bytes}  '
          f'max |logit change|: {drift:.1e}', flush=True)
    if drift != 0.0 or not same_bytes:
      raise SystemExit(f'{name} changed after {stage}: that must never happen')


def fmt(found: dict) -> str:
  return ' / '.join(f'{k} {v:.4f}' for k, v in found.items())


def mixed_pass(out: pathlib.Path, record: dict) -> float:
  """All artifacts in one model: each task's dev logits against that artifact alone."""
  import numpy as np

  names = list(record)
  together = score([out / n / 'adapter' for n in names])
  return max(float(np.abs(together[n][1] - record[n]['first']['logits']).max()) for n in names)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('out', type=pathlib.Path)
  p.add_argument('--steps_scale', type=float, default=1.0,
                 help='multiplies every run\'s steps (a quick look: 0.1)')
  args = p.parse_args(argv)
  out = args.out.resolve()
  out.mkdir(parents=True, exist_ok=True)
  log: list = []
  record: dict = {}
  for name, config, steps, extra in RUNS:
    print(f'== {name}', flush=True)
    train(out, name, config, max(1, int(steps * args.steps_scale)), extra, log)
    record[name] = {'task': TASKS[name]}
    check_unchanged(out, record, f'after {name}')
  print('== sst2_avg', flush=True)
  if not (out / 'sst2_avg' / 'adapter').exists():
    run([sys.executable, '-m', 'adapter_tuning.compose', 'average', '--adapter',
         f'{out / "sst2_s0" / "adapter"},{out / "sst2_s1" / "adapter"}', '--weights', '0.5,0.5',
         '--output', out / 'sst2_avg' / 'adapter'], log)
  record['sst2_avg'] = {'task': 'glue/sst2'}
  check_unchanged(out, record, 'after sst2_avg')
  mixed = mixed_pass(out, {k: record[k] for k in ('sst2_s0', 'cola', 'mrpc_fusion')})
  print(f'== one mixed-task model of sst2_s0, cola, mrpc_fusion: max |logit - alone| '
        f'{mixed:.1e}', flush=True)
  for r in record.values():
    r['first'].pop('logits')
  (out / 'sequential.json').write_text(json.dumps({'runs': record, 'commands': log,
                                                   'mixed_max_logit_diff': mixed}, indent=1))
  print(table(record))


def table(record: dict) -> str:
  """Markdown: each artifact's dev score when trained and after the last later step."""
  lines = ['| artifact | task | dev, right after training | dev after every later step | '
           'later checks: bytes and logits unchanged |', '|---|---|---|---|---|']
  for name, r in record.items():
    later = r['after'][1:]
    last = fmt(later[-1]['dev']) if later else '(trained last)'
    lines.append(f'| {name} | {r["task"]} | {fmt(r["first"]["dev"])} | {last} | '
                 f'{len(later)} of {len(later)} |')
  return '\n'.join(lines)


if __name__ == '__main__':
  main()
