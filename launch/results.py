"""Collecting a sweep: every run folder into results.csv/json, best per method, the plot.

Reads only what a run leaves (config.json, metrics.jsonl, adapter/config.json), so runs
done elsewhere (a cluster array job) are collected the same way as local ones.
"""

from __future__ import annotations

import csv
import json
import math
import os
import pathlib
import re
import statistics

from adapter_tuning.data.metrics import lower_is_better  # perplexity, losses, errors

CSV_FIELDS = ('name', 'status', 'method', 'adapter_size', 'placement', 'learning_rate',
              'num_epochs', 'num_train_steps', 'seed', 'trained_params', 'total_params',
              'base_params', 'pct_of_base', 'metric', 'final', 'best', 'best_step', 'selected')


class SweepError(Exception):
  """A usage error: reported as one line, exit code 2."""


def is_finished(run_dir: pathlib.Path) -> bool:
  return (run_dir / 'adapter' / 'config.json').exists()


def method_of(cfg: dict) -> str:
  """A run's method label: the `trainable` preset ('full', 'head', 'top:K', 'bitfit'); for
  'adapters' / 'peft', the PEFT methods the model keys switch on ('adapters' for Houlsby
  bottlenecks, else the placement, 'lora', 'ia3', 'prefix', joined by '+'; ' (peft)' when LayerNorms
  stay frozen); explicit rule lists are 'custom'."""
  trainable = cfg['trainable']
  if not isinstance(trainable, str) or '=' in trainable:
    return 'custom'
  if trainable not in ('adapters', 'peft'):
    return trainable
  model = cfg['model']
  adapter = model.get('adapter', {})
  placement, scaling = adapter.get('placement', 'houlsby'), adapter.get('scaling', 1.0)
  names = []
  if placement != 'none':
    names.append('adapters' if placement == 'houlsby' else placement +
                 (f' x{scaling:g}' if scaling != 1.0 else ''))
  if (model.get('lora') or {}).get('rank'):
    names.append('lora')
  if (model.get('ia3') or {}).get('targets'):
    names.append('ia3')
  if (model.get('prefix') or {}).get('length'):
    names.append('prefix')
  label = '+'.join(names) or 'layernorms'
  return label if trainable == 'adapters' else f'{label} (peft)'


# ---------------------------------------------------------------------------------------
# Collecting.


def _read_json(path: pathlib.Path):
  try:
    return json.loads(path.read_text())
  except (OSError, ValueError):
    return None


def read_metrics(path: pathlib.Path) -> list[dict]:
  """metrics.jsonl; a half-written last line (a killed run) is ignored."""
  events = []
  if path.exists():
    for line in path.read_text(errors='replace').splitlines():
      try:
        events.append(json.loads(line))
      except ValueError:
        continue
  return [e for e in events if isinstance(e, dict)]


def _default_metric(artifact: dict) -> str | None:
  names = artifact.get('metric_names') or []
  if 'f1' in names and artifact.get('task') == 'squad':
    return 'eval/f1'  # the paper reports SQuAD F1
  return f'eval/{names[0]}' if names else None


def find_runs(workdir: pathlib.Path) -> list[pathlib.Path]:
  """Sub-folders holding a trainer config.json (resolved config with model/trainable)."""
  found = []
  for d in sorted(p for p in workdir.iterdir() if p.is_dir()):
    cfg = _read_json(d / 'config.json')
    if isinstance(cfg, dict) and 'trainable' in cfg and 'model' in cfg:
      found.append(d)
  return found


def collect_run(run_dir: pathlib.Path, metric: str) -> dict:
  cfg = _read_json(run_dir / 'config.json')
  art = _read_json(run_dir / 'adapter' / 'config.json') if is_finished(run_dir) else None
  adapter = cfg['model'].get('adapter', {})
  placement = adapter.get('placement', 'houlsby')
  params = (art or {}).get('params') or {}
  evals = [(e.get('step'), e[metric]) for e in read_metrics(run_dir / 'metrics.jsonl')
           if isinstance(e.get(metric), (int, float)) and math.isfinite(e[metric])]
  pick = min if lower_is_better(metric) else max
  best = pick(evals, key=lambda sv: sv[1]) if evals else (None, None)
  final = None
  if art is not None:
    final = (art.get('final_metrics') or {}).get(metric)
    if not isinstance(final, (int, float)) or not math.isfinite(final):
      final = evals[-1][1] if evals else None
  return {
      'name': run_dir.name, 'status': 'done' if art is not None else 'incomplete',
      'method': method_of(cfg),
      'adapter_size': adapter.get('size') if placement != 'none' else None,
      'placement': placement, 'learning_rate': cfg.get('learning_rate'),
      'num_epochs': cfg.get('num_epochs'), 'num_train_steps': cfg.get('num_train_steps'),
      'seed': cfg.get('seed'), 'trained_params': params.get('trainable'),
      'total_params': params.get('total'), 'base_params': params.get('base'),
      'pct_of_base': params.get('trainable_pct_of_base'), 'metric': metric,
      'final': final, 'best': best[1], 'best_step': best[0], 'selected': False,
      '_setting': json.dumps({k: v for k, v in cfg.items() if k != 'seed'}, sort_keys=True),
  }


