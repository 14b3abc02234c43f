"""AdapterFusion (peft/fusion.py, interop/adapterhub_fusion.py): two adapters trained on two
tasks, then a fusion of them trained on a third, served, exported to AdapterHub's `Fuse` and
back, resumed after SIGKILL; its adapters' files and predictions untouched throughout."""

import json
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import flax.traverse_util as tu
import numpy as np
import pytest

from adapter_tuning import config as config_lib
from adapter_tuning import export
from adapter_tuning.data import demo
from adapter_tuning.errors import UsageError
from adapter_tuning.interop import artifact
from adapter_tuning.predict import predict_rows
from adapter_tuning.serving.multi_adapter import MultiTaskModel
from adapter_tuning.training.trainer import train_and_evaluate
from conftest import GLUE_DIR
from composition import (ROWS, TOL, borrowing_then_changed, check_predict_cli, digest,
                         glue_config, padded_batch, rows_for)
from helpers import ROOT, read_metrics, run_train, start_train


def _fusion_config(base, adapters, **overrides):
  return glue_config(base, 'glue/mrpc', **{
      'model.adapter.placement': 'none', 'model.fusion.adapters': adapters,
      'num_train_steps': 8, 'learning_rate': 1e-2, **overrides})


@pytest.fixture(scope='module')
def runs(tmp_path_factory, sst2_peft_run):
  """sst2 (conftest's sst2_peft_run: peft preset) and rte (adapters preset: its own
  LayerNorms, unused by a fusion) adapters with weights large enough to matter, then a
  fusion of both on MRPC."""
  root = tmp_path_factory.mktemp('fusion')
  base, sst2 = sst2_peft_run
  train_and_evaluate(glue_config(base, 'glue/rte', trainable='adapters', learning_rate=1e-2,
                             **{'model.adapter.init_scale': 0.3}), root / 'rte')
  adapters = [sst2, root / 'rte' / 'adapter']
  before = {d: (digest(d), predict_rows(MultiTaskModel([d]), rows_for(f'glue/{d.parent.name}'), 8,
                                         32)) for d in adapters}
  train_and_evaluate(_fusion_config(base, ','.join(map(str, adapters))), root / 'fusion')
  return {'root': root, 'base': base, 'adapters': adapters, 'before': before,
          'fusion': root / 'fusion' / 'adapter'}


def test_fusion_trains_only_fusion_layers_head_and_layer_norms(runs):
  meta, trained = artifact.load(runs['fusion'])
  paths = sorted('/'.join(k) for k in tu.flatten_dict(trained))
  assert not [p for p in paths if 'fused_' in p or '_adapter/' in p]
  fusion_paths = [p for p in paths if '_fusion/' in p]
  # 2 layers x 2 sites (houlsby) x query kernel+bias, key kernel+bias, value
  assert len(fusion_paths) == 2 * 2 * 5 and 'head/kernel' in paths
  assert any('layer_norm/' in p for p in paths)  # the `adapters` preset (tiny_config default)
  members = meta['peft']['fusion']['adapters']
  assert [m['path'] for m in members] == [str(d.resolve()) for d in runs['adapters']]
  assert all(m['sha256'] == artifact.content_hash(d) for m, d in zip(members, runs['adapters']))
  # Params moved from their init (V = identity + 1e-6, query ~ N(0, 0.02) from the seed).
  from adapter_tuning import peft
  from adapter_tuning.interop.pretrained import load_pretrained
  init = load_pretrained(runs['base'], peft.config_from_meta(meta)).params
  for site in ('attention', 'ffn'):
    for leaf in (('value',), ('query', 'kernel'), ('key', 'kernel')):
      now = trained['encoder']['layer_1'][f'{site}_fusion']
      start = init['layer_1'][f'{site}_fusion']
      for part in leaf:
        now, start = now[part], start[part]
      assert np.abs(now - start).max() > 1e-4, (site, leaf)
  assert read_metrics(runs['root'] / 'fusion')[-1]


def test_fused_adapters_files_and_predictions_untouched(runs):
  for d, (files, preds) in runs['before'].items():
    assert digest(d) == files
    assert predict_rows(MultiTaskModel([d]), rows_for(f'glue/{d.parent.name}'), 8, 32) == preds


