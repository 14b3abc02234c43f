"""LoRA and IA³: identity at init, exact parameter counts, the same forward as AdapterHub's
methods on MiniLM with non-zero weights, merge, and runs through the trainer and serving
combined with bottleneck adapters."""

import json

import adapters
import flax.traverse_util as tu
import numpy as np
import pytest
import safetensors.numpy
import torch

from adapter_tuning.errors import UsageError
from adapter_tuning.interop.pretrained import load_pretrained
from adapter_tuning.models.encoder import Encoder
from adapter_tuning import peft
from adapter_tuning.peft import lora
from adapter_tuning.peft.lora import LoRAConfig

TEXTS = ['a short sentence', 'another, somewhat longer sentence with more tokens in it']
ALL = ('query', 'key', 'value', 'attention_output', 'intermediate', 'output')


def _batch(pre):
  b = pre.tokenizer.pad(*pre.tokenizer.tokenize(TEXTS))
  return b['input_ids'], b['attention_mask'], b['token_type_ids']


def _torch_hidden(model, ids, mask, types):
  with torch.no_grad():
    out = model.base_model(input_ids=torch.tensor(ids, dtype=torch.long),
                           attention_mask=torch.tensor(mask, dtype=torch.long),
                           token_type_ids=torch.tensor(types, dtype=torch.long))
  return out.last_hidden_state.numpy()


def _both_forwards(pre, params, ah_model, minilm_dir):
  """(ours, AdapterHub's last hidden states, valid positions), after checking that the
  method's weights move AdapterHub's output away from the base."""
  ids, mask, types = _batch(pre)
  ours = np.asarray(pre.model.apply({'params': params}, ids, mask, types)['last_hidden_state'])
  theirs = _torch_hidden(ah_model, ids, mask, types)
  valid = mask.astype(bool)
  base = np.asarray(load_pretrained(minilm_dir).encode(TEXTS)['last_hidden_state'])
  assert np.abs(theirs[valid] - base[valid]).max() > 1e-2  # the method's weights matter
  return ours, theirs, valid


def _lora_params(params):
  return {k: v for k, v in tu.flatten_dict(params).items() if any('_lora' in p for p in k)}


def test_zero_b_is_exactly_the_base(minilm_dir, minilm):
  pre = load_pretrained(minilm_dir, adapter=LoRAConfig(rank=4, targets=ALL))
  np.testing.assert_array_equal(pre.encode(TEXTS)['last_hidden_state'],
                                minilm.encode(TEXTS)['last_hidden_state'])


def test_parameter_count_per_target(minilm_dir):
  pre = load_pretrained(minilm_dir, adapter=LoRAConfig(rank=4, targets=ALL))
  c = pre.config
  d, f, r = c.hidden_size, c.intermediate_size, 4
  per_layer = 4 * r * (d + d) + r * (d + f) + r * (f + d)  # q, k, v, attn out; intermediate; output
  assert sum(v.size for v in _lora_params(pre.params).values()) == c.num_layers * per_layer
  a = pre.params['layer_0']['attention']['query_lora']['lora_A']
  assert np.abs(a).max() <= 1 / np.sqrt(d) and np.abs(a).std() > 0  # nn.Linear's default


def test_bad_keys_are_one_line_errors():
  with pytest.raises(UsageError, match='model.lora.targets has .*ffn.*; use a comma-separated'):
    LoRAConfig(rank=4, targets='query,ffn')
  with pytest.raises(UsageError, match='model.lora.rank must be a positive integer'):
    LoRAConfig(rank=-1)


def _adapterhub_lora(minilm_dir, rank, alpha):
  """AdapterHub's LoRA on MiniLM, every projection it can target, A and B non-zero."""
  model = adapters.AutoAdapterModel.from_pretrained(str(minilm_dir))
  config = adapters.LoRAConfig(r=rank, alpha=alpha, selfattn_lora=True,
                               attn_matrices=['q', 'k', 'v'], intermediate_lora=True,
                               output_lora=True, init_weights='bert')
  model.add_adapter('l', config=config)
  model.set_active_adapters('l')
  model.eval()
  return model