def _method_order(method: str, size):
  order = {'head': 0, 'adapters': 2, 'full': 3}
  k = int(method[4:]) if method.startswith('top:') and method[4:].isdigit() else 0
  return (order.get(method, 1 if method.startswith('top:') else 4), k, size or 0, method)


def select_best(rows: list[dict], select: str) -> list[dict]:
  """Per (method, size): the setting with the best mean `select` score over its seeds."""
  metric = rows[0]['metric'] if rows else ''
  sign = -1.0 if lower_is_better(metric) else 1.0
  groups: dict = {}
  for row in rows:
    if row['status'] == 'done' and row[select] is not None:
      key = (row['method'], row['adapter_size'])
      groups.setdefault(key, {}).setdefault(row['_setting'], []).append(row)
  best = []
  for (method, size), settings in groups.items():
    def mean(members):
      return statistics.fmean(r[select] for r in members)
    members = max(sorted(settings.values(), key=lambda m: m[0]['name']),
                  key=lambda m: sign * mean(m))
    members.sort(key=lambda r: (r['seed'] is None, r['seed'], r['name']))
    scores = [r[select] for r in members]
    for r in members:
      r['selected'] = True
    first = members[0]
    pcts = [r['pct_of_base'] for r in members if r['pct_of_base'] is not None]
    best.append({
        'method': method, 'adapter_size': size,
        'setting': re.sub(r'_s\d+$', '', first['name']),
        'runs': [r['name'] for r in members], 'seeds': [r['seed'] for r in members],
        'n': len(members), 'mean': statistics.fmean(scores),
        'std': statistics.stdev(scores) if len(scores) > 1 else 0.0,
        'learning_rate': first['learning_rate'], 'num_epochs': first['num_epochs'],
        'num_train_steps': first['num_train_steps'],
        'trained_params': first['trained_params'],
        'pct_of_base': statistics.fmean(pcts) if pcts else None,
    })
  best.sort(key=lambda b: _method_order(b['method'], b['adapter_size']))
  return best


