"""Prefix tuning <-> AdapterHub's `PrefixTuningConfig` (`adapters` 1.3), both ways.

A converter of `interop/adapterhub.py`. Facts about AdapterHub 1.3.0, checked against its
source (`adapters/methods/prefix_tuning.py`) and files it saved:

* One module per adapter, `prefix_tunings.{name}.{location}`, shared by every layer; its
  state dict lists it once at `{p}.prefix_tuning.prefix_tunings.{name}.{location}.*` and
  again under each layer's prefix pool, `{pool}.pool.` (the same tensors): export writes
  every copy, import reads one and checks the others agree. Location and pool are the
  family's (`Family.adapterhub_modules`): BERT's 'self_prefix' under
  `encoder.layer.{i}.attention.self.prefix_tuning`, DistilBERT's 'self' under
  `transformer.layer.{i}.attention.prefix_tuning`. A family may refuse prefixes with a
  reason (`prefix_refused`: DeBERTa, DistilBERT).
* `flat=False`: `wte.weight` [P, d], `control_trans.0` Linear(d, b), tanh,
  `control_trans.2` Linear(b, layers x 2 x d): our `PrefixMLP` (kernels transposed).
  `flat=True`: `control_trans` [P x layers x 2 x d], the prefixes themselves, laid out
  [P, layers x 2, heads, head_dim]: our flat `kv` [P, layers x 2 x d] reshaped.
* `dropout` acts on the prefixes in training only; `leave_out`, gating and other
  non-linearities have no equivalent here and are refused.
"""

from __future__ import annotations

import re

import numpy as np

from adapter_tuning.errors import UsageError, listing
from adapter_tuning.models.families import family_named
from adapter_tuning.peft import prefix as prefix_method
from adapter_tuning.peft.prefix import PrefixConfig

ARCHITECTURE = 'prefix_tuning'
_DEFAULTS = {'architecture': ARCHITECTURE, 'cross_prefix': True, 'dropout': 0.0,
             'encoder_prefix': True, 'init_weights_seed': None, 'leave_out': [],
             'non_linearity': 'tanh', 'shared_gating': True, 'use_gating': False}
# AdapterHub leaf -> (our path under kv_prefix, transposed)
_MLP = {'wte.weight': (('wte',), False), 'control_trans.0.weight': (('down', 'kernel'), True),
        'control_trans.0.bias': (('down', 'bias'), False),
        'control_trans.2.weight': (('up', 'kernel'), True),
        'control_trans.2.bias': (('up', 'bias'), False)}
_FLAT = {'control_trans': (('kv',), False)}


def owns_key(key: str, name: str) -> bool:
  return f'.prefix_tunings.{name}.' in key


def reads(ah_config: dict) -> bool:
  return ah_config.get('architecture') == ARCHITECTURE


def _modules(model_config):
  """The family's AdapterHub modules, refusing a family whose prefixes do not convert."""
  modules = family_named(model_config.family).adapterhub_modules
  if modules.prefix_refused:
    raise UsageError(f'prefix tuning does not convert between AdapterHub and '
                     f'{model_config.family}: {modules.prefix_refused}')
  return modules


def _owners(key_prefix: str, name: str, model_config) -> list[str]:
  """Every state-dict prefix under which AdapterHub lists the one prefix module."""
  modules = _modules(model_config)
  module = f'prefix_tunings.{name}.{modules.prefix_location}.'
  return [f'{key_prefix}prefix_tuning.{module}'] + [
      f'{key_prefix}{modules.layers}.{i}.{modules.prefix_pool}.pool.{module}'
      for i in range(model_config.num_layers)]


