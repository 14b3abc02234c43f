"""ModernBERT (models/families/modernbert, models/modernbert_layer) against transformers.

Tiny randomly initialised `ModernBertForSequenceClassification` models (hidden 32, 4 layers,
4 heads, initializer_range 0.2, perturbed LayerNorms so their mapping matters) are saved
with MiniLM's tokenizer.json and loaded through `load_pretrained`. Every batch is longer than
the sliding window of the local layers (8 tokens: |i - j| <= 4), so global and local layers,
both rotary thetas and the window all move the output. Checked: last hidden states and
logits (cls and mean pooling) to 1e-4, LoRA on q/k/v of the fused Wqkv and IA³ merged back
into a checkpoint that transformers alone runs to our logits, bottleneck adapters against
AdapterHub's plugin interface, and every PEFT method training on the family.
"""

import shutil

import flax.traverse_util as tu
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from adapter_tuning import load_pretrained, peft
from adapter_tuning.errors import UsageError
from adapter_tuning.interop import hf_checkpoint
from adapter_tuning.models.families import family_named
from adapter_tuning.models.encoder import Encoder
from adapter_tuning.models.heads import TaskModel
from adapter_tuning.peft.bottleneck import AdapterConfig, adapter_param_count
from adapter_tuning.peft.ia3 import IA3Config
from adapter_tuning.peft.lora import LoRAConfig
from adapter_tuning.peft.prefix import PrefixConfig
from helpers import merged_classifier

SENTENCES = ['The quick brown fox jumps over the lazy dog and keeps running far away.', 'Hello!',
             'adapters add few parameters per task and the base stays frozen']
PAIRS = ['What jumps?', 'A greeting', 'how many parameters']
NUM_LABELS = 3
TINY = dict(vocab_size=30522, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
            num_attention_heads=4, max_position_embeddings=64, local_attention=8,
            pad_token_id=0, cls_token_id=101, sep_token_id=102, bos_token_id=101,
            eos_token_id=102, initializer_range=0.2, num_labels=NUM_LABELS)
GEOMETRIES = {
    'base': dict(global_attn_every_n_layers=3, classifier_pooling='cls'),
    # every other layer global, biases everywhere, one theta for all layers, mean pooling
    'biased_mean': dict(global_attn_every_n_layers=2, classifier_pooling='mean',
                        attention_bias=True, mlp_bias=True, norm_bias=True, classifier_bias=True,
                        local_rope_theta=None, global_rope_theta=5000.0),
}


def _modernbert(directory, minilm_dir, **config):
  torch.manual_seed(0)
  model = transformers.ModernBertForSequenceClassification(transformers.ModernBertConfig(
      **TINY, **config, attn_implementation='eager')).eval()
  with torch.no_grad():
    for name, param in model.named_parameters():
      if 'norm' in name or name.endswith('bias'):
        param.add_(torch.randn_like(param) * 0.2)
  model.save_pretrained(directory, max_shard_size='100KB')  # sharded safetensors
  shutil.copyfile(minilm_dir / 'tokenizer.json', directory / 'tokenizer.json')
  return model, directory


@pytest.fixture(scope='module')
def base_dir(tmp_path_factory, minilm_dir):
  """The 'base' geometry's checkpoint, for tests that only read it."""
  return _modernbert(tmp_path_factory.mktemp('modernbert'), minilm_dir, **GEOMETRIES['base'])[1]


def _hf_forward(model, batch):
  inputs = {k: torch.tensor(batch[k], dtype=torch.long) for k in ('input_ids', 'attention_mask')}
  with torch.no_grad():
    out = model(**inputs)
    hidden = model.model(**inputs).last_hidden_state
  return hidden.numpy(), out.logits.numpy()


def _head_of(model):
  return {'kernel': model.classifier.weight.detach().numpy().T,
          'bias': model.classifier.bias.detach().numpy()}


def _logits(ours, encoder_params, head, batch, adapter=None):
  task = TaskModel(ours.config, adapter, 'classification', NUM_LABELS, pooling='pooler')
  return np.asarray(task.apply({'params': {'encoder': encoder_params, 'head': head}},
                               batch['input_ids'], batch['attention_mask'],
                               batch['token_type_ids']))


