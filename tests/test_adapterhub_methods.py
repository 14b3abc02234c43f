"""AdapterHub round trips of LoRA, IA³, prefix tuning and unions (MAM): an AdapterHub adapter
with random non-zero weights imports and serves here with its logits, and exports back to an
adapter that AdapterHub loads with the same logits (tiny random BERT of test_adapterhub)."""

import json

import adapters
import flax.traverse_util as tu
import numpy as np
import pytest
import torch

from adapter_tuning import load_pretrained, peft
from adapter_tuning.interop import artifact
from adapter_tuning.peft.ia3 import IA3Config
from adapter_tuning.peft.lora import LoRAConfig
from test_adapterhub import TOL, _cli, _load_in_adapterhub, _ours, _torch_logits, base, batch  # noqa: F401

CONFIGS = {
    'lora': adapters.LoRAConfig(r=4, alpha=8, attn_matrices=['q', 'k', 'v'],
                                intermediate_lora=True, output_lora=True, leave_out=[1]),
    'ia3': adapters.IA3Config(output_lora=True),
    'prefix': adapters.PrefixTuningConfig(prefix_length=5, bottleneck_size=16),
    'prefix_flat': adapters.PrefixTuningConfig(prefix_length=5, flat=True),
    'mam': adapters.ConfigUnion(adapters.PrefixTuningConfig(prefix_length=5, bottleneck_size=16),
                                adapters.ParBnConfig(reduction_factor=4)),  # MAMConfig's shape
    'lora_seqbn': adapters.ConfigUnion(adapters.LoRAConfig(r=2),
                                       adapters.SeqBnConfig(reduction_factor=4)),
}
METHODS = {'lora': ['lora'], 'ia3': ['ia3'], 'prefix': ['prefix'], 'prefix_flat': ['prefix'],
           'mam': ['prefix', 'bottleneck'], 'lora_seqbn': ['lora', 'bottleneck']}


def _adapterhub_model(base_dir, name, config, seed=3, **head):
  """AdapterHub's method on the base, every parameter of it (and the head) random."""
  torch.manual_seed(seed)
  model = adapters.AutoAdapterModel.from_pretrained(str(base_dir))
  model.add_adapter(name, config=config)
  model.add_classification_head(name, num_labels=3, id2label={0: 'a', 1: 'b', 2: 'c'}, **head)
  owned = (f'.loras.{name}.', f'.prefix_tunings.{name}.', f'.adapters.{name}.', f'heads.{name}.')
  changed = 0
  with torch.no_grad():
    for key, p in model.named_parameters():
      if any(o in key for o in owned):
        p.copy_(torch.randn(p.shape) * 0.3 + (1.0 if key.endswith('lora_B') and name == 'ia3'
                                               else 0.0))
        changed += 1
  assert changed
  model.set_active_adapters(name)
  model.active_head = name
  return model


@pytest.mark.parametrize('name', list(CONFIGS))
def test_adapterhub_method_imports_and_exports_with_same_logits(base, batch, tmp_path, name):
  model = _adapterhub_model(base, name, CONFIGS[name])
  theirs = _torch_logits(model, batch)
  model.set_active_adapters(None)  # the same head on the bare base: the method matters
  model.active_head = name
  assert np.abs(_torch_logits(model, batch) - theirs).max() > 1e-2
  model.set_active_adapters(name)
  model.save_adapter(str(tmp_path / 'ah'), name, with_head=True)
  art = tmp_path / 'artifact'
  assert _cli('--adapter', tmp_path / 'ah', '--format', 'adapterhub', '--to-artifact',
              '--base', base, '--output', art) == 0
  meta, _ = artifact.load(art)
  assert sorted(meta['peft']) == sorted(METHODS[name])
  ours, _ = _ours([art], batch)
  back = tmp_path / 'back'
  assert _cli('--adapter', art, '--format', 'adapterhub', '--output', back) == 0
  again = _torch_logits(_load_in_adapterhub(base, back)[0], batch)
  diffs = float(np.abs(ours - theirs).max()), float(np.abs(again - theirs).max())
  print(f'{name}: import {diffs[0]:.2e}, export back {diffs[1]:.2e}')
  assert max(diffs) < TOL