_AH_SITE = {'attention.self.query': ('attention', 'query_lora'),
            'attention.self.key': ('attention', 'key_lora'),
            'attention.self.value': ('attention', 'value_lora'),
            'intermediate.dense': ('intermediate', 'intermediate_dense_lora'),
            'output.dense': ('output_lora',)}


def test_forward_equals_adapterhub_lora(minilm_dir):
  rank, alpha = 4, 16
  model = _adapterhub_lora(minilm_dir, rank, alpha)
  pre = load_pretrained(minilm_dir, adapter=LoRAConfig(
      rank=rank, alpha=alpha, targets=('query', 'key', 'value', 'intermediate', 'output')))
  flat = tu.flatten_dict(pre.params)
  copied = 0
  for key, value in model.state_dict().items():
    if '.loras.l.' not in key:
      continue
    layer = int(key.split('encoder.layer.')[1].split('.')[0])
    module = key.split(f'encoder.layer.{layer}.')[1].split('.loras.')[0]
    leaf = key.rsplit('.', 1)[1]  # lora_A [r, in] / lora_B [out, r], torch layout
    path = (f'layer_{layer}',) + _AH_SITE[module] + (leaf,)
    assert flat[path].shape == value.numpy().T.shape, key
    flat[path] = value.numpy().T.astype(np.float32)
    copied += 1
  assert copied == 6 * 5 * 2
  params = tu.unflatten_dict(flat)
  ids, mask, types = _batch(pre)
  ours, theirs, valid = _both_forwards(pre, params, model, minilm_dir)  # the LoRA weights matter
  diff = np.abs(ours[valid] - theirs[valid]).max()
  print(f'LoRA vs AdapterHub LoRA: max |difference| = {diff:.2e}')
  assert diff <= 1e-4


def test_merge_folds_the_update_into_the_kernels(minilm_dir):
  config = LoRAConfig(rank=4, alpha=8, targets=ALL)
  pre = load_pretrained(minilm_dir, adapter=config)
  rng = np.random.default_rng(0)
  flat = tu.flatten_dict(pre.params)
  for k in _lora_params(pre.params):
    flat[k] = rng.normal(0, 0.05, flat[k].shape).astype(np.float32)
  params = tu.unflatten_dict(flat)
  merged = lora.merge(params, config, pre.config.num_layers)
  assert not _lora_params(merged)
  ids, mask, types = _batch(pre)
  unmerged_out = pre.model.apply({'params': params}, ids, mask, types)['last_hidden_state']
  merged_out = Encoder(pre.config).apply({'params': merged}, ids, mask, types)[
      'last_hidden_state']
  valid = mask.astype(bool)
  diff = np.abs(np.asarray(unmerged_out)[valid] - np.asarray(merged_out)[valid]).max()
  print(f'merged vs unmerged: max |difference| = {diff:.2e}')
  assert diff <= 1e-5


def _artifact_logits(base, directory, rows):
  """One artifact's logits through its own (training) config, not the serving union."""
  from adapter_tuning.interop import artifact
  from adapter_tuning.models.heads import TaskModel
  from adapter_tuning.training import trainable as trainable_lib
  meta, params = artifact.load(directory)
  method = peft.config_from_meta(meta)
  pre = load_pretrained(base, adapter=method)
  model = TaskModel(pre.config, method, meta['head'], meta['num_outputs'],
                    pooling=meta.get('pooling', 'pooler'))
  full = trainable_lib.merge(params, {'encoder': pre.params})
  b = pre.tokenizer.pad(*pre.tokenizer.tokenize([r['text'] for r in rows]))
  return np.asarray(model.apply({'params': full}, b['input_ids'], b['attention_mask'],
                                b['token_type_ids']))


