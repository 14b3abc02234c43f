"""LoRA and IA³ <-> AdapterHub's `LoRAConfig` / `IA3Config` (`adapters` 1.3), both ways.

Two converters of `interop/adapterhub.py`. Facts about AdapterHub 1.3.0, checked against its
source (`adapters/methods/lora.py`, `configuration/adapter_config.py`) and files it saved:

* Both are its 'lora' architecture: `LoRALinear` wraps the query, key and value projections
  (`selfattn_lora` with `attn_matrices` among q, k, v), the FFN's first matmul
  (`intermediate_lora`: before the activation) and its second (`output_lora`); there is no
  LoRA on the attention output projection. `leave_out` lists layers without modules. Which
  modules those are is the family's (`Family.adapterhub_modules`): BERT's
  `attention.self.query` ... `output.dense`, DeBERTa's `attention.self.query_proj`,
  DistilBERT's `attention.q_lin` ... `ffn.lin2`. DeBERTa's shared-key position projections
  reuse the wrapped query/key modules, as ours reuse the hooked ones.
* LoRA (`composition_mode='add'`): y + (alpha / r) * dropout(x) A^T B^T with keys
  `{p}.encoder.layer.{i}.{module}.loras.{name}.lora_A` [r, in] and `.lora_B` [out, r]:
  our `lora_A` [in, r] and `lora_B` [r, out] transposed.
* IA³ (`composition_mode='scale'`, r = alpha = 1): y * lora_B, lora_B [out, 1] (lora_A is
  not saved); our `scale` vector. With alpha != 1 AdapterHub multiplies by alpha as well:
  refused rather than guessed.
* Two 'lora' configs cannot share one AdapterHub adapter (`ConfigUnion.validate`), so an
  artifact with both LoRA and IA³ does not export.
"""

from __future__ import annotations

import numpy as np

from adapter_tuning.errors import UsageError, listing
from adapter_tuning.models.families import family_named
from adapter_tuning.peft import lora as lora_method
from adapter_tuning.peft.ia3 import IA3Config
from adapter_tuning.peft.lora import LoRAConfig

ARCHITECTURE = 'lora'
# the sites AdapterHub has LoRA at -> the scope our module lives in under layer_i
_SCOPES = {'query': 'attention', 'key': 'attention', 'value': 'attention',
           'intermediate_dense': 'intermediate', 'output': ''}
_ATTN_MATRIX = {'query': 'q', 'key': 'k', 'value': 'v'}  # our target -> attn_matrices
_COMMON = {'architecture': ARCHITECTURE, 'dropout': 0.0, 'dtype': None,
           'init_weights_seed': None, 'use_dora': False, 'use_gating': False,
           'vera_b': None, 'vera_d': None}


def owns_key(key: str, name: str) -> bool:
  return f'.loras.{name}.' in key


def reads_lora(ah_config: dict) -> bool:
  return ah_config.get('architecture') == ARCHITECTURE and \
      ah_config.get('composition_mode', 'add') == 'add'


def reads_ia3(ah_config: dict) -> bool:
  return ah_config.get('architecture') == ARCHITECTURE and \
      ah_config.get('composition_mode') == 'scale'


def _dims(site: str, model_config) -> tuple[int, int]:
  d, f = model_config.hidden_size, model_config.intermediate_size
  return {'intermediate_dense': (d, f), 'output': (f, d)}.get(site, (d, d))


def _targets_config(targets, layers, model_config) -> dict:
  """The site switches of a LoRAConfig/IA3Config for our targets and layers."""
  unsupported = [t for t in targets if t not in (*_ATTN_MATRIX, 'intermediate', 'output')]
  if unsupported:
    raise UsageError(f'AdapterHub has no LoRA/IA³ on {", ".join(unsupported)}; export needs '
                     'targets among query,key,value,intermediate,output')
  leave_out = [] if layers is None else [i for i in range(model_config.num_layers)
                                         if i not in layers]
  matrices = [_ATTN_MATRIX[t] for t in targets if t in _ATTN_MATRIX]
  return {'selfattn_lora': bool(matrices), 'attn_matrices': matrices,
          'intermediate_lora': 'intermediate' in targets, 'output_lora': 'output' in targets,
          'leave_out': leave_out}


