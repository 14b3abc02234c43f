"""Conversion between our adapter artifacts and AdapterHub's (`adapters` 1.3) on-disk format.

This module holds the folder-level side, both ways: adapter_config.json (one method's config,
or a `ConfigUnion` of several, as `MAMConfig` is), the LayerNorms, the artifact meta. Each
PEFT method's config and tensors convert in a module of its own beside it (`Converter`,
`converters()`): bottleneck adapters (`adapterhub_bottleneck`), LoRA and IA³
(`adapterhub_lora`), prefix tuning (`adapterhub_prefix`); the prediction head in
`adapterhub_head`. Where AdapterHub puts each module in a family's model is the family's
(`Family.adapterhub_modules`): BERT, RoBERTa, XLM-R, ELECTRA, DistilBERT and DeBERTa-v2
convert. Pure functions on nested param dicts, torch-layout state dicts (numpy) and config
dicts; files are read and written by `export.py`. Facts about AdapterHub 1.3.0, checked
against its source (`loading.py`, `configuration/adapter_config.py`):

* An adapter of several methods is one name whose config is `{"architecture": "union",
  "configs": [...]}`; every method's tensors carry the same name in their keys
  (`.adapters.{name}.`, `.loras.{name}.`, `.prefix_tunings.{name}.`). `ConfigUnion`
  refuses two configs of one architecture (LoRA and IA³ are both 'lora').
* Adapters never hold the base LayerNorms (no option places a new LN where ours is), so
  trained LayerNorms travel in an extra file, `layer_norms.safetensors`, keyed like the
  base model's own state dict, loaded with `model.base_model.load_state_dict(...,
  strict=False)` (see `README_TEXT`).
* Extra top-level keys in adapter_config.json are kept and ignored by the loader (that is
  where `save_adapter(meta_dict=...)` puts its entries); ours, "adapter_tuning", records the
  task, max_seq_length and base identity so that an import restores them.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable

import flax.traverse_util as tu
import numpy as np

from adapter_tuning import peft
from adapter_tuning.errors import UsageError, listing
from adapter_tuning.interop import adapterhub_head, hf_checkpoint
from adapter_tuning.models.encoder import ModelConfig
from adapter_tuning.models.families import families, family_named

ADAPTERHUB_VERSION = 'adapters.1.3.0'  # the library version these facts were checked on
ADAPTER_CONFIG = 'adapter_config.json'
ADAPTER_WEIGHTS = ('adapter.safetensors', 'pytorch_adapter.bin')
HEAD_CONFIG = 'head_config.json'
HEAD_WEIGHTS = ('model_head.safetensors', 'pytorch_model_head.bin')
LAYER_NORMS = 'layer_norms.safetensors'


@dataclasses.dataclass(frozen=True)
class Converter:
  """One PEFT method's side of the conversion (a module beside this one provides it)."""

  config_class: type  # our method config it converts
  reads: Callable  # one AdapterHub config dict -> whether it is this method's
  owns_key: Callable  # (state-dict key, adapter name) -> whether the tensor is this method's
  export: Callable  # (config, {'/'-path: array}, ModelConfig, name, key prefix) -> (AH config, state)
  import_: Callable  # (AH config, state, ModelConfig, name, versioned) -> (config, {path: array})


def converters() -> tuple[Converter, ...]:
  from adapter_tuning.interop import adapterhub_bottleneck as bn  # lazy: they import peft
  from adapter_tuning.interop import adapterhub_lora as lo
  from adapter_tuning.interop import adapterhub_prefix as pt
  from adapter_tuning.peft.bottleneck import AdapterConfig
  from adapter_tuning.peft.ia3 import IA3Config
  from adapter_tuning.peft.lora import LoRAConfig
  from adapter_tuning.peft.prefix import PrefixConfig
  return (Converter(AdapterConfig, bn.reads, bn.owns_key, bn.export, bn.import_),
          Converter(LoRAConfig, lo.reads_lora, lo.owns_key, lo.export_lora, lo.import_lora),
          Converter(IA3Config, lo.reads_ia3, lo.owns_key, lo.export_ia3, lo.import_ia3),
          Converter(PrefixConfig, pt.reads, pt.owns_key, pt.export, pt.import_))


def _converter_for(config) -> Converter:
  for converter in converters():
    if isinstance(config, converter.config_class):
      return converter
  raise UsageError(f'{peft.method_of(config).name} adapters have no AdapterHub equivalent; '
                   'export bottleneck, LoRA, IA³ or prefix-tuning artifacts')


