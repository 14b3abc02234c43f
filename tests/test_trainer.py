"""The whole loop: demo end to end, no frozen param in the optimizer, devices, resume, bad input."""

import json
import re
import signal

import numpy as np
import pytest
from safetensors.numpy import load_file

from helpers import (DEMO_REFERENCE, final_eval, read_metrics, run_train, start_train,
                     wait_for_step)

DEMO = ('--config', 'configs/demo.py')


@pytest.fixture(scope='module')
def demo_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('demo')
  result = run_train(*DEMO, '--workdir', workdir)
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir, result


def test_demo_learns_and_reports(demo_run):
  workdir, result = demo_run
  assert final_eval(workdir)['eval/accuracy'] >= 0.9
  assert 'trainable' in result.stdout and 'adapter artifact' in result.stdout
  meta = json.loads((workdir / 'adapter' / 'config.json').read_text())
  assert meta['label_names'] == ['negative', 'positive']
  assert len(meta['base']['sha256']) == 64
  assert (workdir / 'config.json').exists()
  assert list((workdir / 'tensorboard').iterdir())
  assert any('train/loss' in m for m in read_metrics(workdir))
  # Every train and eval batch ran on an executable compiled ahead (precompile.py).
  assert re.search(r'[1-9]\d* step shapes compiled ahead, 0 batches not', result.stdout)


def test_artifact_holds_only_the_trainable_subtree(demo_run):
  workdir, _ = demo_run
  weights = load_file(str(workdir / 'adapter' / 'weights.safetensors'))
  for key in weights:
    assert '_adapter/' in key or 'layer_norm/' in key or key.startswith('head/'), key
  assert any('_adapter/' in k for k in weights)
  # The frozen base on disk is untouched by training (it is never written).
  from adapter_tuning.interop.pretrained import load_pretrained
  base = load_pretrained(workdir / 'demo_base')
  assert base.identity['sha256'] == json.loads(
      (workdir / 'adapter' / 'config.json').read_text())['base']['sha256']


def _dict_paths(tree) -> set:
  """Paths of a tree's array leaves as tuples of dict keys (attribute/index keys dropped)."""
  import jax
  out = set()
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    if np.ndim(leaf) > 0:
      out.add(tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey)))
  return out


def test_no_frozen_leaf_reaches_the_optimizer_or_the_gradient(minilm_dir):
  """What matters for a frozen base: the optimizer never sees it and the step never returns it.

  (Checking the frozen NumPy arrays after a jitted step would prove nothing: JAX cannot write
  into its inputs.)
  """
  import jax
  from adapter_tuning.interop.pretrained import load_pretrained
  from adapter_tuning.models.heads import TaskModel
  from adapter_tuning.training import steps, trainable
  from adapter_tuning.training.optim import make_optimizer
  from adapter_tuning import config as common
  config = common.get_config()
  pre = load_pretrained(minilm_dir, adapter={'size': 8})
  params = {'encoder': pre.params,
            'head': {'kernel': np.zeros((384, 2), np.float32), 'bias': np.zeros(2, np.float32)}}
  rules = trainable.resolve('adapters', 6)
  train_p, frozen_p = trainable.split(params, rules)
  train_paths, frozen_paths = _dict_paths(train_p), _dict_paths(frozen_p)
  assert train_paths and frozen_paths and not train_paths & frozen_paths
  assert train_paths | frozen_paths == _dict_paths(params)
  # The adapters preset: adapters, LayerNorms and the head; the attention/FFN/embeddings frozen.
  assert all(any('adapter' in k or 'layer_norm' in k for k in p) or p[0] == 'head'
             for p in train_paths)
  assert any('word_embeddings' in p for p in frozen_paths)
  model = TaskModel(pre.config, pre.adapter, 'classification', 2)
  tx = make_optimizer(config, 10)
  state = steps.init_state(train_p, tx, 0)
  # Adam's two moments mirror the trainable tree exactly: no frozen path, nothing missing.
  moment_paths = _dict_paths(state['opt_state'])
  assert moment_paths == train_paths
  adam_leaves = [x for x in jax.tree.leaves(state['opt_state']) if np.ndim(x) > 0]
  assert sum(x.size for x in adam_leaves) == 2 * sum(x.size for x in jax.tree.leaves(train_p))
  batch = pre.tokenizer.pad(*pre.tokenizer.tokenize(['good film', 'bad film'] * 2))
  batch['labels'] = np.array([1, 0, 1, 0], np.int32)
  step = jax.jit(steps.make_train_step(model, tx, 'classification'))
  for _ in range(3):
    state, metrics = step(state, frozen_p, batch)
  assert bool(metrics['finite'])
  assert _dict_paths(state['params']) == train_paths  # the step returns the trainable tree only
  assert _dict_paths(state['opt_state']) == train_paths
  moved = jax.tree.map(lambda a, b: not np.array_equal(a, b), state['params'], train_p)
  assert any(jax.tree.leaves(moved))


def test_eight_devices_match_one_device(tmp_path, demo_reference_run):
  eight = run_train(*DEMO_REFERENCE, '--workdir', tmp_path / 'eight', devices=8)
  assert eight.returncode == 0, eight.stderr[-3000:]
  assert '8 cpu device(s)' in eight.stdout
  a = load_file(str(demo_reference_run / 'adapter' / 'weights.safetensors'))
  b = load_file(str(tmp_path / 'eight' / 'adapter' / 'weights.safetensors'))
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_allclose(a[k], b[k], atol=1e-5, rtol=0, err_msg=k)
  la = [m['train/loss'] for m in read_metrics(demo_reference_run) if 'train/loss' in m]
  lb = [m['train/loss'] for m in read_metrics(tmp_path / 'eight') if 'train/loss' in m]
  np.testing.assert_allclose(la, lb, atol=1e-5)


def test_sigterm_checkpoints_and_rerun_resumes_exactly(tmp_path):
  """Pre-emption: SIGTERM mid-run saves a checkpoint; rerunning finishes bit-identically."""
  args = (*DEMO, '--config.num_train_steps=400', '--config.checkpoint_every_steps=1000',
          '--config.log_every_steps=2', '--config.data.max_train_examples=512')
  full = run_train(*args, '--workdir', tmp_path / 'full')
  assert full.returncode == 0, full.stderr[-3000:]
  part = tmp_path / 'part'
  proc = start_train(*args, '--workdir', part)
  wait_for_step(part, 6, proc)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err[-3000:]
  assert 'received SIGTERM' in out
  assert not (part / 'adapter').exists()
  resumed = run_train(*args, '--workdir', part)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  step = int(re.search(r'resumed from the checkpoint at step (\d+)', resumed.stdout).group(1))
  assert 6 <= step < 400
  a = load_file(str(tmp_path / 'full' / 'adapter' / 'weights.safetensors'))
  b = load_file(str(part / 'adapter' / 'weights.safetensors'))
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  assert final_eval(tmp_path / 'full')['eval/accuracy'] == final_eval(part)['eval/accuracy']
