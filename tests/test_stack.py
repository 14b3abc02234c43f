"""Stacking (peft/stack.py, interop/adapterhub_stack.py): an adapter trained on SST-2, then a
new adapter trained on top of it (frozen) on MRPC through the real trainer; served alone and
in one batch with the adapter below; exported to AdapterHub's `Stack` and back; the adapter
below's files and predictions untouched throughout."""

import dataclasses
import json
import pathlib
import shutil

import flax.traverse_util as tu
import numpy as np
import pytest

from adapter_tuning import config as config_lib
from adapter_tuning import export, peft
from adapter_tuning.data import demo
from adapter_tuning.errors import UsageError
from adapter_tuning.interop import artifact
from adapter_tuning.interop.pretrained import load_pretrained
from adapter_tuning.peft import bottleneck, lora, stack
from adapter_tuning.predict import predict_rows
from adapter_tuning.serving.multi_adapter import MultiTaskModel
from adapter_tuning.training.trainer import train_and_evaluate
from composition import (ROWS, TOL, borrowing_then_changed, check_predict_cli, digest,
                         glue_config, padded_batch, rows_for)
from helpers import predict_main, run_train


def _stack_config(base, below, **overrides):
  return glue_config(base, 'glue/mrpc', **{
      'model.stack.below': str(below), 'num_train_steps': 8, 'learning_rate': 1e-2, **overrides})


@pytest.fixture(scope='module')
def runs(tmp_path_factory, sst2_peft_run):
  """An SST-2 adapter (conftest's sst2_peft_run: `peft` preset, no LayerNorms of its own, so
  a stack sees it exactly as trained) with weights large enough to matter, then an MRPC
  adapter stacked on it (`adapters` preset, tiny_config's default: the stack trains its own
  LayerNorms)."""
  root = tmp_path_factory.mktemp('stack')
  base, below = sst2_peft_run
  before = (digest(below), predict_rows(MultiTaskModel([below]), rows_for('glue/sst2'), 8, 32))
  train_and_evaluate(_stack_config(base, below), root / 'stack')
  return {'root': root, 'base': base, 'below': below, 'before': before,
          'stack': root / 'stack' / 'adapter'}


def test_stack_trains_only_the_top_adapter_head_and_layer_norms(runs):
  meta, trained = artifact.load(runs['stack'])
  paths = sorted('/'.join(k) for k in tu.flatten_dict(trained))
  assert not [p for p in paths if '_stack/' in p or 'below_' in p]
  # 2 layers x 2 sites (houlsby) x down/up x kernel/bias
  assert len([p for p in paths if '_adapter/' in p]) == 2 * 2 * 4 and 'head/kernel' in paths
  assert any('layer_norm/' in p for p in paths)
  assert [type(p) for p in peft.parts(peft.config_from_meta(meta))] == [
      stack.StackConfig, bottleneck.AdapterConfig]  # the frozen adapter runs first
  (ref,) = meta['peft']['stack']['below']
  assert ref['path'] == str(runs['below'].resolve())
  assert ref['sha256'] == artifact.content_hash(runs['below'])
  model = load_pretrained(runs['base'], peft.config_from_meta(meta)).params
  _, below = artifact.load(runs['below'])
  for site in ('attention', 'ffn'):
    loaded = model['layer_1'][f'{site}_stack'][f'below_{ref["sha256"][:16]}']
    for proj in ('down', 'up'):
      np.testing.assert_array_equal(
          loaded[proj]['kernel'], below['encoder']['layer_1'][f'{site}_adapter'][proj]['kernel'])
    now = trained['encoder']['layer_1'][f'{site}_adapter']['down']['kernel']
    assert np.abs(now - model['layer_1'][f'{site}_adapter']['down']['kernel']).max() > 1e-4


def test_below_adapter_files_and_predictions_untouched(runs):
  files, preds = runs['before']
  assert digest(runs['below']) == files
  assert predict_rows(MultiTaskModel([runs['below']]), rows_for('glue/sst2'), 8, 32) == preds


def _encode(base, config, trained_encoder, batch):
  pre = load_pretrained(base, config)
  flat = tu.flatten_dict(pre.params)
  flat.update(tu.flatten_dict(trained_encoder))
  args = (batch['input_ids'], batch['attention_mask'], batch['token_type_ids'])
  return np.asarray(pre.model.apply({'params': tu.unflatten_dict(flat)}, *args)[
      'last_hidden_state'])