README_TEXT = """\
# AdapterHub export of an adapter_tuning artifact

Load onto the same base checkpoint with `adapters` (AdapterHub) 1.3:

    import adapters
    model = adapters.AutoAdapterModel.from_pretrained(BASE)
    name = model.load_adapter(THIS_DIR)            # adapter + prediction head
    model.set_active_adapters(name)
{ln_step}
What `adapter_config.json` asks for, as trained:
{notes}
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
  method: object  # the PEFT config (one method's, or a peft.Combined)
  head: str
  label_names: list
  num_outputs: int
  trainable_rules: list
  name: str
  origin: dict  # what our own export recorded (task, max_seq_length, base); {} otherwise
  pooling: str = 'pooler'  # TaskModel.pooling the head reads: pooler or cls


def _meta_rules(meta: dict) -> str:
  rules = meta.get('trainable_rules')
  return f' (trainable_rules {rules})' if rules else ''


# ----------------------------------------------------------------------------- export


def to_adapterhub(params: dict, meta: dict, config: ModelConfig, name: str,
                  base_name: str = '') -> AdapterHubFiles:
  """Artifact (meta, trainable params) -> AdapterHub files for `name`.

  Raises UsageError naming what AdapterHub cannot represent (params other than the PEFT
  methods', LayerNorms, the head, and the pooler under a classification head; a method or
  a combination of methods it lacks).
  """
  family = family_named(config.family)
  if not family.adapterhub_model_class:
    raise UsageError(f'AdapterHub export has no model class for {config.family!r} bases')
  if not re.fullmatch(r'[A-Za-z0-9_\-]+', name):
    raise UsageError(f'AdapterHub adapter name {name!r} must be letters, digits, _ or -; '
                     'pass --name')
  methods = peft.parts(peft.config_from_meta(meta))
  if not methods:
    raise UsageError('the artifact has no PEFT method (placement none, no LoRA, IA³ or '
                     'prefix): an AdapterHub adapter needs one')
  converters_ = [_converter_for(m) for m in methods]
  head = meta.get('head')
  if head not in ('classification', 'regression', 'span'):
    raise UsageError(f'head {head!r} has no AdapterHub equivalent')
  flat = {'/'.join(k): np.asarray(v, np.float32) for k, v in tu.flatten_dict(params).items()}
  by_method, ln_params, head_params, pooler = _split_params(flat, methods, head, meta)
  member_configs, state = [], {}
  for method, converter, method_flat in zip(methods, converters_, by_method):
    member, member_state = converter.export(method, method_flat, config, name,
                                            family.key_prefixes[0])
    member_configs.append(member)
    state.update(member_state)
  top = {'hidden_size': config.hidden_size, 'model_class': family.adapterhub_model_class,
         'model_name': base_name, 'model_type': config.family, 'name': name,
         'version': ADAPTERHUB_VERSION}
  head_config, head_state = adapterhub_head.export(head, meta, name, head_params, pooler, config)
  ln_state = (hf_checkpoint.export_encoder_state(tu.unflatten_dict(ln_params), config.family)
              if ln_params else None)
  # Top-level extra keys are how AdapterHub itself stores meta_dict; its loader ignores them.
  origin = {'task': meta.get('task'), 'max_seq_length': meta.get('max_seq_length'),
            'base': {k: (meta.get('base') or {}).get(k) for k in ('name', 'sha256')}}
  return AdapterHubFiles(
      adapter_config={**top, 'config': _union(member_configs), 'adapter_tuning': origin},
      adapter_state=state, head_config={**top, 'config': head_config}, head_state=head_state,
      layer_norm_state=ln_state)


def _split_params(flat: dict, methods, head: str, meta: dict):
  """({'/'-path: array} per method, LayerNorm params, head params, pooler params)."""
  markers = [peft.method_of(m).param_marker for m in methods]
  by_method = [{} for _ in methods]
  ln_params, head_params, pooler, rest = {}, {}, {}, []
  for path, value in flat.items():
    parts = path.split('/')
    owner = [i for i, marker in enumerate(markers) if any(p.endswith(marker) for p in parts)]
    if owner:
      by_method[owner[0]][path] = value
    elif parts[0] == 'encoder' and parts[-2].endswith('layer_norm'):
      ln_params[tuple(parts[1:])] = value
    elif parts[0] == 'head':
      head_params[parts[-1]] = value
    elif parts[:2] == ['encoder', 'pooler'] and head in ('classification', 'regression'):
      pooler[parts[-1]] = value
    else:
      rest.append(path)
  if rest:
    raise UsageError(f'the artifact trains params AdapterHub cannot represent: {listing(rest)}'
                     f'{_meta_rules(meta)}; only PEFT methods, LayerNorms, the head (and the '
                     'pooler under a classification head) export')
  if set(head_params) != {'kernel', 'bias'}:
    raise UsageError('the artifact has no trained head (head/kernel, head/bias); AdapterHub '
                     'needs one to reproduce the logits')
  if pooler and set(pooler) != {'kernel', 'bias'}:
    raise UsageError('the artifact trains only part of the pooler; export needs both its '
                     'kernel and bias')
  return by_method, ln_params, head_params, pooler


def _union(members: list[dict]) -> dict:
  """One method's config, or AdapterHub's ConfigUnion of several (one per architecture)."""
  architectures = [m['architecture'] if 'architecture' in m else 'bottleneck' for m in members]
  twice = sorted({a for a in architectures if architectures.count(a) > 1})
  if twice:
    raise UsageError(f'AdapterHub cannot hold two {twice[0]!r} methods in one adapter (LoRA '
                     'and IA³ are both its "lora" architecture); train them as two artifacts')
  return members[0] if len(members) == 1 else {'architecture': 'union', 'configs': members}


def _members(adapter_config: dict) -> list[dict]:
  """The method configs of an adapter_config.json: its one config, or a union's members."""
  config = adapter_config.get('config')
  if isinstance(config, str):
    raise UsageError(f'adapter_config.json names its config {config!r} instead of spelling it '
                     'out; re-save the adapter with adapters>=1.0 (model.save_adapter)')
  if not isinstance(config, dict):
    raise UsageError('adapter_config.json has no "config" object; is it an AdapterHub adapter?')
  if config.get('architecture') != 'union':
    return [config]
  members = config.get('configs')
  if not isinstance(members, list) or not all(isinstance(m, dict) for m in members):
    raise UsageError('adapter_config.json: a "union" config needs a "configs" list of objects')
  return members


