"""launch/: sweep expansion, names and commands; print mode; collection, best-per-method
selection and the trade-off plot on fake run folders; local mode with a fake trainer; the
TPU pod and Slurm launchers' command lines; and a 2-run demo sweep end to end."""

import json
import os
import pathlib
import shlex
import subprocess
import sys
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))

from launch import results, sweep  # pylint: disable=g-import-not-at-top

PNG_MAGIC = b'\x89PNG\r\n\x1a\n'


def _config_file(tmp_path, body: str, name='cfg') -> str:
  """A config in TMP/configs/NAME.py that builds on configs/common.py."""
  path = tmp_path / 'configs' / f'{name}.py'
  path.parent.mkdir(exist_ok=True)
  path.write_text('from configs import common\n\ndef get_config():\n  return common.get_config()\n'
                  + textwrap.dedent(body))
  return str(path)


def _main(capsys, *argv):
  rc = sweep.main([str(a) for a in argv])
  out, err = capsys.readouterr()
  return rc, out, err


# --- expansion, names, commands ----------------------------------------------------------


def test_demo_sweep_names_and_commands():
  runs = sweep.expand('configs/demo.py', [], None)
  assert [r.name for r in runs] == ['adapters_m8_lr3e-3_ep3_s0', 'adapters_m32_lr3e-3_ep3_s0',
                                    'head_lr3e-3_ep3_s0']
  assert runs[2].command('python', 'configs/demo.py', 'sw', ['--config.num_train_steps=20']) == [
      'python', '-m', 'adapter_tuning.train', '--config', 'configs/demo.py',
      '--workdir', os.path.join('sw', 'head_lr3e-3_ep3_s0'), '--config.trainable=head',
      '--config.model.adapter.placement=none', '--config.num_train_steps=20']


def test_extra_overrides_and_seeds_shape_the_names():
  runs = sweep.expand('configs/demo.py', ['--config.num_train_steps=20', '--verbose'], [0, 1])
  assert [r.name for r in runs][:3] == ['adapters_m8_lr3e-3_st20_s0', 'adapters_m8_lr3e-3_st20_s1',
                                        'adapters_m32_lr3e-3_st20_s0']
  assert runs[1].args == ['--config.model.adapter.size=8', '--config.seed=1']
  assert runs[1].config['num_train_steps'] == 20 and runs[1].config['seed'] == 1


def test_paper_grid_expansion():
  runs = sweep.expand('configs/glue_sst2.py', [], [0, 1])
  names = [r.name for r in runs]
  assert len(runs) == 40 and len(set(names)) == 40
  assert 'adapters_m64_lr3e-4_ep3_s0' in names and 'adapters_m256_lr3e-3_ep20_s1' in names
  assert 'full_lr5e-5_ep3_s1' in names  # full fine-tuning: no adapters, so no size
  run = runs[names.index('adapters_m64_lr3e-4_ep3_s0')]
  assert run.config['model']['adapter']['size'] == 64 and run.config['learning_rate'] == 3e-4


def test_awkward_values_survive_the_command_line(tmp_path):
  rules = (('^head/', 'train'), ('layer_norm', 'train'), ('.*', 'freeze'))
  cfg = _config_file(tmp_path, f"""
      def sweep():
        return [{{'trainable': {rules!r}}},
                {{'trainable': 'top:2', 'model.adapter.placement': 'none'}},
                {{'model.adapter.layers': (6, 7), 'model.adapter.init_scale': 1e-2,
                  'data.data_dir': '/data/my glue', 'model.remat': True}},
                {{'trainable': 'true'}},  # a string that looks like a literal
                {{'model.adapter.placement': 'pfeiffer', 'num_epochs': 20}}]
      """)
  runs = sweep.expand(cfg, [], None)
  assert runs[0].name.startswith('rules') and runs[0].name.endswith('_m64_lr3e-4_ep3_s0')
  assert runs[1].name == 'top2_lr3e-4_ep3_s0'
  assert runs[2].name == 'adapters_m64_lr3e-4_ep3_layers6-7_init_scale0.01_data_dirdata-my-glue_rematTrue_s0'
  assert runs[4].name == 'adapters_pfeiffer_m64_lr3e-4_ep20_s0'
  # What adapter_tuning.train parses from each command line is the intended config.
  for run in runs:
    assert sweep.parse_config(cfg, run.args).to_dict() == run.config
  assert sweep.parse_config(cfg, runs[0].args).trainable == rules
  assert sweep.parse_config(cfg, runs[3].args).trainable == 'true'
  assert sweep.expand(cfg, [], None)[2].name == runs[2].name


