"""LoRA (Hu et al. 2021, arXiv 2106.09685): y = x W + (alpha / rank) * x A B, W frozen.

A PEFT method on the seam of `adapter_tuning.peft` (`METHOD`): a `LoRA` module at each
targeted projection site, named '{site}_lora', with A [in, rank] drawn as nn.Linear's
default (uniform in +-1/sqrt(in), AdapterHub's and peft's `init_weights='lora'`) and B
[rank, out] zero, so the model equals its base at init. `merge` folds (alpha / rank) A B
into the frozen kernels: a plain encoder with no extra inference cost.

Targets, as `model.lora.targets` names them, and the site each one hooks:
query, key, value, attention_output (the attention output projection), intermediate (the
FFN's first projection, before its activation, as AdapterHub's `intermediate_lora`),
output (the FFN's second matmul). Every site's y includes its bias.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import flax.linen as nn
import flax.traverse_util as tu
import jax.numpy as jnp
import numpy as np

from adapter_tuning.errors import UsageError
from adapter_tuning.models.dropout import Dropout
from adapter_tuning.peft import Method, MethodConfig, from_fields, normalize_sites, site_scope

TARGET_SITES = {'query': 'query', 'key': 'key', 'value': 'value',
                'attention_output': 'attention_out', 'intermediate': 'intermediate_dense',
                'output': 'output'}
PARAM_MARKER = '_lora'


@dataclasses.dataclass(frozen=True)
class LoRAConfig(MethodConfig):
  """rank r, alpha (the update is scaled by alpha / r), targets, optional layers."""

  rank: int = 8
  alpha: float = 8.0
  dropout: float = 0.0
  targets: tuple[str, ...] = ('query', 'value')
  layers: Optional[tuple[int, ...]] = None
  seed: int = 0

  def __post_init__(self):
    if not isinstance(self.rank, int) or self.rank <= 0:
      raise UsageError(f'model.lora.rank must be a positive integer (0 = LoRA off), got '
                       f'{self.rank!r}')
    normalize_sites(self, 'model.lora.targets', TARGET_SITES)
    if not 0 <= self.dropout < 1:
      raise UsageError(f'model.lora.dropout must be in [0, 1), got {self.dropout}')

  @property
  def scale(self) -> float:
    return self.alpha / self.rank

  def sites(self, layer: int) -> tuple[str, ...]:
    if self.layers is not None and layer not in self.layers:
      return ()
    return tuple(TARGET_SITES[t] for t in self.targets)

  def hook(self, layer: int, site: str, dtype):
    if site not in self.sites(layer):
      return None
    return LoRA(self.rank, self.scale, self.dropout, dtype=dtype, name=f'{site}{PARAM_MARKER}')

  def init_layer(self, layer_params: dict, layer: int):
    """A ~ U(+-1/sqrt(in)) (nn.Linear's default), B = 0: one NumPy generator per site."""
    for site in self.sites(layer):
      module = site_scope(layer_params, site)[f'{site}{PARAM_MARKER}']
      a = module['lora_A']
      rng = np.random.default_rng((self.seed, layer, list(TARGET_SITES.values()).index(site)))
      bound = 1.0 / np.sqrt(a.shape[0])
      a[...] = rng.uniform(-bound, bound, a.shape)
      module['lora_B'][...] = 0.0

  def check(self, model_config):
    if self.layers is not None:
      bad = [i for i in self.layers if not 0 <= i < model_config.num_layers]
      if bad:
        raise UsageError(f'LoRA layers {bad} do not exist; the model has layers '
                         f'0..{model_config.num_layers - 1}')


class LoRA(nn.Module):
  """A projection-site hook: y + scale * (Drop(x) A) B, x and y flattened to [B, T, -1].

  Dropout acts on LoRA's input only (Hu et al.; AdapterHub and peft do the same), with the
  site's own key (`rng`; None when deterministic).
  """

  rank: int
  scale: float
  dropout: float = 0.0
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, y, rng=None):
    x_BxTxI = x.reshape(x.shape[:2] + (-1,))
    x_BxTxI = Dropout(self.dropout)(x_BxTxI, deterministic=rng is None, rng=rng)
    out = int(np.prod(y.shape[2:]))
    zeros = nn.initializers.zeros  # shapes only: the draw is LoRAConfig.init_layer's
    a = self.param('lora_A', zeros, (x_BxTxI.shape[-1], self.rank))
    b = self.param('lora_B', zeros, (self.rank, out))
    delta = (x_BxTxI.astype(self.dtype) @ a.astype(self.dtype)) @ b.astype(self.dtype)
    return y + (self.scale * delta).reshape(y.shape).astype(y.dtype)


_KERNEL_OF_SITE = {'query': ('attention', 'query'), 'key': ('attention', 'key'),
                   'value': ('attention', 'value'), 'attention_out': ('attention', 'out'),
                   'intermediate_dense': ('intermediate',), 'output': ('output',)}
_SCOPE_OF_SITE = {**{s: ('attention',) for s in ('query', 'key', 'value', 'attention_out')},
                  'intermediate_dense': ('intermediate',), 'output': ()}  # as peft.site_scope


def merge(encoder_params: dict, config: LoRAConfig, num_layers: int) -> dict:
  """Encoder params with every LoRA update folded into its frozen kernel and no LoRA params:
  W + (alpha / r) A B, reshaped to the kernel's own layout ([D, N, H] for q/k/v, [N, H, D]
  for the attention output)."""
  flat = {k: np.array(v) for k, v in tu.flatten_dict(encoder_params).items()}
  for layer in range(num_layers):
    for site in config.sites(layer):
      module = (f'layer_{layer}',) + _SCOPE_OF_SITE[site] + (f'{site}{PARAM_MARKER}',)
      a, b = flat.pop(module + ('lora_A',)), flat.pop(module + ('lora_B',))
      kernel = (f'layer_{layer}',) + _KERNEL_OF_SITE[site] + ('kernel',)
      flat[kernel] = flat[kernel] + (config.scale * (a @ b)).reshape(flat[kernel].shape)
  return tu.unflatten_dict(flat)


def from_run_config(config) -> LoRAConfig | None:
  """`config.model.lora` -> the LoRA config; None when rank is 0 (LoRA off)."""
  c = config.model.lora
  if c.rank == 0:
    return None
  return LoRAConfig(rank=c.rank, alpha=float(c.alpha), dropout=c.dropout, targets=c.targets,
                    seed=config.seed)


def from_meta(fields) -> LoRAConfig | None:
  return from_fields(LoRAConfig, fields, 'LoRA')


def union(configs: list[LoRAConfig]) -> LoRAConfig:
  """Serving several LoRA artifacts in one pass needs one rank and scale per site."""
  geometry = {(c.rank, c.scale) for c in configs}
  if len(geometry) > 1:
    raise UsageError(f'cannot serve LoRA adapters of different rank/alpha {sorted(geometry)} in '
                     'one pass; run them separately')
  targets = tuple(dict.fromkeys(t for c in configs for t in c.targets))
  layers = None
  if all(c.layers is not None for c in configs):
    layers = tuple(sorted(set().union(*[c.layers for c in configs])))
  return LoRAConfig(rank=configs[0].rank, alpha=configs[0].alpha, targets=targets,
                    layers=layers)


METHOD = Method(name='lora', config_class=LoRAConfig, param_marker=PARAM_MARKER,
                from_run_config=from_run_config, from_meta=from_meta, union=union,
                merge=merge)