@pytest.mark.parametrize('geometry', sorted(GEOMETRIES))
def test_modernbert_matches_transformers(tmp_path, minilm_dir, geometry):
  model, directory = _modernbert(tmp_path, minilm_dir, **GEOMETRIES[geometry])
  assert len(list(directory.glob('model-*.safetensors'))) > 1
  ours = load_pretrained(directory)
  assert ours.config.family == 'modernbert' and ours.config.final_norm
  assert ('attention_layer_norm' in ours.params['layer_0']) is False
  assert ('bias' in ours.params['layer_1']['attention']['query']) == (geometry != 'base')
  batch = ours.encode(SENTENCES, PAIRS, max_length=48)
  assert not batch['attention_mask'].all() and batch['attention_mask'].sum(1).max() > 2 * 8
  hidden, logits = _hf_forward(model, batch)
  mask = batch['attention_mask'].astype(bool)
  np.testing.assert_allclose(batch['last_hidden_state'][mask], hidden[mask], atol=1e-4, rtol=0)
  np.testing.assert_allclose(_logits(ours, ours.params, _head_of(model), batch), logits,
                             atol=1e-4, rtol=0)
  assert np.abs(logits).max() > 0.1


def test_window_and_thetas_matter(base_dir):
  """The comparison above is sensitive to the window and the local theta: changing either
  moves the output far beyond the tolerance."""
  import dataclasses
  directory = base_dir
  ours = load_pretrained(directory)
  batch = ours.encode(SENTENCES, PAIRS, max_length=48)
  options = ours.config.family_options
  for change in ({'local_attention': 64}, {'local_rope_theta': options.global_rope_theta}):
    config = dataclasses.replace(ours.config,
                                 family_options=dataclasses.replace(options, **change))
    other = Encoder(config).apply({'params': ours.params}, batch['input_ids'],
                                  batch['attention_mask'], batch['token_type_ids'])
    mask = batch['attention_mask'].astype(bool)
    assert np.abs(np.asarray(other['last_hidden_state'])[mask]
                  - batch['last_hidden_state'][mask]).max() > 1e-2, change


def test_scanned_rematerialised_training_forward(base_dir):
  directory = base_dir
  ours = load_pretrained(directory)
  batch = ours.encode(SENTENCES, PAIRS, max_length=48)
  head = {'kernel': np.ones((32, NUM_LABELS), np.float32), 'bias': np.zeros(NUM_LABELS)}
  args = (batch['input_ids'], batch['attention_mask'], batch['token_type_ids'])
  variables = {'params': {'encoder': ours.params, 'head': head}}
  plain = TaskModel(ours.config, None, 'classification', NUM_LABELS, pooling='pooler')
  scanned = TaskModel(ours.config, None, 'classification', NUM_LABELS, pooling='pooler',
                      remat=True, scan=True)
  np.testing.assert_allclose(np.asarray(scanned.apply(variables, *args)),
                             np.asarray(plain.apply(variables, *args)), atol=1e-5, rtol=0)


def test_lora_on_fused_qkv_and_ia3_merge_into_a_checkpoint_transformers_runs(tmp_path,
                                                                            minilm_dir):
  """LoRA on query, key and value separately (three thirds of Wqkv), the attention output,
  Wi and Wo, plus IA³, merged by hf_merged into a ModernBertForSequenceClassification that
  transformers alone runs to our logits (pooler = head.dense/head.norm, head = classifier)."""
  (tmp_path / 'base').mkdir()
  _, directory = _modernbert(tmp_path / 'base', minilm_dir, **GEOMETRIES['base'])
  config = peft.combine([
      LoRAConfig(rank=2, alpha=4.0, targets=('query', 'key', 'value', 'attention_output',
                                             'intermediate', 'output')),
      IA3Config(targets=('key', 'value', 'intermediate', 'output'))])
  ours = load_pretrained(directory, config)
  encoder, head, merged = merged_classifier(ours, config, directory, tmp_path / 'merged',
                                            NUM_LABELS, attn_implementation='eager')
  assert type(merged).__name__ == 'ModernBertForSequenceClassification'
  batch = ours.encode(SENTENCES, PAIRS, max_length=48)
  ours_logits = _logits(ours, encoder, head, batch, config)
  _, ref = _hf_forward(merged, batch)
  np.testing.assert_allclose(ours_logits, ref, atol=1e-4, rtol=0)
  plain = _logits(ours, {**ours.params, 'pooler': encoder['pooler']}, head, batch)
  assert np.abs(plain - ours_logits).max() > 1e-2  # the methods moved the output


