"""Bottleneck adapters (Houlsby et al. 2019): h + W_up f(W_down h + b_down) + b_up.

A PEFT method on the seam of `adapter_tuning.peft` (`METHOD`): it hooks the sub-layer sites,
'attention' and 'ffn' (Houlsby) or 'ffn' only (Pfeiffer), with modules named
'{site}_adapter'. The config is a small frozen dataclass, validated once, so that a bad
size or placement fails at load time with a message rather than deep inside `init`.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from adapter_tuning.errors import UsageError
from adapter_tuning.models.activations import ACTIVATIONS
from adapter_tuning.peft import Method, MethodConfig

PLACEMENTS = ('houlsby', 'pfeiffer', 'parallel', 'parallel_ffn', 'none')
SITES = ('attention', 'ffn')  # the sub-layer sites of peft.SUBLAYER_SITES it can hook
PARAM_MARKER = '_adapter'


@dataclasses.dataclass(frozen=True)
class AdapterConfig(MethodConfig):
  """Where adapters go and what they look like.

  Attributes:
    size: bottleneck width m (d -> m -> d).
    placement: 'houlsby' (after attention output and after FFN output, before the
      residual add and LayerNorm), 'pfeiffer' (after the FFN output only), 'parallel'
      (He et al. 2022: at both sub-layers the adapter reads the sub-layer's input x and
      adds scaling * up(f(down(x))) to its output), 'parallel_ffn' (the FFN one only) or
      'none'.
    scaling: the factor on the adapter's output (AdapterHub's `scaling`; the scaled
      parallel adapter of He et al. uses 4).
    activation: the bottleneck non-linearity; exact GELU as in the official code.
    init_scale: std of the truncated normal (at 2 std) for both projections; biases are
      zero. 0 gives an exact identity, so the model equals its base.
    layers: indices of transformer layers that carry adapters; None means all.
      With `trainable=peft` nothing below the lowest adapter trains, so the backward pass
      ends there (AdapterDrop's speed-up, Rücklé et al. 2021; tests/test_adapterdrop.py).
    drop_lowest: AdapterDrop's robust variant: each training step draws k' uniformly from
      0..drop_lowest (one draw per step, from the step's dropout key) and the adapters of
      layers < k' act as the identity; evaluation and serving run every adapter. 0 = off.
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
  scaling: float = 1.0
  drop_lowest: int = 0

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
    if self.parallel and self.original_ln_before:
      raise UsageError('a parallel adapter reads the sub-layer input, so original_ln_before '
                       'does not apply; set model.adapter.original_ln_before=false')
    if self.layers is not None:
      object.__setattr__(self, 'layers', tuple(int(i) for i in self.layers))
    if not isinstance(self.drop_lowest, int) or self.drop_lowest < 0:
      raise UsageError(f'adapter drop_lowest must be an integer >= 0, got {self.drop_lowest!r}; '
                       'set model.adapter.drop_lowest (0 = off)')

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
    return site == 'ffn' or self.placement in ('houlsby', 'parallel')

  def has_adapter_anywhere(self, site: str) -> bool:
    """Whether the placement puts adapters at `site` (AdapterHub's mh_adapter/output_adapter)."""
    return site == 'ffn' or self.placement in ('houlsby', 'parallel')

  @property
  def parallel(self) -> bool:
    return self.placement in ('parallel', 'parallel_ffn')

  def sites(self, layer: int) -> tuple[str, ...]:
    return tuple(site for site in SITES if self.has_adapter(layer, site))

  def hook(self, layer: int, site: str, dtype):
    """The module the encoder runs at (layer, site), or None (peft's seam)."""
    if site not in SITES or not self.has_adapter(layer, site):
      return None
    return Adapter(self.size, self.activation, self.original_ln_before, self.parallel,
                   self.scaling, dtype=dtype, layer=layer, drop_lowest=self.drop_lowest,
                   name=f'{site}{PARAM_MARKER}')

  def init_layer(self, layer_params: dict, layer: int):
    """Draws this layer's adapter kernels in place (`init_kernels`)."""
    for site in self.sites(layer):
      init_kernels(layer_params[f'{site}{PARAM_MARKER}'], self, layer, site, self.seed)

  def check(self, model_config):
    """Fails with one line when the adapter does not fit the encoder (peft's seam)."""
    num_layers = model_config.num_layers
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
  """A sub-layer hook: y + s * up(f(down(y))), or its original_ln_before / parallel forms.

  Called as adapter(y, residual, norm) at a sub-layer site (peft): y is the sub-layer's
  output, residual its input, and the layer goes on with norm(residual + returned). With
  original_ln_before the bottleneck reads norm(residual + y) instead of y:
  norm(residual + y + s * up(f(down(norm(residual + y))))); a parallel adapter reads the
  sub-layer's input: norm(residual + y + s * up(f(down(residual)))). Params: `init_kernels`.
  `layer` and `drop_lowest`: AdapterDrop while training (`AdapterConfig.drop_lowest`).
  """

  size: int
  activation: str = 'gelu'
  original_ln_before: bool = False
  parallel: bool = False
  scaling: float = 1.0
  dtype: jnp.dtype = jnp.float32
  layer: int = 0
  drop_lowest: int = 0

  @nn.compact
  def __call__(self, y_BxTxD, residual_BxTxD=None, norm=None):
    if self.parallel:
      x_BxTxD = residual_BxTxD
    else:
      x_BxTxD = norm(residual_BxTxD + y_BxTxD) if self.original_ln_before else y_BxTxD
    init = nn.initializers.zeros  # shapes only: the draw is init_kernels'
    hidden = y_BxTxD.shape[-1]
    h_BxTxM = nn.Dense(self.size, kernel_init=init, dtype=self.dtype, name='down')(x_BxTxD)
    h_BxTxM = ACTIVATIONS[self.activation](h_BxTxM)
    up_BxTxD = nn.Dense(hidden, kernel_init=init, dtype=self.dtype, name='up')(h_BxTxM)
    out_BxTxD = y_BxTxD + (up_BxTxD if self.scaling == 1.0 else self.scaling * up_BxTxD)
    if self.layer >= self.drop_lowest or not self.has_rng('dropout'):
      return out_BxTxD  # never dropped here, or not training (no dropout stream)
    return jnp.where(self.layer < lowest_dropped(step_dropout_key(self), self.drop_lowest),
                     y_BxTxD, out_BxTxD)


ADAPTER_DROP_SALT = 0x4144_4450  # folded into the step's key for k' ('ADDP'); no other use


def step_dropout_key(module: nn.Module):
  """The key the train step gave `apply` as its 'dropout' stream, the same in every layer.

  A module's `make_rng` folds in the module's own path, but AdapterDrop needs one draw of k'
  per step that every layer's adapter reads; Flax keeps the apply's key in each scope's lazy
  RNG with the path only as a suffix, which `clear_suffix` drops.
  """
  return module.scope.rngs['dropout'].clear_suffix().as_jax_rng()


def lowest_dropped(key, drop_lowest: int):
  """k' ~ uniform on 0..drop_lowest: this step drops the adapters of layers < k'."""
  return jax.random.randint(jax.random.fold_in(key, ADAPTER_DROP_SALT), (), 0, drop_lowest + 1)


def from_run_config(config) -> AdapterConfig | None:
  """`config.model.adapter` (and the run's seed) -> the adapter config; None for 'none'."""
  a = config.model.adapter
  if a.placement == 'none':
    return None
  drop_lowest = a.get('drop_lowest', 0)
  if drop_lowest and config.model.get('scan_layers', False):
    raise UsageError('model.adapter.drop_lowest needs each layer to know its index, which the '
                     'layer scan does not give; set model.scan_layers=false')
  # layers: None or () = every layer (None cannot be written on a command line).
  return AdapterConfig(size=a.size, placement=a.placement, activation=a.activation,
                       init_scale=a.init_scale, layers=a.layers or None, seed=config.seed,
                       original_ln_before=a.get('original_ln_before', False),
                       scaling=float(a.get('scaling', 1.0)), drop_lowest=drop_lowest)


def union(configs: list[AdapterConfig]) -> AdapterConfig:
  """One adapter geometry that holds every given adapter exactly (zero-padded to the widest).

  Serving many artifacts in one pass (serving/multi_adapter) needs one module shape per site;
  a narrower adapter padded with zeros computes exactly what it computed alone.
  """
  activations = {c.activation for c in configs}
  if len(activations) > 1:
    raise UsageError(f'cannot serve adapters with different activations {sorted(activations)} '
                     'in one pass; run them separately')
  ln_before = {c.original_ln_before for c in configs}
  if len(ln_before) > 1:
    raise UsageError('cannot serve adapters with and without original_ln_before in one pass '
                     '(their adapters read different inputs); run them separately')
  forms = {(c.parallel, c.scaling) for c in configs}
  if len(forms) > 1:
    raise UsageError(f'cannot serve sequential and parallel adapters, or adapters of different '
                     f'scaling, in one pass ({sorted(forms)}); run them separately')
  both = any(c.placement in ('houlsby', 'parallel') for c in configs)
  parallel, scaling = forms.pop()
  placement = {(True, False): 'houlsby', (False, False): 'pfeiffer', (True, True): 'parallel',
               (False, True): 'parallel_ffn'}[(both, parallel)]
  layers = None
  if all(c.layers is not None for c in configs):
    layers = tuple(sorted(set().union(*[c.layers for c in configs])))
  return AdapterConfig(size=max(c.size for c in configs), placement=placement,
                       activation=configs[0].activation, init_scale=0.0, layers=layers,
                       original_ln_before=ln_before.pop(), scaling=scaling)


METHOD = Method(name='bottleneck', config_class=AdapterConfig, param_marker=PARAM_MARKER,
                from_run_config=from_run_config, from_meta=AdapterConfig.from_any, union=union)