def export(config: PrefixConfig, flat: dict, model_config, name: str,
           key_prefix: str) -> tuple[dict, dict]:
  leaves = _FLAT if config.flat else _MLP
  module = {tuple(k.split('/')[2:]): v for k, v in flat.items()}  # under encoder/kv_prefix/
  missing = [leaf for leaf, (path, _) in leaves.items() if path not in module]
  if missing or len(module) != len(leaves):
    raise UsageError(f'the artifact\'s prefix weights {listing("/".join(k) for k in module)} '
                     f'are not a whole {"flat prefix" if config.flat else "prefix MLP"}; '
                     'AdapterHub needs all of it')
  tensors = {leaf: module[path].T if transpose else module[path]
             for leaf, (path, transpose) in leaves.items()}
  if config.flat:
    tensors['control_trans'] = tensors['control_trans'].reshape(-1)
  state = {owner + leaf: value for owner in _owners(key_prefix, name, model_config)
           for leaf, value in tensors.items()}
  ah = {**_DEFAULTS, 'flat': config.flat, 'prefix_length': config.length,
        'bottleneck_size': config.bottleneck}
  return ah, state


def import_(ah: dict, state: dict, model_config, name: str,
            versioned: bool) -> tuple[PrefixConfig, dict]:
  del versioned
  ah = {**_DEFAULTS, 'flat': False, 'prefix_length': 30, 'bottleneck_size': 512, **ah}
  bad = {k: ah[k] for k in ('use_gating', 'leave_out') if ah[k]}
  if str(ah['non_linearity']).lower() != 'tanh':
    bad['non_linearity'] = ah['non_linearity']
  if bad:
    raise UsageError(f'AdapterHub prefix-tuning options {bad} have no equivalent here; '
                     'prefixes in every layer through a tanh MLP (or flat) import')
  flat_prefix = bool(ah['flat'])
  config = PrefixConfig(length=int(ah['prefix_length']), bottleneck=int(ah['bottleneck_size']),
                        flat=flat_prefix)
  tensors = _one_copy(state, name, model_config, _FLAT if flat_prefix else _MLP)
  d, layers = model_config.hidden_size, model_config.num_layers
  if flat_prefix:
    if tensors['control_trans'].size != config.length * layers * 2 * d:
      raise UsageError(f'the flat prefix has {tensors["control_trans"].size} numbers; '
                       f'prefix_length {config.length} on this base needs '
                       f'{config.length * layers * 2 * d}')
    tensors['control_trans'] = tensors['control_trans'].reshape(config.length, layers * 2 * d)
  params = {}
  for leaf, (path, transpose) in (_FLAT if flat_prefix else _MLP).items():
    params[('encoder', prefix_method.MODULE) + path] = (
        tensors[leaf].T if transpose else tensors[leaf])
  _check_shapes(params, config, model_config)
  return config, params


def _one_copy(state: dict, name: str, model_config, leaves: dict) -> dict:
  """{AdapterHub leaf: tensor}, from whichever owner lists it; every copy must agree."""
  modules = _modules(model_config)
  pattern = re.compile(rf'^(?:\w+\.)?(?:{re.escape(modules.layers)}\.(\d+)\.'
                       rf'{re.escape(modules.prefix_pool)}\.pool\.|prefix_tuning\.)prefix_tunings\.'
                       rf'{re.escape(name)}\.{re.escape(modules.prefix_location)}\.(.+)$')
  tensors, unknown = {}, []
  for key, value in state.items():
    m = pattern.match(key)
    if not m or m[2] not in leaves or (m[1] and int(m[1]) >= model_config.num_layers):
      unknown.append(key)
      continue
    value = np.asarray(value, np.float32)
    seen = tensors.setdefault(m[2], value)
    if seen.shape != value.shape or not np.array_equal(seen, value):
      raise UsageError(f'copies of the shared prefix tensor {m[2]} differ ({key}); re-save the '
                       'adapter with model.save_adapter')
  if unknown:
    raise UsageError(f'AdapterHub prefix weights this project cannot place: {listing(unknown)}')
  missing = sorted(set(leaves) - set(tensors))
  if missing:
    raise UsageError(f'the AdapterHub prefix-tuning adapter lacks {missing}')
  return tensors


def _check_shapes(params: dict, config: PrefixConfig, model_config):
  import jax
  module = config.encoder_hook(model_config, np.float32)
  want = jax.eval_shape(module.init, jax.random.PRNGKey(0))['params']
  for path, value in params.items():
    expected = want
    for name in path[2:]:
      expected = expected[name]
    if value.shape != expected.shape:
      raise UsageError(f'AdapterHub prefix tensor for {"/".join(path)} has shape '
                       f'{value.shape}, expected {expected.shape} for this base')