def test_predict_serves_fusion_alone_and_in_mixed_batches(runs, tmp_path):
  alone = predict_rows(MultiTaskModel([runs['fusion']]), ROWS, 8, 32)
  mixed_model = MultiTaskModel([runs['adapters'][0], runs['fusion'], runs['adapters'][1]])
  rows = ROWS + rows_for('glue/sst2') + rows_for('glue/rte')
  mixed = predict_rows(mixed_model, rows, 8, 32)
  for got, want in zip(mixed, alone + runs['before'][runs['adapters'][0]][1]
                       + runs['before'][runs['adapters'][1]][1]):
    assert got['task'] == want['task'] and got['label'] == want['label']
    np.testing.assert_allclose(got['logits'], want['logits'], atol=1e-6)
  check_predict_cli(runs['fusion'], alone, tmp_path)


def _adapterhub_logits(out: pathlib.Path, base, batch):
  import adapters
  import torch
  from adapters.composition import Fuse
  names = json.loads((out / 'fusion' / 'adapter_fusion_config.json').read_text())['adapter_names']
  model = adapters.AutoAdapterModel.from_pretrained(str(base))
  for name in names:
    model.load_adapter(str(out / 'adapters' / name), with_head=False)
  model.load_adapter_fusion(str(out / 'fusion'))
  model.load_head(str(out / 'head'))
  if (out / 'layer_norms.safetensors').exists():  # the README's step
    from safetensors.torch import load_file
    result = model.base_model.load_state_dict(load_file(str(out / 'layer_norms.safetensors')),
                                              strict=False)
    assert not result.unexpected_keys
  model.set_active_adapters(Fuse(*names))
  model.active_head = json.loads((out / 'head' / 'head_config.json').read_text())['name']
  model.eval()
  with torch.no_grad():
    return model(**{k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}).logits.numpy()


def _sharpened(fusion_dir, out):
  """The fusion artifact with large random Q, K, V (peaked, input-dependent attention) and a
  large head (the tiny random base's logits barely move otherwise), so a transposed or
  swapped tensor in the export could not pass."""
  meta, params = artifact.load(fusion_dir)
  rng = np.random.default_rng(1)
  flat = tu.flatten_dict(params)
  for k, v in flat.items():
    if any(p.endswith('_fusion') for p in k):
      flat[k] = (np.eye(v.shape[0]) if k[-1] == 'value' else 0) + rng.normal(0, 0.5, v.shape)
    elif k == ('head', 'kernel'):
      flat[k] = rng.normal(0, 20.0, v.shape)
  artifact.save(out, tu.unflatten_dict(flat), meta)
  return out


def test_adapterhub_fuse_reproduces_logits_and_imports_back(runs, tmp_path):
  batch, logits = padded_batch(), {}
  for name, fusion_dir in (('trained', runs['fusion']),
                           ('sharp', _sharpened(runs['fusion'], tmp_path / 'sharp'))):
    ours = logits[name] = MultiTaskModel([fusion_dir]).logits(np.zeros(4, np.int32), batch)
    out = tmp_path / f'ah_{name}'
    assert export.main(['export', f'--adapter={fusion_dir}', '--format=adapterhub',
                        f'--output={out}']) == 0
    assert sorted(p.name for p in (out / 'adapters').iterdir()) == ['glue_rte', 'glue_sst2']
    assert {'fusion', 'head', 'README.md', 'layer_norms.safetensors'} <= {
        p.name for p in out.iterdir()}
    theirs = _adapterhub_logits(out, runs['base'], batch)
    print(f'{name}: AdapterHub Fuse vs ours max |diff| {np.abs(theirs - ours).max():.2e}, '
          f'logit spread {np.ptp(ours):.3f}')
    np.testing.assert_allclose(theirs, ours, atol=TOL)
    back = tmp_path / f'imported_{name}'
    assert export.main(['export', f'--adapter={out}', '--format=adapterhub', '--to_artifact',
                        f'--base={runs["base"]}', f'--output={back}']) == 0
    assert sorted(p.name for p in (back / 'fused').iterdir()) == ['glue_rte', 'glue_sst2']
    again = MultiTaskModel([back]).logits(np.zeros(4, np.int32), batch)
    np.testing.assert_allclose(again, ours, atol=1e-6)
  sharp = logits['sharp']
  assert np.ptp(sharp - sharp.mean(0)) > 1000 * TOL  # the rows' logits differ: a real test


