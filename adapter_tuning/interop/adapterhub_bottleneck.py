"""Bottleneck adapters <-> AdapterHub's `BnConfig` family (`adapters` 1.3), both ways.

One converter of `interop/adapterhub.py` (which holds the folder, head and LayerNorm side).
Facts about AdapterHub 1.3.0, checked against its source (`adapters/methods/modeling.py`,
`methods/bottleneck.py`):

* A bottleneck adapter is `adapter_down = Sequential(Linear(d, m), act)`, `adapter_up =
  Linear(m, d)`, output `up * scaling + residual`. Around a BERT sub-layer with output h
  and input x, `original_ln_before=False`, `residual_before_ln=True` make the residual h
  and the adapter input h; `original_ln_after=True` then applies the base LayerNorm:
  LN(x + h + up(act(down(h)))) -- exactly our placement (modeling.TransformerLayer).
  `mh_adapter` is the adapter after attention, `output_adapter` the one after the FFN:
  both = Houlsby (`DoubleSeqBnConfig`), output only = Pfeiffer (`SeqBnConfig`);
  `is_parallel=True` reads the sub-layer's input instead (`ParBnConfig`: our parallel /
  parallel_ffn placements; `scaling` is He et al.'s s).
* `SeqBnConfig`'s default `original_ln_before=True` (with `residual_before_ln=True`) keeps h
  as the residual, feeds the adapter LN(x + h), and `original_ln_after` applies the same LN
  again: LN(x + h + up(act(down(LN(x + h))))) -- our `AdapterConfig.original_ln_before`.
  With `residual_before_ln=False` the residual would be LN(x + h) itself (refused); with
  `original_ln_before=False` it does not matter (the residual is h either way). Artifacts
  export with `original_ln_before` as they were trained (false unless set).
* The bottleneck width is `int(d // reduction_factor)`; leave_out lists layers without
  adapters; `non_linearity` goes through transformers' `get_activation` (lower-cased):
  'gelu' is exact GELU, 'gelu_new' the tanh form, 'swish' = SiLU. A config without a
  "version" key is read as legacy: 'gelu' then means 'gelu_new' (and 'gelu_orig' exact).
* State dict keys: `{p}{module}.adapters.{name}.adapter_down.0.weight` ([m, d]),
  `...adapter_down.0.bias`, `...adapter_up.weight` ([d, m]), `...adapter_up.bias`,
  `...adapters.{name}.scaling` when scaling is 'learned' or 'channel'; the module of our
  'attention' and 'ffn' sites is the family's (`Family.adapterhub_modules`: BERT's
  `encoder.layer.{i}.attention.output` and `.output`, DistilBERT's
  `transformer.layer.{i}.attention_adapters` and `.output_adapters`).
* `init_weights='houlsby'` is truncated normal (std 1e-2, +-2 std) for both projections
  with zero biases, i.e. our init with init_scale=1e-2; it only matters for fresh adapters.
"""

from __future__ import annotations

import re

import numpy as np

from adapter_tuning.errors import UsageError, listing
from adapter_tuning.models.families import family_named
from adapter_tuning.peft.bottleneck import AdapterConfig

ARCHITECTURE = 'bottleneck'
_SITES = ('attention', 'ffn')
_PROJ = {'down': 'adapter_down.0', 'up': 'adapter_up'}
_TO_AH_ACT = {'gelu': 'gelu', 'gelu_tanh': 'gelu_new', 'relu': 'relu', 'swish': 'swish',
              'tanh': 'tanh'}
_FROM_AH_ACT = {'gelu': 'gelu', 'gelu_python': 'gelu', 'gelu_new': 'gelu_tanh',
                'gelu_pytorch_tanh': 'gelu_tanh', 'gelu_fast': 'gelu_tanh',
                'gelu_python_tanh': 'gelu_tanh', 'relu': 'relu', 'swish': 'swish',
                'silu': 'swish', 'tanh': 'tanh'}
_LEGACY_ACT = {'gelu': 'gelu_new', 'gelu_orig': 'gelu'}  # configs saved without "version"

