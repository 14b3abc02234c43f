"""Markdown table of the runs bench/glue_table.sh made: dev metrics of head / adapters / full.

usage: python bench/glue_table.py ROOT

A cell is the final dev metrics from the run's adapter artifact, then the last logged
train loss; "(constant)" marks a run whose log carries the constant-prediction warning,
so a collapse like issue 21's shows up in the table itself.
"""

import json
import pathlib
import sys

TASKS = ('cola', 'sst2', 'mrpc', 'stsb', 'rte', 'wnli', 'qnli')
TRAINABLES = ('head', 'adapters', 'full')


def cell(run: pathlib.Path) -> str:
  meta_path = run / 'adapter' / 'config.json'
  if not meta_path.exists():
    return 'not run'
  meta = json.loads(meta_path.read_text())
  metrics = meta['final_metrics']
  text = ' / '.join(f'{v:.3f}' for k, v in metrics.items() if k.count('/') == 1)
  losses = [json.loads(l).get('train/loss') for l in (run / 'metrics.jsonl').open()]
  losses = [l for l in losses if l is not None]
  log = run.with_name(run.name + '.log')
  constant = log.exists() and 'predictions are constant' in log.read_text()
  return f'{text} (loss {losses[-1]:.2f})' + (' **(constant)**' if constant else '')


def main(root: pathlib.Path):
  print('| task | steps x 32 | metrics | head (lr 1e-3) | adapters m=64 (lr 1e-3) | full (lr 5e-5) |')
  print('|---|---|---|---|---|---|')
  for task in TASKS:
    runs = [root / f'{task}_{t}' for t in TRAINABLES]
    done = [r for r in runs if (r / 'adapter' / 'config.json').exists()]
    if not done:
      continue
    meta = json.loads((done[0] / 'adapter' / 'config.json').read_text())
    names = ', '.join(k.split('/', 1)[1] for k in meta['final_metrics'] if k.count('/') == 1)
    print(f'| {task} | {meta["step"]} | {names} | ' + ' | '.join(cell(r) for r in runs) + ' |')


if __name__ == '__main__':
  main(pathlib.Path(sys.argv[1]))
