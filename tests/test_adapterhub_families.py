"""AdapterHub export/import on DistilBERT and DeBERTa-v3, whose AdapterHub modules sit under
other names than BERT's (`Family.adapterhub_modules`) and whose *AdapterModels hand their
heads no pooler output (our pooler travels as the first layer of a 2-layer head).

Tiny random *ForSequenceClassification checkpoints (hidden 32, 2 layers; MiniLM's
tokenizer.json) are the bases. Artifacts with random non-zero weights export, load with
`AutoAdapterModel.from_pretrained(base)` + `load_adapter` (+ the LayerNorm file, as the
export's README says) and give our logits to 1e-4; importing the export back
(--to_artifact) gives the artifact's weights again.
"""

import json

import adapters
import flax.traverse_util as tu
import numpy as np
import pytest

from adapter_tuning.interop import artifact
from adapter_tuning.peft.ia3 import IA3Config
from adapter_tuning.peft.lora import LoRAConfig
from adapter_tuning.peft.prefix import PrefixConfig
from adapter_tuning.training import trainable as trainable_lib
from test_adapterhub import TOL, _cli, _load_in_adapterhub, _make_artifact, _ours, _torch_logits
from test_adapterhub_methods import _method_artifact

POOLER_ACT = {'distilbert': 'relu', 'deberta-v2': 'gelu'}  # pre_classifier, ContextPooler


@pytest.fixture(scope='module', params=sorted(POOLER_ACT))
def family_base(request, tmp_path_factory, minilm_dir):
  """(family, base folder): a tiny random DistilBERT or DeBERTa-v3 classifier save."""
  directory = tmp_path_factory.mktemp(request.param)
  if request.param == 'distilbert':
    from test_families_more import _distilbert
    _distilbert(directory, minilm_dir, sinusoidal=False)
  else:
    from test_deberta import V3, _deberta
    _deberta(directory, minilm_dir, **V3)
  return request.param, directory


@pytest.fixture(scope='module')
def batch():
  """A padded batch of BERT-vocabulary ids; one token type (neither base uses them)."""
  rng = np.random.default_rng(0)
  lengths = np.array([12, 7, 3])
  mask = (np.arange(12)[None] < lengths[:, None]).astype(np.int32)
  ids = rng.integers(1000, 30000, (3, 12)).astype(np.int32)
  ids[:, 0] = 101
  ids[np.arange(3), lengths - 1] = 102
  ids = np.where(mask == 1, ids, 0).astype(np.int32)
  return {'input_ids': ids, 'attention_mask': mask, 'token_type_ids': np.zeros_like(ids)}


def _theirs(model, family, batch):
  """AdapterHub's logits; DistilBERT's forward takes no token_type_ids."""
  if family == 'distilbert':
    batch = {k: v for k, v in batch.items() if k != 'token_type_ids'}
  return _torch_logits(model, batch)


def _flat(directory):
  return {'/'.join(k): np.asarray(v) for k, v in tu.flatten_dict(artifact.load(directory)[1]).items()}


def _round_trip(family, base, art, batch, tmp_path):
  """Export `art`, check AdapterHub's logits against ours, import back, check the weights."""
  out, back = tmp_path / 'ah', tmp_path / 'back'
  assert _cli('--adapter', art, '--format', 'adapterhub', '--output', out) == 0
  model, name = _load_in_adapterhub(base, out)
  theirs = _theirs(model, family, batch)
  ours, _ = _ours([art], batch)
  model.set_active_adapters(None)  # the same head on the bare base: the adapter matters
  model.active_head = name
  assert np.abs(_theirs(model, family, batch) - theirs).max() > 1e-2
  diff = float(np.abs(ours - theirs).max())
  assert _cli('--adapter', out, '--format', 'adapterhub', '--to-artifact', '--base', base,
              '--output', back) == 0
  want, got = _flat(art), _flat(back)
  assert sorted(got) == sorted(want)
  weights = max(float(np.abs(got[k] - want[k]).max()) for k in want)
  print(f'{family} {art.name}: export {diff:.2e}, import back {weights:.2e}')
  assert diff < TOL and weights < 1e-6
  return out