def test_export_encoder_state_round_trips_the_fused_tensors(tmp_path, minilm_dir):
  model, directory = _modernbert(tmp_path, minilm_dir, **GEOMETRIES['biased_mean'])
  ours = load_pretrained(directory)
  state = hf_checkpoint.export_encoder_state(
      {k: v for k, v in ours.params.items() if k != 'pooler'}, 'modernbert')
  reference = {k[len('model.'):]: v.numpy() for k, v in model.state_dict().items()
               if k.startswith('model.')}
  assert state.keys() == reference.keys()
  for key, value in reference.items():
    np.testing.assert_array_equal(state[key], value, err_msg=key)


def test_houlsby_adapters_equal_hooks_on_the_transformers_model(tmp_path, minilm_dir):
  """Our pre-LN placement, x + (y + up(f(down(y)))) after attn.Wo and mlp.Wo, computed in
  torch by forward hooks on the transformers model with the same non-zero weights."""
  model, directory = _modernbert(tmp_path, minilm_dir, **GEOMETRIES['base'])
  ours = load_pretrained(directory, AdapterConfig(size=8, placement='houlsby',
                                                   activation='swish', init_scale=0.3))
  rng = np.random.default_rng(0)
  t = lambda a: torch.tensor(np.asarray(a, np.float32))
  hooks = []
  for i, layer in enumerate(model.model.layers):
    for site, module in (('attention', layer.attn.Wo), ('ffn', layer.mlp.Wo)):
      p = ours.params[f'layer_{i}'][f'{site}_adapter']
      p['down']['bias'] = rng.normal(0, 0.3, p['down']['bias'].shape).astype(np.float32)
      p['up']['bias'] = rng.normal(0, 0.3, p['up']['bias'].shape).astype(np.float32)
      adapter = lambda y, p=p: y + torch.nn.functional.silu(
          y @ t(p['down']['kernel']) + t(p['down']['bias'])) @ t(p['up']['kernel']) + t(
              p['up']['bias'])
      hooks.append(module.register_forward_hook(lambda m, args, y, f=adapter: f(y)))
  batch = ours.encode(SENTENCES, None, max_length=48)
  hidden, _ = _hf_forward(model, batch)
  for hook in hooks:
    hook.remove()
  mask = batch['attention_mask'].astype(bool)
  np.testing.assert_allclose(batch['last_hidden_state'][mask], hidden[mask], atol=1e-4, rtol=0)
  plain = load_pretrained(directory).encode(SENTENCES, None, max_length=48)
  assert np.abs(plain['last_hidden_state'] - batch['last_hidden_state']).max() > 1e-2


def test_adapterhub_plugin_bottleneck_is_not_the_identity_on_modernbert(tmp_path, minilm_dir):
  """Why there is no AdapterHub parity for ModernBERT bottleneck adapters: adapters 1.3's
  plugin interface requires original_ln_after=True and then adds the normalised sub-layer
  input (and, after attention, runs mlp_norm) inside the residual branch, so even all-zero
  adapters change the base's output. Ours at zero are the base exactly (above)."""
  import adapters
  model, directory = _modernbert(tmp_path, minilm_dir, **GEOMETRIES['base'])
  batch = load_pretrained(directory).encode(SENTENCES, None, max_length=48)
  before, _ = _hf_forward(model, batch)
  adapters.init(model.model)
  with pytest.raises(ValueError, match='original_ln_after=False'):
    model.model.add_adapter('b', config=adapters.BnConfig(
        mh_adapter=True, output_adapter=True, reduction_factor=4, non_linearity='swish',
        original_ln_after=False))
  model.model.add_adapter('a', config=adapters.DoubleSeqBnConfig(reduction_factor=4))
  model.model.set_active_adapters('a')
  with torch.no_grad():
    for name, param in model.model.named_parameters():
      if '.adapters.a.' in name:
        param.zero_()
  after, _ = _hf_forward(model, batch)
  mask = batch['attention_mask'].astype(bool)
  assert np.abs(after[mask] - before[mask]).max() > 1e-1


METHODS = {
    'houlsby': AdapterConfig(size=4, placement='houlsby'),
    'pfeiffer': AdapterConfig(size=4, placement='pfeiffer'),
    'parallel': AdapterConfig(size=4, placement='parallel', scaling=4.0),
    'lora': LoRAConfig(rank=2, targets=('query', 'value')),
    'ia3': IA3Config(),
    'prefix': PrefixConfig(length=3),
    'mam': peft.combine([PrefixConfig(length=3),
                         AdapterConfig(size=4, placement='parallel_ffn', scaling=4.0)]),
}


