"""peft: the method seam. A method is a config object that hands the encoder a module per
layer site; these tests plug a small method in at the projection sites (where LoRA and IA³
will hook) and check the encoder runs it exactly where the seam says, and that trainable
rules, parameter counts and the checkpoint reader find its parameters by its marker."""

import dataclasses

import flax.linen as nn
import flax.traverse_util as tu
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adapter_tuning import peft
from adapter_tuning.interop.pretrained import load_pretrained
from adapter_tuning.models.encoder import Encoder
from adapter_tuning.peft import bottleneck
from adapter_tuning.training import trainable

TEXTS = ['a short sentence', 'another, somewhat longer sentence with more tokens in it']


class Scale(nn.Module):
  """y * s, s a learned vector over y's trailing axes (IA³'s form)."""

  @nn.compact
  def __call__(self, x, y, rng=None):
    del x, rng
    return y * self.param('scale', nn.initializers.ones, y.shape[2:])


@dataclasses.dataclass(frozen=True)
class ScaleConfig(peft.MethodConfig):
  site: str
  layer: int = 1
  seed: int = 0

  def sites(self, layer):
    return (self.site,) if layer == self.layer else ()

  def hook(self, layer, site, dtype):
    del dtype
    return Scale(name=f'{site}_scaled') if site in self.sites(layer) else None

  def check(self, model_config):
    assert self.layer < model_config.num_layers

  def init_layer(self, layer_params, layer):
    for site in self.sites(layer):
      scale = peft.site_scope(layer_params, site)[f'{site}_scaled']['scale']
      scale[...] = np.random.default_rng(layer).uniform(0.5, 1.5, scale.shape)


SCALE = peft.Method(name='scale', config_class=ScaleConfig, param_marker='_scaled',
                    from_run_config=lambda c: None, from_meta=lambda m: ScaleConfig(**m),
                    union=lambda cs: cs[0])


@pytest.fixture
def with_scale_method(monkeypatch):
  known = peft.methods()
  monkeypatch.setattr(peft, 'methods', lambda: known + (SCALE,))


def _find(params, marker):
  return {k: v for k, v in tu.flatten_dict(params).items() if any(marker in p for p in k)}


def _fold_scale_into_base(base_params, scaled_params, site):
  """The same function without the hook: the scale folded into the kernel it follows."""
  params = jax.tree.map(np.array, base_params)
  (path, scale), = _find(scaled_params, '_scaled').items()
  layer = params[path[0]]
  assert path[1:] == (('attention', 'value_scaled', 'scale') if site == 'value'
                      else ('intermediate_scaled', 'scale'))
  if site == 'value':  # y = x W + b, W [D, N, H]: scaling y scales W's and b's columns
    layer['attention']['value']['kernel'] *= scale
    layer['attention']['value']['bias'] *= scale
  else:  # 'intermediate': act(x W + b) * s feeds `output`, so s scales its kernel's rows
    layer['output']['kernel'] *= scale[:, None]
  return params


@pytest.mark.parametrize('site', ['value', 'intermediate'])
def test_projection_site_hook_runs_where_the_seam_says(minilm_dir, minilm, with_scale_method,
                                                      site):
  pre = load_pretrained(minilm_dir, adapter=ScaleConfig(site))
  hooked = _find(pre.params, '_scaled')
  assert [k[0] for k in hooked] == ['layer_1']
  assert not np.allclose(next(iter(hooked.values())), 1.0)  # its init_layer drew the values
  folded = _fold_scale_into_base(minilm.params, pre.params, site)
  batch = minilm.tokenizer.pad(*minilm.tokenizer.tokenize(TEXTS))
  args = (batch['input_ids'], batch['attention_mask'], batch['token_type_ids'])
  ours = pre.model.apply({'params': pre.params}, *args)['last_hidden_state']
  plain = Encoder(minilm.config).apply({'params': folded}, *args)['last_hidden_state']
  np.testing.assert_allclose(ours, plain, atol=2e-5)
  assert np.abs(ours - minilm.model.apply({'params': minilm.params}, *args)[
      'last_hidden_state']).max() > 1e-3


def test_rules_counts_and_checkpoint_reader_find_a_method_by_its_marker(minilm_dir,
                                                                       with_scale_method):
  pre = load_pretrained(minilm_dir, adapter=ScaleConfig('value'))
  path = 'encoder/layer_1/attention/value_scaled/scale'
  assert peft.is_method_param(path) and not peft.is_method_param('encoder/layer_1/output/kernel')
  rules = tuple((p, 'train') for p in peft.param_patterns()) + ((r'.*', 'freeze'),)
  assert trainable.decide(rules, path)
  counts = trainable.summary({'encoder': pre.params}, rules)
  assert counts['adapter'] == counts['trainable'] == 12 * 32  # one [N, H] scale vector


def test_bottleneck_is_a_method_on_the_seam():
  config = bottleneck.AdapterConfig(size=8, placement='pfeiffer')
  assert peft.method_of(config) is bottleneck.METHOD
  assert config.sites(0) == ('ffn',)
  assert bottleneck.AdapterConfig(size=8).sites(0) == ('attention', 'ffn')
  assert config.hook(0, 'attention', jnp.float32) is None
  assert config.hook(0, 'query', jnp.float32) is None
  assert peft.config_from_meta({'adapter': dataclasses.asdict(config)}) == config
  assert peft.config_from_meta({'adapter': None}) is None
