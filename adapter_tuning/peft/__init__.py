"""Parameter-efficient methods: one module per method, all through one seam.

A method's config object (`bottleneck.AdapterConfig`, `lora.LoRAConfig`, `ia3.IA3Config`,
`prefix.PrefixConfig`, or a `Combined` of several) is what the encoder is given
(`Encoder.adapter`, `load_pretrained(adapter=...)`). At each site of each transformer layer
the encoder asks it `hook(layer, site, dtype)` for a Flax module to run there (None: nothing
runs) and knows nothing else about the method:

  sub-layer sites   'attention', 'ffn': the module is called as hook(y, residual, norm) and
                    returns y'; the layer then computes norm(residual + y') (post-LN BERT).
                    Bottleneck adapters (Houlsby and parallel: both; Pfeiffer and
                    parallel_ffn: 'ffn') hook here.
  projection sites  'query', 'key', 'value', 'attention_out' (attention), 'intermediate_dense'
                    (the FFN's first projection x W + b, before its activation),
                    'intermediate' (after the activation), 'output' (FFN): called as
                    hook(x, y, rng) with y = that projection of x and rng the site's
                    dropout key (None when deterministic), returns y' (where LoRA adds
                    B A x and IA³ scales y). Their modules live under layer_i/attention/ for
                    the four attention sites and layer_i/intermediate/ for
                    'intermediate_dense' (`site_scope`).

Prefix tuning hooks the attention keys and values of every layer from one module the
encoder runs once per call (`MethodConfig.encoder_hook`).

AdapterFusion (`fusion.py`) hooks the sub-layer sites with attention over frozen adapters
loaded from other artifacts, and stacking (`stack.py`) runs one such adapter below the run's
own (`references.py` holds what both share); `Method.frozen_params` keeps those out of
every preset.

Methods combine: several configs run as one `Combined` config, whose hook at a site runs
each method's module in turn, in `methods()` order whoever combines them (`combine`):
a stack's frozen adapter before the bottleneck adapter trained on it, LoRA before IA³
(bottleneck adapters and LoRA in one model, say; MAM is prefix tuning plus a scaled
parallel FFN adapter).

Every parameter a method creates lives under a module whose name ends with the method's
`param_marker` (bottleneck: 'layer_3/ffn_adapter/...'). The `adapters` trainable preset,
artifacts, multi-adapter serving and export find a method's parameters by that marker, and
`init_layer` (the method's only initialiser) draws them, so a new method is one new module
here plus one entry in `methods()`.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable

SUBLAYER_SITES = ('attention', 'ffn')
ATTENTION_SITES = ('query', 'key', 'value', 'attention_out')  # modules under layer_i/attention/
PROJECTION_SITES = ATTENTION_SITES + ('intermediate_dense', 'intermediate', 'output')
SITES = SUBLAYER_SITES + PROJECTION_SITES


def site_scope(layer_params: dict, site: str) -> dict:
  """The params dict a site's module lives in: `layer_i/attention/` for the attention
  projections (the attention module creates them), `layer_i/intermediate/` for the FFN's
  pre-activation matmul, `layer_i/` for the rest."""
  if site in ATTENTION_SITES:
    return layer_params['attention']
  return layer_params['intermediate'] if site == 'intermediate_dense' else layer_params


def normalize_sites(config, key: str, known: dict, hint: str = ''):
  """For a method config's __post_init__: `targets` (comma-separated or a sequence) as a
  tuple of names of `known`, `layers` as a tuple or None; a bad target is one line."""
  targets = config.targets.split(',') if isinstance(config.targets, str) else config.targets
  object.__setattr__(config, 'targets', tuple(t.strip() for t in targets if t.strip()))
  if config.layers is not None:
    object.__setattr__(config, 'layers', tuple(int(i) for i in config.layers) or None)
  unknown = [t for t in config.targets if t not in known]
  if unknown or not config.targets:
    from adapter_tuning.errors import UsageError
    raise UsageError(f'{key} has {unknown or "nothing"}; use a comma-separated subset of '
                     f'{",".join(known)}{hint}')


class MethodConfig:
  """What every method config answers, with the answers of a method that hooks nothing;
  each method's frozen dataclass subclasses it and overrides what it uses."""

  def sites(self, layer: int) -> tuple[str, ...]:
    return ()

  def hook(self, layer: int, site: str, dtype):
    """The module to run at (layer, site), or None."""
    return None

  def init_layer(self, layer_params: dict, layer: int):
    """Draws this layer's params of the method in place."""

  def encoder_hook(self, model_config, dtype):
    """A module the encoder runs once per call, giving each layer's attention key/value
    prefixes [num_layers, 2, P, heads, head_dim] (prefix tuning), or None."""
    return None

  def init_encoder(self, encoder_params: dict):
    """Draws the params of `encoder_hook`'s module in place."""

  def check(self, model_config):
    """A one-line UsageError when the method does not fit the encoder."""