def plot_tradeoff(best: list[dict], path: pathlib.Path, metric: str, select: str, title: str):
  """Score vs trained parameters (% of the base, log x): one curve/marker set per method."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  from matplotlib.ticker import FuncFormatter

  series: dict = {}
  for b in best:
    if b['pct_of_base'] and b['pct_of_base'] > 0:
      family = 'top-k' if b['method'].startswith('top:') else b['method']
      series.setdefault(family, []).append(b)
  styles = {'adapters': ('o', '-', 'tab:orange', 'Adapters (size m)'),
            'top-k': ('s', '--', 'tab:blue', 'Fine-tune top k layers'),
            'full': ('*', '', 'black', 'Full fine-tuning'),
            'head': ('D', '', 'tab:green', 'Head only'),
            'custom': ('x', '', 'tab:purple', 'Custom rules')}
  others = iter([('^', 'tab:red'), ('v', 'tab:purple'), ('P', 'tab:brown'), ('X', 'tab:pink'),
                 ('h', 'tab:olive'), ('p', 'tab:cyan'), ('<', 'tab:gray'), ('>', 'tab:blue')])
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for family, points in series.items():
    points.sort(key=lambda b: b['pct_of_base'])
    if family not in styles:  # PEFT methods and anything else: a marker and colour each
      marker, color = next(others, ('^', 'tab:gray'))
      styles[family] = (marker, '', color, family)
    marker, line, color, label = styles[family]
    xs = [b['pct_of_base'] for b in points]
    ys = [b['mean'] for b in points]
    errs = [b['std'] for b in points]
    ax.errorbar(xs, ys, yerr=errs if any(errs) else None, marker=marker, linestyle=line or 'none',
                markersize=11 if marker == '*' else 6, capsize=3, color=color, label=label)
    for b, x, y in zip(points, xs, ys):
      tag = (f"m={b['adapter_size']}" if family == 'adapters' and b['adapter_size'] else
             f"k={b['method'][4:]}" if family == 'top-k' else '')
      if tag:
        ax.annotate(tag, (x, y), textcoords='offset points', xytext=(4, 6), fontsize=8)
    if family == 'full':
      ax.axhline(max(ys) if not lower_is_better(metric) else min(ys), color='gray',
                 linestyle=':', linewidth=1)
  ax.set_xscale('log')
  ax.margins(x=0.12, y=0.12)
  ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f'{v:g}%'))
  ax.set_xlabel('trained parameters per task (% of the base model)')
  ax.set_ylabel(f'{metric} ({select}, mean over seeds)')
  ax.set_title(title)
  ax.grid(True, which='major', alpha=0.3)
  if series:
    ax.legend(fontsize=8)
  else:
    ax.text(0.5, 0.5, 'no finished runs', ha='center', va='center', transform=ax.transAxes)
  fig.tight_layout()
  tmp = path.with_suffix('.tmp.png')
  fig.savefig(tmp, dpi=120)
  plt.close(fig)
  os.replace(tmp, path)


def _write_atomic(path: pathlib.Path, text: str):
  tmp = path.with_name(path.name + '.tmp')
  tmp.write_text(text)
  os.replace(tmp, path)


def collect(workdir: pathlib.Path, metric: str | None, select: str = 'final',
            quiet: bool = False) -> dict:
  """Reads every run folder in workdir; writes results.csv, results.json, tradeoff.png."""
  if not workdir.is_dir():
    raise SweepError(f'{workdir} does not exist; pass the --workdir of a sweep')
  run_dirs = find_runs(workdir)
  if not run_dirs:
    raise SweepError(f'{workdir} holds no runs (sub-folders with a config.json from '
                     'adapter_tuning.train)')
  task = None
  if metric is None:
    for d in run_dirs:
      art = _read_json(d / 'adapter' / 'config.json') if is_finished(d) else None
      if art and _default_metric(art):
        metric = _default_metric(art)
        break
    metric = metric or 'eval/accuracy'
  for d in run_dirs:
    task = task or (_read_json(d / 'config.json').get('data') or {}).get('task')
  rows = [collect_run(d, metric) for d in run_dirs]
  def num(x):
    return (x is None or isinstance(x, str), x if isinstance(x, (int, float)) else 0)
  rows.sort(key=lambda r: (_method_order(r['method'], r['adapter_size']), num(r['learning_rate']),
                           num(r['num_epochs']), num(r['seed']), r['name']))
  best = select_best(rows, select)
  with open(workdir / 'results.csv.tmp', 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction='ignore')
    writer.writeheader()
    for row in rows:
      writer.writerow({k: '' if row[k] is None else row[k] for k in CSV_FIELDS})
  os.replace(workdir / 'results.csv.tmp', workdir / 'results.csv')
  plot = workdir / 'tradeoff.png'
  title = f'{task or "sweep"}: best per method and size'
  plot_tradeoff(best, plot, metric, select, title)
  results = {'metric': metric, 'higher_is_better': not lower_is_better(metric),
             'select': select, 'task': task,
             'runs': [{k: r[k] for k in CSV_FIELDS} for r in rows], 'best': best,
             'plot': plot.name}
  _write_atomic(workdir / 'results.json', json.dumps(results, indent=1) + '\n')
  if not quiet:
    done = sum(r['status'] == 'done' for r in rows)
    print(f'{len(rows)} runs ({done} finished) -> {workdir / "results.csv"}, results.json, '
          f'{plot.name}')
    if best:
      print(f'best per (method, size) on {metric} ({select}, mean over seeds):')
      for b in best:
        size = '' if b['adapter_size'] is None else b['adapter_size']
        pct = '' if b['pct_of_base'] is None else f"{b['pct_of_base']:.3g}%"
        spread = f" ± {b['std']:.4f}" if b['n'] > 1 else ''
        print(f"  {b['method']:<9} {str(size):>4} {pct:>8}  {b['mean']:.4f}{spread} "
              f"(n={b['n']})  {b['setting']}")
  return results