def _method_artifact(base_dir, directory, method, seed=5):
  """An artifact of `method` (peft rules: method params + head) with random weights."""
  pre = load_pretrained(base_dir, adapter=method)
  rng = np.random.default_rng(seed)
  flat = {k: np.asarray(v, np.float32) for k, v in tu.flatten_dict(pre.params).items()
          if peft.is_method_param(k)}
  flat = {('encoder',) + k: (v + rng.normal(0, 0.3, v.shape)).astype(np.float32)
          for k, v in flat.items()}
  d = pre.config.hidden_size
  flat[('head', 'kernel')] = rng.normal(0, 0.5, (d, 3)).astype(np.float32)
  flat[('head', 'bias')] = rng.normal(0, 0.5, (3,)).astype(np.float32)
  rules = [[p, 'train'] for p in peft.param_patterns()] + [['^head/', 'train'], ['.*', 'freeze']]
  artifact.save(directory, tu.unflatten_dict(flat), {
      'task': 'glue/mnli', 'head': 'classification', 'label_names': ['a', 'b', 'c'],
      'num_outputs': 3, 'peft': peft.to_meta(method), 'trainable_rules': rules,
      'base': {**pre.identity, 'path': str(base_dir)}, 'max_seq_length': 32,
      'pooling': 'cls'})
  return directory


def test_our_lora_artifact_exports_with_same_logits(base, batch, tmp_path):
  art = _method_artifact(base, tmp_path / 'art', LoRAConfig(
      rank=4, alpha=16, targets=('query', 'value', 'intermediate', 'output'), layers=(0,)))
  out = tmp_path / 'ah'
  assert _cli('--adapter', art, '--format', 'adapterhub', '--output', out) == 0
  config = json.loads((out / 'adapter_config.json').read_text())['config']
  assert (config['r'], config['alpha'], config['attn_matrices'], config['leave_out']) == (
      4, 16.0, ['q', 'v'], [1])
  ours, _ = _ours([art], batch)
  diff = float(np.abs(ours - _torch_logits(_load_in_adapterhub(base, out)[0], batch)).max())
  print(f'export LoRA: {diff:.2e}')
  assert diff < TOL


def test_what_adapterhub_cannot_hold_is_refused_in_one_line(base, tmp_path, capsys):
  cases = {
      'attn_out': (LoRAConfig(rank=2, targets=('attention_output',)), 'attention_output'),
      'lora_ia3': (peft.combine([LoRAConfig(rank=2), IA3Config()]), 'two \'lora\' methods'),
  }
  for key, (method, says) in cases.items():
    art = _method_artifact(base, tmp_path / key, method)
    capsys.readouterr()
    assert _cli('--adapter', art, '--format', 'adapterhub', '--output', tmp_path / 'o') == 2
    err = capsys.readouterr().err
    assert says in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / 'o').exists()
  gated = _adapterhub_model(base, 'g', adapters.LoRAConfig(r=2, use_gating=True))
  gated.save_adapter(str(tmp_path / 'gated'), 'g', with_head=True)
  assert _cli('--adapter', tmp_path / 'gated', '--format', 'adapterhub', '--to_artifact',
              '--base', base, '--output', tmp_path / 'o') == 2
  assert 'use_gating' in capsys.readouterr().err


def test_electra_adapterhub_lora_round_trip(tmp_path, minilm_dir):
  """Another family through the same converters: ELECTRA (projected embeddings, GELU
  classifier layer as AdapterHub's 2-layer head) with LoRA + head, imported and exported."""
  from test_families_more import _electra
  _, base_dir = _electra(tmp_path / 'base', minilm_dir, embedding_size=16)
  ids = np.array([[101, 2023, 2003, 1037, 3231, 102, 0], [101, 2178, 102, 0, 0, 0, 0]], np.int32)
  batch = {'input_ids': ids, 'attention_mask': (ids != 0).astype(np.int32),
           'token_type_ids': np.zeros_like(ids)}
  model = _adapterhub_model(base_dir, 'el', adapters.LoRAConfig(r=2, output_lora=True),
                            activation_function='gelu')  # ElectraClassificationHead's
  theirs = _torch_logits(model, batch)
  model.save_adapter(str(tmp_path / 'ah'), 'el', with_head=True)
  art, back = tmp_path / 'art', tmp_path / 'back'
  assert _cli('--adapter', tmp_path / 'ah', '--format', 'adapterhub', '--to-artifact',
              '--base', base_dir, '--output', art) == 0
  assert _cli('--adapter', art, '--format', 'adapterhub', '--output', back) == 0
  ours, _ = _ours([art], batch)
  again = _torch_logits(_load_in_adapterhub(base_dir, back)[0], batch)
  diffs = float(np.abs(ours - theirs).max()), float(np.abs(again - theirs).max())
  print(f'ELECTRA LoRA: import {diffs[0]:.2e}, export back {diffs[1]:.2e}')
  assert max(diffs) < TOL