def test_zero_adapter_on_top_is_the_adapter_below_alone(runs):
  meta, below_params = artifact.load(runs['below'])
  below_config = peft.config_from_meta(meta)
  ref = peft.parts(peft.config_from_meta(artifact.load(runs['stack'])[0]))[0]
  top = bottleneck.AdapterConfig(size=8, init_scale=0.0)
  batch = padded_batch()
  alone = _encode(runs['base'], below_config, below_params['encoder'], batch)
  stacked = _encode(runs['base'], peft.combine([top, ref]), {}, batch)
  np.testing.assert_array_equal(stacked, alone)
  plain = _encode(runs['base'], None, {}, batch)
  assert np.abs(alone - plain).max() > 1e-2  # the adapter below does something
  _, trained = artifact.load(runs['stack'])
  no_ln = {k: v for k, v in tu.flatten_dict(trained['encoder']).items() if '_adapter' in k[-3]}
  on_top = _encode(runs['base'], peft.combine([ref, dataclasses.replace(top, init_scale=1e-3)]),
                   tu.unflatten_dict(no_ln), batch)
  assert np.abs(on_top - alone).max() > 1e-4  # ... and so does the trained one on top


def test_predict_serves_the_stack_alone_and_beside_the_adapter_below(runs, tmp_path):
  alone = predict_rows(MultiTaskModel([runs['stack']]), ROWS, 8, 32)
  below_preds = runs['before'][1]
  for order in ([runs['below'], runs['stack']], [runs['stack'], runs['below']]):
    mixed = predict_rows(MultiTaskModel(order), ROWS + rows_for('glue/sst2'), 8, 32)
    diff = max(np.abs(np.subtract(g['logits'], w['logits'])).max()
               for g, w in zip(mixed, alone + below_preds))
    print(f'mixed batch vs alone: max |logit diff| {diff:.1e}')
    for got, want in zip(mixed, alone + below_preds):
      assert got['task'] == want['task'] and got['label'] == want['label']
    assert diff <= 1e-5
  check_predict_cli(runs['stack'], alone, tmp_path)


def _adapterhub_logits(out: pathlib.Path, base, batch, reverse=False):
  import adapters
  import torch
  from adapters.composition import Stack
  below, top = json.loads((out / 'stack.json').read_text())['stack']
  model = adapters.AutoAdapterModel.from_pretrained(str(base))
  model.load_adapter(str(out / 'adapters' / below), with_head=False)
  model.load_adapter(str(out / 'adapters' / top))
  norms = out / 'adapters' / top / 'layer_norms.safetensors'
  if norms.exists():  # the README's step
    from safetensors.torch import load_file
    result = model.base_model.load_state_dict(load_file(str(norms)), strict=False)
    assert not result.unexpected_keys
  model.active_adapters = Stack(top, below) if reverse else Stack(below, top)
  model.active_head = top
  model.eval()
  with torch.no_grad():
    return model(**{k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}).logits.numpy()


def _rewrite(source, out, seed, placement=None, ln_before=None, below=None, head_scale=0.0,
             task=None):
  """A copy of artifact `source` with large random adapter weights (and head, if
  head_scale), optionally another placement / original_ln_before / adapter below: the
  tiny random base's logits barely move otherwise, and a swapped input or order in the
  export could not pass."""
  meta, params = artifact.load(source)
  fields = meta['peft']['bottleneck']
  fields.update({k: v for k, v in (('placement', placement), ('original_ln_before', ln_before))
                 if v is not None})
  meta['adapter'] = fields
  meta['task'] = task or meta['task']
  if below is not None:
    ref = peft.parts(peft.config_from_meta(artifact.load(below)[0]))[0]
    meta['peft']['stack']['below'] = [{'name': 'below', 'path': str(below.resolve()),
                                       'sha256': artifact.content_hash(below),
                                       'adapter': dataclasses.asdict(ref)}]
  rng = np.random.default_rng(seed)
  flat = {}
  for k, v in tu.flatten_dict(params).items():
    if k[-3:-2] == ('attention_adapter',) and placement == 'pfeiffer':
      continue
    if any(p.endswith('_adapter') for p in k):
      v = rng.normal(0, 0.3, v.shape)
    elif k == ('head', 'kernel') and head_scale:
      v = rng.normal(0, head_scale, v.shape)
    flat[k] = v
  artifact.save(out, tu.unflatten_dict(flat), meta)
  return out


