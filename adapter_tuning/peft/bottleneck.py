"""Bottleneck adapters (Houlsby et al. 2019): h + W_up f(W_down h + b_down) + b_up.

The adapter config is a small frozen dataclass, validated once, so that a bad size or
placement fails at load time with a message rather than deep inside `init`.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from adapter_tuning.errors import UsageError
from adapter_tuning.models.activations import ACTIVATIONS

PLACEMENTS = ('houlsby', 'pfeiffer', 'none')

@dataclasses.dataclass(frozen=True)
class AdapterConfig:
  """Where adapters go and what they look like.

  Attributes:
    size: bottleneck width m (d -> m -> d).
    placement: 'houlsby' (after attention output and after FFN output, before the
      residual add and LayerNorm), 'pfeiffer' (after the FFN output only) or 'none'.
    activation: the bottleneck non-linearity; exact GELU as in the official code.
    init_scale: std of the truncated normal (at 2 std) for both projections; biases are
      zero. 0 gives an exact identity, so the model equals its base.
    layers: indices of transformer layers that carry adapters; None means all.
    seed: seed for the adapter initialisation.
    original_ln_before: AdapterHub's `original_ln_before=True` (with residual_before_ln=True,
      `SeqBnConfig()`'s default): the adapter reads LN(x + h) instead of the sub-layer output
      h, keeps h as its residual, and the same LayerNorm then runs again:
      LN(x + h + up(f(down(LN(x + h))))). Zero adapters still give exactly the base.
  """

  size: int = 64
  placement: str = 'houlsby'
  activation: str = 'gelu'
  init_scale: float = 1e-3
  layers: Optional[tuple[int, ...]] = None
  seed: int = 0
  original_ln_before: bool = False

  def __post_init__(self):
    if not isinstance(self.size, int) or self.size <= 0:
      raise UsageError(f'adapter size must be a positive integer, got {self.size!r}; '
                       'set model.adapter.size (the paper uses 8, 64 or 256)')
    if self.placement not in PLACEMENTS:
      raise UsageError(f'unknown adapter placement {self.placement!r}; '
                       f'use one of {", ".join(PLACEMENTS)}')
    if self.activation not in ACTIVATIONS:
      raise UsageError(f'unknown adapter activation {self.activation!r}; '
                       f'use one of {", ".join(ACTIVATIONS)}')
    if self.init_scale < 0:
      raise UsageError(f'adapter init_scale must be >= 0, got {self.init_scale}')
    if not isinstance(self.original_ln_before, bool):
      raise UsageError('adapter original_ln_before must be true or false, got '
                       f'{self.original_ln_before!r}')
    if self.layers is not None:
      object.__setattr__(self, 'layers', tuple(int(i) for i in self.layers))

  @classmethod
  def from_any(cls, adapter) -> 'AdapterConfig | None':
    """Accepts None, an AdapterConfig, a dict or an ml_collections ConfigDict."""
    if adapter is None or isinstance(adapter, AdapterConfig):
      return adapter
    if hasattr(adapter, 'to_dict'):
      adapter = adapter.to_dict()
    adapter = dict(adapter)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(adapter) - names)
    if unknown:
      raise UsageError(f'unknown adapter config keys {unknown}; valid keys: {sorted(names)}')
    layers = adapter.get('layers')
    if layers is not None and not isinstance(layers, Sequence):
      raise UsageError(f'adapter layers must be a list of layer indices, got {layers!r}')
    if layers is not None and len(layers) == 0:
      adapter['layers'] = None
    return cls(**adapter)

  def has_adapter(self, layer: int, site: str) -> bool:
    """Whether layer `layer` carries an adapter at `site` ('attention' or 'ffn')."""
    if self.placement == 'none':
      return False
    if self.layers is not None and layer not in self.layers:
      return False
    return site == 'ffn' or self.placement == 'houlsby'

  def check_layers(self, num_layers: int):
    if self.layers is not None:
      bad = [i for i in self.layers if not 0 <= i < num_layers]
      if bad:
        raise UsageError(f'adapter layers {bad} do not exist; the model has layers '
                         f'0..{num_layers - 1}')


def adapter_param_count(hidden: int, size: int) -> int:
  """2md + d + m: two projections and their biases."""
  return 2 * hidden * size + hidden + size


def init_kernels(site_params: dict, config: AdapterConfig, layer: int, site: str, seed: int):
  """Draws one adapter's kernels in place: the adapters' only initialiser.

  Both projections ~ init_scale x a standard normal truncated at 2 std, biases zero, one
  NumPy generator per (layer i, site j) seeded with (seed, 2i + j), so an adapter's start
  does not depend on which other layers carry one. NumPy, not jax.random: drawing with
  jax.random compiled XLA programs at start-up (~1-2 s on 2 cores, the same cores the first
  train-step compile needs). `Adapter`'s Flax initialiser is zeros and only gives shapes.
  """
  rng = np.random.default_rng((seed, 2 * layer + ('attention', 'ffn').index(site)))
  for proj in site_params.values():
    x = rng.standard_normal(proj['kernel'].shape)
    while (outside := np.abs(x) > 2).any():
      x[outside] = rng.standard_normal(int(outside.sum()))
    proj['kernel'][...] = config.init_scale * x


class Adapter(nn.Module):
  """x + up(f(down(x))); `residual` replaces the x added back. Params: `init_kernels`."""

  size: int
  activation: str = 'gelu'
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BxTxD, residual_BxTxD=None):
    init = nn.initializers.zeros  # shapes only: the draw is init_kernels'
    hidden = x_BxTxD.shape[-1]
    h_BxTxM = nn.Dense(self.size, kernel_init=init, dtype=self.dtype, name='down')(x_BxTxD)
    h_BxTxM = ACTIVATIONS[self.activation](h_BxTxM)
    out_BxTxD = nn.Dense(hidden, kernel_init=init, dtype=self.dtype, name='up')(h_BxTxM)
    return (x_BxTxD if residual_BxTxD is None else residual_BxTxD) + out_BxTxD
