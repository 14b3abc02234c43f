"""Frozen bottleneck adapters that one artifact borrows from others, by path and content hash.

AdapterFusion (`fusion.py`) attends over such adapters and stacking (`stack.py`) runs a new
adapter on top of one. Both record each borrowed adapter as an `AdapterRef` (its artifact
folder, the sha256 of that folder's files, its bottleneck geometry) instead of copying its
weights: the borrowing artifact stays small, and an adapter that was moved, deleted or
retrained afterwards is refused in one line rather than silently used. The weights are read
(and the hash checked) when a model is built (`copy_adapter`, from a method's `init_layer`),
and they are never trained: each method's `Method.frozen_params` freezes them.

A borrowed adapter's own head and trained LayerNorms are not used: like AdapterHub's
`Fuse` and `Stack`, where adapters never hold LayerNorms, the borrowing run works on the
base's LayerNorms, or on its own when its trainable preset trains them.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
import re

import numpy as np

from adapter_tuning.errors import UsageError
from adapter_tuning.peft import SUBLAYER_SITES, MethodConfig
from adapter_tuning.peft.bottleneck import AdapterConfig
from adapter_tuning.peft.bottleneck import PARAM_MARKER as ADAPTER_MARKER


@dataclasses.dataclass(frozen=True, repr=False)
class AdapterRef:
  """One borrowed adapter: its artifact (path + content hash) and its bottleneck geometry."""

  name: str  # the adapter's task as a name (AdapterHub adapter name on export)
  path: str  # its artifact folder, absolute
  sha256: str  # artifact.content_hash of that folder when the borrowing run was trained
  adapter: AdapterConfig

  def __post_init__(self):
    if not isinstance(self.adapter, AdapterConfig):
      object.__setattr__(self, 'adapter', AdapterConfig.from_any(self.adapter))

  def submodule(self, prefix: str) -> str:
    """Its submodule name at every site: by content, so a serving union holds it once."""
    return f'{prefix}_{self.sha256[:16]}'

  def __repr__(self) -> str:
    return f'{self.name}@{self.sha256[:8]}'


class Borrowing(MethodConfig):
  """A method config that runs borrowed adapters at the sub-layer sites (fusion, stacking):
  where they sit follows from `borrowed()`, each adapter's own placement and layers."""

  def borrowed(self) -> tuple:
    """The `AdapterRef`s this config runs."""
    raise NotImplementedError

  def members(self, layer: int, site: str) -> tuple:
    """The borrowed adapters that sit at (layer, site)."""
    if site not in SUBLAYER_SITES:
      return ()
    return tuple(r for r in self.borrowed() if r.adapter.has_adapter(layer, site))

  def sites(self, layer: int) -> tuple[str, ...]:
    return tuple(site for site in SUBLAYER_SITES if self.members(layer, site))


def as_refs(refs) -> tuple:
  """`AdapterRef`s, or their fields as dicts (an artifact's meta), as a tuple of AdapterRef."""
  return tuple(r if isinstance(r, AdapterRef) else AdapterRef(**dict(r)) for r in refs)


@dataclasses.dataclass(frozen=True)
class Borrower:
  """How a method names the adapters it borrows in its one-line errors."""

  noun: str  # 'fused adapter'
  owner: str  # 'the fusion'


_LOADED: dict = {}  # (path, sha256, file stamps) -> the artifact's encoder params


def _stamp(directory: pathlib.Path) -> tuple:
  return tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns)
               for f in (directory / 'config.json', directory / 'weights.safetensors'))


def adapter_weights(ref: AdapterRef, who: Borrower) -> dict:
  """A borrowed adapter's encoder params from its artifact, refused in one line when the
  artifact is gone or differs from the one the borrowing run was trained with."""
  from adapter_tuning.interop import artifact
  directory = pathlib.Path(ref.path)
  if not all((directory / n).is_file() for n in ('config.json', 'weights.safetensors')):
    raise UsageError(f'{who.noun} {ref.name!r} (sha256 {ref.sha256[:12]}...) is missing: no '
                     f'artifact at {directory}; put it back there ({who.owner} references its '
                     'adapters by path and content hash)')
  key = (ref.path, ref.sha256, _stamp(directory))
  if key not in _LOADED:
    found = artifact.content_hash(directory)
    if found != ref.sha256:
      raise UsageError(f'{who.noun} {ref.name!r} at {directory} changed since {who.owner} was '
                       f'trained (sha256 {found[:12]}..., recorded {ref.sha256[:12]}...); '
                       f'restore that artifact or train {who.owner} again')
    if len(_LOADED) > 32:
      _LOADED.clear()
    _LOADED[key] = artifact.load(directory)[1].get('encoder', {})
  return _LOADED[key]


