"""IA³ (Liu et al. 2022, arXiv 2205.05638): learned vectors that scale projection outputs.

A PEFT method on the seam of `adapter_tuning.peft` (`METHOD`): at each targeted site an
`IA3` module, named '{site}_ia3', multiplies y (the projection's output, bias included) by
a vector initialised to ones, so the model equals its base at init. Targets as
`model.ia3.targets` names them: key, value (attention), intermediate and output (FFN). The
paper's set is key,value,intermediate. As in AdapterHub's `IA3Config` (the implementation
checked against), 'intermediate' scales the FFN's first projection before its activation.
`merge` folds the vectors into the kernels and biases they follow.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import flax.linen as nn
import flax.traverse_util as tu
import numpy as np

from adapter_tuning.errors import UsageError
from adapter_tuning.peft import Method, MethodConfig, from_fields, normalize_sites, site_scope

TARGET_SITES = {'key': 'key', 'value': 'value', 'intermediate': 'intermediate_dense',
                'output': 'output'}
PARAM_MARKER = '_ia3'
_OWNER = {'key': ('attention', 'key'), 'value': ('attention', 'value'),
          'intermediate_dense': ('intermediate',), 'output': ('output',)}
_SCOPE = {'key': ('attention',), 'value': ('attention',), 'intermediate_dense': ('intermediate',),
          'output': ()}  # as peft.site_scope


@dataclasses.dataclass(frozen=True)
class IA3Config(MethodConfig):
  targets: tuple[str, ...] = ('key', 'value', 'intermediate')
  layers: Optional[tuple[int, ...]] = None
  seed: int = 0

  def __post_init__(self):
    normalize_sites(self, 'model.ia3.targets', TARGET_SITES,
                    " (key,value,intermediate is the paper's), or '' for IA³ off")

  def sites(self, layer: int) -> tuple[str, ...]:
    if self.layers is not None and layer not in self.layers:
      return ()
    return tuple(TARGET_SITES[t] for t in self.targets)

  def hook(self, layer: int, site: str, dtype):
    del dtype
    return IA3(name=f'{site}{PARAM_MARKER}') if site in self.sites(layer) else None

  def init_layer(self, layer_params: dict, layer: int):
    for site in self.sites(layer):
      site_scope(layer_params, site)[f'{site}{PARAM_MARKER}']['scale'][...] = 1.0

  def check(self, model_config):
    if self.layers is not None and any(not 0 <= i < model_config.num_layers
                                       for i in self.layers):
      raise UsageError(f'IA³ layers {self.layers} do not all exist; the model has layers '
                       f'0..{model_config.num_layers - 1}')


class IA3(nn.Module):
  """A projection-site hook: y * scale, scale over y's feature axes ([N, H] or [F])."""

  @nn.compact
  def __call__(self, x, y, rng=None):
    del x, rng
    return y * self.param('scale', nn.initializers.ones, y.shape[2:]).astype(y.dtype)


def merge(encoder_params: dict, config: IA3Config, num_layers: int) -> dict:
  """Encoder params with each vector folded into the kernel and bias it scales."""
  flat = {k: np.array(v) for k, v in tu.flatten_dict(encoder_params).items()}
  for layer in range(num_layers):
    for site in config.sites(layer):
      scale = flat.pop((f'layer_{layer}',) + _SCOPE[site] + (f'{site}{PARAM_MARKER}', 'scale'))
      owner = (f'layer_{layer}',) + _OWNER[site]
      flat[owner + ('kernel',)] = flat[owner + ('kernel',)] * scale
      if owner + ('bias',) in flat:  # ModernBERT's projections have none
        flat[owner + ('bias',)] = flat[owner + ('bias',)] * scale
  return tu.unflatten_dict(flat)


def from_run_config(config) -> IA3Config | None:
  targets = config.model.ia3.targets
  return IA3Config(targets=targets, seed=config.seed) if targets.strip() else None


def from_meta(fields) -> IA3Config | None:
  return from_fields(IA3Config, fields, 'IA³')


def union(configs: list[IA3Config]) -> IA3Config:
  """Absent vectors are the base's ones, so any targets serve together."""
  layers = None
  if all(c.layers is not None for c in configs):
    layers = tuple(sorted(set().union(*[c.layers for c in configs])))
  return IA3Config(targets=tuple(dict.fromkeys(t for c in configs for t in c.targets)),
                   layers=layers)


METHOD = Method(name='ia3', config_class=IA3Config, param_marker=PARAM_MARKER,
                from_run_config=from_run_config, from_meta=from_meta, union=union,
                merge=merge)