def test_artifacts_of_every_method_serve_together_as_they_do_alone(tmp_path):
  """LoRA, bottleneck + LoRA, prefix (MLP kept) and prefix + IA³ runs through the trainer;
  their artifacts in one mixed batch predict what each predicts alone (per-example routing
  across methods, prefixes of different lengths), and a prefix artifact served predicts what
  its own model computes."""
  from adapter_tuning.data import demo
  from adapter_tuning.predict import predict_rows
  from adapter_tuning.serving.multi_adapter import MultiTaskModel
  from adapter_tuning.training.trainer import train_and_evaluate
  from conftest import GLUE_DIR
  from helpers import tiny_config
  base = demo.ensure_checkpoint(tmp_path / 'base')
  common = {'data.source': 'glue_dir', 'data.data_dir': str(GLUE_DIR),
            'data.max_train_examples': 64, 'data.max_eval_examples': 32, 'learning_rate': 3e-3}
  none = {'model.adapter.placement': 'none', 'trainable': 'peft'}
  runs = {
      'glue/rte': {'model.lora.rank': 4, 'model.lora.targets': 'query,value,output', **none},
      'glue/sst2': {'model.lora.rank': 4, 'model.lora.targets': 'query'},  # + adapters
      'glue/cola': {'model.prefix.length': 3, 'model.prefix.bottleneck': 8,
                    'model.prefix.keep_mlp': True, **none},
      'glue/mrpc': {'model.prefix.length': 5, 'model.prefix.bottleneck': 8,
                    'model.ia3.targets': 'key,value', **none},
  }
  dirs = {}
  for task, keys in runs.items():
    workdir = tmp_path / task.split('/')[1]
    train_and_evaluate(tiny_config(base, task, **common, **keys), workdir)
    dirs[task] = workdir / 'adapter'
  meta = json.loads((dirs['glue/sst2'] / 'config.json').read_text())
  assert set(meta['peft']) == {'bottleneck', 'lora'}
  assert json.loads((dirs['glue/cola'] / 'config.json').read_text())['peft']['prefix'][
      'flat'] is False  # keep_mlp: the artifact holds the MLP
  mixed = MultiTaskModel(list(dirs.values()))
  tasks = list(dirs)
  rows = [{'text': f'a film {i}', 'text_pair': 'it is good' if i % 3 == 0 else None,
           'task': tasks[i % len(tasks)]} for i in range(12)]
  together = predict_rows(mixed, rows, 4, 32)
  for task, d in dirs.items():
    mine = [i for i, r in enumerate(rows) if r['task'] == task]
    alone = predict_rows(MultiTaskModel([d]), [rows[i] for i in mine], 4, 32)
    for i, a in zip(mine, alone):
      assert a['label'] == together[i]['label']
      np.testing.assert_allclose(a['logits'], together[i]['logits'], atol=1e-5)
  single = [{'text': f'a film {i}', 'task': 'glue/mrpc'} for i in range(4)]
  served = np.asarray([r['logits'] for r in predict_rows(mixed, single, 4, 32)])
  np.testing.assert_allclose(served, _artifact_logits(base, dirs['glue/mrpc'], single),
                             atol=1e-5)
  with pytest.raises(UsageError, match='different rank/alpha'):
    lora.union([LoRAConfig(rank=2), LoRAConfig(rank=4)])


