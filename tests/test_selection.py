"""Model selection: the best-on-validation artifact beside the last one, early stopping, and
both surviving a rerun."""

import json

from adapter_tuning.training.selection import BestTracker
from helpers import read_metrics, run_train

ARGS = ('--config', 'configs/demo.py', '--config.num_train_steps=300',
        '--config.eval_every_steps=10', '--config.early_stopping_patience=2',
        '--config.log_every_steps=10', '--config.data.max_train_examples=512')


def test_tracker_counts_evaluations_without_a_new_best():
  t = BestTracker('eval/accuracy', patience=2)
  assert t.update({'eval/accuracy': 0.5}, 10) and t.update({'eval/accuracy': 0.7}, 20)
  assert not t.update({'eval/accuracy': 0.7}, 30) and not t.should_stop
  assert not t.update({'eval/accuracy': float('nan')}, 40) and t.should_stop
  again = BestTracker('eval/accuracy', patience=2)
  again.restore(t.state())
  assert (again.score, again.step, again.should_stop) == (0.7, 20, True)


def test_early_stopping_keeps_the_best_artifact_and_a_rerun_trains_no_further(tmp_path):
  result = run_train(*ARGS, '--workdir', tmp_path)
  assert result.returncode == 0, result.stderr[-2000:]
  assert 'early stopping at step' in result.stdout
  evals = [m for m in read_metrics(tmp_path) if 'eval/accuracy' in m]
  best = max(evals, key=lambda m: (m['eval/accuracy'], -m['step']))
  stopped = max(m['step'] for m in read_metrics(tmp_path) if 'train/loss' in m)
  assert stopped < 300
  meta = json.loads((tmp_path / 'adapter_best' / 'config.json').read_text())
  assert meta['step'] == best['step'] and meta['final_metrics']['eval/accuracy'] == best[
      'eval/accuracy']
  last = json.loads((tmp_path / 'adapter' / 'config.json').read_text())
  assert last['step'] == stopped
  rerun = run_train(*ARGS, '--workdir', tmp_path)
  assert rerun.returncode == 0, rerun.stderr[-2000:]
  assert max(m['step'] for m in read_metrics(tmp_path) if 'train/loss' in m) == stopped