@pytest.mark.parametrize('method', sorted(METHODS))
def test_every_method_trains_on_modernbert(base_dir, method):
  """Each method's parameters get finite, non-zero gradients through the windowed, rotary
  layers (prefix positions are seen by every query, window or not); zero-initialised
  bottleneck adapters are exactly the base, with 2md + d + m parameters per adapter."""
  directory = base_dir
  config = METHODS[method]
  ours = load_pretrained(directory, config)
  batch = ours.encode(SENTENCES, PAIRS, max_length=48)
  model = TaskModel(ours.config, config, 'classification', NUM_LABELS, pooling='mean')
  head = {'kernel': np.ones((32, NUM_LABELS), np.float32), 'bias': np.zeros(NUM_LABELS)}
  args = (batch['input_ids'], batch['attention_mask'], batch['token_type_ids'])
  loss = lambda p: jnp.sum(model.apply({'params': {'encoder': p, 'head': head}}, *args) ** 2)
  grads = jax.grad(loss)(ours.params)
  method_grads = [g for k, g in tu.flatten_dict(grads).items() if peft.is_method_param(k)]
  assert method_grads and all(np.isfinite(g).all() for g in method_grads)
  assert max(np.abs(g).max() for g in method_grads) > 0
  if method in ('houlsby', 'pfeiffer'):
    adapters_only = {k: v for k, v in tu.flatten_dict(ours.params).items() if '_adapter' in k[1]}
    sites = 2 if method == 'houlsby' else 1
    assert sum(v.size for v in adapters_only.values()) == 4 * sites * adapter_param_count(32, 4)
    zero = load_pretrained(directory, AdapterConfig(size=4, placement=method, init_scale=0.0))
    plain = load_pretrained(directory)
    np.testing.assert_allclose(zero.encode(SENTENCES, PAIRS, 48)['last_hidden_state'],
                               plain.encode(SENTENCES, PAIRS, 48)['last_hidden_state'],
                               atol=1e-6, rtol=0)


def test_config_reader_and_key_map():
  family = family_named('modernbert')
  config = family.read_config({'model_type': 'modernbert', **TINY}, 'config.json')
  assert (config.type_vocab_size, config.absolute_positions, config.norm_bias,
          config.pooler_bias, config.pooler_input, config.hidden_act) == (
              0, False, False, False, 'cls', 'gelu')
  options = config.family_options
  assert (options.local_rope_theta, options.global_rope_theta, options.global_every,
          options.local_attention) == (10000.0, 160000.0, 3, 8)
  assert [options.is_global(i) for i in range(4)] == [True, False, False, True]
  assert family.checkpoint_key(('layer_2', 'attention', 'value', 'kernel')) == (
      'layers.2.attn.Wqkv.weight', 'attn_in:2')
  assert family.checkpoint_key(('layer_1', 'intermediate', 'kernel')) == (
      'layers.1.mlp.Wi.weight', 'linear')
  assert family.checkpoint_key(('pooler', 'norm', 'scale')) == ('head.norm.weight', 'copy')
  assert family.checkpoint_key(('final_layer_norm', 'scale')) == ('final_norm.weight', 'copy')


@pytest.mark.parametrize('change, message', [
    ({'hidden_size': 36}, 'whole, even head size'),
    ({'rope_scaling': {'rope_type': 'yarn', 'factor': 2.0}}, 'rope_scaling .* not supported'),
    ({'classifier_pooling': 'max'}, "classifier_pooling 'max' .* use cls or mean"),
    ({'hidden_activation': 'gelu_fast'}, "unsupported hidden_activation 'gelu_fast'"),
])
def test_unsupported_configs_are_one_line_errors(change, message):
  with pytest.raises(UsageError, match=message) as e:
    family_named('modernbert').read_config({**TINY, **change}, 'config.json')
  assert '\n' not in str(e.value)


def test_original_ln_before_is_refused_in_one_line(base_dir):
  directory = base_dir
  with pytest.raises(UsageError, match='original_ln_before') as e:
    load_pretrained(directory, AdapterConfig(size=4, original_ln_before=True))
  assert '\n' not in str(e.value)


def test_bitfit_without_biases_is_a_one_line_error(base_dir):
  from adapter_tuning.training import trainable
  ours = load_pretrained(base_dir)
  params = {'encoder': ours.params, 'head': {'kernel': np.zeros((32, NUM_LABELS), np.float32),
                                             'bias': np.zeros(NUM_LABELS, np.float32)}}
  with pytest.raises(UsageError, match='trainable=bitfit finds no bias') as e:
    trainable.split(params, trainable.resolve('bitfit', 4))
  assert '\n' not in str(e.value)