def test_duplicate_entries_run_once(tmp_path, capsys):
  cfg = _config_file(tmp_path, """
      def sweep():
        return [{'learning_rate': 3e-4}, {}, {'model.adapter.size': 8}]
      """)
  assert [r.name for r in sweep.expand(cfg, [], None)] == ['adapters_m64_lr3e-4_ep3_s0',
                                                           'adapters_m8_lr3e-4_ep3_s0']
  assert 'repeats run adapters_m64_lr3e-4_ep3_s0' in capsys.readouterr().err


@pytest.mark.parametrize('body,extra,needles', [
    ("def sweep():\n  return [{'learning_rate': 1e-3}, {'model.adaptr.size': 8}]\n", [],
     ['sweep entry 2', 'model.adaptr.size', 'unknown config key']),
    ("def sweep():\n  return [{'learning_rate': 'fast'}]\n", [],
     ['sweep entry 1', 'learning_rate', 'wrong type']),
    ("def sweep():\n  return [{'batch_size': 3.5}]\n", [], ['sweep entry 1', 'batch_size']),
    ('', [], ['has no sweep()']),
    ("def sweep():\n  return []\n", [], ['non-empty list']),
    ("def sweep():\n  return ['lr=1']\n", [], ['sweep entry 1', 'not a dict']),
    ("def sweep():\n  return [{'learning_rate': 1e-3}]\n", ['--config.learning_rate=1e-2'],
     ['--config.learning_rate', 'also set by sweep entry 1']),
    ("def sweep():\n  return [{}]\n", ['--config.lerning_rate=1'],
     ['extra overrides', 'lerning_rate', 'learning_rate']),
    ("def sweep():\n  return [{}]\n", ['--workdir=x'], ['--workdir=x']),
    ("def sweep():\n  return [{}]\n", ['--config.seed=3', '--seeds-flag'], ['--config.seed']),
])
def test_bad_sweeps_are_one_line_errors(tmp_path, capsys, body, extra, needles):
  cfg = _config_file(tmp_path, body)
  seeds = []
  if '--seeds-flag' in extra:
    extra, seeds = [e for e in extra if e != '--seeds-flag'], ['--seeds', '0,1']
  rc, out, err = _main(capsys, '--config', cfg, '--workdir', tmp_path / 'sw', '--mode', 'print',
                       *seeds, '--', *extra)
  assert rc == 2 and not out
  lines = err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('error: '), err
  for needle in needles:
    assert needle in lines[0], lines[0]
  assert not (tmp_path / 'sw').exists()


@pytest.mark.parametrize('argv,needle', [
    (['--config', 'configs/nope.py'], 'configs/nope.py does not exist'),
    (['--config', 'configs/demo.py', '--seeds', 'a,b'], '--seeds'),
    (['--config', 'configs/demo.py', '--only', '0'], '--only'),
    (['--config', 'configs/demo.py', '--mode', 'cluster'], '--mode'),
    ([], '--config is required'),
    (['--collect-only'], 'does not exist'),
])
def test_bad_arguments(tmp_path, capsys, argv, needle):
  rc, _, err = _main(capsys, '--workdir', tmp_path / 'none', *argv)
  assert rc == 2
  assert len(err.strip().splitlines()) == 1 and needle in err, err


# --- print mode -----------------------------------------------------------------------------


