"""`export --format onnx` and `--format stablehlo`: the exported graph reproduces predict.

Artifacts with random non-zero method weights on the demo's tiny random BERT (hidden 64,
2 layers): the ONNX file under onnxruntime and the StableHLO folder under its own loader
(in a fresh interpreter without adapter_tuning) must give predict's logits on padded
batches of two lengths and batch sizes.
"""

import json
import os
import pathlib
import subprocess
import sys

import flax.traverse_util as tu
import jax
import numpy as np
import onnx
import onnxruntime as ort
import pytest

from adapter_tuning import export, load_pretrained, peft
from adapter_tuning.data import demo
from adapter_tuning.interop import artifact
from adapter_tuning.models.heads import TaskModel
from adapter_tuning.peft.lora import LoRAConfig
from adapter_tuning.peft.prefix import PrefixConfig
from adapter_tuning.serving.multi_adapter import MultiTaskModel

METHODS = {
    'houlsby': peft.as_config({'size': 8, 'placement': 'houlsby'}),
    'lora': LoRAConfig(rank=4, alpha=8, targets=('query', 'value', 'intermediate', 'output')),
    'prefix_parallel': peft.combine([PrefixConfig(length=3, flat=True),
                                     peft.as_config({'size': 8, 'placement': 'parallel'})]),
}


@pytest.fixture(scope='module')
def base(tmp_path_factory):
  return demo.ensure_checkpoint(tmp_path_factory.mktemp('base') / 'tiny')


def _artifact(base_dir, directory, method, seed=7):
  """What a run of `method` would leave: its params, LayerNorms and a 3-way head, all
  moved well away from their init so that every one of them shows in the logits."""
  pre = load_pretrained(base_dir, adapter=method)
  rng = np.random.default_rng(seed)
  flat = {('encoder',) + k: (np.asarray(v) + rng.normal(0, 0.3, v.shape)).astype(np.float32)
          for k, v in tu.flatten_dict(pre.params).items()
          if peft.is_method_param(k) or 'layer_norm' in k[-2]}
  d = pre.config.hidden_size
  flat[('head', 'kernel')] = rng.normal(0, 0.5, (d, 3)).astype(np.float32)
  flat[('head', 'bias')] = rng.normal(0, 0.5, (3,)).astype(np.float32)
  rules = [[p, 'train'] for p in peft.param_patterns()] + [
      ['layer_norm/', 'train'], ['^head/', 'train'], ['.*', 'freeze']]
  artifact.save(directory, tu.unflatten_dict(flat), {
      'task': 'glue/mnli', 'head': 'classification', 'label_names': ['a', 'b', 'c'],
      'num_outputs': 3, 'peft': peft.to_meta(method), 'trainable_rules': rules,
      'base': {**pre.identity, 'path': str(base_dir)}, 'max_seq_length': 32,
      'pooling': 'pooler'})
  return directory


@pytest.fixture(scope='module')
def artifacts(base, tmp_path_factory):
  root = tmp_path_factory.mktemp('artifacts')
  return {name: _artifact(base, root / name, method) for name, method in METHODS.items()}