def test_ia3_equals_adapterhub_ia3_and_merges(minilm_dir, minilm):
  from adapter_tuning.peft import ia3
  from adapter_tuning.peft.ia3 import IA3Config
  model = adapters.AutoAdapterModel.from_pretrained(str(minilm_dir))
  model.add_adapter('i', config=adapters.IA3Config())  # k, v and intermediate, before act
  model.set_active_adapters('i')
  model.eval()
  config = IA3Config(targets='key,value,intermediate')
  pre = load_pretrained(minilm_dir, adapter=config)
  np.testing.assert_array_equal(pre.encode(TEXTS)['last_hidden_state'],
                                minilm.encode(TEXTS)['last_hidden_state'])  # ones: the base
  flat = tu.flatten_dict(pre.params)
  sites = {'attention.self.key': ('attention', 'key_ia3'),
           'attention.self.value': ('attention', 'value_ia3'),
           'intermediate.dense': ('intermediate', 'intermediate_dense_ia3')}
  rng = np.random.default_rng(0)
  copied = 0
  with torch.no_grad():
    for key, value in model.named_parameters():
      if '.loras.i.lora_B' not in key:  # AdapterHub keeps IA³'s vector in lora_B
        continue
      value.copy_(torch.tensor(rng.uniform(0.5, 1.5, value.shape), dtype=torch.float32))
      layer = int(key.split('encoder.layer.')[1].split('.')[0])
      module = key.split(f'encoder.layer.{layer}.')[1].split('.loras.')[0]
      path = (f'layer_{layer}',) + sites[module] + ('scale',)
      flat[path] = value.numpy().reshape(flat[path].shape).astype(np.float32)
      copied += 1
  assert copied == 6 * 3
  params = tu.unflatten_dict(flat)
  ids, mask, types = _batch(pre)
  ours = np.asarray(pre.model.apply({'params': params}, ids, mask, types)['last_hidden_state'])
  theirs = _torch_hidden(model, ids, mask, types)
  valid = mask.astype(bool)
  diff = np.abs(ours[valid] - theirs[valid]).max()
  print(f'IA3 vs AdapterHub IA3: max |difference| = {diff:.2e}')
  assert diff <= 1e-4
  merged = ia3.merge(params, config, pre.config.num_layers)
  merged_out = Encoder(pre.config).apply({'params': merged}, ids, mask, types)[
      'last_hidden_state']
  assert np.abs(np.asarray(merged_out)[valid] - ours[valid]).max() <= 1e-5


def test_merged_checkpoint_loads_in_transformers_with_the_same_logits(minilm_dir, tmp_path):
  """LoRA + IA³ + trained LayerNorms and head, merged: transformers alone reproduces the
  artifact's logits; an artifact with bottleneck adapters is refused in one line."""
  import transformers
  from adapter_tuning import export, peft
  from adapter_tuning.interop import artifact
  from adapter_tuning.peft.ia3 import IA3Config
  from adapter_tuning.serving.multi_adapter import MultiTaskModel
  from adapter_tuning.training import trainable as tl
  config = peft.combine([LoRAConfig(rank=4, targets=ALL), IA3Config()])
  pre = load_pretrained(minilm_dir, adapter=config)
  rng = np.random.default_rng(0)
  flat = tu.flatten_dict({'encoder': pre.params, 'head': {
      'kernel': rng.normal(0, 0.5, (pre.config.hidden_size, 3)), 'bias': rng.normal(0, 0.5, 3)}})
  for k, v in flat.items():
    if any(m in p for p in k for m in ('_lora', '_ia3', 'layer_norm')):
      flat[k] = np.asarray(v) + rng.normal(0, 0.05, np.shape(v))
  rules = tl.resolve('adapters', pre.config.num_layers)
  trained, _ = tl.split(tu.unflatten_dict({k: np.asarray(v, np.float32)
                                           for k, v in flat.items()}), rules)
  art = tmp_path / 'artifact'
  artifact.save(art, trained, {
      'task': 'glue/mnli', 'head': 'classification', 'label_names': ['e', 'n', 'c'],
      'num_outputs': 3, 'peft': peft.to_meta(config), 'trainable_rules': [list(r) for r in rules],
      'base': {**pre.identity, 'path': str(minilm_dir)}, 'max_seq_length': 32})
  out = tmp_path / 'merged'
  assert export.main(['export', '--adapter', str(art), '--format', 'hf_merged',
                      '--output', str(out)]) == 0
  ids, mask, types = _batch(pre)
  ours = MultiTaskModel([art]).logits(np.zeros(len(ids), np.int32), {
      'input_ids': ids, 'attention_mask': mask, 'token_type_ids': types})
  model = transformers.AutoModelForSequenceClassification.from_pretrained(str(out)).eval()
  with torch.no_grad():
    theirs = model(input_ids=torch.tensor(ids, dtype=torch.long),
                   attention_mask=torch.tensor(mask, dtype=torch.long),
                   token_type_ids=torch.tensor(types, dtype=torch.long)).logits.numpy()
  diff = float(np.abs(np.asarray(ours)[:, :3] - theirs).max())
  print(f'merged checkpoint in transformers: max |logit difference| = {diff:.2e}')
  assert diff <= 1e-4 and model.config.id2label[1] == 'n'
  bottleneck = load_pretrained(minilm_dir, adapter={'size': 8})
  art2 = tmp_path / 'bottleneck'
  artifact.save(art2, {'head': trained['head']}, {
      'task': 'glue/mnli', 'head': 'classification', 'label_names': ['e', 'n', 'c'],
      'num_outputs': 3, 'peft': peft.to_meta(bottleneck.adapter),
      'trainable_rules': [['^head/', 'train'], ['.*', 'freeze']],
      'base': {**pre.identity, 'path': str(minilm_dir)}})
  assert export.main(['export', '--adapter', str(art2), '--format', 'hf_merged',
                      '--output', str(tmp_path / 'no')]) == 2
  assert not (tmp_path / 'no').exists()