def test_print_mode_prints_one_command_per_run(tmp_path):
  out = subprocess.run(
      [sys.executable, '-m', 'launch.sweep', '--config', 'configs/demo.py', '--workdir', 'runs/sw',
       '--mode', 'print', '--only', '2', '--', '--config.num_train_steps=20'],
      cwd=ROOT, capture_output=True, text=True, timeout=60, check=True).stdout
  lines = out.strip().splitlines()
  assert len(lines) == 2
  assert shlex.split(lines[1]) == [
      'python', '-m', 'adapter_tuning.train', '--config', 'configs/demo.py',
      '--workdir', 'runs/sw/adapters_m32_lr3e-3_st20_s0', '--config.model.adapter.size=32',
      '--config.num_train_steps=20']
  assert not (ROOT / 'runs' / 'sw').exists()


# --- collection, selection, plot -----------------------------------------------------------


def _fake_run(workdir, name, *, trainable='adapters', size=8, placement='houlsby', lr=3e-4,
              seed=0, pct=1.0, evals=(0.8,), finished=True, metric='accuracy'):
  """A run folder as adapter_tuning.train leaves it: config.json, metrics.jsonl, adapter/."""
  d = pathlib.Path(workdir) / name
  d.mkdir(parents=True)
  cfg = {'trainable': trainable, 'learning_rate': lr, 'num_epochs': 3.0, 'num_train_steps': 0,
         'seed': seed, 'data': {'task': 'glue/sst2'},
         'model': {'adapter': {'size': size, 'placement': placement}}}
  (d / 'config.json').write_text(json.dumps(cfg))
  lines = [json.dumps({'step': 10 * (i + 1), 'train/loss': 0.5}) + '\n' +
           json.dumps({'step': 10 * (i + 1), f'eval/{metric}': v}) for i, v in enumerate(evals)]
  (d / 'metrics.jsonl').write_text('\n'.join(lines) + '\n{"step": 99, "eval/acc')  # torn line
  if finished:
    (d / 'adapter').mkdir()
    base = 1_000_000
    (d / 'adapter' / 'config.json').write_text(json.dumps({
        'task': 'glue/sst2', 'metric_names': [metric],
        'final_metrics': {f'eval/{metric}': evals[-1]},
        'params': {'total': base + 10, 'adapter': 0, 'head': 10, 'base': base,
                   'trainable': int(base * pct / 100), 'trainable_pct_of_base': pct}}))
  return d


def _fake_sweep(wd):
  _fake_run(wd, 'adapters_m8_lrA_s0', lr=3e-4, seed=0, pct=0.5, evals=(0.85, 0.80))
  _fake_run(wd, 'adapters_m8_lrA_s1', lr=3e-4, seed=1, pct=0.5, evals=(0.90,))
  _fake_run(wd, 'adapters_m8_lrB_s0', lr=3e-3, seed=0, pct=0.5, evals=(0.95,))  # best single run
  _fake_run(wd, 'adapters_m8_lrB_s1', lr=3e-3, seed=1, pct=0.5, evals=(0.70,))  # ... worse mean
  _fake_run(wd, 'adapters_m64_s0', size=64, pct=3.6, evals=(0.91,))
  _fake_run(wd, 'top2_s0', trainable='top:2', placement='none', pct=17.0, evals=(0.88,))
  _fake_run(wd, 'full_s0', trainable='full', placement='none', lr=3e-5, pct=100.01, evals=(0.93,))
  _fake_run(wd, 'head_s0', trainable='head', placement='none', pct=0.001, evals=(0.6,))
  _fake_run(wd, 'adapters_m8_lrC_s0', lr=1e-2, evals=(0.99,), finished=False)  # still running
  (pathlib.Path(wd) / 'logs').mkdir()
  (pathlib.Path(wd) / 'logs' / 'x.log').write_text('not a run\n')


