"""AdapterFusion artifacts <-> AdapterHub's (`adapters` 1.3) fusion layout, both ways.

An export of a fusion artifact (peft/fusion.py) is one folder OUT:

  OUT/adapters/<name>/   each fused adapter as `model.load_adapter` reads it (the bottleneck
                         export of interop/adapterhub.py, with that adapter's own head)
  OUT/fusion/            `model.load_adapter_fusion`: adapter_fusion_config.json + weights
  OUT/head/              `model.load_head`: the fusion task's head
  OUT/layer_norms.safetensors   when the fusion run trained LayerNorms (`adapters` preset)
  OUT/README.md          the loading snippet

Facts about AdapterHub 1.3.0, checked against its source (`methods/modeling.py`
`BertFusion`, `methods/bottleneck.py` `compose_fuse`, `loading.py` `AdapterFusionLoader`):

* `DynamicAdapterFusionConfig` (the default, "dynamic") is what peft/fusion.py computes:
  query and key Linear(d, d) with bias on the adapter input and on each adapter's scaled
  up-projection, value Linear(d, d) without bias before the softmax, no temperature, the
  result added to the sub-layer output, then `original_ln_after`.
* Its weights are `{prefix}{module}.adapter_fusion_layer.{A,B}.{query,key,value}.{weight,
  bias}` with the fusion named by its adapters joined by commas, on the modules where the
  bottleneck adapters sit (`Family.adapterhub_modules`); a fusion layer exists at every
  layer of a site that all fused adapters share (`common_config_value`), used only where one
  of them sits.
* The fused adapters load with `with_head=False`; the fusion's head is set active by name.
"""

from __future__ import annotations

import dataclasses
import pathlib
import re
import shutil

import flax.traverse_util as tu
import numpy as np

from adapter_tuning import peft
from adapter_tuning.errors import UsageError
from adapter_tuning.interop import adapterhub as ah
from adapter_tuning.interop import adapterhub_head, artifact, hf_checkpoint
from adapter_tuning.models.families import family_named
from adapter_tuning.peft import fusion

FUSION_DIR, ADAPTERS_DIR, HEAD_DIR = 'fusion', 'adapters', 'head'
FUSION_CONFIG = 'adapter_fusion_config.json'
FUSION_WEIGHTS = ('model_adapter_fusion.safetensors', 'pytorch_model_adapter_fusion.bin')
# AdapterHub's DynamicAdapterFusionConfig, as save_adapter_fusion writes it.
DYNAMIC = {'key': True, 'query': True, 'value': True, 'query_before_ln': False,
           'regularization': True, 'residual_before': False, 'temperature': False,
           'value_before_softmax': True, 'value_initialized': True, 'dropout_prob': None}
REFUSAL = 'AdapterFusion fuses bottleneck adapters'
_PROJ = (('query', 'kernel', 'query.weight'), ('query', 'bias', 'query.bias'),
         ('key', 'kernel', 'key.weight'), ('key', 'bias', 'key.bias'),
         ('value', None, 'value.weight'))

README_TEXT = """\
# AdapterHub export of an adapter_tuning AdapterFusion

Load onto the same base checkpoint with `adapters` (AdapterHub) 1.3:

    import adapters
    from adapters.composition import Fuse
    model = adapters.AutoAdapterModel.from_pretrained(BASE)
    for name in {names!r}:
        model.load_adapter(f'{{THIS_DIR}}/adapters/{{name}}', with_head=False)
    model.load_adapter_fusion(f'{{THIS_DIR}}/fusion')
    model.load_head(f'{{THIS_DIR}}/head')
    model.set_active_adapters(Fuse({fuse}))
    model.active_head = {head!r}
{ln_step}
Each folder under adapters/ is also a complete adapter (with its own task's head) for
`load_adapter` alone. The fusion is AdapterHub's default "dynamic" AdapterFusion
(DynamicAdapterFusionConfig) trained here with dropout {dropout} on its scores and
regularization {regularization} x ||I - V||^2.
"""