def test_stacks_over_different_adapters_below_share_a_batch(runs, tmp_path):
  """Each site then holds both adapters below, each switched on for its own stack's
  examples only."""
  other_below = _rewrite(runs['below'], tmp_path / 'below2', 4)
  other = _rewrite(runs['stack'], tmp_path / 'stack2', 5, below=other_below, head_scale=5.0,
                   task='glue/mrpc_b')
  rows = {d: rows_for(t) for d, t in ((runs['stack'], 'glue/mrpc'), (other, 'glue/mrpc_b'),
                                  (runs['below'], 'glue/sst2'))}
  alone = {d: predict_rows(MultiTaskModel([d]), r, 8, 32) for d, r in rows.items()}
  model = MultiTaskModel(list(rows))
  assert len([k for k in model.frozen['encoder']['layer_0']['ffn_stack'] if 'below_' in k]) == 2
  mixed = predict_rows(model, [r for rs in rows.values() for r in rs], 8, 32)
  want = [w for d in rows for w in alone[d]]
  diff = max(np.abs(np.subtract(g['logits'], w['logits'])).max() for g, w in zip(mixed, want))
  print(f'two stacks + the adapter below in one batch vs alone: max |logit diff| {diff:.1e}')
  assert diff <= 1e-5 and [g['label'] for g in mixed] == [w['label'] for w in want]
  first = [np.asarray(alone[d][0]['logits']) for d in (other, runs['stack'])]
  assert np.abs(first[0] - first[1]).max() > 1e-2  # the two stacks differ


def _variants(runs, tmp_path):
  """The trained stack; a sharpened one; one whose adapters read LN(x + h)
  (original_ln_before, the pfeiffer top adapter only at the FFN) over a below adapter that
  does too."""
  below_ln = _rewrite(runs['below'], tmp_path / 'below_ln', 3, ln_before=True)
  return {'trained': runs['stack'],
          'sharp': _rewrite(runs['stack'], tmp_path / 'sharp', 1, head_scale=20.0),
          'ln_before': _rewrite(runs['stack'], tmp_path / 'ln', 2, placement='pfeiffer',
                                ln_before=True, below=below_ln, head_scale=20.0)}


def test_adapterhub_stack_reproduces_logits_and_imports_back(runs, tmp_path):
  batch = padded_batch()
  for name, stack_dir in _variants(runs, tmp_path).items():
    ours = MultiTaskModel([stack_dir]).logits(np.zeros(4, np.int32), batch)
    out = tmp_path / f'ah_{name}'
    assert export.main(['export', f'--adapter={stack_dir}', '--format=adapterhub',
                        f'--output={out}']) == 0
    below, top = json.loads((out / 'stack.json').read_text())['stack']
    assert {p.name for p in (out / 'adapters').iterdir()} == {below, top}
    assert f'Stack({below!r}, {top!r})' in (out / 'README.md').read_text()
    theirs = _adapterhub_logits(out, runs['base'], batch)
    print(f'{name}: AdapterHub Stack vs ours max |diff| {np.abs(theirs - ours).max():.2e}, '
          f'logit spread {np.ptp(ours):.3f}')
    np.testing.assert_allclose(theirs, ours, atol=TOL)
    back = tmp_path / f'imported_{name}'
    assert export.main(['export', f'--adapter={out}', '--format=adapterhub', '--to_artifact',
                        f'--base={runs["base"]}', f'--output={back}']) == 0
    meta = artifact.load(back)[0]
    assert [type(p) for p in peft.parts(peft.config_from_meta(meta))] == [
        stack.StackConfig, bottleneck.AdapterConfig]
    assert meta['peft']['stack']['below'][0]['path'] == str((back / 'below' / below).resolve())
    again = MultiTaskModel([back]).logits(np.zeros(4, np.int32), batch)
    np.testing.assert_allclose(again, ours, atol=1e-6)
    if name != 'trained':  # the rows' logits differ, and the order of the stack matters
      assert np.ptp(ours - ours.mean(0)) > 1000 * TOL
      swapped = _adapterhub_logits(out, runs['base'], batch, reverse=True)
      print(f'{name}: Stack(top, below) vs ours max |diff| {np.abs(swapped - ours).max():.2e}')
      assert np.abs(swapped - ours).max() > 100 * TOL


def _one_line_error(result, needle):
  lines = result.stderr.strip().splitlines()
  assert result.returncode == 2 and 'Traceback' not in result.stderr, result.stderr[-2000:]
  assert lines[-1].startswith('error: ') and needle in lines[-1], lines[-1]


