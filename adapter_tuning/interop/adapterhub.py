"""Conversion between our adapter artifacts and AdapterHub's (`adapters` 1.3) on-disk format.

One job in both directions (export and import share the key maps, activation names and
checks below), hence longer than the house's ~450 lines; when the LoRA/IA³/prefix formats
join it, each method's conversion should move to its own module beside this one.

Pure functions on nested param dicts, torch-layout state dicts (numpy) and config dicts;
files are read and written by `export.py`. What follows are facts about AdapterHub 1.3.0,
checked against its source (`adapters/methods/modeling.py`, `methods/bottleneck.py`,
`heads/base.py`, `loading.py`):

* A bottleneck adapter is `adapter_down = Sequential(Linear(d, m), act)`, `adapter_up =
  Linear(m, d)`, output `up * scaling + residual`. Around a BERT sub-layer with output h
  and input x, `original_ln_before=False`, `residual_before_ln=True` make the residual h
  and the adapter input h; `original_ln_after=True` then applies the base LayerNorm:
  LN(x + h + up(act(down(h)))) -- exactly our placement (modeling.TransformerLayer).
  `mh_adapter` is the adapter after attention, `output_adapter` the one after the FFN:
  both = Houlsby (`DoubleSeqBnConfig`), output only = Pfeiffer (`SeqBnConfig`).
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
* State dict keys (prefix 'bert' or 'roberta'): `{p}.encoder.layer.{i}.attention.output.
  adapters.{name}.adapter_down.0.weight` ([m, d]), `...adapter_down.0.bias`,
  `...adapter_up.weight` ([d, m]), `...adapter_up.bias`; `.output.adapters.` for the FFN
  site; `...adapters.{name}.scaling` when scaling is 'learned' or 'channel'.
* Adapters never hold the base LayerNorms (no option places a new LN where ours is), so
  trained LayerNorms travel in an extra file, `layer_norms.safetensors`, keyed like the
  base model's own state dict, loaded with `model.base_model.load_state_dict(...,
  strict=False)` (see `README_TEXT`).
* `ClassificationHead` with `layers=1` is [Dropout, Linear(d, n)] (keys `heads.{name}.1.*`)
  on the pooler output if `use_pooler=True` -- our head. With `layers=2`,
  `activation_function='tanh'`, `use_pooler=False` (AdapterHub's default head) it is
  [Dropout, Linear(d, d), Tanh, Dropout, Linear(d, n)] on the [CLS] vector: a pooler of
  its own (`heads.{name}.1`) plus our head (`heads.{name}.4`); that maps to an artifact that
  carries `encoder/pooler/*`. `num_labels=1` is regression. `QuestionAnsweringHead` with
  `layers=1` is Linear(d, 2) on every token: our span head.
* Extra top-level keys in adapter_config.json are kept and ignored by the loader (that is
  where `save_adapter(meta_dict=...)` puts its entries); ours, "adapter_tuning", records the
  task, max_seq_length and base identity so that an import restores them.
* `init_weights='houlsby'` is truncated normal (std 1e-2, +-2 std) for both projections
  with zero biases, i.e. our init with init_scale=1e-2; it only matters for fresh adapters.
"""

from __future__ import annotations

import dataclasses
import re

import flax.traverse_util as tu
import numpy as np

from adapter_tuning.errors import UsageError
from adapter_tuning.interop import hf_checkpoint
from adapter_tuning.models.encoder import ModelConfig
from adapter_tuning.models.families import families, family_named
from adapter_tuning.peft.bottleneck import AdapterConfig

ADAPTERHUB_VERSION = 'adapters.1.3.0'  # the library version these facts were checked on
ADAPTER_CONFIG = 'adapter_config.json'
ADAPTER_WEIGHTS = ('adapter.safetensors', 'pytorch_adapter.bin')
HEAD_CONFIG = 'head_config.json'
HEAD_WEIGHTS = ('model_head.safetensors', 'pytorch_model_head.bin')
LAYER_NORMS = 'layer_norms.safetensors'

_SITES = {'attention': 'attention.output', 'ffn': 'output'}  # ours -> HF module path
_PROJ = {'down': 'adapter_down.0', 'up': 'adapter_up'}
_TO_AH_ACT = {'gelu': 'gelu', 'gelu_tanh': 'gelu_new', 'relu': 'relu', 'swish': 'swish',
              'tanh': 'tanh'}