def test_houlsby_with_layer_norms_and_pooler_round_trips(family_base, batch, tmp_path):
  """Non-zero Houlsby adapters, trained LayerNorms (DeBERTa's relative-table one too) and a
  trained pooler: AdapterHub's 2-layer head with the family's pooler activation."""
  family, base = family_base
  art = _make_artifact(base, tmp_path / 'houlsby', adapter={
      'size': 8, 'init_scale': 0.3, 'activation': 'swish', 'placement': 'houlsby'},
      rules=[('^encoder/pooler/', 'train'), *trainable_lib.ADAPTERS])
  out = _round_trip(family, base, art, batch, tmp_path)
  head = json.loads((out / 'head_config.json').read_text())['config']
  assert (head['layers'], head['use_pooler'], head['activation_function']) == (
      2, False, POOLER_ACT[family])
  assert json.loads((out / 'adapter_config.json').read_text())['model_class'] == {
      'distilbert': 'DistilBertAdapterModel', 'deberta-v2': 'DebertaV2AdapterModel'}[family]


@pytest.mark.parametrize('method', ['lora', 'ia3'])
def test_lora_and_ia3_round_trip(family_base, batch, tmp_path, method):
  """Every site AdapterHub has LoRA/IA³ at (q, k, v, FFN in, FFN out; IA³ has no q), a [CLS]
  head."""
  family, base = family_base
  targets = ('key', 'value', 'intermediate', 'output')
  config = (LoRAConfig(rank=4, alpha=8, targets=('query',) + targets) if method == 'lora'
            else IA3Config(targets=targets))
  _round_trip(family, base, _method_artifact(base, tmp_path / method, config), batch, tmp_path)


def _one_line_refusal(capsys, says, *args):
  capsys.readouterr()
  assert _cli(*args) == 2
  err = capsys.readouterr().err
  assert says in err and len(err.strip().splitlines()) == 1, err


def test_refusals(family_base, tmp_path, capsys):
  """One line each: a frozen pooler these heads cannot read, a use_pooler head, and prefix
  tuning (DeBERTa: ours has none; DistilBERT: AdapterHub's depends on the attention kernel)."""
  family, base = family_base
  frozen = _make_artifact(base, tmp_path / 'frozen', adapter={'size': 8})
  _one_line_refusal(capsys, 'no pooler output', '--adapter', frozen, '--format', 'adapterhub',
                    '--output', tmp_path / 'o')
  art = _method_artifact(base, tmp_path / 'lora', LoRAConfig(rank=2))
  assert _cli('--adapter', art, '--format', 'adapterhub', '--output', tmp_path / 'ah') == 0
  head = json.loads((tmp_path / 'ah' / 'head_config.json').read_text())
  head['config']['use_pooler'] = True
  (tmp_path / 'ah' / 'head_config.json').write_text(json.dumps(head))
  _one_line_refusal(capsys, 'use_pooler=True', '--adapter', tmp_path / 'ah', '--format',
                    'adapterhub', '--to_artifact', '--base', base, '--output', tmp_path / 'o')
  model = adapters.AutoAdapterModel.from_pretrained(str(base))
  model.add_adapter('p', config=adapters.PrefixTuningConfig(prefix_length=4))
  model.add_classification_head('p', num_labels=3, layers=1)
  model.save_adapter(str(tmp_path / 'prefix'), 'p', with_head=True)
  _one_line_refusal(capsys, 'prefix tuning does not convert', '--adapter', tmp_path / 'prefix',
                    '--format', 'adapterhub', '--to_artifact', '--base', base, '--output',
                    tmp_path / 'o')
  if family == 'distilbert':
    art = _method_artifact(base, tmp_path / 'ours_prefix', PrefixConfig(length=4, bottleneck=8))
    _one_line_refusal(capsys, 'sdpa', '--adapter', art, '--format', 'adapterhub', '--output',
                      tmp_path / 'o')
  assert not (tmp_path / 'o').exists()