@pytest.mark.parametrize('methods', [
    ('--config.model.adapter.placement=none', '--config.model.lora.rank=4',
     '--config.model.lora.targets=query,value,output',
     '--config.model.ia3.targets=key,value,intermediate'),
    ('--config.model.adapter.placement=parallel_ffn', '--config.model.adapter.scaling=4.0',
     '--config.model.prefix.length=4', '--config.model.prefix.bottleneck=16'),  # MAM
], ids=['lora+ia3', 'prefix+parallel'])
def test_peft_run_resumes_after_sigkill_bit_identically(tmp_path, methods):
  from helpers import run_train, start_train
  from test_reliability import _assert_same_run, _kill_when, _logged_step
  args = ('--config', 'configs/demo.py', '--config.num_train_steps=90',
          '--config.checkpoint_every_steps=6', '--config.log_every_steps=3',
          '--config.data.max_train_examples=512', *methods, '--config.trainable=peft')
  clean = tmp_path / 'clean'
  result = run_train(*args, '--workdir', clean)
  assert result.returncode == 0, result.stderr[-2000:]
  victim = tmp_path / 'victim'
  proc = start_train(*args, '--workdir', victim)
  _kill_when(proc, victim, lambda w: _logged_step(w) >= 40)
  assert not (victim / 'adapter').exists(), 'run finished before it could be killed'
  final = run_train(*args, '--workdir', victim)
  assert final.returncode == 0 and 'resumed from the checkpoint at step' in final.stdout
  _assert_same_run(clean, victim)
  meta = json.loads((clean / 'adapter' / 'config.json').read_text())
  if 'prefix' in meta['peft']:  # the artifact holds the prefixes the MLP computed, no MLP
    assert meta['peft']['prefix']['flat'] is True
    weights = safetensors.numpy.load_file(clean / 'adapter' / 'weights.safetensors')
    assert weights['encoder/kv_prefix/kv'].shape == (4, 2 * 2 * 64)  # P, layers x 2 x d
    assert not any(k.startswith('encoder/kv_prefix/') and k != 'encoder/kv_prefix/kv'
                   for k in weights)


def test_lora_dropout_acts_in_training_only(minilm_dir):
  import jax
  with_drop = load_pretrained(minilm_dir, adapter=LoRAConfig(rank=4, dropout=0.5))
  flat = tu.flatten_dict(with_drop.params)
  rng = np.random.default_rng(0)
  for k in _lora_params(with_drop.params):
    flat[k] = rng.normal(0, 0.1, flat[k].shape).astype(np.float32)
  params = tu.unflatten_dict(flat)
  ids, mask, types = _batch(with_drop)
  run = lambda model, det: np.asarray(model.apply(
      {'params': params}, ids, mask, types, deterministic=det,
      rngs={'dropout': jax.random.PRNGKey(0)})['last_hidden_state'])
  base_cfg = with_drop.config.__class__(**{**with_drop.config.__dict__, 'hidden_dropout': 0.0,
                                           'attention_dropout': 0.0})
  model_drop = Encoder(base_cfg, LoRAConfig(rank=4, dropout=0.5))
  model_none = Encoder(base_cfg, LoRAConfig(rank=4))
  np.testing.assert_array_equal(run(model_drop, True), run(model_none, True))
  assert np.abs(run(model_drop, False) - run(model_none, False)).max() > 1e-3
  np.testing.assert_array_equal(run(model_none, False), run(model_none, True))


