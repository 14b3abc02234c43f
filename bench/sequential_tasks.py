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
  5. MAD-X: a masked-LM language/domain adapter on SST-2's training sentences (Pfeiffer,
     m = 192; MiniLM has no MLM head, so a new one trains with it), then an SST-2 task
     adapter stacked on it (`model.stack.below`, `trainable=peft`)
  6. the CoLA, MRPC-fusion and SST-2-stack artifacts served in one mixed-task model (one
     artifact per task): each task's dev logits equal that artifact's alone

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
BASE = [f'--config.model.checkpoint={CHECKPOINT}', '--config.data.max_seq_length=128',
        '--config.progress_bar=false', '--config.log_every_steps=100']
GLUE_FLAGS = ['--config.data.source=glue_dir', f'--config.data.data_dir={GLUE}',
              '--config.model.head.pooling=mean']
SST2_TEXT = [f'--config.data.train_file={GLUE / "SST-2" / "train.tsv"}',
             f'--config.data.eval_file={GLUE / "SST-2" / "dev.tsv"}',
             '--config.data.text_key=sentence']


def below(name):
  return lambda out: [f'--config.model.stack.below={out / name / "adapter"}']


def fused(*names):
  return lambda out: ['--config.model.fusion.adapters=' +
                      ','.join(str(out / n / 'adapter') for n in names)]


# (name, task, config, steps, flags, flags naming earlier artifacts): the training runs.
RUNS = (
    ('sst2_s0', 'glue/sst2', 'glue_sst2', 600, ['--config.learning_rate=1e-3'], None),
    ('sst2_s1', 'glue/sst2', 'glue_sst2', 600,
     ['--config.learning_rate=1e-3', '--config.seed=1'], None),
    ('cola', 'glue/cola', 'glue_cola', 800, ['--config.learning_rate=1e-3'], None),
    ('mrpc_fusion', 'glue/mrpc', 'glue_mrpc', 400,
     ['--config.learning_rate=5e-4', '--config.trainable=peft',
      '--config.model.adapter.placement=none'], fused('sst2_s0', 'cola')),
    ('sst2_lm', 'mlm', 'mlm_text', 400,
     [*SST2_TEXT, '--config.learning_rate=1e-3', '--config.model.adapter.size=192',
      '--config.eval_every_steps=0'], None),
    ('sst2_on_lm', 'glue/sst2', 'glue_sst2', 600,
     ['--config.learning_rate=1e-3', '--config.trainable=peft'], below('sst2_lm')),
)


def run(cmd: list[str], log: list) -> float:
  """Runs one command from the repo root, echoing it; its wall seconds."""
  shown = ' '.join(str(c) for c in cmd).replace(str(ROOT) + '/', '').replace(
      str(SHARED), '../shared')
  print(f'$ {shown}', flush=True)
  t0 = time.perf_counter()
  subprocess.run([str(c) for c in cmd], cwd=ROOT, check=True)
  log.append({'command': shown, 'wall_s': round(time.perf_counter() - t0, 1)})
  return log[-1]['wall_s']


def train(out: pathlib.Path, name: str, task: str, config: str, steps: int, flags: list,
          earlier, log: list):
  if (out / name / 'adapter').exists():
    return
  flags = [*BASE, *([] if task == 'mlm' else GLUE_FLAGS), f'--config.num_train_steps={steps}',
           *flags, *(earlier(out) if earlier else [])]
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
  """Scores every artifact so far alone; earlier ones must match their first record exactly.
  A masked-LM artifact has no labels to predict: its bytes are compared, and its held-out
  perplexity is the one its run measured (metrics.jsonl)."""
  import numpy as np

  for name, r in record.items():
    directory = out / name / 'adapter'
    if r['task'] == 'mlm':
      found, logits = last_eval(out / name), None
    else:
      (found, logits), = score([directory]).values()
    r.setdefault('first', {'sha256': sha256(directory), 'dev': found, 'logits': logits})
    drift = 0.0 if logits is None else float(np.abs(logits - r['first']['logits']).max())
    same_bytes = sha256(directory) == r['first']['sha256']
    r.setdefault('after', []).append({'stage': stage, 'dev': found, 'max_logit_change': drift,
                                      'same_bytes': same_bytes})
    print(f'  {name:12s} dev {fmt(found)}  bytes unchanged: {same_bytes}  '
          f'max |logit change|: {drift:.1e}', flush=True)
    if drift != 0.0 or not same_bytes:
      raise SystemExit(f'{name} changed after {stage}: that must never happen')


def last_eval(workdir: pathlib.Path) -> dict:
  lines = [json.loads(x) for x in (workdir / 'metrics.jsonl').read_text().splitlines()]
  evals = [x for x in lines if 'eval/perplexity' in x]
  return {k.split('/', 1)[1]: v for k, v in evals[-1].items() if k.startswith('eval/')}


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
  for i, (name, task, config, steps, flags, earlier) in enumerate(RUNS):
    print(f'== {name}', flush=True)
    train(out, name, task, config, max(1, int(steps * args.steps_scale)), flags, earlier, log)
    record[name] = {'task': task}
    check_unchanged(out, record, f'after {name}')
    if name == 'mrpc_fusion':  # step 4, before MAD-X
      average(out, log)
      record['sst2_avg'] = {'task': 'glue/sst2'}
      check_unchanged(out, record, 'after sst2_avg')
  served = ('cola', 'mrpc_fusion', 'sst2_on_lm')
  mixed = mixed_pass(out, {k: record[k] for k in served})
  print(f'== one mixed-task model of {", ".join(served)}: max |logit - alone| {mixed:.1e}',
        flush=True)
  for r in record.values():
    r['first'].pop('logits')  # arrays: the JSON keeps the scores and the checks
  (out / 'sequential.json').write_text(json.dumps({'runs': record, 'commands': log,
                                                   'mixed_max_logit_diff': mixed}, indent=1))
  print(table(record))


def average(out: pathlib.Path, log: list):
  if not (out / 'sst2_avg' / 'adapter').exists():
    run([sys.executable, '-m', 'adapter_tuning.compose', 'average', '--adapter',
         f'{out / "sst2_s0" / "adapter"},{out / "sst2_s1" / "adapter"}', '--weights', '0.5,0.5',
         '--output', out / 'sst2_avg' / 'adapter'], log)


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