@dataclasses.dataclass
class FusionFiles:
  """The contents of an exported fusion folder (torch layout, numpy arrays)."""

  adapters: dict  # name -> ah.AdapterHubFiles of each fused adapter
  fusion_config: dict
  fusion_state: dict
  head_config: dict
  head_state: dict
  layer_norm_state: dict | None
  readme: str


def fusion_of(meta: dict) -> fusion.FusionConfig | None:
  """The artifact's fusion config, or None when it is not a fusion artifact."""
  parts = peft.parts(peft.config_from_meta(meta))
  found = [p for p in parts if isinstance(p, fusion.FusionConfig)]
  if found and len(parts) > 1:
    raise UsageError('the artifact combines AdapterFusion with other methods; AdapterHub '
                     'export takes a fusion alone')
  return found[0] if found else None


def is_layout(directory: pathlib.Path) -> bool:
  return (pathlib.Path(directory) / FUSION_DIR / FUSION_CONFIG).is_file()


# ----------------------------------------------------------------------------- export


def to_adapterhub(params: dict, meta: dict, config, base_name: str) -> FusionFiles:
  """A fusion artifact (meta, trained params) + its fused artifacts -> FusionFiles."""
  fuse = fusion_of(meta)
  family = family_named(config.family)
  if not family.adapterhub_model_class:
    raise UsageError(f'AdapterHub export has no model class for {config.family!r} bases')
  if len({m.adapter.has_adapter_anywhere('attention') for m in fuse.adapters}) > 1:
    raise UsageError('AdapterHub fuses only adapters of one placement (all houlsby or all '
                     'pfeiffer); this fusion mixes them')
  names = [m.name for m in fuse.adapters]
  flat = {'/'.join(k): np.asarray(v, np.float32) for k, v in tu.flatten_dict(params).items()}
  by_method, ln_params, head_params, pooler = ah._split_params(  # pylint: disable=protected-access
      flat, [fuse], meta['head'], meta)
  top = {'hidden_size': config.hidden_size, 'model_class': family.adapterhub_model_class,
         'model_name': base_name, 'model_type': config.family, 'version': ah.ADAPTERHUB_VERSION}
  fusion_name = ','.join(names)
  head_name = re.sub(r'[^A-Za-z0-9_\-]', '_', str(meta.get('task') or 'fusion'))
  head_config, head_state = adapterhub_head.export(meta['head'], meta, head_name, head_params,
                                                   pooler, config)
  ln_state = (hf_checkpoint.export_encoder_state(tu.unflatten_dict(ln_params), config.family)
              if ln_params else None)
  origin = {'task': meta.get('task'), 'max_seq_length': meta.get('max_seq_length'),
            'regularization': fuse.regularization,
            'base': {k: (meta.get('base') or {}).get(k) for k in ('name', 'sha256')}}
  fusion_config = {**top, 'name': fusion_name, 'adapter_names': names, 'adapter_tuning': origin,
                   'config': {**DYNAMIC, 'regularization': fuse.regularization > 0,
                              'dropout_prob': fuse.dropout}}
  readme = README_TEXT.format(names=names, fuse=', '.join(map(repr, names)), head=head_name,
                              ln_step=ah.LN_STEP if ln_state else '', dropout=fuse.dropout,
                              regularization=fuse.regularization)
  adapters = {m.name: ah.referenced_files(m, fusion.BORROWER, config, base_name)
              for m in fuse.adapters}
  return FusionFiles(adapters, fusion_config,
                     _fusion_state(fuse, by_method[0], config, fusion_name),
                     {**top, 'name': head_name, 'config': head_config}, head_state, ln_state,
                     readme)