def from_fields(config_class: type, fields, what: str):
  """A method config from an artifact's recorded fields (dict / ConfigDict), or None."""
  if fields is None or isinstance(fields, config_class):
    return fields
  fields = dict(fields.to_dict() if hasattr(fields, 'to_dict') else fields)
  names = {f.name for f in dataclasses.fields(config_class)}
  unknown = sorted(set(fields) - names)
  if unknown:
    from adapter_tuning.errors import UsageError
    raise UsageError(f'unknown {what} config keys {unknown}; valid keys: {sorted(names)}')
  return config_class(**fields)


@dataclasses.dataclass(frozen=True)
class Method:
  """One PEFT method, as the rest of the code sees it.

  Its config class is a frozen, hashable dataclass (it is a Flax module attribute) that
  subclasses `MethodConfig` and overrides what the method uses (`hook` and `sites` for layer
  sites, `encoder_hook` for prefixes, their initialisers, `check`), and has a `seed` field
  (the run's seed: its init draws from it).
  """

  name: str
  config_class: type
  param_marker: str  # the suffix of every module name the method creates
  from_run_config: Callable  # the run config -> a config_class instance, or None (no method)
  from_meta: Callable  # an artifact's recorded config (dict or None) -> config or None
  union: Callable  # [configs] -> one config whose modules hold each of them (serving)
  merge: Callable | None = None  # (encoder params, config, num_layers) -> plain encoder params
  for_artifact: Callable | None = None  # (config, trained encoder params) -> what an artifact
  # stores instead: prefix tuning's prefixes in place of the MLP that computes them
  for_serving: Callable | None = None  # (config, an artifact's encoder params) -> the params
  # `union`'s config holds for it (prefix tuning: its positions marked in use)
  frozen_params: str = ''  # a regex over '/'-joined param paths of the method's params that
  # are loaded, never trained (fused adapters, a stack's adapter below): frozen under every
  # preset


def methods() -> tuple[Method, ...]:
  """Every method, in the order their modules run at a site they share (`combine`)."""
  from adapter_tuning.peft import (bottleneck, fusion, ia3, lora, prefix,  # lazy: import layers
                                   stack)
  return (stack.METHOD, bottleneck.METHOD, lora.METHOD, ia3.METHOD, prefix.METHOD,
          fusion.METHOD)


def frozen_patterns() -> tuple[str, ...]:
  """Regexes of method params that no trainable preset trains (`Method.frozen_params`)."""
  return tuple(m.frozen_params for m in methods() if m.frozen_params)


@dataclasses.dataclass(frozen=True)
class Combined(MethodConfig):
  """Several methods in one model: at each site their modules run one after another."""

  configs: tuple

  @property
  def seed(self) -> int:
    return self.configs[0].seed

  def sites(self, layer: int) -> tuple[str, ...]:
    return tuple(dict.fromkeys(s for c in self.configs for s in c.sites(layer)))

  def hook(self, layer: int, site: str, dtype):
    modules = [m for m in (c.hook(layer, site, dtype) for c in self.configs) if m is not None]
    if len(modules) <= 1:
      return modules[0] if modules else None

    def chained(y_or_x, *rest):
      if site in SUBLAYER_SITES:  # (y, residual, norm) -> y'
        for module in modules:
          y_or_x = module(y_or_x, *rest)
        return y_or_x
      y, rng = rest  # (x, y, dropout key) -> y'
      for module in modules:
        y = module(y_or_x, y, rng)
      return y
    return chained

  def init_layer(self, layer_params: dict, layer: int):
    for c in self.configs:
      c.init_layer(layer_params, layer)

  def encoder_hook(self, model_config, dtype):
    modules = [m for m in (c.encoder_hook(model_config, dtype) for c in self.configs) if m]
    return modules[0] if modules else None  # at most one prefix method per model

  def init_encoder(self, encoder_params: dict):
    for c in self.configs:
      c.init_encoder(encoder_params)

  def check(self, model_config):
    for c in self.configs:
      c.check(model_config)