_FROM_AH_ACT = {'gelu': 'gelu', 'gelu_python': 'gelu', 'gelu_new': 'gelu_tanh',
                'gelu_pytorch_tanh': 'gelu_tanh', 'gelu_fast': 'gelu_tanh',
                'gelu_python_tanh': 'gelu_tanh', 'relu': 'relu', 'swish': 'swish',
                'silu': 'swish', 'tanh': 'tanh'}
_LEGACY_ACT = {'gelu': 'gelu_new', 'gelu_orig': 'gelu'}  # configs saved without "version"

# What a BnConfig holds, as `save_adapter` writes it; the keys we set are overridden.
_BN_DEFAULTS = {
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

README_TEXT = """\
# AdapterHub export of an adapter_tuning artifact

Load onto the same base checkpoint with `adapters` (AdapterHub) 1.3:

    import adapters
    model = adapters.AutoAdapterModel.from_pretrained(BASE)
    name = model.load_adapter(THIS_DIR)            # adapter + prediction head
    model.set_active_adapters(name)
{ln_step}
`adapter_config.json` asks for original_ln_before={ln_before}, residual_before_ln=True,
original_ln_after=True: {formula} around each sub-layer, as trained.
"""

LN_STEP = """\
    # The LayerNorms were trained with the adapter; AdapterHub adapters cannot hold them,
    # so they ship here and replace the base model's (one such adapter per model):
    from safetensors.torch import load_file
    result = model.base_model.load_state_dict(load_file(f'{THIS_DIR}/layer_norms.safetensors'),
                                              strict=False)
    assert not result.unexpected_keys
"""


@dataclasses.dataclass
class AdapterHubFiles:
  """The contents of an AdapterHub adapter folder (torch layout, numpy arrays)."""

  adapter_config: dict
  adapter_state: dict
  head_config: dict | None = None
  head_state: dict | None = None
  layer_norm_state: dict | None = None  # HF base-model keys, without the model prefix


@dataclasses.dataclass
class Imported:
  """An AdapterHub adapter as an artifact: trainable params plus the meta fields it fixes."""

  params: dict
  adapter: AdapterConfig
  head: str
  label_names: list
  num_outputs: int
  trainable_rules: list
  name: str
  origin: dict  # what our own export recorded (task, max_seq_length, base); {} otherwise
  pooling: str = 'pooler'  # TaskModel.pooling the head reads: pooler or cls


def _names(paths) -> str:
  paths = sorted(paths)
  more = f' and {len(paths) - 5} more' if len(paths) > 5 else ''
  return ', '.join(paths[:5]) + more


def reduction_factor(hidden: int, size: int):
  """A reduction factor r with int(hidden // r) == size, as AdapterHub computes the width."""
  if hidden % size == 0:
    return hidden // size
  r = hidden / size
  for candidate in (r, np.nextafter(r, 0.0), np.nextafter(r, np.inf)):
    if int(hidden // float(candidate)) == size:
      return float(candidate)
  raise UsageError(f'no AdapterHub reduction_factor gives width {size} for hidden size {hidden}')


def _meta_rules(meta: dict) -> str:
  rules = meta.get('trainable_rules')
  return f' (trainable_rules {rules})' if rules else ''


# ----------------------------------------------------------------------------- export


def to_adapterhub(params: dict, meta: dict, config: ModelConfig, name: str,
                  base_name: str = '') -> AdapterHubFiles:
  """Artifact (meta, trainable params) -> AdapterHub files for `name`.

  Raises UsageError naming the params AdapterHub cannot represent (anything other than
  adapters, LayerNorms, the head, and the pooler under a classification head).
  """
  family = family_named(config.family)
  if not family.adapterhub_model_class:
    raise UsageError(f'AdapterHub export has no model class for {config.family!r} bases')
  if not re.fullmatch(r'[A-Za-z0-9_\-]+', name):
    raise UsageError(f'AdapterHub adapter name {name!r} must be letters, digits, _ or -; '
                     'pass --name')
  adapter = AdapterConfig.from_any(meta.get('adapter'))
  if adapter is None or adapter.placement == 'none':
    raise UsageError('the artifact has no adapters (placement none): an AdapterHub adapter '
                     'needs bottleneck modules; export a houlsby or pfeiffer artifact')
  head = meta.get('head')
  if head not in ('classification', 'regression', 'span'):
    raise UsageError(f'head {head!r} has no AdapterHub equivalent')
  prefix, d = config.family, config.hidden_size
  flat = {'/'.join(k): np.asarray(v, np.float32) for k, v in tu.flatten_dict(params).items()}
  adapter_state, ln_params, head_params, pooler, rest = {}, {}, {}, {}, []
  for path, value in flat.items():
    parts = path.split('/')
    m = re.fullmatch(r'encoder/layer_(\d+)/(attention|ffn)_adapter/(down|up)/(kernel|bias)', path)
    if m:
      layer, site, proj, leaf = int(m[1]), m[2], m[3], m[4]
      if not adapter.has_adapter(layer, site):
        raise UsageError(f'artifact weight {path} is outside its adapter config ({adapter})')
      key = (f'{prefix}.encoder.layer.{layer}.{_SITES[site]}.adapters.{name}.{_PROJ[proj]}.'
             f'{"weight" if leaf == "kernel" else "bias"}')
      adapter_state[key] = value.T if leaf == 'kernel' else value
    elif parts[0] == 'encoder' and parts[-2].endswith('layer_norm'):
      ln_params[tuple(parts[1:])] = value
    elif parts[0] == 'head':
      head_params[parts[-1]] = value
    elif parts[:2] == ['encoder', 'pooler'] and head in ('classification', 'regression'):
      pooler[parts[-1]] = value
    else:
      rest.append(path)
  if rest:
    raise UsageError(f'the artifact trains params AdapterHub cannot represent: {_names(rest)}'
                     f'{_meta_rules(meta)}; only adapters, LayerNorms, the head (and the pooler '
                     'under a classification head) export')
  if set(head_params) != {'kernel', 'bias'}:
    raise UsageError('the artifact has no trained head (head/kernel, head/bias); AdapterHub '
                     'needs one to reproduce the logits')
  if pooler and set(pooler) != {'kernel', 'bias'}:
    raise UsageError('the artifact trains only part of the pooler; export needs both its '
                     'kernel and bias')
  _fill_untrained_adapters(adapter_state, adapter, config, name)
  leave_out = [i for i in range(config.num_layers) if not adapter.has_adapter(i, 'ffn')]
  bn = dict(_BN_DEFAULTS, mh_adapter=adapter.has_adapter_anywhere('attention'),
            output_adapter=True, is_parallel=adapter.parallel,
            non_linearity=_TO_AH_ACT[adapter.activation], leave_out=leave_out,
            reduction_factor=reduction_factor(d, adapter.size),
            original_ln_before=adapter.original_ln_before,
            original_ln_after=True, residual_before_ln=True, scaling=adapter.scaling)
  top = {'hidden_size': d, 'model_class': family.adapterhub_model_class, 'model_name': base_name,
         'model_type': prefix, 'name': name, 'version': ADAPTERHUB_VERSION}
  head_config, head_state = _head_to_adapterhub(head, meta, name, head_params, pooler,
                                                meta.get('pooling', 'pooler'))
  ln_state = hf_checkpoint.export_encoder_state(tu.unflatten_dict(ln_params), config.family) if ln_params else None
  # Top-level extra keys are how AdapterHub itself stores meta_dict; its loader ignores them.
  origin = {'task': meta.get('task'), 'max_seq_length': meta.get('max_seq_length'),
            'base': {k: (meta.get('base') or {}).get(k) for k in ('name', 'sha256')}}
  return AdapterHubFiles(
      adapter_config={**top, 'config': bn, 'adapter_tuning': origin}, adapter_state=adapter_state,
      head_config={**top, 'config': head_config}, head_state=head_state,
      layer_norm_state=ln_state)


def _fill_untrained_adapters(adapter_state: dict, adapter, config: ModelConfig, name: str):
  """Every adapter module AdapterHub will create must get weights: adapters the artifact
  did not train are zero, as our own serving treats them (serving/multi_adapter.py)."""
  size, d = adapter.size, config.hidden_size
  for layer in range(config.num_layers):
    for site in adapter.sites(layer):
      base = f'{config.family}.encoder.layer.{layer}.{_SITES[site]}.adapters.{name}.'
      shapes = {'adapter_down.0.weight': (size, d), 'adapter_down.0.bias': (size,),
                'adapter_up.weight': (d, size), 'adapter_up.bias': (d,)}
      for key, shape in shapes.items():
        value = adapter_state.setdefault(base + key, np.zeros(shape, np.float32))
        if value.shape != shape:
          raise UsageError(f'artifact tensor for {base + key} has shape {value.shape}, but '
                           f'its adapter config implies {shape}')


def _head_to_adapterhub(head, meta, name, head_params, pooler, pooling):
  kernel, bias = head_params['kernel'], head_params['bias']
  if head != 'span' and pooling == 'mean':
    raise UsageError('the artifact\'s head reads the mean over tokens (model.head.pooling=mean); '
                     'AdapterHub heads read the pooler or [CLS]: train with pooling pooler or cls '
                     'to export')
  if head == 'span':
    config = {'activation_function': 'tanh', 'dropout_prob': None,
              'head_type': 'question_answering', 'label2id': None, 'layers': 1, 'num_labels': 2}
    return config, {f'heads.{name}.1.weight': kernel.T, f'heads.{name}.1.bias': bias}
  labels = list(meta.get('label_names') or [])
  num = int(kernel.shape[1])
  if head == 'classification' and len(labels) != num:
    raise UsageError(f'artifact has {len(labels)} label names but a head with {num} outputs')
  config = {'activation_function': 'tanh', 'bias': True, 'dropout_prob': None,
            'head_type': 'classification',
            'label2id': {str(l): i for i, l in enumerate(labels)} if head == 'classification' else None,
            'layers': 1, 'num_labels': num, 'use_pooler': True}
  if pooling == 'cls':  # the [CLS] state itself; a trained pooler would be unused
    config.update(use_pooler=False)
  if pooling == 'cls' or not pooler:
    return config, {f'heads.{name}.1.weight': kernel.T, f'heads.{name}.1.bias': bias}
  # A trained pooler: AdapterHub's two-layer head on the raw [CLS] vector carries it.
  config.update(layers=2, use_pooler=False)
  return config, {f'heads.{name}.1.weight': pooler['kernel'].T, f'heads.{name}.1.bias': pooler['bias'],
                  f'heads.{name}.4.weight': kernel.T, f'heads.{name}.4.bias': bias}


def readme(files: AdapterHubFiles) -> str:
  ln_before = bool(files.adapter_config['config'].get('original_ln_before'))
  formula = ('LN(x + h + up(act(down(LN(x + h)))))' if ln_before
             else 'LN(x + h + up(act(down(h))))')
  return README_TEXT.format(ln_step=LN_STEP if files.layer_norm_state else '',
                            ln_before=str(ln_before).lower(), formula=formula)


# ----------------------------------------------------------------------------- import


def _bn_config(file_config: dict) -> dict:
  bn = file_config.get('config')
  if isinstance(bn, str):
    raise UsageError(f'adapter_config.json names its config {bn!r} instead of spelling it out; '
                     're-save the adapter with adapters>=1.0 (model.save_adapter)')
  if not isinstance(bn, dict):
    raise UsageError('adapter_config.json has no "config" object; is it an AdapterHub adapter?')
  arch = bn.get('architecture')
  if arch not in (None, 'bottleneck'):
    raise UsageError(f'the AdapterHub adapter is {arch!r}, not a bottleneck adapter; only '
                     'Houlsby (DoubleSeqBnConfig) and Pfeiffer (SeqBnConfig) adapters import')
  bn = {**_BN_DEFAULTS, 'init_weights': 'bert', **bn}
  act = str(bn.get('non_linearity') or '').lower()
  if 'version' not in file_config:
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
                     'sequential bottleneck adapters without own LayerNorms, gating, PHM or '
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


def from_adapterhub(files: AdapterHubFiles, config: ModelConfig) -> Imported:
  """AdapterHub files -> trainable params in our layout, plus the artifact meta they fix."""
  cfg = files.adapter_config
  model_type = cfg.get('model_type')
  if model_type not in [f.name for f in families() if f.adapterhub_model_class]:
    raise UsageError(f'the AdapterHub adapter was made for model_type {model_type!r}; only '
                     'BERT and RoBERTa adapters import')
  if model_type != config.family or cfg.get('hidden_size', config.hidden_size) != config.hidden_size:
    raise UsageError(f'the AdapterHub adapter was made for a {model_type} model with hidden size '
                     f'{cfg.get("hidden_size")}, but the base is {config.family} with hidden size '
                     f'{config.hidden_size}; pass the base it was trained on')
  bn = _bn_config(cfg)
  placement, ln_before = _check_bn(bn)
  activation = _FROM_AH_ACT.get(bn['non_linearity'])
  if activation is None:
    raise UsageError(f'adapter non_linearity {bn["non_linearity"]!r} is not supported; '
                     f'supported: {", ".join(sorted(_FROM_AH_ACT))}')
  name = cfg.get('name')
  if not name:
    raise UsageError('adapter_config.json has no adapter "name"')
  modules = _parse_adapter_state(files.adapter_state, name, config)
  scaling = bn.get('scaling', 1.0)
  if not isinstance(scaling, (int, float)) and scaling not in ('learned', 'channel'):
    raise UsageError(f'unknown adapter scaling {scaling!r}')
  leave_out = {int(i) for i in bn.get('leave_out') or []}
  sites = ('attention', 'ffn') if placement in ('houlsby', 'parallel') else ('ffn',)
  expected = {(i, s) for i in range(config.num_layers) if i not in leave_out for s in sites}
  if set(modules) != expected:
    missing = sorted(expected - set(modules))
    extra = sorted(set(modules) - expected)
    raise UsageError(f'adapter weights do not match adapter_config.json: missing modules '
                     f'{missing}, unexpected modules {extra} (layer, site)')
  size = max(m['down_w'].shape[0] for m in modules.values())
  d = config.hidden_size
  flat = {}
  for (layer, site), m in modules.items():
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
    flat[base + ('down', 'kernel')] = np.pad(down_w.T, ((0, 0), (0, pad)))
    flat[base + ('down', 'bias')] = np.pad(down_b, (0, pad))
    flat[base + ('up', 'kernel')] = np.pad(up_w.T, ((0, pad), (0, 0)))
    flat[base + ('up', 'bias')] = up_b
  layers = sorted({i for i, _ in modules})
  adapter = AdapterConfig(size=size, placement=placement, activation=activation,
                          init_scale=1e-2 if bn.get('init_weights') == 'houlsby' else 1e-3,
                          layers=None if len(layers) == config.num_layers else tuple(layers),
                          original_ln_before=ln_before)
  rules = [['_adapter/', 'train']]
  if files.layer_norm_state:
    flat.update(_layer_norms_from_state(files.layer_norm_state, config))
    rules.append(['layer_norm/', 'train'])
  head, labels, num_outputs, head_flat, pooling = _head_from_adapterhub(files, config)
  flat.update(head_flat)
  if any(k[:2] == ('encoder', 'pooler') for k in head_flat):
    rules.append(['^encoder/pooler/', 'train'])
  rules += [['^head/', 'train'], ['.*', 'freeze']]
  params = tu.unflatten_dict({k: np.ascontiguousarray(v, np.float32) for k, v in flat.items()})
  return Imported(params, adapter, head, labels, num_outputs, rules, name,
                  dict(cfg.get('adapter_tuning') or {}), pooling)


def _scale(scaling, stored, layer, site, d) -> np.ndarray:
  if isinstance(scaling, (int, float)) and not isinstance(scaling, bool):
    return np.full((d,), float(scaling), np.float32)
  if stored is None:
    raise UsageError(f'scaling={scaling!r} but layer {layer} ({site}) has no scaling tensor')
  stored = np.asarray(stored, np.float32).reshape(-1)
  return np.broadcast_to(stored, (d,)).astype(np.float32)


def _parse_adapter_state(state: dict, name: str, config: ModelConfig) -> dict:
  pattern = re.compile(
      rf'^(?:(?:bert|roberta)\.)?encoder\.layer\.(\d+)\.(attention\.output|output)\.adapters\.'
      rf'{re.escape(name)}\.(adapter_down\.0\.weight|adapter_down\.0\.bias|adapter_up\.weight|'
      rf'adapter_up\.bias|scaling)$')
  fields = {'adapter_down.0.weight': 'down_w', 'adapter_down.0.bias': 'down_b',
            'adapter_up.weight': 'up_w', 'adapter_up.bias': 'up_b', 'scaling': 'scaling'}
  modules, unknown = {}, []
  for key, value in state.items():
    m = pattern.match(key)
    if not m or int(m[1]) >= config.num_layers:
      unknown.append(key)
      continue
    site = 'attention' if m[2] == 'attention.output' else 'ffn'
    modules.setdefault((int(m[1]), site), {})[fields[m[3]]] = np.asarray(value, np.float32)
  if unknown:
    raise UsageError(f'AdapterHub weights this project cannot place (for adapter {name!r} on a '
                     f'{config.num_layers}-layer {config.family}): {_names(unknown)}')
  for (layer, site), m in modules.items():
    lacking = [f for f in ('down_w', 'down_b', 'up_w', 'up_b') if f not in m]
    if lacking:
      raise UsageError(f'adapter of layer {layer} ({site}) lacks tensors {lacking}')
  return modules


def _layer_norm_paths(config: ModelConfig):
  paths = [('embeddings', 'layer_norm')]
  for i in range(config.num_layers):
    paths += [(f'layer_{i}', 'attention_layer_norm'), (f'layer_{i}', 'ffn_layer_norm')]
  return [p + (leaf,) for p in paths for leaf in ('scale', 'bias')]


def _layer_norms_from_state(state: dict, config: ModelConfig) -> dict:
  by_key = {hf_checkpoint.checkpoint_key(p, config.family)[0]: p
            for p in _layer_norm_paths(config)}
  out, unknown = {}, []
  for key, value in state.items():
    bare = re.sub(r'^(bert|roberta)\.', '', key)
    if bare not in by_key:
      unknown.append(key)
      continue
    value = np.asarray(value, np.float32)
    if value.shape != (config.hidden_size,):
      raise UsageError(f'{LAYER_NORMS}: {key} has shape {value.shape}, expected '
                       f'({config.hidden_size},)')
    out[('encoder',) + by_key[bare]] = value
  if unknown:
    raise UsageError(f'{LAYER_NORMS} holds tensors that are not LayerNorms of this base: '
                     f'{_names(unknown)}')
  return out


def _head_from_adapterhub(files: AdapterHubFiles, config: ModelConfig):
  """(head kind, label names, num outputs, flat params, pooling) from head_config + weights."""
  if files.head_config is None or files.head_state is None:
    raise UsageError('the AdapterHub folder has no prediction head (head_config.json and '
                     'head weights); save it with model.save_adapter(..., with_head=True)')
  hc = files.head_config.get('config') or {}
  name = files.head_config.get('name')
  kind, layers = hc.get('head_type'), hc.get('layers', 1)
  state = {}
  for key, value in files.head_state.items():
    m = re.fullmatch(rf'heads\.{re.escape(str(name))}\.(\d+)\.(weight|bias)', key)
    if not m:
      raise UsageError(f'head weight {key!r} does not belong to head {name!r}')
    state[(int(m[1]), m[2])] = np.asarray(value, np.float32)
  d = config.hidden_size

  def linear(index, out_dim):
    w = state.get((index, 'weight'))
    if w is None or w.shape != (out_dim, d):
      raise UsageError(f'head {name!r}: expected heads.{name}.{index}.weight of shape '
                       f'({out_dim}, {d}), got {None if w is None else w.shape}')
    b = state.get((index, 'bias'), np.zeros((out_dim,), np.float32))  # bias=False heads
    return w.T, b

  flat = {}
  if kind == 'question_answering':
    if layers != 1 or hc.get('num_labels', 2) != 2:
      raise UsageError(f'question answering head with layers={layers}, '
                       f'num_labels={hc.get("num_labels")}: only layers=1, 2 labels imports')
    flat[('head', 'kernel')], flat[('head', 'bias')] = linear(1, 2)
    return 'span', [], 2, flat, 'pooler'
  if kind != 'classification':
    raise UsageError(f'AdapterHub head type {kind!r} has no equivalent here; classification '
                     '(incl. regression) and question_answering heads import')
  num = int(hc.get('num_labels', 2))
  use_pooler, act = bool(hc.get('use_pooler')), hc.get('activation_function')
  pooling = 'pooler'
  if layers == 1:  # on the pooler output, or on the [CLS] state (use_pooler=False)
    flat[('head', 'kernel')], flat[('head', 'bias')] = linear(1, num)
    pooling = 'pooler' if use_pooler else 'cls'
  elif layers == 2 and not use_pooler and act == 'tanh':
    flat[('encoder', 'pooler', 'kernel')], flat[('encoder', 'pooler', 'bias')] = linear(1, d)
    flat[('head', 'kernel')], flat[('head', 'bias')] = linear(4, num)
  else:
    raise UsageError(
        f'classification head with layers={layers}, use_pooler={use_pooler}, '
        f'activation_function={act!r} does not fit a linear head on the pooled [CLS] output; '
        'importable: layers=1, or layers=2 with tanh and use_pooler=False')
  if num == 1:
    return 'regression', [], 1, flat, pooling
  label2id = hc.get('label2id') or {}
  if sorted(label2id.values()) == list(range(num)):
    labels = [l for l, _ in sorted(label2id.items(), key=lambda kv: kv[1])]
  else:
    labels = [f'LABEL_{i}' for i in range(num)]
  return 'classification', labels, num, flat, pooling