def test_collect_selects_best_setting_on_mean_over_seeds(tmp_path, capsys):
  wd = tmp_path / 'sw'
  _fake_sweep(wd)
  rc, out, _ = _main(capsys, '--workdir', wd, '--collect-only')
  assert rc == 0 and '9 runs (8 finished)' in out
  res = json.loads((wd / 'results.json').read_text())
  assert res['metric'] == 'eval/accuracy' and res['select'] == 'final'
  runs = {r['name']: r for r in res['runs']}
  assert len(runs) == 9
  assert runs['adapters_m8_lrA_s0']['final'] == 0.80 and runs['adapters_m8_lrA_s0']['best'] == 0.85
  assert runs['adapters_m8_lrA_s0']['best_step'] == 10
  assert runs['adapters_m8_lrC_s0']['status'] == 'incomplete'
  assert runs['adapters_m8_lrC_s0']['final'] is None and not runs['adapters_m8_lrC_s0']['selected']
  assert runs['top2_s0']['method'] == 'top:2' and runs['top2_s0']['adapter_size'] is None
  best = {(b['method'], b['adapter_size']): b for b in res['best']}
  assert list(best) == [('head', None), ('top:2', None), ('adapters', 8), ('adapters', 64),
                        ('full', None)]
  m8 = best[('adapters', 8)]
  assert m8['runs'] == ['adapters_m8_lrA_s0', 'adapters_m8_lrA_s1'] and m8['learning_rate'] == 3e-4
  assert m8['mean'] == pytest.approx(0.85) and m8['std'] == pytest.approx(0.0707, abs=1e-4)
  assert m8['n'] == 2 and m8['seeds'] == [0, 1] and m8['pct_of_base'] == 0.5
  assert runs['adapters_m8_lrA_s1']['selected'] and not runs['adapters_m8_lrB_s0']['selected']

  csv_lines = (wd / 'results.csv').read_text().splitlines()
  assert csv_lines[0].split(',') == list(results.CSV_FIELDS) and len(csv_lines) == 10
  assert csv_lines[1].startswith('head_s0,done,head,,none,')
  png = (wd / 'tradeoff.png').read_bytes()
  assert png.startswith(PNG_MAGIC) and len(png) > 5000


def test_collect_on_best_during_training_and_another_metric(tmp_path, capsys):
  wd = tmp_path / 'sw'
  _fake_run(wd, 'a_s0', evals=(0.7, 0.9, 0.8), metric='f1')
  _fake_run(wd, 'a_s1', seed=1, evals=(0.75,), metric='f1')
  rc, _, _ = _main(capsys, '--workdir', wd, '--collect-only', '--select', 'best')
  assert rc == 0
  res = json.loads((wd / 'results.json').read_text())
  assert res['metric'] == 'eval/f1'  # the task's headline metric from the artifact
  assert res['best'][0]['mean'] == pytest.approx((0.9 + 0.75) / 2)
  rc, _, _ = _main(capsys, '--workdir', wd, '--collect-only', '--metric', 'eval/accuracy')
  res = json.loads((wd / 'results.json').read_text())
  assert rc == 0 and res['best'] == [] and res['runs'][0]['final'] is None
  assert (wd / 'tradeoff.png').read_bytes().startswith(PNG_MAGIC)  # says "no finished runs"


def test_collect_only_without_runs(tmp_path, capsys):
  (tmp_path / 'empty').mkdir()
  rc, _, err = _main(capsys, '--workdir', tmp_path / 'empty', '--collect-only')
  assert rc == 2 and 'holds no runs' in err


# --- local mode with a fake trainer ----------------------------------------------------------

