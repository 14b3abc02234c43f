"""AdapterHub (`adapters` 1.3) round trips: our export loads there, their adapters serve here.

Logits are compared on a padded batch of a tiny random BERT (hidden 32, 2 layers).
"""

import dataclasses
import json

import flax.traverse_util as tu
import numpy as np
import pytest

# Dev dependencies (requirements-dev.txt): a missing one fails here, loudly, as in test_parity.
import adapters
import torch
import transformers

from adapter_tuning import export, load_pretrained  # noqa: E402
from adapter_tuning.errors import UsageError  # noqa: E402
from adapter_tuning.interop import artifact
from adapter_tuning.serving.multi_adapter import MultiTaskModel, union_adapter  # noqa: E402
from adapter_tuning.training import trainable as trainable_lib  # noqa: E402

VOCAB = ['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]'] + [f'w{i}' for i in range(59)]
TOL = 1e-4


@pytest.fixture(scope='module')
def base(tmp_path_factory):
  directory = tmp_path_factory.mktemp('base')
  torch.manual_seed(0)
  config = transformers.BertConfig(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2,
                                   num_attention_heads=4, intermediate_size=64,
                                   max_position_embeddings=64, initializer_range=0.2)
  transformers.BertModel(config).save_pretrained(directory)
  (directory / 'vocab.txt').write_text('\n'.join(VOCAB) + '\n')
  return directory


