"""Hyper-parameter sweeps: expand a config's sweep(), run or print the runs, collect results.

  python -m launch.sweep --config configs/glue_sst2.py --workdir runs/sst2_sweep \
      [--mode local|print] [--seeds 0,1] [--metric eval/accuracy] [--only N] \
      [-- --config.key=value ...]            # extra overrides for every run

Every entry of the config's `sweep()` (a dict of dotted config keys -> values), times each
of --seeds, is one run with a readable name built from its resolved config, e.g.
`adapters_m64_lr3e-4_ep3_s0`, trained in WORKDIR/<name> by
`python -m adapter_tuning.train --config CONFIG --workdir WORKDIR/<name> --config.k=v ...`.

  local  runs them one after another, one status line each (full output in
         WORKDIR/logs/<name>.log); finished runs (adapter/config.json present) are
         skipped, interrupted ones resume from their checkpoints (same command again).
  print  prints one command per line, e.g. for a cluster array job (line i = task i).

Then (local, or --collect-only) every run folder in WORKDIR is read into results.csv and
results.json (final and best validation metric per run), the best setting per (method,
adapter size) is chosen on the mean over seeds, and tradeoff.png plots the score against
the trained parameters as % of the base model (log x), one curve per method, like the
paper's figures. Bad input: one line `error: ...` and exit 2.
"""

from __future__ import annotations

import argparse
import ast
import copy
import hashlib
import importlib.util
import os
import pathlib
import re
import shlex
import signal
import subprocess
import sys
import time
import warnings

from launch.results import (SweepError, _default_metric, _read_json, collect, find_runs,
                            is_finished)

ROOT = pathlib.Path(__file__).resolve().parents[1]
TRAIN_MODULE = 'adapter_tuning.train'
# Keys that the run name always shows (from the resolved config); others are appended.
NAMED_KEYS = ('trainable', 'model.adapter.size', 'model.adapter.placement', 'learning_rate',
              'num_epochs', 'num_train_steps', 'seed')


# ---------------------------------------------------------------------------------------
# Configs: loading, overriding, and the command-line form of an override.