def _one_line_error(result, needle):
  lines = result.stderr.strip().splitlines()
  assert result.returncode == 2 and 'Traceback' not in result.stderr, result.stderr[-2000:]
  assert lines[-1].startswith('error: ') and needle in lines[-1], lines[-1]


def test_changed_or_missing_fused_adapter_is_refused_in_one_line(runs, tmp_path):
  moved, member = borrowing_then_changed(runs['fusion'], 'fusion', 'adapters',
                                         runs['adapters'][0], tmp_path)
  with pytest.raises(UsageError, match='changed since the fusion was trained'):
    MultiTaskModel([moved])
  (tmp_path / 'in.jsonl').write_text(json.dumps(ROWS[0]) + '\n')
  result = subprocess.run([sys.executable, '-m', 'adapter_tuning.predict', f'--adapter={moved}',
                           f'--input={tmp_path / "in.jsonl"}', f'--output={tmp_path / "o.jsonl"}'],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
  _one_line_error(result, 'changed since the fusion was trained')
  assert not (tmp_path / 'o.jsonl').exists()
  shutil.rmtree(member)
  with pytest.raises(UsageError, match="fused adapter 'glue_sst2' .* is missing"):
    MultiTaskModel([moved])


def test_bad_fusion_configs_are_refused_before_anything_runs(runs, tmp_path):
  adapters = ','.join(map(str, runs['adapters']))
  other = demo.ensure_checkpoint(tmp_path / 'other', seed=99)
  cases = [
      (_fusion_config(other, adapters), 'was trained on base'),
      (_fusion_config(runs['base'], str(runs['adapters'][0])), 'combines two or more'),
      (_fusion_config(runs['base'], adapters, **{'model.adapter.placement': 'houlsby'}),
       'bottleneck is on too'),
      (_fusion_config(runs['base'], f'{adapters},{runs["fusion"]}'),
       'AdapterFusion fuses bottleneck-adapter artifacts'),
  ]
  for config, needle in cases:
    with pytest.raises(UsageError, match=needle):
      config_lib.validate(config)
  workdir = tmp_path / 'run'
  result = run_train('--config', 'configs/glue_mrpc.py', '--workdir', workdir,
                     f'--config.model.checkpoint={other}', '--config.model.adapter.placement=none',
                     f'--config.model.fusion.adapters={adapters}', timeout=300)
  _one_line_error(result, 'was trained on base')
  assert not workdir.exists()


def _cli_args(runs, workdir):
  return ('--config', 'configs/glue_mrpc.py', '--workdir', workdir,
          f'--config.model.checkpoint={runs["base"]}', '--config.data.source=glue_dir',
          f'--config.data.data_dir={GLUE_DIR}', '--config.data.max_train_examples=128',
          '--config.data.max_eval_examples=32', '--config.data.max_seq_length=32',
          '--config.batch_size=16', '--config.model.adapter.placement=none',
          f'--config.model.fusion.adapters={",".join(map(str, runs["adapters"]))}',
          '--config.num_train_steps=120', '--config.checkpoint_every_steps=10',
          '--config.log_every_steps=5', '--config.learning_rate=1e-2')


def test_fusion_resume_after_sigkill_is_bit_identical(runs, tmp_path):
  clean = run_train(*_cli_args(runs, tmp_path / 'clean'))
  assert clean.returncode == 0, clean.stderr[-3000:]
  victim = tmp_path / 'victim'
  proc = start_train(*_cli_args(runs, victim))
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None:
    try:
      if any(m.get('step', 0) >= 30 and 'train/loss' in m for m in read_metrics(victim)):
        break
    except (FileNotFoundError, ValueError):
      pass
    time.sleep(0.01)
  proc.send_signal(signal.SIGKILL)
  proc.wait(timeout=60)
  assert not (victim / 'adapter').exists(), 'the run finished before it could be killed'
  resumed = run_train(*_cli_args(runs, victim))
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert 'resumed from the checkpoint at step' in resumed.stdout
  a, b = (artifact.load(w / 'adapter')[1] for w in (tmp_path / 'clean', victim))
  fa, fb = tu.flatten_dict(a), tu.flatten_dict(b)
  assert fa.keys() == fb.keys()
  for k in fa:
    np.testing.assert_array_equal(fa[k], fb[k], err_msg='/'.join(k))
  for d, (files, _) in runs['before'].items():
    assert digest(d) == files