def _state_key(key_prefix: str, layer: int, site: str, name: str, leaf: str,
               model_config) -> str:
  modules = family_named(model_config.family).adapterhub_modules
  return f'{key_prefix}{modules.module(layer, site)}.loras.{name}.{leaf}'


def _our_path(layer: int, site: str, marker: str, leaf: str) -> tuple:
  scope = _SCOPES[site]
  return ('encoder', f'layer_{layer}') + ((scope,) if scope else ()) + (f'{site}{marker}', leaf)


def _export_tensors(config, flat: dict, model_config, name: str, key_prefix: str,
                    marker: str, leaves) -> dict:
  """State dict of every module the config creates: trained tensors from `flat`
  ('/'-joined paths), the rest at the value that leaves the base unchanged. `leaves(site)`:
  {our leaf: (AdapterHub's leaf, its shape, the neutral value, ours -> its layout)}."""
  by_path = {tuple(k.split('/')): v for k, v in flat.items()}
  state = {}
  for layer in range(model_config.num_layers):
    for site in config.sites(layer):
      for leaf, (ah_leaf, shape, neutral, convert) in leaves(site).items():
        path = _our_path(layer, site, marker, leaf)
        value = by_path.pop(path, None)
        value = np.full(shape, neutral, np.float32) if value is None else convert(value)
        if value.shape != shape:
          raise UsageError(f'artifact tensor {"/".join(path)} does not fit AdapterHub\'s '
                           f'{shape} (its config: {config})')
        state[_state_key(key_prefix, layer, site, name, ah_leaf, model_config)] = value
  if by_path:
    raise UsageError(f'artifact weights outside its {marker[1:]} config: '
                     f'{listing("/".join(k) for k in by_path)}')
  return state


def export_lora(config: LoRAConfig, flat: dict, model_config, name: str,
                key_prefix: str) -> tuple[dict, dict]:
  def leaves(site):
    n_in, n_out = _dims(site, model_config)
    return {'lora_A': ('lora_A', (config.rank, n_in), 0.0, np.transpose),
            'lora_B': ('lora_B', (n_out, config.rank), 0.0, np.transpose)}
  sites = _targets_config(config.targets, config.layers, model_config)
  state = _export_tensors(config, flat, model_config, name, key_prefix,
                          lora_method.PARAM_MARKER, leaves)
  ah = {**_COMMON, **sites, 'r': config.rank, 'alpha': config.alpha, 'dropout': config.dropout,
        'composition_mode': 'add', 'init_weights': 'lora'}
  return ah, state


def export_ia3(config: IA3Config, flat: dict, model_config, name: str,
               key_prefix: str) -> tuple[dict, dict]:
  from adapter_tuning.peft import ia3

  def leaves(site):
    n_out = _dims(site, model_config)[1]
    return {'scale': ('lora_B', (n_out, 1), 1.0, lambda v: v.reshape(-1, 1))}
  sites = _targets_config(config.targets, config.layers, model_config)
  state = _export_tensors(config, flat, model_config, name, key_prefix, ia3.PARAM_MARKER,
                          leaves)
  ah = {**_COMMON, **sites, 'r': 1, 'alpha': 1, 'composition_mode': 'scale', 'init_weights': 'ia3'}
  return ah, state


# ----------------------------------------------------------------------------- import


def _check_options(ah: dict, what: str):
  bad = {k: ah.get(k) for k in ('use_gating', 'use_dora') if ah.get(k)}
  bad.update({k: ah.get(k) for k in ('vera_d', 'vera_b') if ah.get(k) is not None})
  if bad:
    raise UsageError(f'AdapterHub {what} options {bad} have no equivalent here (gating, DoRA '
                     'and VeRA do not import)')


def _targets(ah: dict) -> tuple[list, tuple | None]:
  names = {v: k for k, v in _ATTN_MATRIX.items()}
  matrices = ah.get('attn_matrices', ['q', 'v']) if ah.get('selfattn_lora', True) else []
  unknown = [m for m in matrices if m not in names]
  if unknown:
    raise UsageError(f'attn_matrices {unknown} are not among q, k, v')
  targets = [names[m] for m in matrices]
  targets += [t for t in ('intermediate', 'output') if ah.get(f'{t}_lora')]
  return targets, [int(i) for i in ah.get('leave_out') or []]