def _batches():
  """Two padded batches: 3 rows of length 11 and 2 rows of length 27, pairs as types."""
  rng = np.random.default_rng(1)
  out = []
  for lengths, width in (([11, 6, 2], 11), ([27, 15], 27)):
    lengths = np.asarray(lengths)
    mask = (np.arange(width)[None] < lengths[:, None]).astype(np.int32)
    ids = rng.integers(5, 60, mask.shape)  # the demo vocabulary has ~100.astype(np.int32)
    ids[:, 0] = 2
    ids = np.where(mask == 1, ids, 0).astype(np.int32)
    types = ((np.arange(width)[None] >= lengths[:, None] // 2) & (mask == 1)).astype(np.int32)
    out.append({'input_ids': ids, 'attention_mask': mask, 'token_type_ids': types})
  return out


def _predict_logits(art, batches):
  """predict's path (MultiTaskModel: per-example routing, the unmerged methods)."""
  mt = MultiTaskModel([art])
  return mt, [mt.logits(np.zeros(len(b['input_ids']), np.int32), b) for b in batches]


def _bare_logits(mt, batch):
  """The base with the artifact's head but no method: the method must matter."""
  model = TaskModel(mt.pretrained.config, None, 'classification', 3)
  head = jax.tree.map(lambda x: x[0], mt.stacked['head'])
  return np.asarray(jax.jit(model.apply)(
      {'params': {'encoder': mt.pretrained.params, 'head': head}}, batch['input_ids'],
      batch['attention_mask'], batch['token_type_ids']))


def _cli(*args):
  return export.main(['export', *map(str, args)])


@pytest.mark.parametrize('name', ['houlsby', 'lora'])
def test_onnx_reproduces_predict_on_padded_batches(artifacts, tmp_path, name, capsys):
  out = tmp_path / 'model.onnx'
  assert _cli('--adapter', artifacts[name], '--format', 'onnx', '--output', out) == 0
  said = capsys.readouterr().out
  graph = onnx.load(str(out))
  inputs = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
            for i in graph.graph.input}
  assert inputs == {n: ['batch', 'sequence'] for n in
                    ('input_ids', 'attention_mask', 'token_type_ids')}
  assert [o.name for o in graph.graph.output] == ['logits']
  meta = json.loads({p.key: p.value for p in graph.metadata_props}['adapter_tuning'])
  assert meta['label_names'] == ['a', 'b', 'c']
  assert (meta['max_seq_length'], meta['trained_max_seq_length']) == (64, 32)  # base, run
  initializers = [i.name for i in graph.graph.initializer]
  if name == 'lora':  # merged into the base kernels: no LoRA tensor left in the graph
    assert meta['merged_methods'] == ['lora'] and meta['graph_methods'] == []
    assert 'merged into the base weights' in said
  else:
    assert meta['merged_methods'] == []
  session = ort.InferenceSession(str(out), providers=['CPUExecutionProvider'])
  batches = _batches()
  mt, expected = _predict_logits(artifacts[name], batches)
  diffs = []
  for batch, want in zip(batches, expected):
    got = session.run(['logits'], batch)[0]
    assert got.shape == want.shape
    diffs.append(float(np.abs(got - want).max()))
    assert np.abs(want - _bare_logits(mt, batch)).max() > 1e-2  # the method shows
  size = out.stat().st_size
  print(f'onnx {name}: max |onnxruntime - predict| {max(diffs):.2e}, {size / 1024:.0f} KiB, '
        f'{len(initializers)} initializers')
  assert max(diffs) <= 1e-4, diffs


def test_stablehlo_round_trip_runs_without_the_project(artifacts, tmp_path):
  names = ('houlsby', 'prefix_parallel')
  for name in names:
    out = tmp_path / name
    assert _cli('--adapter', artifacts[name], '--format', 'stablehlo', '--output', out) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        'model.stablehlo', 'serving.json', 'stablehlo_loader.py', 'weights.npz']
    serving = json.loads((out / 'serving.json').read_text())
    assert serving['inputs'] == ['input_ids', 'attention_mask', 'token_type_ids']
    assert serving['sequence_length'] is None  # symbolic
  batches = _batches()
  for i, b in enumerate(batches):
    np.savez(tmp_path / f'batch{i}.npz', **b)
  # A fresh interpreter that can import only the export folder: jax + numpy, no project.
  script = (
      'import sys, numpy as np\n'
      f'sys.path[:0] = [{str(tmp_path / names[0])!r}]\n'
      'import stablehlo_loader\n'
      f'for name in {names!r}:\n'
      f'  m = stablehlo_loader.load({str(tmp_path)!r} + "/" + name)\n'
      '  for i in range(2):\n'
      f'    b = dict(np.load({str(tmp_path)!r} + f"/batch{{i}}.npz"))\n'
      f'    np.save({str(tmp_path)!r} + f"/{{name}}{{i}}.npy", m(**b))\n'
      'try:\n'
      '  m(np.zeros((1, 65), np.int32), np.ones((1, 65), np.int32))\n'
      'except ValueError as e:\n'
      '  print("refused:", e)\n'
      'assert not any(k.startswith("adapter_tuning") for k in sys.modules)\n')
  env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
  run = subprocess.run([sys.executable, '-c', script], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120)
  assert run.returncode == 0, run.stderr[-2000:]
  assert 'refused: sequence length 65 exceeds the model maximum 64' in run.stdout
  for name in names:
    _, expected = _predict_logits(artifacts[name], batches)
    diffs = [float(np.abs(np.load(tmp_path / f'{name}{i}.npy') - want).max())
             for i, want in enumerate(expected)]
    out = tmp_path / name
    print(f'stablehlo {name}: max |loader - predict| {max(diffs):.2e}, model.stablehlo '
          f'{(out / "model.stablehlo").stat().st_size / 1024:.0f} KiB, weights.npz '
          f'{(out / "weights.npz").stat().st_size / 1024:.0f} KiB')
    assert max(diffs) <= 1e-5, (name, diffs)