def _fusion_state(fuse, flat: dict, config, fusion_name: str) -> dict:
  """Our Q/K/V per site -> AdapterHub's keys; sites AdapterHub creates but no fused adapter
  uses get the untrained values (never read there)."""
  family = family_named(config.family)
  modules, prefix, d = family.adapterhub_modules, family.key_prefixes[0], config.hidden_size
  sites = [s for s in peft.SUBLAYER_SITES if all(m.adapter.has_adapter_anywhere(s) for m in fuse.adapters)]
  state = {}
  for layer in range(config.num_layers):
    for site in sites:
      ours = f'encoder/layer_{layer}/{site}{fusion.PARAM_MARKER}/'
      theirs = f'{prefix}{modules.module(layer, site)}.adapter_fusion_layer.{fusion_name}.'
      used = site in fuse.sites(layer)
      for module, leaf, key in _PROJ:
        path = ours + module + (f'/{leaf}' if leaf else '')
        if used and path not in flat:
          raise UsageError(f'the fusion artifact has no trained {path}; AdapterHub export '
                           'needs every fusion weight (train them: trainable=peft or adapters)')
        default = np.eye(d, dtype=np.float32) if leaf is None else np.zeros(
            (d, d) if leaf == 'kernel' else (d,), np.float32)
        value = flat.get(path, default) if used else default
        state[theirs + key] = value.T if value.ndim == 2 else value
  return state


def write(files: FusionFiles, out: pathlib.Path) -> bool:
  """The whole folder, put in place once complete (`artifact.write_folder`); True when the
  torch .bin files were written too."""
  from adapter_tuning import export

  def fill(tmp):
    (tmp / ADAPTERS_DIR).mkdir()
    for name, adapter_files in files.adapters.items():
      export.write_adapterhub(adapter_files, tmp / ADAPTERS_DIR / name)
    (tmp / FUSION_DIR).mkdir()
    wrote_bin = export.write_config_and_weights(tmp / FUSION_DIR, FUSION_CONFIG, FUSION_WEIGHTS,
                                                files.fusion_config, files.fusion_state)
    (tmp / HEAD_DIR).mkdir()
    export.write_config_and_weights(tmp / HEAD_DIR, ah.HEAD_CONFIG, ah.HEAD_WEIGHTS,
                                    files.head_config, files.head_state)
    if files.layer_norm_state:
      from safetensors.numpy import save_file
      save_file({k: np.ascontiguousarray(v) for k, v in files.layer_norm_state.items()},
                str(tmp / ah.LAYER_NORMS))
    (tmp / 'README.md').write_text(files.readme)
    return wrote_bin
  return artifact.write_folder(out, fill)


# ----------------------------------------------------------------------------- import