def combine(configs) -> object:
  """None, the one config, or a `Combined` of several (at most one per method), in
  `methods()` order: the order their modules run in at a shared site is part of the model,
  so it must not depend on who combines them (a run config, an artifact's meta, the
  serving `union` of artifacts listed in any order, an AdapterHub union's member order)."""
  configs = [c for c in configs if c is not None]
  if not configs:
    return None
  order = {m.config_class: i for i, m in enumerate(methods())}
  configs = sorted(configs, key=lambda c: order.get(type(c), len(order)))
  return configs[0] if len(configs) == 1 else Combined(tuple(configs))


def parts(config) -> tuple:
  """The method configs a (possibly combined) config holds."""
  if config is None:
    return ()
  return config.configs if isinstance(config, Combined) else (config,)


def method_of(config) -> Method:
  """The method a config object belongs to."""
  for method in methods():
    if isinstance(config, method.config_class):
      return method
  raise TypeError(f'{type(config).__name__} is not the config of a known PEFT method')


def param_patterns() -> tuple[str, ...]:
  """Regexes (re.search on '/'-joined param paths) matching every method's parameters."""
  return tuple(re.escape(m.param_marker) + '/' for m in methods())


def is_method_param(path) -> bool:
  """Whether a param path (a tuple of names, or '/'-joined) lies in a PEFT method's module."""
  names = path.split('/') if isinstance(path, str) else path
  markers = tuple(m.param_marker for m in methods())
  return any(name.endswith(markers) for name in names)


def method_named(name: str) -> Method:
  for method in methods():
    if method.name == name:
      return method
  from adapter_tuning.errors import UsageError
  raise UsageError(f'unknown PEFT method {name!r}; known: '
                   f'{", ".join(m.name for m in methods())}')


def as_config(adapter, method: str = 'bottleneck'):
  """None, a method's (or Combined) config, or its keys as a dict / ConfigDict -> config."""
  if adapter is None or isinstance(adapter, Combined) or any(
      isinstance(adapter, m.config_class) for m in methods()):
    return adapter
  return method_named(method).from_meta(adapter)


def from_run_config(config):
  """The run's PEFT config: every method its `config.model` keys switch on, combined."""
  return combine([m.from_run_config(config) for m in methods()])


def to_meta(config) -> dict:
  """{method name: its config's fields}: what an artifact records (`config_from_meta`)."""
  return {method_of(c).name: dataclasses.asdict(c) for c in parts(config)}


def describe(config) -> str:
  """'lora(rank=4) + ia3()': each method with the fields it sets away from their defaults."""
  def one(part):
    changed = [f'{f.name}={getattr(part, f.name)}' for f in dataclasses.fields(part)
               if f.name != 'seed' and getattr(part, f.name) != f.default]
    return f'{method_of(part).name}({", ".join(changed)})'
  return ' + '.join(one(p) for p in parts(config)) or 'no PEFT method'


def for_artifact(config, trained: dict) -> tuple:
  """(config, trained params) as an artifact records them: each method's `for_artifact`."""
  configs = []
  for part in parts(config):
    convert = method_of(part).for_artifact
    if convert is not None and 'encoder' in trained:
      part, encoder = convert(part, trained['encoder'])
      trained = {**trained, 'encoder': encoder}
    configs.append(part)
  return combine(configs), trained


def for_serving(config, trained: dict) -> dict:
  """An artifact's trained params as `union`'s config holds them (each `for_serving`)."""
  for part in parts(config):
    convert = method_of(part).for_serving
    if convert is not None and 'encoder' in trained:
      trained = {**trained, 'encoder': convert(part, trained['encoder'])}
  return trained


def config_from_meta(meta: dict):
  """The PEFT config an artifact records: `peft` ({method: fields}), or, as artifacts
  written before methods combined did, `method` (default bottleneck) and `adapter`."""
  if meta.get('peft') is not None:
    return combine([method_named(name).from_meta(fields)
                    for name, fields in meta['peft'].items()])
  recorded = meta.get('adapter')
  return None if not recorded else method_named(meta.get('method', 'bottleneck')).from_meta(
      recorded)


def union(configs: list):
  """One config whose modules hold every given config's, for serving them in one pass:
  per method, that method's union of the configs that use it."""
  by_method: dict[str, list] = {}
  for config in configs:
    for part in parts(config):
      by_method.setdefault(method_of(part).name, []).append(part)
  return combine([method_named(name).union(group) for name, group in by_method.items()])