def _deberta_base(directory, minilm_dir):
  """A tiny random DeBERTa-v3-style checkpoint (relative positions, no absolute ones)."""
  from safetensors.numpy import save_file

  from adapter_tuning.interop import hf_checkpoint
  from adapter_tuning.models.encoder import Encoder
  directory.mkdir()
  (directory / 'config.json').write_text(json.dumps(dict(
      model_type='deberta-v2', vocab_size=128, hidden_size=32, num_hidden_layers=2,
      num_attention_heads=4, intermediate_size=64, max_position_embeddings=64,
      relative_attention=True, pos_att_type=['p2c', 'c2p'], position_buckets=256,
      max_relative_positions=-1, share_att_key=True, norm_rel_ebd='layer_norm',
      position_biased_input=False, type_vocab_size=0, pooler_hidden_act='gelu',
      hidden_act='gelu', layer_norm_eps=1e-7, pad_token_id=0)))
  (directory / 'tokenizer.json').write_bytes((minilm_dir / 'tokenizer.json').read_bytes())
  ids = np.zeros((1, 8), np.int32)
  config = hf_checkpoint.read_model_config(directory)
  params = Encoder(config).init(jax.random.PRNGKey(0), ids, np.ones_like(ids), ids)['params']
  save_file(hf_checkpoint.export_encoder_state(params, 'deberta-v2'),
            str(directory / 'model.safetensors'))
  return directory


def test_deberta_exports_stablehlo_at_a_fixed_length_and_refuses_onnx(tmp_path, capsys,
                                                                      minilm_dir):
  """Its relative positions are NumPy over a concrete length: no symbolic sequence axis."""
  import importlib.util
  art = _artifact(_deberta_base(tmp_path / 'deberta', minilm_dir), tmp_path / 'art', METHODS['houlsby'])
  assert _cli('--adapter', art, '--format', 'onnx', '--output', tmp_path / 'x.onnx') == 2
  err = capsys.readouterr().err
  assert 'deberta-v2 base cannot export to ONNX' in err and len(err.strip().splitlines()) == 1
  out = tmp_path / 'hlo'
  assert _cli('--adapter', art, '--format', 'stablehlo', '--output', out) == 0
  assert json.loads((out / 'serving.json').read_text())['sequence_length'] == 32
  spec = importlib.util.spec_from_file_location('deberta_loader', out / 'stablehlo_loader.py')
  loader = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(loader)
  model = loader.load(out)
  batches = _batches()
  _, expected = _predict_logits(art, batches)
  diffs = [float(np.abs(model(**b) - want).max()) for b, want in zip(batches, expected)]
  print(f'stablehlo deberta (padded to 32): max |loader - predict| {max(diffs):.2e}')
  assert max(diffs) <= 1e-5, diffs
  with pytest.raises(ValueError, match='exceeds the model maximum 32'):
    model(np.zeros((1, 33), np.int32), np.ones((1, 33), np.int32))


def test_bad_requests_are_one_line_errors(artifacts, tmp_path, capsys):
  art = artifacts['lora']
  taken = tmp_path / 'model.onnx'
  taken.write_text('keep me')
  folder = tmp_path / 'folder'
  folder.mkdir()
  cases = [
      (('--format', 'onnx', '--output', taken), 'exists; pass --overwrite'),
      (('--format', 'stablehlo', '--output', folder), 'exists; pass --overwrite'),
      (('--format', 'onnx', '--output', folder, '--overwrite'), 'writes one file'),
      (('--format', 'stablehlo', '--output', taken, '--overwrite'), 'writes a folder'),
      (('--format', 'onnx', '--output', tmp_path / 'x.onnx', '--to_artifact'),
       '--to_artifact imports AdapterHub adapters'),
      (('--format', 'onnx', '--output', tmp_path / 'x.onnx', '--base', tmp_path / 'nope'),
       'nope'),
  ]
  cases = [((art,) + args, says) for args, says in cases] + [
      ((artifacts['prefix_parallel'], '--format', 'onnx', '--output', tmp_path / 'x.onnx'),
       'prefix tuning cannot export to ONNX')]
  for args, says in cases:
    capsys.readouterr()
    assert _cli('--adapter', *args) == 2, args
    err = capsys.readouterr().err
    assert says in err and len(err.strip().splitlines()) == 1, (args, err)
  assert taken.read_text() == 'keep me' and not any(folder.iterdir())
  assert not (tmp_path / 'x.onnx').exists()
  assert _cli('--adapter', art, '--format', 'onnx', '--output', taken, '--overwrite') == 0
  assert onnx.load(str(taken)).graph.output[0].name == 'logits'