# What a BnConfig holds, as `save_adapter` writes it; the keys we set are overridden.
DEFAULTS = {
    'adapter_residual_before_ln': False, 'cross_adapter': False, 'dropout': 0.0,
    'factorized_phm_W': True, 'factorized_phm_rule': False,
    'hypercomplex_nonlinearity': 'glorot-uniform', 'init_weights': 'houlsby',
    'init_weights_seed': None, 'inv_adapter': None, 'inv_adapter_reduction_factor': None,
    'is_parallel': False, 'learn_phm': True, 'leave_out': [], 'ln_after': False,
    'ln_before': False, 'mh_adapter': True, 'non_linearity': 'gelu',
    'original_ln_after': True, 'original_ln_before': False, 'output_adapter': True,
    'phm_bias': True, 'phm_c_init': 'normal', 'phm_dim': 4, 'phm_init_range': 0.0001,
    'phm_layer': False, 'phm_rank': 1, 'reduction_factor': 16, 'residual_before_ln': True,
    'scaling': 1.0, 'shared_W_phm': False, 'shared_phm_rule': True, 'stochastic_depth': 0.0,
    'use_gating': False,
}


def reduction_factor(hidden: int, size: int):
  """A reduction factor r with int(hidden // r) == size, as AdapterHub computes the width."""
  if hidden % size == 0:
    return hidden // size
  r = hidden / size
  for candidate in (r, np.nextafter(r, 0.0), np.nextafter(r, np.inf)):
    if int(hidden // float(candidate)) == size:
      return float(candidate)
  raise UsageError(f'no AdapterHub reduction_factor gives width {size} for hidden size {hidden}')


def owns_key(key: str, name: str) -> bool:
  return f'.adapters.{name}.' in key


def reads(ah_config: dict) -> bool:
  return ah_config.get('architecture') in (None, ARCHITECTURE)


# ----------------------------------------------------------------------------- export


def export(adapter: AdapterConfig, flat: dict, model_config, name: str,
           key_prefix: str) -> tuple[dict, dict]:
  """(BnConfig dict, state dict) from the artifact's adapter params ({'/'-path: array})."""
  if adapter.placement == 'none':
    raise UsageError('the artifact\'s bottleneck adapters have placement none: nothing to '
                     'export as an AdapterHub bottleneck adapter')
  modules, state = family_named(model_config.family).adapterhub_modules, {}
  for path, value in flat.items():
    m = re.fullmatch(r'encoder/layer_(\d+)/(attention|ffn)_adapter/(down|up)/(kernel|bias)', path)
    if not m:
      raise UsageError(f'artifact weight {path} is not a bottleneck adapter tensor')
    layer, site, proj, leaf = int(m[1]), m[2], m[3], m[4]
    if not adapter.has_adapter(layer, site):
      raise UsageError(f'artifact weight {path} is outside its adapter config ({adapter})')
    key = (f'{key_prefix}{modules.module(layer, site)}.adapters.{name}.{_PROJ[proj]}.'
           f'{"weight" if leaf == "kernel" else "bias"}')
    state[key] = value.T if leaf == 'kernel' else value
  _fill_untrained(state, adapter, model_config, name, key_prefix)
  leave_out = [i for i in range(model_config.num_layers) if not adapter.has_adapter(i, 'ffn')]
  config = dict(DEFAULTS, mh_adapter=adapter.has_adapter_anywhere('attention'),
                output_adapter=True, is_parallel=adapter.parallel,
                non_linearity=_TO_AH_ACT[adapter.activation], leave_out=leave_out,
                reduction_factor=reduction_factor(model_config.hidden_size, adapter.size),
                original_ln_before=adapter.original_ln_before,
                original_ln_after=True, residual_before_ln=True, scaling=adapter.scaling)
  return config, state


def _fill_untrained(state: dict, adapter, model_config, name: str, key_prefix: str):
  """Every adapter module AdapterHub will create must get weights: adapters the artifact
  did not train are zero, as our own serving treats them (serving/multi_adapter.py)."""
  size, d = adapter.size, model_config.hidden_size
  modules = family_named(model_config.family).adapterhub_modules
  for layer in range(model_config.num_layers):
    for site in adapter.sites(layer):
      base = f'{key_prefix}{modules.module(layer, site)}.adapters.{name}.'
      shapes = {'adapter_down.0.weight': (size, d), 'adapter_down.0.bias': (size,),
                'adapter_up.weight': (d, size), 'adapter_up.bias': (d,)}
      for key, shape in shapes.items():
        value = state.setdefault(base + key, np.zeros(shape, np.float32))
        if value.shape != shape:
          raise UsageError(f'artifact tensor for {base + key} has shape {value.shape}, but '
                           f'its adapter config implies {shape}')


def original_ln_before(ah_config: dict) -> bool:
  """For the export README: whether the adapter reads LN(x + h)."""
  return bool(ah_config.get('original_ln_before'))


# ----------------------------------------------------------------------------- import


def _bn_config(bn: dict, versioned: bool) -> dict:
  bn = {**DEFAULTS, 'init_weights': 'bert', **bn}
  act = str(bn.get('non_linearity') or '').lower()
  if not versioned:
    act = _LEGACY_ACT.get(act, act)
  bn['non_linearity'] = act
  return bn


def _check_bn(bn: dict) -> tuple[str, bool]:
  """Refuses what our model cannot compute exactly; returns (placement, original_ln_before)."""
  unsupported = {'phm_layer': False, 'use_gating': False,
                 'ln_before': False, 'ln_after': False, 'inv_adapter': None,
                 'original_ln_after': True}
  bad = {k: bn.get(k) for k, want in unsupported.items() if bn.get(k) != want}
  if bad:
    raise UsageError(f'AdapterHub adapter options {bad} have no equivalent here; only '
                     'bottleneck adapters without own LayerNorms, gating, PHM or '
                     'invertible adapters import')
  mh, out = bool(bn.get('mh_adapter')), bool(bn.get('output_adapter'))
  ln_before = bn.get('original_ln_before')
  if ln_before not in (True, False):
    raise UsageError(f'original_ln_before={ln_before!r} is not supported')
  if bn.get('residual_before_ln') not in (True, False):
    raise UsageError(f'residual_before_ln={bn.get("residual_before_ln")!r} is not supported')
  if ln_before and bn.get('residual_before_ln') is not True:
    raise UsageError(
        'adapter has original_ln_before=True with residual_before_ln=False: its residual is '
        'LayerNorm(x + h), which this project does not compute; only residual_before_ln=True '
        '(the SeqBnConfig default) imports with original_ln_before=True')
  if bn.get('is_parallel') and ln_before:
    raise UsageError('a parallel adapter with original_ln_before=True has no equivalent here')
  if out:
    names = ('parallel', 'parallel_ffn') if bn.get('is_parallel') else ('houlsby', 'pfeiffer')
    return names[0] if mh else names[1], ln_before
  raise UsageError(f'adapter sites mh_adapter={mh}, output_adapter={out} have no placement '
                   'here: houlsby = both, pfeiffer = output_adapter only')


def import_(bn: dict, state: dict, model_config, name: str,
            versioned: bool) -> tuple[AdapterConfig, dict]:
  """(AdapterConfig, {path tuple: array}) from a BnConfig dict and its state dict."""
  bn = _bn_config(bn, versioned)
  placement, ln_before = _check_bn(bn)
  activation = _FROM_AH_ACT.get(bn['non_linearity'])
  if activation is None:
    raise UsageError(f'adapter non_linearity {bn["non_linearity"]!r} is not supported; '
                     f'supported: {", ".join(sorted(_FROM_AH_ACT))}')
  modules = _parse_state(state, name, model_config)
  scaling = bn.get('scaling', 1.0)
  if not isinstance(scaling, (int, float)) and scaling not in ('learned', 'channel'):
    raise UsageError(f'unknown adapter scaling {scaling!r}')
  leave_out = {int(i) for i in bn.get('leave_out') or []}
  sites = ('attention', 'ffn') if placement in ('houlsby', 'parallel') else ('ffn',)
  expected = {(i, s) for i in range(model_config.num_layers) if i not in leave_out
              for s in sites}
  if set(modules) != expected:
    raise UsageError(f'adapter weights do not match adapter_config.json: missing modules '
                     f'{sorted(expected - set(modules))}, unexpected modules '
                     f'{sorted(set(modules) - expected)} (layer, site)')
  size = max(m['down_w'].shape[0] for m in modules.values())
  flat = {}
  for (layer, site), m in modules.items():
    flat.update(_module_params(layer, site, m, size, scaling, model_config.hidden_size))
  layers = sorted({i for i, _ in modules})
  adapter = AdapterConfig(size=size, placement=placement, activation=activation,
                          init_scale=1e-2 if bn.get('init_weights') == 'houlsby' else 1e-3,
                          layers=None if len(layers) == model_config.num_layers else tuple(layers),
                          original_ln_before=ln_before)
  return adapter, flat


def _module_params(layer: int, site: str, m: dict, size: int, scaling, d: int) -> dict:
  down_w, down_b, up_w, up_b = m['down_w'], m['down_b'], m['up_w'], m['up_b']
  width = down_w.shape[0]
  if down_w.shape != (width, d) or down_b.shape != (width,) or up_w.shape != (d, width) \
      or up_b.shape != (d,):
    raise UsageError(f'adapter tensors of layer {layer} ({site}) have shapes '
                     f'{down_w.shape}, {down_b.shape}, {up_w.shape}, {up_b.shape}; expected '
                     f'[m, {d}], [m], [{d}, m], [{d}]')
  s = _scale(scaling, m.get('scaling'), layer, site, d)
  up_w, up_b = up_w * s[:, None], up_b * s  # up(z) * s folds into the up projection
  pad = size - width  # narrower layers: zero units contribute nothing
  base = ('encoder', f'layer_{layer}', f'{site}_adapter')
  return {base + ('down', 'kernel'): np.pad(down_w.T, ((0, 0), (0, pad))),
          base + ('down', 'bias'): np.pad(down_b, (0, pad)),
          base + ('up', 'kernel'): np.pad(up_w.T, ((0, pad), (0, 0))),
          base + ('up', 'bias'): up_b}


def _scale(scaling, stored, layer, site, d) -> np.ndarray:
  if isinstance(scaling, (int, float)) and not isinstance(scaling, bool):
    return np.full((d,), float(scaling), np.float32)
  if stored is None:
    raise UsageError(f'scaling={scaling!r} but layer {layer} ({site}) has no scaling tensor')
  stored = np.asarray(stored, np.float32).reshape(-1)
  return np.broadcast_to(stored, (d,)).astype(np.float32)


def _parse_state(state: dict, name: str, model_config) -> dict:
  paths = family_named(model_config.family).adapterhub_modules
  fields = {'adapter_down.0.weight': 'down_w', 'adapter_down.0.bias': 'down_b',
            'adapter_up.weight': 'up_w', 'adapter_up.bias': 'up_b', 'scaling': 'scaling'}
  modules, unknown = {}, []
  for key, value in state.items():
    parsed = paths.parse(key, _SITES, 'adapters', name)
    if not parsed or parsed[0] >= model_config.num_layers or parsed[2] not in fields:
      unknown.append(key)
      continue
    layer, site, leaf = parsed
    modules.setdefault((layer, site), {})[fields[leaf]] = np.asarray(value, np.float32)
  if unknown:
    raise UsageError(f'AdapterHub weights this project cannot place (for adapter {name!r} on a '
                     f'{model_config.num_layers}-layer {model_config.family}): {listing(unknown)}')
  for (layer, site), m in modules.items():
    lacking = [f for f in ('down_w', 'down_b', 'up_w', 'up_b') if f not in m]
    if lacking:
      raise UsageError(f'adapter of layer {layer} ({site}) lacks tensors {lacking}')
  return modules
