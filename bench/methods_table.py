"""The PEFT-methods sitting's JSON lines (bench/methods.sh) as Markdown tables for BENCHMARKS.md.

  python bench/methods_table.py results.jsonl

Per method: the median over rounds of each run's median step time and of its peak RSS, ours
(adapter_tuning) and the peer's (adapterhub), the ratio ours / peer of the step times
(below 1: ours is faster), and the trained parameter counts of both (they should agree: a
mismatch means the two tools did not run the same method, and is flagged). Then the
merged-LoRA inference lines. Lines with an "error" are listed, not averaged. Standard
library only, so any Python runs it.
"""

from __future__ import annotations

import json
import statistics
import sys

TOOLS = ('adapter_tuning', 'adapterhub')


def read(path: str) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip().startswith('{')]


def by_method(rows: list[dict]) -> dict:
  """{method: {tool: [rows]}} for the train-step lines, in the order methods first appear."""
  out: dict = {}
  for r in rows:
    if r.get('method') and 'bench' not in r and 'error' not in r and r.get('tool') in TOOLS:
      out.setdefault(r['method'], {t: [] for t in TOOLS})[r['tool']].append(r)
  return out


def median_of(runs: list[dict], key: str):
  values = [r[key] for r in runs if r.get(key) is not None]
  return statistics.median(values) if values else None


def fmt(x, spec: str = '.2f') -> str:
  return '–' if x is None else format(x, spec)


def params_cell(ours: list[dict], peer: list[dict]) -> str:
  """'a / b', with a warning when the tools trained different counts (or a run varied)."""
  counts = [sorted({r['trainable_params'] for r in runs}) for runs in (ours, peer)]
  cell = ' / '.join(','.join(f'{c:,}' for c in cs) or '–' for cs in counts)
  return cell if counts[0] == counts[1] and len(counts[0]) == 1 else f'{cell} **(differ)**'


def step_table(methods: dict) -> list[str]:
  """The per-method table: medians over rounds, so one slow run does not set a number."""
  lines = ['| method | ours s/step | peer s/step | ratio ours / peer | ours ex/s | peer ex/s '
           '| ours peak RSS MiB | peer peak RSS MiB | trained params ours / peer | rounds |',
           '|---|---|---|---|---|---|---|---|---|---|']
  for method, runs in methods.items():
    ours, peer = runs['adapter_tuning'], runs['adapterhub']
    s_ours, s_peer = median_of(ours, 'step_s_median'), median_of(peer, 'step_s_median')
    ratio = s_ours / s_peer if s_ours and s_peer else None
    lines.append(
        f'| {method} | {fmt(s_ours, ".3g")} | {fmt(s_peer, ".3g")} | {fmt(ratio)} '
        f'| {fmt(median_of(ours, "examples_per_s"), ".1f")} '
        f'| {fmt(median_of(peer, "examples_per_s"), ".1f")} '
        f'| {fmt(median_of(ours, "peak_rss_mb"), ".0f")} '
        f'| {fmt(median_of(peer, "peak_rss_mb"), ".0f")} '
        f'| {params_cell(ours, peer)} | {len(ours)} / {len(peer)} |')
  return lines


def inference_table(rows: list[dict]) -> list[str]:
  """The merged-LoRA check: each variant's median s/batch and its ratio to the base."""
  infer = [r for r in rows if r.get('bench') == 'merged_inference' and 'error' not in r]
  base = next((r['batch_s_median'] for r in infer if r['variant'] == 'base'), None)
  lines = ['| forward (eval, jit) | s/batch (median) | ex/s | vs base | max abs logit diff |',
           '|---|---|---|---|---|']
  for r in infer:
    if r['variant'] == 'summary':
      continue
    diff = r.get('max_abs_logit_diff_vs_unmerged')
    lines.append(f'| {r["variant"]} | {fmt(r["batch_s_median"], ".3g")} '
                 f'| {fmt(r["examples_per_s"], ".1f")} '
                 f'| {fmt(r["batch_s_median"] / base if base else None, ".3f")} '
                 f'| {"–" if diff is None else f"{diff:.1e} vs unmerged"} |')
  return lines if len(lines) > 2 else []


def describe(rows: list[dict]) -> list[str]:
  """Where and on what the sitting ran: the header line and the runs' shapes."""
  head = next((r for r in rows if r.get('header')), {})
  flags = ', '.join(k for k, v in head.get('cpu_flags', {}).items() if v) or 'unknown'
  shapes = sorted({(r.get('model'), r.get('batch_size'), r.get('seq_len'))
                   for r in rows if r.get('tool') in TOOLS and 'batch_size' in r}, key=str)
  return [f'Sitting {head.get("date", "?")}, CPU: {head.get("cpu_model", "?")} '
          f'({head.get("cpu_count", "?")} cores; {flags}); runs: '
          + '; '.join(f'{m} batch {b} x {s}' for m, b, s in shapes) + '.']


def main(argv=None):
  argv = sys.argv[1:] if argv is None else argv
  if len(argv) != 1:
    raise SystemExit('usage: methods_table.py results.jsonl')
  rows = read(argv[0])
  out = describe(rows) + [''] + step_table(by_method(rows))
  infer = inference_table(rows)
  if infer:
    out += [''] + infer
  errors = [r for r in rows if 'error' in r]
  if errors:
    out += ['', 'Failed runs: ' + ', '.join(f'{r.get("tool")} {r.get("method")}' for r in errors)]
  print('\n'.join(out))


if __name__ == '__main__':
  main()