def _parse_state(state: dict, name: str, model_config) -> dict:
  """{(layer, site): {leaf: array}} of the state dict's LoRA/IA³ tensors."""
  paths = family_named(model_config.family).adapterhub_modules
  modules, unknown = {}, []
  for key, value in state.items():
    parsed = paths.parse(key, _SCOPES, 'loras', name)
    if not parsed or parsed[0] >= model_config.num_layers or \
        parsed[2] not in ('lora_A', 'lora_B'):
      unknown.append(key)
      continue
    layer, site, leaf = parsed
    modules.setdefault((layer, site), {})[leaf] = np.asarray(value, np.float32)
  if unknown:
    raise UsageError(f'AdapterHub LoRA/IA³ weights this project cannot place (adapter '
                     f'{name!r}, a {model_config.num_layers}-layer model): {listing(unknown)}')
  return modules


def _import_modules(config, state, name, model_config, leaves) -> dict:
  modules = _parse_state(state, name, model_config)
  expected = {(i, s) for i in range(model_config.num_layers) for s in config.sites(i)}
  if set(modules) != expected:
    raise UsageError(f'adapter weights do not match adapter_config.json: missing modules '
                     f'{sorted(expected - set(modules))}, unexpected '
                     f'{sorted(set(modules) - expected)} (layer, site)')
  for (layer, site), tensors in modules.items():
    if set(tensors) < set(leaves):
      raise UsageError(f'module {site} of layer {layer} lacks {sorted(set(leaves) - set(tensors))}')
  return modules


def import_lora(ah: dict, state: dict, model_config, name: str,
                versioned: bool) -> tuple[LoRAConfig, dict]:
  del versioned
  _check_options(ah, 'LoRA')
  targets, leave_out = _targets(ah)
  layers = tuple(i for i in range(model_config.num_layers) if i not in leave_out)
  config = LoRAConfig(rank=int(ah.get('r', 8)), alpha=float(ah.get('alpha', 8)),
                      dropout=float(ah.get('dropout', 0.0)), targets=tuple(targets),
                      layers=layers if leave_out else None)
  flat = {}
  for (layer, site), t in _import_modules(config, state, name, model_config,
                                          ('lora_A', 'lora_B')).items():
    n_in, n_out = _dims(site, model_config)
    if t['lora_A'].shape != (config.rank, n_in) or t['lora_B'].shape != (n_out, config.rank):
      raise UsageError(f'LoRA tensors of layer {layer} ({site}) have shapes '
                       f'{t["lora_A"].shape}, {t["lora_B"].shape}; expected '
                       f'({config.rank}, {n_in}), ({n_out}, {config.rank})')
    for leaf in ('lora_A', 'lora_B'):
      flat[_our_path(layer, site, lora_method.PARAM_MARKER, leaf)] = t[leaf].T
  return config, flat


def import_ia3(ah: dict, state: dict, model_config, name: str,
               versioned: bool) -> tuple[IA3Config, dict]:
  from adapter_tuning.peft import ia3
  del versioned
  _check_options(ah, 'IA³')
  if ah.get('r', 1) != 1 or ah.get('alpha', 1) != 1:
    raise UsageError(f'IA³ with r={ah.get("r")}, alpha={ah.get("alpha")}: only r = alpha = 1 '
                     '(IA3Config\'s) imports')
  targets, leave_out = _targets(ah)
  layers = tuple(i for i in range(model_config.num_layers) if i not in leave_out)
  config = IA3Config(targets=tuple(targets), layers=layers if leave_out else None)
  flat = {}
  for (layer, site), t in _import_modules(config, state, name, model_config,
                                          ('lora_B',)).items():
    n_out = _dims(site, model_config)[1]
    if t['lora_B'].size != n_out:
      raise UsageError(f'IA³ vector of layer {layer} ({site}) has shape {t["lora_B"].shape}; '
                       f'expected ({n_out}, 1)')
    heads = model_config.num_heads  # attention outputs are [heads, head_dim] in our layout
    shape = (heads, n_out // heads) if site in _ATTN_MATRIX else (n_out,)
    flat[_our_path(layer, site, ia3.PARAM_MARKER, 'scale')] = t['lora_B'].reshape(shape)
  return config, flat