def test_prefix_tuning_equals_adapterhub_prefix_tuning(minilm_dir):
  """Prefix tuning and MAM (prefixes + a scaled parallel FFN adapter) against AdapterHub's
  PrefixTuningConfig / MAMConfig-style union on MiniLM, with random non-zero weights."""
  from adapter_tuning import peft
  from adapter_tuning.peft import prefix
  from adapter_tuning.peft.bottleneck import AdapterConfig
  from adapter_tuning.peft.prefix import PrefixConfig
  p_len, width = 5, 16
  model = adapters.AutoAdapterModel.from_pretrained(str(minilm_dir))
  model.add_adapter('p', config=adapters.ConfigUnion(
      adapters.PrefixTuningConfig(prefix_length=p_len, bottleneck_size=width),
      adapters.ParBnConfig(reduction_factor=48, scaling=4.0)))  # MAM's shape, m = 8
  model.set_active_adapters('p')
  model.eval()
  config = peft.combine([PrefixConfig(length=p_len, bottleneck=width),
                         AdapterConfig(size=8, placement='parallel_ffn', activation='relu',
                                       scaling=4.0)])
  pre = load_pretrained(minilm_dir, adapter=config)
  c = pre.config
  assert sum(v.size for k, v in tu.flatten_dict(pre.params).items() if k[0] == 'kv_prefix') == \
      prefix.param_count(next(p for p in peft.parts(config) if isinstance(p, PrefixConfig)),
                         c.hidden_size, c.num_layers)
  flat = tu.flatten_dict(pre.params)
  rng = np.random.default_rng(0)
  ours_of = {'wte.weight': ('kv_prefix', 'wte'),
             'control_trans.0.weight': ('kv_prefix', 'down', 'kernel'),
             'control_trans.0.bias': ('kv_prefix', 'down', 'bias'),
             'control_trans.2.weight': ('kv_prefix', 'up', 'kernel'),
             'control_trans.2.bias': ('kv_prefix', 'up', 'bias')}
  with torch.no_grad():
    for key, value in model.named_parameters():
      if '.prefix_tunings.p.self_prefix.' in key:  # one module, listed under its first owner
        leaf = key.split('self_prefix.')[1]
        value.copy_(torch.tensor(rng.normal(0, 0.3, value.shape), dtype=torch.float32))
        v = value.numpy()
        flat[ours_of[leaf]] = (v.T if v.ndim == 2 and leaf != 'wte.weight' else v).astype(
            np.float32)
      elif '.adapters.p.' in key:
        value.copy_(torch.tensor(rng.normal(0, 0.1, value.shape), dtype=torch.float32))
        layer = int(key.split('encoder.layer.')[1].split('.')[0])
        proj, leaf = ('down', key.split('adapter_down.0.')[1]) if 'adapter_down' in key else \
            ('up', key.split('adapter_up.')[1])
        v = value.numpy()
        flat[(f'layer_{layer}', 'ffn_adapter', proj, 'kernel' if leaf == 'weight' else 'bias')] = (
            v.T if leaf == 'weight' else v).astype(np.float32)
  params = tu.unflatten_dict(flat)
  ids, mask, types = _batch(pre)
  ours, theirs, valid = _both_forwards(pre, params, model, minilm_dir)
  diff = np.abs(ours[valid] - theirs[valid]).max()
  print(f'prefix tuning + scaled parallel FFN adapter (MAM) vs AdapterHub: {diff:.2e}')
  assert diff <= 1e-4
  scanned = Encoder(c, config, scan=True).apply({'params': params}, ids, mask, types)
  np.testing.assert_allclose(np.asarray(scanned['last_hidden_state'])[valid], ours[valid],
                             atol=1e-5)