def copy_adapter(target: dict, ref: AdapterRef, layer: int, site: str, who: Borrower):
  """The borrowed adapter's down/up at (layer, site) into `target` (a module's params)."""
  trained = adapter_weights(ref, who).get(f'layer_{layer}', {}).get(f'{site}{ADAPTER_MARKER}')
  if trained is None:
    raise UsageError(f'{who.noun} {ref.name!r} ({ref.path}) has no trained adapter at layer '
                     f'{layer} ({site}) although its config places one there')
  for proj in ('down', 'up'):
    for leaf in ('kernel', 'bias'):
      value = np.asarray(trained[proj][leaf], np.float32)
      if value.shape != target[proj][leaf].shape:
        raise UsageError(f'{who.noun} {ref.name!r}: {proj}/{leaf} at layer {layer} has '
                         f'shape {value.shape}, its config implies {target[proj][leaf].shape}')
      target[proj][leaf][...] = value


def layers_of(ref: AdapterRef, who: Borrower) -> set[int]:
  """The layers a borrowed adapter sits in: those its artifact trained adapters in."""
  return {int(m[1]) for k in adapter_weights(ref, who)
          if (m := re.fullmatch(r'layer_(\d+)', k))}


def switched_on(config, refs: tuple, marker: str, prefix: str, who: Borrower,
                encoder_params: dict) -> dict:
  """An artifact's encoder params with the serving switch 'use_<submodule>' of each of
  its borrowed adapters set to 1 wherever `config` runs it (`Method.for_serving`): in a
  serving union every other artifact's examples leave it at 0, its base value."""
  out = dict(encoder_params)
  for layer in sorted({i for ref in refs for i in layers_of(ref, who)}):
    for site in config.sites(layer):
      key, name = f'layer_{layer}', f'{site}{marker}'
      module = dict(out.get(key, {}).get(name, {}))
      module.update({f'use_{r.submodule(prefix)}': np.float32(1.0)
                     for r in config.members(layer, site)})
      out[key] = {**out.get(key, {}), name: module}
  return out


def unique_name(task: str, taken: set) -> str:
  """A task as an AdapterHub-safe adapter name, not in `taken` (which it joins)."""
  name = re.sub(r'[^A-Za-z0-9_\-]', '_', task or 'adapter')
  unique, i = name, 2
  while unique in taken:
    unique, i = f'{name}_{i}', i + 1
  taken.add(unique)
  return unique


def reference(path: str, run_base: dict, taken: set, refusal: str) -> AdapterRef:
  """An artifact folder as an AdapterRef, checked: trained on the run's base (`run_base`,
  its identity) and a plain bottleneck-adapter artifact (else `refusal` follows what it
  holds, in one line)."""
  from adapter_tuning import peft
  from adapter_tuning.interop import artifact
  directory = pathlib.Path(path).expanduser().resolve()
  meta, _ = artifact.load(directory)
  artifact.check_base(meta, run_base, str(directory))
  parts = peft.parts(peft.config_from_meta(meta))
  if len(parts) != 1 or not isinstance(parts[0], AdapterConfig):
    raise UsageError(f'{directory} holds {peft.describe(peft.config_from_meta(meta))}; '
                     f'{refusal}')
  adapter = dataclasses.replace(parts[0], seed=0, drop_lowest=0, init_scale=0.0)
  return AdapterRef(unique_name(meta['task'], taken), str(directory),
                    artifact.content_hash(directory), adapter)


@functools.lru_cache(maxsize=4)
def _identity(directory: str, stamp: tuple) -> dict:
  del stamp  # part of the cache key: a rewritten checkpoint is hashed again
  from adapter_tuning.interop import hf_checkpoint
  return hf_checkpoint.checkpoint_identity(pathlib.Path(directory))


def run_base(config, key: str) -> tuple[dict, object]:
  """(identity, model config) of the run's base checkpoint, which `key` (the config key
  that borrows adapters) needs to check them against."""
  from adapter_tuning.interop import hf_checkpoint
  if not config.model.checkpoint:
    raise UsageError(f'{key} needs model.checkpoint: the base its adapters were trained on')
  directory = hf_checkpoint.resolve_checkpoint(config.model.checkpoint)
  stamp = tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns)
                for f in hf_checkpoint.weight_files(directory))
  return _identity(str(directory), stamp), hf_checkpoint.read_model_config(directory)