FAKE_TRAINER = '''#!{python}
"""Stands in for `python -m adapter_tuning.train`: writes what a run leaves, fast."""
import ast, json, os, pathlib, sys
args = sys.argv[1:]
assert args[:2] == ['-m', 'adapter_tuning.train'], args
workdir = pathlib.Path(args[args.index('--workdir') + 1])
over = {{}}
for a in args:
  if a.startswith('--config.'):
    k, v = a[len('--config.'):].split('=', 1)
    try:
      over[k] = ast.literal_eval(v)
    except (ValueError, SyntaxError):
      over[k] = v
with open(os.environ['FAKE_CALLS'], 'a') as f:
  f.write(workdir.name + '\\n')
lr = over.get('learning_rate', 3e-4)
if str(lr) == os.environ.get('FAKE_FAIL_LR'):
  print('error: the fake trainer fails at this learning rate', file=sys.stderr)
  sys.exit(1)
workdir.mkdir(parents=True, exist_ok=True)
size = over.get('model.adapter.size', 64)
cfg = {{'trainable': over.get('trainable', 'adapters'), 'learning_rate': lr, 'num_epochs': 3.0,
       'num_train_steps': 0, 'seed': over.get('seed', 0), 'data': {{'task': 'fake'}},
       'model': {{'adapter': {{'size': size, 'placement': 'houlsby'}}}}}}
(workdir / 'config.json').write_text(json.dumps(cfg))
score = 0.5 + size / 1000 + lr
(workdir / 'metrics.jsonl').write_text(json.dumps({{'step': 5, 'eval/accuracy': score}}) + '\\n')
if os.environ.get('FAKE_STOP') == workdir.name:  # SIGTERM-style: checkpoint, exit 0
  (workdir / 'checkpoints').mkdir(exist_ok=True)
  sys.exit(0)
(workdir / 'adapter').mkdir(exist_ok=True)
(workdir / 'adapter' / 'config.json').write_text(json.dumps({{
    'task': 'fake', 'metric_names': ['accuracy'], 'final_metrics': {{'eval/accuracy': score}},
    'params': {{'total': 1100, 'adapter': 90, 'head': 10, 'base': 1000, 'trainable': size,
               'trainable_pct_of_base': size / 10}}}}))
'''


def test_local_mode_skips_finished_and_reruns_the_rest(tmp_path, capsys, monkeypatch):
  fake = tmp_path / 'fake_python'
  fake.write_text(FAKE_TRAINER.format(python=sys.executable))
  fake.chmod(0o755)
  calls = tmp_path / 'calls.txt'
  monkeypatch.setenv('FAKE_CALLS', str(calls))
  monkeypatch.setenv('FAKE_FAIL_LR', '0.001')
  monkeypatch.setenv('FAKE_STOP', 'adapters_m16_lr3e-4_ep3_s0')
  cfg = _config_file(tmp_path, """
      def sweep():
        return [{'model.adapter.size': s, 'learning_rate': lr}
                for s in (8, 16) for lr in (3e-4, 1e-3)]
      """)
  wd = tmp_path / 'sw'
  argv = ['--config', cfg, '--workdir', wd, '--python', fake]
  rc, out, _ = _main(capsys, *argv)
  assert rc == 1
  lines = out.splitlines()
  assert lines[0] == f'4 runs in {wd}'
  assert lines[1].startswith('[1/4] adapters_m8_lr3e-4_ep3_s0  running ... ok ')
  assert lines[1].endswith('eval/accuracy=0.5083')
  assert lines[2].startswith('[2/4] adapters_m8_lr1e-3_ep3_s0  running ... FAILED (exit 1) '
                             'error: the fake trainer fails')
  assert lines[3].startswith('[3/4] adapters_m16_lr3e-4_ep3_s0  running ... stopped')
  assert 'FAILED' in lines[4]
  assert (wd / 'logs' / 'adapters_m8_lr1e-3_ep3_s0.log').read_text().count('error:') == 1
  res = json.loads((wd / 'results.json').read_text())
  assert [b['setting'] for b in res['best']] == ['adapters_m8_lr3e-4_ep3']

  monkeypatch.delenv('FAKE_FAIL_LR')
  monkeypatch.delenv('FAKE_STOP')
  calls.write_text('')
  rc, out, _ = _main(capsys, *argv)
  assert rc == 0
  lines = out.splitlines()
  assert lines[1] == '[1/4] adapters_m8_lr3e-4_ep3_s0  done already, skipped'
  assert lines[3].startswith('[3/4] adapters_m16_lr3e-4_ep3_s0  resuming ... ok')
  assert calls.read_text().split() == ['adapters_m8_lr1e-3_ep3_s0', 'adapters_m16_lr3e-4_ep3_s0',
                                       'adapters_m16_lr1e-3_ep3_s0']
  res = json.loads((wd / 'results.json').read_text())
  assert [b['setting'] for b in res['best']] == ['adapters_m8_lr1e-3_ep3', 'adapters_m16_lr1e-3_ep3']