def readme(files: AdapterHubFiles) -> str:
  notes = []
  for member in _members(files.adapter_config):
    arch = member.get('architecture') or 'bottleneck'
    if arch == 'bottleneck':
      before = bool(member.get('original_ln_before'))
      formula = ('LN(x + h + s up(act(down(LN(x + h)))))' if before
                 else 'LN(x + h + s up(act(down(h))))')
      if member.get('is_parallel'):
        formula = 'LN(x + h + s up(act(down(x))))'
      notes.append(f'- bottleneck adapters: original_ln_before={str(before).lower()}, '
                   f'residual_before_ln=True, original_ln_after=True, is_parallel='
                   f'{str(bool(member.get("is_parallel"))).lower()}: {formula} around each '
                   'sub-layer')
    elif arch == 'lora':
      notes.append(f'- {"IA³" if member.get("composition_mode") == "scale" else "LoRA"} '
                   f'(r={member.get("r")}, alpha={member.get("alpha")}) on attention '
                   f'{member.get("attn_matrices") if member.get("selfattn_lora") else []}, '
                   f'intermediate={member.get("intermediate_lora")}, '
                   f'output={member.get("output_lora")}')
    else:
      notes.append(f'- prefix tuning: {member.get("prefix_length")} key/value prefixes per '
                   f'layer, {"stored flat" if member.get("flat") else "through its MLP"}')
  return README_TEXT.format(ln_step=LN_STEP if files.layer_norm_state else '',
                            notes='\n'.join(notes))


# ----------------------------------------------------------------------------- import


def _reader_for(member: dict) -> Converter:
  for converter in converters():
    if converter.reads(member):
      return converter
  raise UsageError(f'AdapterHub method {member.get("architecture")!r} '
                   f'(composition_mode {member.get("composition_mode")!r}) has no equivalent '
                   'here; bottleneck (Houlsby, Pfeiffer, parallel), LoRA, IA³, prefix tuning '
                   'and their unions (MAM) import')