@pytest.fixture(scope='module')
def batch():
  rng = np.random.default_rng(0)
  lengths = np.array([12, 7, 3, 9])
  mask = (np.arange(12)[None] < lengths[:, None]).astype(np.int32)
  ids = rng.integers(5, len(VOCAB), (4, 12)).astype(np.int32)
  ids[:, 0] = 2
  ids = np.where(mask == 1, ids, 0).astype(np.int32)
  types = ((np.arange(12)[None] >= lengths[:, None] // 2) & (mask == 1)).astype(np.int32)
  return {'input_ids': ids, 'attention_mask': mask, 'token_type_ids': types}


def _torch_logits(model, batch):
  model.eval()
  with torch.no_grad():
    out = model(**{k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()})
  return out.logits.numpy()


def _ours(artifact_dirs, batch, task_ids=None):
  mt = MultiTaskModel(artifact_dirs)
  ids = np.zeros(len(batch['input_ids']), np.int32) if task_ids is None else task_ids
  return mt.logits(ids, batch), mt


def _cli(*args):
  return export.main(['export', *map(str, args)])


def _make_artifact(base, directory, rules='adapters', adapter=None, head='classification',
                   seed=1, pooling='pooler'):
  """What the trainer would write, without training: random adapters, LayerNorms and head.

  Weights are large enough (here and in the base: initializer_range 0.2) that e.g. exact vs
  tanh GELU in the adapters moves the logits well beyond the tolerance.
  """
  pre = load_pretrained(base, adapter=adapter or {'size': 8, 'init_scale': 0.3})
  rng = np.random.default_rng(seed)
  d = pre.config.hidden_size
  labels = ['entailment', 'neutral', 'contradiction'] if head == 'classification' else []
  n = len(labels) or 2
  params = {'encoder': pre.params,
            'head': {'kernel': rng.normal(0, 0.5, (d, n)), 'bias': rng.normal(0, 0.5, (n,))}}
  flat = tu.flatten_dict(params)
  for k, v in flat.items():
    if ('layer_norm' in k[-2] or k[1] == 'pooler'
        or (len(k) > 2 and k[-3].endswith('_adapter') and k[-1] == 'bias')):
      flat[k] = np.asarray(v) + rng.normal(0, 0.3, v.shape)
  params = tu.unflatten_dict({k: np.asarray(v, np.float32) for k, v in flat.items()})
  resolved = trainable_lib.resolve(rules, pre.config.num_layers)
  trained, _ = trainable_lib.split(params, resolved)
  artifact.save(directory, trained, {
      'task': 'glue/mnli' if head == 'classification' else 'squad', 'head': head,
      'label_names': labels, 'num_outputs': n,
      'adapter': dataclasses.asdict(pre.adapter),
      'trainable_rules': [list(r) for r in resolved],
      'base': {**pre.identity, 'path': str(base)}, 'max_seq_length': 32, 'pooling': pooling})
  return directory


def _load_in_adapterhub(base, out):
  from safetensors.torch import load_file
  model = adapters.AutoAdapterModel.from_pretrained(str(base))
  name = model.load_adapter(str(out))
  model.set_active_adapters(name)
  if (out / 'layer_norms.safetensors').exists():
    result = model.base_model.load_state_dict(load_file(str(out / 'layer_norms.safetensors')),
                                              strict=False)
    assert not result.unexpected_keys
  return model, name


def test_export_loads_in_adapterhub_with_same_logits(base, batch, tmp_path):
  art = _make_artifact(base, tmp_path / 'artifact')
  out = tmp_path / 'ah'
  assert _cli('--adapter', art, '--format', 'adapterhub', '--output', out) == 0
  for f in ('adapter_config.json', 'pytorch_adapter.bin', 'head_config.json',
            'pytorch_model_head.bin', 'layer_norms.safetensors', 'README.md'):
    assert (out / f).exists(), f
  config = json.loads((out / 'adapter_config.json').read_text())['config']
  assert (config['original_ln_before'], config['original_ln_after'],
          config['residual_before_ln'], config['non_linearity']) == (False, True, True, 'gelu')
  ours, _ = _ours([art], batch)

  from safetensors.torch import load_file
  model = adapters.AutoAdapterModel.from_pretrained(str(base))
  name = model.load_adapter(str(out))
  model.set_active_adapters(name)
  assert name == 'glue_mnli' and model.active_head == name
  without_ln = _torch_logits(model, batch)
  result = model.base_model.load_state_dict(load_file(str(out / 'layer_norms.safetensors')),
                                            strict=False)
  assert not result.unexpected_keys
  theirs = _torch_logits(model, batch)
  diff = float(np.abs(ours - theirs).max())
  print(f'export: max |logit difference| = {diff:.2e}')
  assert diff < TOL
  assert np.abs(ours - without_ln).max() > 1e-2  # the trained LayerNorms matter
  assert model.heads[name].config['label2id'] == {'entailment': 0, 'neutral': 1,
                                                  'contradiction': 2}


def test_cls_pooling_head_exports_and_imports_with_same_logits(base, batch, tmp_path, capsys):
  """model.head.pooling=cls is AdapterHub's use_pooler=False head; mean has no equivalent."""
  art = _make_artifact(base, tmp_path / 'artifact', pooling='cls')
  out = tmp_path / 'ah'
  assert _cli('--adapter', art, '--format', 'adapterhub', '--output', out) == 0
  head_config = json.loads((out / 'head_config.json').read_text())['config']
  assert (head_config['layers'], head_config['use_pooler']) == (1, False)
  ours, _ = _ours([art], batch)
  model, _ = _load_in_adapterhub(base, out)
  theirs = _torch_logits(model, batch)
  diff = float(np.abs(ours - theirs).max())
  with capsys.disabled():
    print(f'export cls pooling: max |logit difference| = {diff:.2e}')
  assert diff < TOL
  back = tmp_path / 'back'
  assert _cli('--adapter', out, '--format', 'adapterhub', '--to_artifact', '--base', base,
              '--output', back) == 0
  assert artifact.load(back)[0]['pooling'] == 'cls'
  assert float(np.abs(_ours([back], batch)[0] - theirs).max()) < TOL
  with pytest.raises(UsageError):  # one pass cannot mix poolings
    MultiTaskModel([art, _make_artifact(base, tmp_path / 'pooler_art')])

  mean_art = _make_artifact(base, tmp_path / 'mean_art', pooling='mean')
  capsys.readouterr()
  assert _cli('--adapter', mean_art, '--format', 'adapterhub', '--output', tmp_path / 'x') == 2
  err = capsys.readouterr().err
  assert 'pooling=mean' in err and len(err.strip().splitlines()) == 1
  assert not (tmp_path / 'x').exists()


def test_roberta_pfeiffer_with_trained_pooler_round_trip(tmp_path, capsys):
  """RoBERTa, adapters in layer 1 only, tanh-GELU, a trained pooler (-> AdapterHub's
  two-layer head); exported, loaded in AdapterHub, then imported back."""
  from tokenizers import ByteLevelBPETokenizer
  base = tmp_path / 'roberta'
  torch.manual_seed(0)
  transformers.RobertaModel(transformers.RobertaConfig(
      vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
      intermediate_size=64, max_position_embeddings=40, type_vocab_size=1,
      initializer_range=0.2)).save_pretrained(base)
  bpe = ByteLevelBPETokenizer()
  bpe.train_from_iterator(['a small corpus for roberta'] * 4, vocab_size=300,
                          special_tokens=['<s>', '<pad>', '</s>', '<unk>'])
  bpe.save_model(str(base))
  rules = [('^encoder/pooler/', 'train'), *trainable_lib.ADAPTERS]
  art = _make_artifact(base, tmp_path / 'artifact', rules=rules, adapter={
      'size': 6, 'placement': 'pfeiffer', 'activation': 'gelu_tanh', 'layers': [1],
      'init_scale': 0.1})
  out = tmp_path / 'ah'
  assert _cli('--adapter', art, '--format', 'adapterhub', '--output', out, '--name', 'nli') == 0
  head = json.loads((out / 'head_config.json').read_text())['config']
  assert (head['layers'], head['use_pooler']) == (2, False)
  mask = (np.arange(10)[None] < np.array([10, 4, 7])[:, None]).astype(np.int32)
  ids = np.random.default_rng(0).integers(4, 300, (3, 10))
  ids[:, 0] = 0
  batch = {'input_ids': np.where(mask == 1, ids, 1).astype(np.int32), 'attention_mask': mask,
           'token_type_ids': np.zeros_like(mask)}
  ours, _ = _ours([art], batch)
  model, _ = _load_in_adapterhub(base, out)
  theirs = _torch_logits(model, batch)
  back = tmp_path / 'back'
  assert _cli('--adapter', out, '--format', 'adapterhub', '--to_artifact', '--base', base,
              '--output', back) == 0
  again, _ = _ours([back], batch)
  meta_in, meta_back = artifact.load(art)[0], artifact.load(back)[0]
  for key in ('task', 'label_names', 'max_seq_length', 'head'):
    assert meta_back[key] == meta_in[key], key
  assert {k: meta_back['adapter'][k] for k in ('size', 'placement', 'activation', 'layers')} == {
      'size': 6, 'placement': 'pfeiffer', 'activation': 'gelu_tanh', 'layers': [1]}
  diffs = float(np.abs(ours - theirs).max()), float(np.abs(ours - again).max())
  with capsys.disabled():
    print(f'roberta export: {diffs[0]:.2e}, round trip: {diffs[1]:.2e}')
  assert max(diffs) < TOL


def test_span_head_exports_as_question_answering_head(base, batch, tmp_path):
  art = _make_artifact(base, tmp_path / 'artifact', head='span')
  out = tmp_path / 'ah'
  assert _cli('--adapter', art, '--format', 'adapterhub', '--output', out) == 0
  ours, _ = _ours([art], batch)  # [B, T, 2]: start, end
  model, _ = _load_in_adapterhub(base, out)
  model.eval()
  with torch.no_grad():
    res = model(**{k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()})
  theirs = np.stack([res.start_logits.numpy(), res.end_logits.numpy()], -1)
  assert np.abs(ours - theirs).max() < TOL


def _adapterhub_model(base, name, config, head_kwargs, seed):
  torch.manual_seed(seed)
  model = adapters.AutoAdapterModel.from_pretrained(str(base))
  model.add_adapter(name, config=config)
  model.add_classification_head(name, **head_kwargs)
  with torch.no_grad():
    for key, p in model.named_parameters():
      if f'adapters.{name}.' in key or f'heads.{name}.' in key:
        p.normal_(0.0, 0.3)
  model.set_active_adapters(name)
  model.active_head = name
  return model


def test_import_houlsby_serves_with_same_logits(base, batch, tmp_path):
  model = _adapterhub_model(
      base, 'houlsby', adapters.DoubleSeqBnConfig(reduction_factor=4),  # swish, m = 8
      dict(num_labels=3, id2label={0: 'a', 1: 'b', 2: 'c'}), seed=1)  # layers=2, raw [CLS]
  theirs = _torch_logits(model, batch)
  model.save_adapter(str(tmp_path / 'ah'), 'houlsby', with_head=True)
  out = tmp_path / 'artifact'
  assert _cli('--adapter', tmp_path / 'ah', '--format', 'adapterhub', '--to-artifact',
              '--base', base, '--output', out) == 0
  meta, params = artifact.load(out)
  assert meta['adapter']['placement'] == 'houlsby' and meta['adapter']['activation'] == 'swish'
  assert meta['label_names'] == ['a', 'b', 'c'] and 'pooler' in params['encoder']
  ours, _ = _ours([out], batch)
  diff = float(np.abs(ours - theirs).max())
  print(f'import houlsby: max |logit difference| = {diff:.2e}')
  assert diff < TOL


def test_import_pfeiffer_serves_with_same_logits(base, batch, tmp_path, capsys):
  # Per-layer widths (4 and 8: zero-padded here), learned per-channel scaling folded into
  # the up projection, a regression head on the pooler output.
  config = adapters.SeqBnConfig(original_ln_before=False, reduction_factor={'0': 8, 'default': 4},
                                scaling='channel')
  model = _adapterhub_model(base, 'pfeiffer', config,
                            dict(num_labels=1, layers=1, use_pooler=True), seed=2)
  theirs = _torch_logits(model, batch)
  model.save_adapter(str(tmp_path / 'ah'), 'pfeiffer', with_head=True, use_safetensors=True)
  out = tmp_path / 'artifact'
  assert _cli('--adapter', tmp_path / 'ah', '--format', 'adapterhub', '--to_artifact',
              '--base', base, '--output', out, '--name', 'glue/stsb') == 0
  meta, _ = artifact.load(out)
  assert (meta['task'], meta['head'], meta['adapter']['placement'],
          meta['adapter']['size']) == ('glue/stsb', 'regression', 'pfeiffer', 8)
  ours, _ = _ours([out], batch)
  diff = float(np.abs(ours - theirs).max())
  with capsys.disabled():
    print(f'import pfeiffer: max |logit difference| = {diff:.2e}')
  assert diff < TOL

  # original_ln_before=True with residual_before_ln=False makes LayerNorm(x + h) the
  # adapter's residual: no equivalent here, refused rather than approximated.
  model.add_adapter('ln_residual', config=adapters.SeqBnConfig(residual_before_ln=False))
  model.save_adapter(str(tmp_path / 'ah_ln_residual'), 'ln_residual', with_head=False)
  capsys.readouterr()
  assert _cli('--adapter', tmp_path / 'ah_ln_residual', '--format', 'adapterhub',
              '--to_artifact', '--base', base, '--output', tmp_path / 'x') == 2
  err = capsys.readouterr().err
  assert 'original_ln_before=True' in err and len(err.strip().splitlines()) == 1


def test_import_default_seqbn_serves_with_same_logits(base, batch, tmp_path, capsys):
  """AdapterHub's default Pfeiffer adapter (SeqBnConfig(): original_ln_before=True, the
  adapter reads LN(x + h) and the LN runs again) imports exactly, and exports back."""
  model = _adapterhub_model(base, 'seqbn', adapters.SeqBnConfig(),  # relu, m = 2
                            dict(num_labels=3, layers=1, use_pooler=True), seed=3)
  theirs = _torch_logits(model, batch)
  model.save_adapter(str(tmp_path / 'ah'), 'seqbn', with_head=True)
  out = tmp_path / 'artifact'
  assert _cli('--adapter', tmp_path / 'ah', '--format', 'adapterhub', '--to_artifact',
              '--base', base, '--output', out) == 0
  meta, _ = artifact.load(out)
  assert (meta['adapter']['placement'], meta['adapter']['original_ln_before']) == ('pfeiffer', True)
  ours, _ = _ours([out], batch)
  diff = float(np.abs(ours - theirs).max())

  # Round trip: the artifact exports with original_ln_before=true and loads there again.
  back = tmp_path / 'ah_back'
  assert _cli('--adapter', out, '--format', 'adapterhub', '--output', back) == 0
  config = json.loads((back / 'adapter_config.json').read_text())['config']
  assert (config['original_ln_before'], config['residual_before_ln'],
          config['original_ln_after'], config['mh_adapter']) == (True, True, True, False)
  again = _torch_logits(_load_in_adapterhub(base, back)[0], batch)
  diff_back = float(np.abs(again - theirs).max())
  with capsys.disabled():
    print(f'import SeqBnConfig(): max |logit difference| = {diff:.2e}, '
          f'exported back: {diff_back:.2e}')
  assert max(diff, diff_back) < TOL


def test_original_ln_before_artifact_round_trip(base, batch, tmp_path, capsys):
  """Our artifact with original_ln_before (and trained LayerNorms, used twice per site)
  exports, matches AdapterHub, imports back; the flag changes the logits."""
  adapter = {'size': 8, 'init_scale': 0.3, 'placement': 'pfeiffer', 'original_ln_before': True}
  art = _make_artifact(base, tmp_path / 'artifact', adapter=adapter)
  plain = _make_artifact(base, tmp_path / 'plain', adapter={**adapter, 'original_ln_before': False})
  out = tmp_path / 'ah'
  assert _cli('--adapter', art, '--format', 'adapterhub', '--output', out) == 0
  assert json.loads((out / 'adapter_config.json').read_text())['config']['original_ln_before']
  assert 'LN(x + h + s up(act(down(LN(x + h)))))' in (out / 'README.md').read_text()
  ours, _ = _ours([art], batch)
  theirs = _torch_logits(_load_in_adapterhub(base, out)[0], batch)
  back = tmp_path / 'back'
  assert _cli('--adapter', out, '--format', 'adapterhub', '--to_artifact', '--base', base,
              '--output', back) == 0
  assert artifact.load(back)[0]['adapter']['original_ln_before'] is True
  again, _ = _ours([back], batch)
  diffs = float(np.abs(ours - theirs).max()), float(np.abs(ours - again).max())
  with capsys.disabled():
    print(f'original_ln_before export: {diffs[0]:.2e}, round trip: {diffs[1]:.2e}')
  assert max(diffs) < TOL
  assert np.abs(ours - _ours([plain], batch)[0]).max() > 1e-2
  with pytest.raises(UsageError, match='original_ln_before'):  # one pass cannot hold both
    union_adapter([artifact.load(art)[0], artifact.load(plain)[0]])


def test_refusals(base, tmp_path, capsys):
  def refused(*args, says):
    capsys.readouterr()
    assert _cli(*args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and says in err, err

  full = _make_artifact(base, tmp_path / 'full', rules='full')
  refused('--adapter', full, '--format', 'adapterhub', '--output', tmp_path / 'o1',
          says='AdapterHub cannot represent: encoder/embeddings')
  art = _make_artifact(base, tmp_path / 'art')
  (tmp_path / 'exists').mkdir()
  refused('--adapter', art, '--format', 'adapterhub', '--output', tmp_path / 'exists',
          says='exists; pass --overwrite')
  assert _cli('--adapter', art, '--format', 'adapterhub', '--output', tmp_path / 'exists',
              '--overwrite') == 0
  gpt2 = tmp_path / 'gpt2'
  gpt2.mkdir()
  (gpt2 / 'config.json').write_text(json.dumps({'model_type': 'gpt2'}))
  refused('--adapter', tmp_path / 'exists', '--format', 'adapterhub', '--to_artifact',
          '--base', gpt2, '--output', tmp_path / 'o2', says="unsupported model_type 'gpt2'")
  refused('--adapter', art, '--format', 'adapterhub', '--to_artifact', '--base', base,
          '--output', tmp_path / 'o3', says='is not an AdapterHub adapter')
  refused('--adapter', art, '--format', 'peft', '--output', tmp_path / 'o4', says='format')


@pytest.mark.parametrize('name,config,placement', [
    ('par', adapters.ParBnConfig(reduction_factor=4), 'parallel_ffn'),  # scaling 4, relu
    ('par_both', adapters.ParBnConfig(reduction_factor=4, mh_adapter=True, scaling=2.0),
     'parallel'),
])
def test_import_parallel_adapters_serves_with_same_logits(base, batch, tmp_path, name, config,
                                                         placement):
  """He et al.'s (scaled) parallel adapter: AdapterHub's ParBnConfig, imported and served."""
  model = _adapterhub_model(base, name, config,
                            dict(num_labels=3, id2label={0: 'a', 1: 'b', 2: 'c'}), seed=2)
  theirs = _torch_logits(model, batch)
  model.save_adapter(str(tmp_path / 'ah'), name, with_head=True)
  out = tmp_path / 'artifact'
  assert _cli('--adapter', tmp_path / 'ah', '--format', 'adapterhub', '--to-artifact',
              '--base', base, '--output', out) == 0
  meta, _ = artifact.load(out)
  assert meta['adapter']['placement'] == placement
  ours, _ = _ours([out], batch)
  diff = float(np.abs(ours - theirs).max())
  print(f'import {placement}: max |logit difference| = {diff:.2e}')
  assert diff < TOL


def test_parallel_artifact_exports_to_adapterhub_with_same_logits(base, batch, tmp_path):
  art = _make_artifact(base, tmp_path / 'artifact', adapter={
      'size': 8, 'init_scale': 0.3, 'placement': 'parallel', 'scaling': 4.0})
  out = tmp_path / 'ah'
  assert _cli('--adapter', art, '--format', 'adapterhub', '--output', out) == 0
  config = json.loads((out / 'adapter_config.json').read_text())['config']
  assert (config['is_parallel'], config['mh_adapter'], config['scaling']) == (True, True, 4.0)
  ours, _ = _ours([art], batch)
  model, _ = _load_in_adapterhub(base, out)
  diff = float(np.abs(ours - _torch_logits(model, batch)).max())
  print(f'export parallel: max |logit difference| = {diff:.2e}')
  assert diff < TOL