# --- cluster launchers ----------------------------------------------------------------------


def _bash(args, env_extra=None, path_dir=None):
  env = dict(os.environ)
  if path_dir:
    env['PATH'] = f'{path_dir}{os.pathsep}{env["PATH"]}'
  env.update(env_extra or {})
  return subprocess.run(['bash', *args], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=60)


def _trap_gcloud(tmp_path):
  """A gcloud on PATH that fails the test if anything calls it."""
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir(exist_ok=True)
  (bin_dir / 'gcloud').write_text('#!/bin/sh\necho "gcloud was called" >&2\nexit 99\n')
  (bin_dir / 'gcloud').chmod(0o755)
  return bin_dir


def test_tpu_pod_dry_run_prints_the_gcloud_commands(tmp_path):
  rules = "--config.trainable=(('^head/','train'),('.*','freeze'))"
  train = ['--config', 'configs/glue_mnli.py', '--workdir', 'runs/mnli 1', rules]
  r = _bash(['launch/tpu_pod.sh', '--dry-run', '--name', 'ad-pod', '--zone', 'us-central2-b',
             '--type', 'v4-64', '--project', 'proj', '--spot', '--', *train],
            path_dir=_trap_gcloud(tmp_path))
  assert r.returncode == 0, r.stderr
  lines = r.stdout.strip().splitlines()
  where = ['--zone=us-central2-b', '--project=proj']
  gc = ['gcloud', 'compute', 'tpus', 'tpu-vm']
  cmds = [shlex.split(l) for l in lines]
  assert cmds[0] == gc + ['create', 'ad-pod', *where, '--accelerator-type=v4-64',
                          '--version=tpu-ubuntu2204-base', '--spot']
  assert lines[1].startswith('git -C ') and '--exclude-standard' in lines[1]
  assert cmds[2] == gc + ['scp', '/tmp/adapter_tuning_src_ad-pod.tgz',
                          'ad-pod:adapter_tuning_src.tgz', *where, '--worker=all']
  ssh_all = gc + ['ssh', 'ad-pod', *where, '--worker=all']
  assert cmds[3][:-1] == ssh_all and 'tar -xzf adapter_tuning_src.tgz' in cmds[3][-1]
  assert cmds[4][:-1] == ssh_all and "'jax[tpu]==0.10.2'" in cmds[4][-1]
  assert cmds[5][:-1] == ssh_all
  remote = cmds[5][-1][len('--command='):]
  prefix = 'cd adapter_tuning && '
  assert remote.startswith(prefix)
  # What the worker's shell runs is the training command line given after --, with
  # --distributed so that every worker joins jax.distributed.
  assert shlex.split(remote[len(prefix):]) == [
      '.venv/bin/python', '-m', 'adapter_tuning.train', '--distributed', *train]
  assert cmds[6][:-1] == gc + ['ssh', 'ad-pod', *where, '--worker=0']
  assert cmds[7] == gc + ['scp', 'ad-pod:adapter_tuning/adapter_tuning_results.tgz',
                          '/tmp/adapter_tuning_results_ad-pod.tgz', *where, '--worker=0']
  assert cmds[8:] == [['mkdir', '-p', 'runs/mnli 1'],
                      ['tar', '-xzf', '/tmp/adapter_tuning_results_ad-pod.tgz', '-C', 'runs/mnli 1']]