def import_layout(ah_dir: pathlib.Path, base_dir: pathlib.Path, out: pathlib.Path,
                  name: str | None = None, max_seq_length: int = 0) -> str:
  """An exported fusion folder -> a fusion artifact at `out` whose fused adapters are
  imported as artifacts of their own under out/fused/<name>/ (referenced by hash)."""
  from adapter_tuning import export, fileio
  fix = 'export the fusion again (python -m adapter_tuning.export --format adapterhub)'
  fusion_dir = pathlib.Path(ah_dir) / FUSION_DIR
  cfg = fileio.read_json(fusion_dir / FUSION_CONFIG, fix)
  _check_dynamic(cfg.get('config') or {})
  state = export.read_weights(fusion_dir, FUSION_WEIGHTS, fix)
  head_dir = pathlib.Path(ah_dir) / HEAD_DIR
  head_state = export.read_weights(head_dir, ah.HEAD_WEIGHTS, fix)
  if state is None or head_state is None:
    raise fileio.file_error(pathlib.Path(ah_dir), 'lacks fusion or head weights', fix)
  config = hf_checkpoint.read_model_config(base_dir)
  identity = hf_checkpoint.checkpoint_identity(base_dir)
  origin = cfg.get('adapter_tuning') or {}
  recorded = (origin.get('base') or {}).get('sha256')
  if recorded and recorded != identity['sha256']:
    raise UsageError(f'{ah_dir} was exported from a fusion trained on another base (sha256 '
                     f'{recorded[:12]}...), not {base_dir} (sha256 {identity["sha256"][:12]}...)')
  staged = out.with_name(out.name + '.fused.tmp')
  shutil.rmtree(staged, ignore_errors=True)
  try:
    members = [ah.import_referenced(pathlib.Path(ah_dir) / ADAPTERS_DIR / n, base_dir,
                                    staged / n, out / 'fused' / n, REFUSAL)
               for n in cfg.get('adapter_names') or []]
    dropout = cfg['config'].get('dropout_prob') or config.attention_dropout  # AdapterHub's
    fuse = fusion.FusionConfig(tuple(members), dropout=float(dropout),
                               regularization=float(origin.get('regularization', 0.01)))
    params = _fusion_params(fuse, state, config, cfg.get('name', ''))
    head, labels, num_outputs, head_flat, pooling = adapterhub_head.import_(
        fileio.read_json(head_dir / ah.HEAD_CONFIG, fix), head_state, config)
    params.update(head_flat)
    ln_state = export.read_weights(pathlib.Path(ah_dir), (ah.LAYER_NORMS,), fix)
    if ln_state:
      params.update(ah._layer_norms_from_state(ln_state, config))  # pylint: disable=protected-access
    meta = _import_meta(fuse, origin, name, head, labels, num_outputs, pooling, bool(ln_state),
                        any(k[:2] == ('encoder', 'pooler') for k in head_flat), identity,
                        base_dir, max_seq_length or origin.get('max_seq_length')
                        or min(128, config.max_seq_length), ah_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    artifact.save(out, tu.unflatten_dict(params), meta)
    staged.rename(out / 'fused')
  finally:
    shutil.rmtree(staged, ignore_errors=True)
  return (f'wrote fusion artifact {out} over {", ".join(m.name for m in members)} (imported '
          f'under {out / "fused"}) with a {head} head')


def _check_dynamic(config: dict):
  fixed = {k: v for k, v in DYNAMIC.items() if k not in ('regularization', 'dropout_prob')}
  bad = {k: config.get(k) for k, want in fixed.items() if config.get(k) != want}
  if bad:
    raise UsageError(f'AdapterFusion options {bad} have no equivalent here; only the default '
                     '"dynamic" AdapterFusion (DynamicAdapterFusionConfig) imports')


def _fusion_params(fuse, state: dict, config, fusion_name: str) -> dict:
  """AdapterHub's fusion weights -> {our param path tuple: array} at our fusion sites."""
  modules = family_named(config.family).adapterhub_modules
  leaves = {key: (module, leaf) for module, leaf, key in _PROJ}
  params = {}
  for key, value in state.items():
    parsed = modules.parse(key, peft.SUBLAYER_SITES, 'adapter_fusion_layer', fusion_name)
    if not parsed or parsed[2] not in leaves:
      raise UsageError(f'AdapterFusion weight {key} has no place here (fusion {fusion_name!r})')
    layer, site, leaf = parsed
    if site not in fuse.sites(layer):
      continue  # a fusion layer where none of its adapters sits: never used
    module, ours = leaves[leaf]
    value = np.asarray(value, np.float32)
    path = ('encoder', f'layer_{layer}', f'{site}{fusion.PARAM_MARKER}', module)
    params[path + ((ours,) if ours else ())] = value.T if value.ndim == 2 else value
  missing = [(i, s) for i in range(config.num_layers) for s in fuse.sites(i)
             if ('encoder', f'layer_{i}', f'{s}{fusion.PARAM_MARKER}', 'value') not in params]
  if missing:
    raise UsageError(f'AdapterFusion weights lack the (layer, site) pairs {missing}')
  return params


def _import_meta(fuse, origin, name, head, labels, num_outputs, pooling, with_ln: bool,
                 with_pooler: bool, identity, base_dir, max_seq_length, ah_dir) -> dict:
  from adapter_tuning.training import trainable
  rules = list(trainable.resolve('adapters' if with_ln else 'peft', 0))
  if with_pooler:
    rules.insert(len(rules) - 1, ('^encoder/pooler/', 'train'))
  return {'task': name or origin.get('task') or 'fusion', 'head': head, 'label_names': labels,
          'num_outputs': num_outputs, 'pooling': pooling, 'peft': peft.to_meta(fuse),
          'adapter': None, 'trainable_rules': [list(r) for r in rules],
          'base': {**identity, 'path': str(base_dir)}, 'max_seq_length': max_seq_length,
          'source': {'format': 'adapterhub_fusion', 'path': str(ah_dir)}}