def load_sweep(config_path: str) -> list:
  spec = importlib.util.spec_from_file_location('_sweep_config', config_path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except Exception as e:  # pylint: disable=broad-except
    raise SweepError(f'could not load {config_path} ({type(e).__name__}: {e})') from None
  if not callable(getattr(module, 'sweep', None)):
    raise SweepError(f'{config_path} has no sweep(); add `def sweep(): return [{{...}}, ...]` '
                     'returning one dict of config overrides per run')
  entries = module.sweep()
  if not isinstance(entries, (list, tuple)) or not entries:
    raise SweepError(f'{config_path}: sweep() returned {entries!r}; it must return a non-empty '
                     'list of dicts of config overrides')
  for i, entry in enumerate(entries, 1):
    if not isinstance(entry, dict) or not all(isinstance(k, str) for k in entry):
      raise SweepError(f'{config_path}: sweep entry {i} is {entry!r}, not a dict of '
                       '"dotted.key": value')
  return [dict(e) for e in entries]


def parse_config(config_path: str, args: list[str]):
  """The config exactly as `adapter_tuning.train` sees it with these --config.* args."""
  from absl import flags
  from ml_collections import config_flags
  argv = ['train', f'--config={config_path}', *args]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file('config', config_path, flag_values=fv, lock_config=True,
                                  sys_argv=argv)
  with warnings.catch_warnings():  # ml_collections loads config files with load_module()
    warnings.simplefilter('ignore', DeprecationWarning)
    fv(argv)
    return fv.config


def _field_type(config, key: str):
  from ml_collections.config_flags import config_path as cp
  return cp.get_type(key, config)


def apply_override(config, key: str, value):
  """config[key] = value for a dotted key; unknown keys and wrong types raise SweepError."""
  *parents, leaf = key.split('.')
  node = config
  for part in parents:
    if part not in node or not hasattr(node[part], 'keys'):
      raise SweepError(f'unknown config key {key!r}')
    node = node[part]
  if leaf not in node:
    raise SweepError(f'unknown config key {key!r}')
  try:
    node[leaf] = value
  except (TypeError, ValueError) as e:
    raise SweepError(f'{key}={value!r} has the wrong type ({str(e).splitlines()[0]})') from None


def _one_line(e: BaseException) -> str:
  """absl / ml_collections messages (a KeyError's repr with a 'Did you mean') on one line."""
  text = str(e).replace('\\n', ' ').replace('\\', '')
  if isinstance(e, (KeyError, AttributeError)):
    text = 'unknown config key ' + text.replace("'", '')
  return ' '.join(text.split())


def _literal(text: str):
  if text in ('true', 'false'):
    return text == 'true'
  try:
    return ast.literal_eval(text)
  except (SyntaxError, ValueError):
    return text


def format_value(value, ftype) -> str:
  """The text after `--config.key=` that ml_collections parses back into `value`."""
  if ftype is bool or isinstance(value, bool):
    return str(bool(value))
  if ftype is str:
    return str(value)
  if isinstance(value, str):  # an object-typed field: literals are parsed, so quote if needed
    return value if _literal(value) == value and isinstance(_literal(value), str) else repr(value)
  if isinstance(value, float):
    return repr(value)
  if isinstance(value, list):
    value = tuple(value)
  return repr(value)


def _sci(x: float) -> str:
  mantissa, exponent = f'{x:.6e}'.split('e')
  mantissa = mantissa.rstrip('0').rstrip('.')
  return f'{mantissa}e{int(exponent)}'


def _token(value) -> str:
  if isinstance(value, float):
    text = f'{value:g}' if 0.01 <= abs(value) < 1000 or value == 0 else _sci(value)
  elif isinstance(value, (list, tuple)):
    text = '-'.join(_token(v) for v in value)
  else:
    text = str(value)
  text = re.sub(r'[^A-Za-z0-9.+-]+', '-', text).strip('-') or 'x'
  if len(text) > 32:
    text = text[:16] + '-' + hashlib.sha1(text.encode()).hexdigest()[:8]
  return text


def run_name(config, entry: dict) -> str:
  trainable = config.trainable
  if isinstance(trainable, str):
    parts = [_token(trainable.replace(':', ''))]
  else:
    parts = ['rules' + hashlib.sha1(repr(trainable).encode()).hexdigest()[:6]]
  placement = config.model.adapter.placement
  if placement != 'none':
    if placement != 'houlsby':
      parts.append(_token(placement))
    parts.append(f'm{config.model.adapter.size}')
  parts.append(f'lr{_sci(config.learning_rate)}')
  parts.append(f'st{config.num_train_steps}' if config.num_train_steps
               else f'ep{config.num_epochs:g}')
  for key, value in entry.items():
    if key not in NAMED_KEYS:
      parts.append(key.rsplit('.', 1)[-1] + _token(value))
  parts.append(f's{config.seed}')
  return '_'.join(parts)


class Run:
  """One point of the sweep: its name, its --config.* args and its resolved config."""

  def __init__(self, name: str, entry: dict, args: list[str], config_dict: dict):
    self.name, self.entry, self.args, self.config = name, entry, args, config_dict

  def command(self, python: str, config_path: str, workdir: str, extras: list[str]) -> list[str]:
    return [python, '-m', TRAIN_MODULE, '--config', config_path,
            '--workdir', os.path.join(workdir, self.name), *self.args, *extras]


def expand(config_path: str, extras: list[str], seeds: list[int] | None) -> list[Run]:
  """The sweep's runs in order (entries x seeds), validated against the config."""
  entries = load_sweep(config_path)
  config_extras = [a for a in extras if a.startswith('--config.')]
  for arg in config_extras:
    if '=' not in arg:
      raise SweepError(f'write the extra override {arg} as --config.key=value')
  try:
    base = parse_config(config_path, config_extras)
  except Exception as e:  # pylint: disable=broad-except  # absl / ml_collections errors
    raise SweepError(f'in the extra overrides {" ".join(config_extras)}: {_one_line(e)}') from None
  extra_keys = {a.split('=', 1)[0][len('--config.'):] for a in config_extras}
  if seeds is not None and 'seed' in extra_keys:
    raise SweepError('--config.seed and --seeds both set the seed; use one')
  runs, by_name = [], {}
  for i, entry in enumerate(entries, 1):
    for seed in (seeds if seeds is not None else [None]):
      point = dict(entry) if seed is None else {**entry, 'seed': seed}
      where = f'sweep entry {i} {entry!r}'
      clash = sorted(extra_keys & set(point))
      if clash:
        raise SweepError(f'--config.{clash[0]} after -- is also set by {where}; the sweep '
                         'would collapse: drop it, or edit the sweep')
      config = copy.deepcopy(base)
      args = []
      for key, value in point.items():
        try:
          apply_override(config, key, value)
          args.append(f'--config.{key}={format_value(value, _field_type(config, key))}')
        except SweepError as e:
          raise SweepError(f'{where}: {e}') from None
      try:  # the command line must mean exactly this config
        parsed = parse_config(config_path, args + config_extras)
      except Exception as e:  # pylint: disable=broad-except
        raise SweepError(f'{where}: {_one_line(e)}') from None
      expected = config.to_dict()
      if parsed.to_dict() != expected:
        raise SweepError(f'{where}: its overrides {args} do not survive the command line; '
                         'use plain numbers, strings or tuples')
      name = run_name(config, point)
      if name in by_name:
        if by_name[name].config != expected:
          raise SweepError(f'{where} and an earlier entry get the same run name {name}; make '
                           'them differ in a named key')
        print(f'note: {where} repeats run {name}; running it once', file=sys.stderr)
        continue
      run = Run(name, point, args, expected)
      by_name[name] = run
      runs.append(run)
  return runs


# ---------------------------------------------------------------------------------------
# Running.


class _Stop:
  """SIGTERM during a local sweep: pass it to the running trainer (which checkpoints), stop."""

  def __init__(self):
    self.proc = None
    self.stopped = False

  def __call__(self, signum, frame):
    self.stopped = True
    if self.proc is not None and self.proc.poll() is None:
      self.proc.send_signal(signal.SIGTERM)


def run_local(runs: list[Run], config_path: str, workdir: pathlib.Path, python: str,
              extras: list[str], metric: str | None) -> int:
  """Runs one after another; returns 0 if all finished, 1 if some did not, 130 on Ctrl-C."""
  logs = workdir / 'logs'
  logs.mkdir(parents=True, exist_ok=True)
  env = dict(os.environ)
  env['PYTHONPATH'] = os.pathsep.join(p for p in (str(ROOT), env.get('PYTHONPATH')) if p)
  stop = _Stop()
  previous = signal.signal(signal.SIGTERM, stop)
  failed, width = 0, len(str(len(runs)))
  try:
    for i, run in enumerate(runs, 1):
      if stop.stopped:
        print('SIGTERM: stopping the sweep; rerun the same command to go on', flush=True)
        return 1
      run_dir = workdir / run.name
      head = f'[{i:>{width}}/{len(runs)}] {run.name}'
      if is_finished(run_dir):
        print(f'{head}  done already, skipped', flush=True)
        continue
      resuming = (run_dir / 'checkpoints').exists()
      print(f'{head}  {"resuming" if resuming else "running"} ... ', end='', flush=True)
      cmd = run.command(python, config_path, str(workdir), extras)
      log_path = logs / f'{run.name}.log'
      start = time.time()
      with open(log_path, 'a') as log:
        log.write(f'# {time.strftime("%Y-%m-%d %H:%M:%S")} {shlex.join(cmd)}\n')
        log.flush()
        stop.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        interrupted = False
        while True:
          try:
            rc = stop.proc.wait()
            break
          except KeyboardInterrupt:  # the trainer got the Ctrl-C too: let it save and exit
            interrupted = True
        stop.proc = None
      secs = time.time() - start
      if interrupted or rc == 130:
        print(f'interrupted after {secs:.0f}s; rerun the same command to resume', flush=True)
        return 130
      if rc == 0 and is_finished(run_dir):
        print(f'ok {secs:.0f}s  {_score_text(run_dir, metric)}', flush=True)
      elif rc == 0:
        failed += 1
        print(f'stopped after {secs:.0f}s with a checkpoint; rerun to resume', flush=True)
      elif ' is in use by ' in _last_error(log_path):  # another sweep or job runs it now
        failed += 1
        print(f'busy, skipped: {_last_error(log_path)}', flush=True)
      else:
        failed += 1
        print(f'FAILED (exit {rc}) {_last_error(log_path)}  [log: {log_path}]', flush=True)
  finally:
    signal.signal(signal.SIGTERM, previous)
  return 1 if failed else 0


def _score_text(run_dir: pathlib.Path, metric: str | None) -> str:
  art = _read_json(run_dir / 'adapter' / 'config.json') or {}
  final = art.get('final_metrics') or {}
  key = metric or _default_metric(art)
  return f'{key}={final[key]:.4f}' if isinstance(final.get(key), (int, float)) else ''


def _last_error(log_path: pathlib.Path) -> str:
  lines = [l.strip() for l in log_path.read_text(errors='replace').splitlines() if l.strip()]
  errors = [l for l in lines if l.startswith('error:')]
  return (errors or lines or [''])[-1][:200]


# ---------------------------------------------------------------------------------------
# Command line.


class _Parser(argparse.ArgumentParser):

  def error(self, message):
    print(f'error: {message}; see python -m launch.sweep --help', file=sys.stderr)
    sys.exit(2)


def _parser() -> argparse.ArgumentParser:
  p = _Parser(prog='python -m launch.sweep', description=__doc__.split('\n\n')[0],
              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--config', help='config file with a sweep(), e.g. configs/glue_sst2.py')
  p.add_argument('--workdir', required=True, help='sweep folder: one sub-folder per run')
  p.add_argument('--mode', choices=('local', 'print'), default='local',
                 help='local: run one after another; print: print the commands')
  p.add_argument('--seeds', help='comma-separated seeds, e.g. 0,1,2 (default: the config\'s)')
  p.add_argument('--metric', help='validation metric key (default: the task\'s headline, '
                 'e.g. eval/accuracy)')
  p.add_argument('--select', choices=('final', 'best'), default='final',
                 help='rank settings by the final eval or the best eval seen during training')
  p.add_argument('--only', type=int, help='only the first N runs')
  p.add_argument('--collect-only', action='store_true',
                 help='only collect results from the run folders in --workdir')
  p.add_argument('--python', help='interpreter in the commands (default: this one for local, '
                 '"python" for print)')
  return p


def main(argv=None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  extras = []
  if '--' in argv:
    extras = argv[argv.index('--') + 1:]
    argv = argv[:argv.index('--')]
  try:
    args = _parser().parse_args(argv)
  except SystemExit as e:  # --help (0) or a usage error, already reported (2)
    return e.code
  try:
    for arg in extras:
      name = arg.split('=', 1)[0]
      if name in ('--workdir', '--config') or not arg.startswith('-'):
        raise SweepError(f'{arg} after --: give only per-run flags such as --config.key=value '
                         '(the sweep sets --config and --workdir)')
    workdir = pathlib.Path(args.workdir)
    if args.collect_only:
      collect(workdir, args.metric, args.select)
      return 0
    if not args.config:
      raise SweepError('--config is required (a config file with a sweep())')
    if not os.path.isfile(args.config):
      raise SweepError(f'config file {args.config} does not exist')
    seeds = None
    if args.seeds is not None:
      try:
        seeds = [int(s) for s in args.seeds.split(',') if s.strip()]
      except ValueError:
        raise SweepError(f'--seeds {args.seeds!r}: give integers like 0,1,2') from None
      if not seeds:
        raise SweepError('--seeds is empty')
    if args.only is not None and args.only < 1:
      raise SweepError('--only N needs N >= 1')
    runs = expand(args.config, extras, seeds)[:args.only]
    if args.mode == 'print':
      lines = [shlex.join(run.command(args.python or 'python', args.config, args.workdir,
                                      extras)) for run in runs]
      try:
        print('\n'.join(lines), flush=True)
      except BrokenPipeError:  # `| head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
      return 0
    workdir.mkdir(parents=True, exist_ok=True)
    print(f'{len(runs)} runs in {workdir}', flush=True)
    rc = run_local(runs, args.config, workdir, args.python or sys.executable, extras,
                   args.metric)
    if find_runs(workdir):
      collect(workdir, args.metric, args.select)
    return rc
  except SweepError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2


if __name__ == '__main__':
  sys.exit(main())