def test_tpu_pod_env_vars_steps_and_errors(tmp_path):
  trap = _trap_gcloud(tmp_path)
  r = _bash(['launch/tpu_pod.sh', '--dry-run', '--steps', 'train,delete', '--', '--config',
             'configs/demo.py', '--workdir=runs/d'], path_dir=trap,
            env_extra={'TPU_NAME': 'p', 'TPU_ZONE': 'europe-west4-a'})
  assert r.returncode == 0, r.stderr
  lines = r.stdout.strip().splitlines()
  assert len(lines) == 2 and 'adapter_tuning.train --distributed --config configs/demo.py --workdir=runs/d' in lines[0]
  assert lines[1] == 'gcloud compute tpus tpu-vm delete p --zone=europe-west4-a --quiet'
  for args, needle in [(['--zone', 'z'], '--name'), (['--name', 'p', '--zone', 'z'], '--workdir'),
                       (['--name', 'p', '--zone', 'z', '--steps', 'boot'], "unknown step 'boot'"),
                       (['--nme', 'p'], 'unknown option --nme')]:
    r = _bash(['launch/tpu_pod.sh', '--dry-run', *args], path_dir=trap)
    assert r.returncode == 2 and r.stderr.startswith('error: ') and needle in r.stderr, r.stderr


def test_slurm_sbatch_builds_the_srun_commands(tmp_path):
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  (bin_dir / 'srun').write_text(  # two tasks; strip srun's own options
      '#!/bin/bash\nwhile [[ $1 == --* ]]; do shift; done\n'
      'for i in 0 1; do SLURM_PROCID=$i "$@"; done\n')
  (bin_dir / 'scontrol').write_text('#!/bin/sh\nprintf "gpu-07\\ngpu-08\\n"\n')
  for f in ('srun', 'scontrol'):
    (bin_dir / f).chmod(0o755)
  env = {'SLURM_SUBMIT_DIR': str(ROOT), 'SLURM_JOB_ID': '4321', 'SLURM_NTASKS': '2',
         'SLURM_JOB_NODELIST': 'gpu-[07-08]', 'PYTHON': 'echo'}
  args = ['launch/slurm.sbatch', '--config', 'configs/glue_mnli.py', '--workdir', 'runs/m n']
  r = _bash(args, env, bin_dir)
  assert r.returncode == 0, r.stderr
  assert r.stdout.splitlines() == ['-m adapter_tuning.train --config configs/glue_mnli.py '
                                   '--workdir runs/m n'] * 2
  r = _bash(args, {**env, 'TASKS': 'node'}, bin_dir)
  assert r.returncode == 0, r.stderr
  assert r.stdout.splitlines() == [
      f'-m adapter_tuning.train --config configs/glue_mnli.py --workdir runs/m n '
      f'--coordinator_address=gpu-07:24321 --num_processes=2 --process_id={i}' for i in (0, 1)]
  r = _bash(['launch/slurm.sbatch'], env, bin_dir)
  assert r.returncode == 2 and r.stderr.startswith('error: ')


# --- end to end -------------------------------------------------------------------------------


def test_demo_sweep_end_to_end(tmp_path):
  """Two real demo runs (20 steps each), then a rerun that skips both."""
  wd = tmp_path / 'sweep'
  cmd = [sys.executable, '-m', 'launch.sweep', '--config', 'configs/demo.py', '--workdir',
         str(wd), '--only', '2', '--', '--config.num_train_steps=20']
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
  r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
  assert r.returncode == 0, (r.stdout, r.stderr)
  names = ['adapters_m8_lr3e-3_st20_s0', 'adapters_m32_lr3e-3_st20_s0']
  for name in names:
    assert (wd / name / 'adapter' / 'config.json').exists()
    assert f'{name}  running ... ok' in r.stdout
  res = json.loads((wd / 'results.json').read_text())
  assert [x['name'] for x in res['runs']] == names
  assert all(x['status'] == 'done' and 0 <= x['final'] <= 1 for x in res['runs'])
  assert [(b['method'], b['adapter_size']) for b in res['best']] == [('adapters', 8),
                                                                     ('adapters', 32)]
  assert res['runs'][0]['pct_of_base'] < res['runs'][1]['pct_of_base']
  assert len((wd / 'results.csv').read_text().splitlines()) == 3
  png = (wd / 'tradeoff.png').read_bytes()
  assert png.startswith(PNG_MAGIC) and len(png) > 5000
  r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
  assert r.returncode == 0 and r.stdout.count('done already, skipped') == 2, r.stdout

