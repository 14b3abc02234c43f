"""Regression heads learn (issue 21): standardised targets, pooling choice, collapse warning."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from adapter_tuning.data import demo
from adapter_tuning.models.heads import TargetScale, head_kind, pool
from adapter_tuning.training.trainer import train_and_evaluate
from conftest import GLUE_DIR, MINILM
from helpers import tiny_config


def test_target_scale_fold_is_the_raw_scale_head():
  labels = np.array([0.0, 1.5, 5.0, 2.25, 3.0])
  scale = TargetScale.from_labels(labels)
  assert scale.mean == pytest.approx(labels.mean()) and scale.std == pytest.approx(labels.std())
  z = scale.standardize(labels)
  assert abs(float(z.mean())) < 1e-6 and float(z.std()) == pytest.approx(1.0, abs=1e-6)
  rng = np.random.default_rng(0)
  x = rng.normal(size=(7, 4)).astype(np.float32)
  head = {'kernel': rng.normal(size=(4, 1)).astype(np.float32),
          'bias': rng.normal(size=(1,)).astype(np.float32)}
  raw = scale.fold(head)
  np.testing.assert_allclose(x @ raw['kernel'] + raw['bias'],
                             (x @ head['kernel'] + head['bias']) * scale.std + scale.mean,
                             rtol=1e-5, atol=1e-5)
  assert TargetScale.from_labels(np.full(4, 3.0)).std == 1.0  # constant labels: no blow-up


def test_pooling_reads_cls_or_the_masked_mean():
  hidden = jnp.arange(2 * 3 * 2, dtype=jnp.float32).reshape(2, 3, 2)
  mask = jnp.array([[1, 1, 0], [1, 1, 1]])
  enc = {'last_hidden_state': hidden, 'pooled': -jnp.ones((2, 2))}
  np.testing.assert_array_equal(pool(enc, mask, 'pooler'), -np.ones((2, 2)))
  np.testing.assert_array_equal(pool(enc, mask, 'cls'), hidden[:, 0])
  np.testing.assert_allclose(pool(enc, mask, 'mean'),
                             [hidden[0, :2].mean(0), hidden[1].mean(0)])


def test_constant_prediction_lines():
  line = head_kind('regression').constant_warning(
      'validation', np.full(50, 2.72359) + 1e-6 * np.arange(50), ())
  assert line.startswith('eval split validation: predictions are constant (2.7236 for all 50')
  assert 'learned only the label mean' in line and 'model.head.pooling' in line
  assert head_kind('regression').constant_warning('validation', np.linspace(0, 5, 50), ()) is None
  classification = head_kind('classification')
  line = classification.constant_warning('validation', np.ones(9, np.int32), ('no', 'yes'))
  assert "class 'yes' for all 9 examples" in line
  assert classification.constant_warning('validation', np.array([0, 1, 1]),
                                         ('no', 'yes')) is None
  assert head_kind('span').constant_warning('validation', {'q1': 'a', 'q2': 'a'}, ()) is None


def _stsb_config(**overrides):
  return tiny_config(MINILM, 'glue/stsb', **{
      'model.adapter.size': 64, 'data.source': 'glue_dir', 'data.data_dir': str(GLUE_DIR),
      'data.max_seq_length': 64, 'data.max_train_examples': 640, 'data.max_eval_examples': 200,
      'num_train_steps': 40, 'learning_rate': 1e-3, **overrides})


def test_stsb_adapters_learn_a_non_constant_positive_predictor(tmp_path, capsys, minilm_dir):
  """Real STS-B, MiniLM, the adapters preset: a few steps already rank pairs (Pearson > 0)."""
  metrics = train_and_evaluate(_stsb_config(), tmp_path / 'run')
  preds = [json.loads(l) for l in (tmp_path / 'run' / 'predictions_validation.jsonl').open()]
  scores = np.array([p['prediction'] for p in preds])
  labels = np.array([p['label'] for p in preds])
  assert len(scores) == 200 and scores.std() > 0.1
  assert np.corrcoef(scores, labels)[0, 1] > 0.3 and metrics['eval/pearson'] > 0.3
  assert 'predictions are constant' not in capsys.readouterr().out
  meta = json.loads((tmp_path / 'run' / 'adapter' / 'config.json').read_text())
  # The train split's scale (STS-B: mean ~2.7, std ~1.5), already folded into head/*.
  assert meta['target_scale']['std'] > 1.0 and 2.0 < meta['target_scale']['mean'] < 3.5


def test_collapsed_classifier_is_reported_in_the_run_log(tmp_path, capsys):
  """A training set of one label but one: the classifier predicts one class everywhere."""
  base = demo.ensure_checkpoint(tmp_path / 'base')
  rows = demo.make_examples('train')[:240]
  with open(tmp_path / 'train.jsonl', 'w') as f:
    for i, r in enumerate(rows[:200]):
      f.write(json.dumps({'text': r['text'], 'label': 'rare' if i == 0 else 'common'}) + '\n')
  with open(tmp_path / 'eval.jsonl', 'w') as f:
    for i, r in enumerate(rows[200:]):
      f.write(json.dumps({'text': r['text'], 'label': 'rare' if i % 2 else 'common'}) + '\n')
  config = tiny_config(base, 'text', **{
      'data.source': 'files', 'data.train_file': str(tmp_path / 'train.jsonl'),
      'data.eval_file': str(tmp_path / 'eval.jsonl'), 'num_train_steps': 20,
      'learning_rate': 1e-2})
  train_and_evaluate(config, tmp_path / 'run')
  out = capsys.readouterr().out
  warnings = [l for l in out.splitlines() if 'predictions are constant' in l]
  assert len(warnings) == 1, out[-2000:]
  assert warnings[0].startswith('warning: eval split ') and "class 'common'" in warnings[0]