def from_adapterhub(files: AdapterHubFiles, config: ModelConfig) -> Imported:
  """AdapterHub files -> trainable params in our layout, plus the artifact meta they fix."""
  cfg = files.adapter_config
  model_type = cfg.get('model_type')
  if model_type not in [f.name for f in families() if f.adapterhub_model_class]:
    raise UsageError(f'the AdapterHub adapter was made for model_type {model_type!r}; '
                     'adapters of ' + ', '.join(f.name for f in families()
                                                if f.adapterhub_model_class) + ' import')
  if model_type != config.family or cfg.get('hidden_size', config.hidden_size) != config.hidden_size:
    raise UsageError(f'the AdapterHub adapter was made for a {model_type} model with hidden size '
                     f'{cfg.get("hidden_size")}, but the base is {config.family} with hidden size '
                     f'{config.hidden_size}; pass the base it was trained on')
  name = cfg.get('name')
  if not name:
    raise UsageError('adapter_config.json has no adapter "name"')
  methods, flat, claimed = [], {}, set()
  for member in _members(cfg):
    converter = _reader_for(member)
    state = {k: v for k, v in files.adapter_state.items() if converter.owns_key(k, name)}
    claimed |= set(state)
    method, method_flat = converter.import_(member, state, config, name, 'version' in cfg)
    methods.append(method)
    flat.update(method_flat)
  unclaimed = set(files.adapter_state) - claimed
  if unclaimed:
    raise UsageError(f'AdapterHub weights this project cannot place (for adapter {name!r} on a '
                     f'{config.num_layers}-layer {config.family}): {listing(unclaimed)}')
  rules = [[re.escape(peft.method_of(m).param_marker) + '/', 'train'] for m in methods]
  if files.layer_norm_state:
    flat.update(_layer_norms_from_state(files.layer_norm_state, config))
    rules.append(['layer_norm/', 'train'])
  if files.head_config is None or files.head_state is None:
    raise UsageError('the AdapterHub folder has no prediction head (head_config.json and '
                     'head weights); save it with model.save_adapter(..., with_head=True)')
  head, labels, num_outputs, head_flat, pooling = adapterhub_head.import_(
      files.head_config, files.head_state, config)
  flat.update(head_flat)
  if any(k[:2] == ('encoder', 'pooler') for k in head_flat):
    rules.append(['^encoder/pooler/', 'train'])
  rules += [['^head/', 'train'], ['.*', 'freeze']]
  params = tu.unflatten_dict({k: np.ascontiguousarray(v, np.float32) for k, v in flat.items()})
  return Imported(params, peft.combine(methods), head, labels, num_outputs, rules, name,
                  dict(cfg.get('adapter_tuning') or {}), pooling)


def _layer_norm_shapes(config: ModelConfig) -> dict:
  """{path under the encoder: shape} of every LayerNorm param of the base, as the trainable
  rule 'layer_norm/' selects them (DeBERTa's relative-table LayerNorm included)."""
  import jax

  from adapter_tuning.models.encoder import Encoder
  ids = jax.ShapeDtypeStruct((1, 8), np.int32)
  shapes = jax.eval_shape(Encoder(config).init, jax.random.PRNGKey(0), ids, ids, ids)['params']
  return {k: tuple(v.shape) for k, v in tu.flatten_dict(shapes).items()
          if k[-2].endswith('layer_norm')}


def _layer_norms_from_state(state: dict, config: ModelConfig) -> dict:
  shapes = _layer_norm_shapes(config)
  by_key = {hf_checkpoint.checkpoint_key(p, config.family)[0]: p for p in shapes}
  prefixes = family_named(config.family).key_prefixes
  out, unknown = {}, []
  for key, value in state.items():
    bare = next((key[len(p):] for p in prefixes if key.startswith(p)), key)
    if bare not in by_key:
      unknown.append(key)
      continue
    value, path = np.asarray(value, np.float32), by_key[bare]
    if value.shape != shapes[path]:
      raise UsageError(f'{LAYER_NORMS}: {key} has shape {value.shape}, expected {shapes[path]}')
    out[('encoder',) + path] = value
  if unknown:
    raise UsageError(f'{LAYER_NORMS} holds tensors that are not LayerNorms of this base: '
                     f"{listing(unknown)}")
  return out


# ------------------------------------------------ adapters borrowed by path + hash (fusion, stack)


def referenced_files(ref, who, config: ModelConfig, base_name: str) -> AdapterHubFiles:
  """A borrowed adapter's (peft/references) own AdapterHub folder: its adapters and head, not
  its LayerNorms (the borrowing artifact runs on the base's, or on its own)."""
  import pathlib

  from adapter_tuning.interop import artifact
  from adapter_tuning.peft import references
  references.adapter_weights(ref, who)  # refuses a missing or changed artifact in one line
  meta, params = artifact.load(pathlib.Path(ref.path))
  keep = {k: v for k, v in tu.flatten_dict(params).items() if not k[-2].endswith('layer_norm')}
  files = to_adapterhub(tu.unflatten_dict(keep), meta, config, ref.name, base_name)
  return dataclasses.replace(files, layer_norm_state=None)


def import_referenced(folder, base_dir, staged, final, refusal: str):
  """An exported borrowed adapter (`folder`) imported as an artifact at `staged`, which the
  caller moves to `final` afterwards: its AdapterRef names `final` (the hash is of the
  content, so the move keeps it valid). Anything but one bottleneck adapter: `refusal`."""
  from adapter_tuning import export
  from adapter_tuning.interop import artifact
  from adapter_tuning.peft import bottleneck, references
  export.import_adapterhub(folder, str(base_dir), staged, name=None)
  meta, _ = artifact.load(staged)
  method = peft.config_from_meta(meta)
  if not isinstance(method, bottleneck.AdapterConfig):
    raise UsageError(f'adapter {folder.name!r} is {peft.describe(method)}; {refusal}')
  return references.AdapterRef(folder.name, str(final.resolve()), artifact.content_hash(staged),
                               method)