def test_changed_or_missing_adapter_below_is_refused_in_one_line(runs, tmp_path):
  moved, copy = borrowing_then_changed(runs['stack'], 'stack', 'below', runs['below'], tmp_path)
  with pytest.raises(UsageError, match='changed since the stack was trained'):
    MultiTaskModel([moved])
  (tmp_path / 'in.jsonl').write_text(json.dumps(ROWS[0]) + '\n')
  result = predict_main(f'--adapter={moved}', f'--input={tmp_path / "in.jsonl"}',
                        f'--output={tmp_path / "o.jsonl"}')  # in this process: see above
  _one_line_error(result, 'changed since the stack was trained')
  shutil.rmtree(copy)
  with pytest.raises(UsageError, match="stacked adapter 'glue_sst2' .* is missing"):
    MultiTaskModel([moved])


def _with_peft(source, out, fields):
  """A copy of artifact `source` whose meta records another PEFT config (weights unread)."""
  meta, params = artifact.load(source)
  meta.update(peft=fields, adapter=fields.get('bottleneck'))
  artifact.save(out, params, meta)
  return out


def test_bad_stack_configs_are_refused_before_anything_runs(runs, tmp_path):
  base, below = runs['base'], runs['below']
  other = demo.ensure_checkpoint(tmp_path / 'other', seed=99)
  lora_artifact = _with_peft(below, tmp_path / 'lora', {
      'lora': dataclasses.asdict(lora.LoRAConfig(rank=4))})
  parallel = _with_peft(below, tmp_path / 'par', {'bottleneck': dataclasses.asdict(
      bottleneck.AdapterConfig(size=8, placement='parallel'))})
  cases = [
      (_stack_config(other, below), 'was trained on base'),
      (_stack_config(base, lora_artifact), 'must be a bottleneck-adapter artifact'),
      (_stack_config(base, runs['stack']), 'must be a bottleneck-adapter artifact'),
      (_stack_config(base, parallel), 'is a parallel adapter'),
      (_stack_config(base, below, **{'model.adapter.placement': 'parallel'}), 'does not stack'),
      (_stack_config(base, below, **{'model.adapter.placement': 'none'}),
       'needs an adapter to train on top'),
      (_stack_config(base, f'{below},{below}'), 'one adapter below'),
      (_stack_config(base, below, **{'model.fusion.adapters': f'{below},{runs["stack"]}'}),
       'cannot combine'),
      (_stack_config(base, tmp_path / 'nowhere'), 'no such folder'),
  ]
  for config, needle in cases:
    with pytest.raises(UsageError, match=needle):
      config_lib.validate(config)
  workdir = tmp_path / 'run'
  result = run_train('--config', 'configs/glue_mrpc.py', '--workdir', workdir,
                     f'--config.model.checkpoint={base}', '--config.model.adapter.placement=none',
                     f'--config.model.stack.below={below}', timeout=300)
  _one_line_error(result, 'needs an adapter to train on top')
  assert not workdir.exists()
  with pytest.raises(UsageError, match='is the name of the adapter below'):
    export.export_artifact(runs['stack'], tmp_path / 'ah', name='glue_sst2')


def test_combine_orders_parts_by_method_whoever_combines_them(runs):
  """The order of a site's modules is part of the model; artifacts store their methods as
  JSON with sorted keys ('bottleneck' < 'stack', 'ia3' < 'lora'), serving unions list them
  in artifact order: each must come back in `peft.methods()` order."""
  ref = peft.parts(peft.config_from_meta(artifact.load(runs['stack'])[0]))[0]
  top, rank = bottleneck.AdapterConfig(size=8), lora.LoRAConfig(rank=4)
  from adapter_tuning.peft import ia3
  scale = ia3.IA3Config(targets='key')
  for parts in ([top, ref, scale, rank], [scale, rank, top, ref]):
    assert [type(p) for p in peft.parts(peft.combine(parts))] == [
        stack.StackConfig, bottleneck.AdapterConfig, lora.LoRAConfig, ia3.IA3Config]
  meta = {'peft': {'ia3': dataclasses.asdict(scale), 'lora': dataclasses.asdict(rank)}}
  assert [type(p) for p in peft.parts(peft.config_from_meta(meta))] == [
      lora.LoRAConfig, ia3.IA3Config]
  assert [type(p) for p in peft.parts(peft.union([top, peft.combine([ref, top])]))] == [
      stack.StackConfig, bottleneck.AdapterConfig]
