"""Prefix tuning (Li & Liang 2021, arXiv 2101.00190): learned keys and values that every
token attends to, in every layer, before its own.

A PEFT method on the seam of `adapter_tuning.peft` (`METHOD`) through the encoder-level
hook: one module, 'kv_prefix', maps P learned embeddings through the reparametrisation
MLP of AdapterHub's `PrefixTuningConfig` (Linear(d, bottleneck) -> tanh -> Linear(bottleneck,
layers x 2 x d)) to each layer's P key and P value vectors, which the attention prepends to
its own (padding masks and position ids of the real tokens are unchanged). The MLP is the
training parametrisation only: it runs once per forward call (not per layer or example),
and the artifact stores what it computes, the prefixes themselves (`eject`: a `flat`
config, P x layers x 2 x d numbers, ~18x fewer than the MLP's at P=30, d=384, b=512, and
no MLP at serving), unless `keep_mlp` asks for the MLP (to train it on elsewhere).
`model.prefix.bottleneck=0` trains flat prefixes directly (AdapterHub's `flat=True`; Li &
Liang found that less stable). Flat prefixes are laid out as AdapterHub's: [P, layers x 2 x
heads x head_dim]. Init as AdapterHub's: embeddings (or flat prefixes) N(0, 1), each Linear
as torch's default.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from adapter_tuning.errors import UsageError
from adapter_tuning.peft import Method, MethodConfig, from_fields

PARAM_MARKER = '_prefix'
MODULE = f'kv{PARAM_MARKER}'


@dataclasses.dataclass(frozen=True)
class PrefixConfig(MethodConfig):
  length: int = 30  # P prefix positions per layer
  bottleneck: int = 512  # width of the reparametrisation MLP (unused when flat)
  flat: bool = False  # the prefixes are the parameters (no MLP)
  keep_mlp: bool = False  # the artifact keeps the MLP instead of the prefixes it computes
  masked: bool = False  # serving several artifacts: flat, plus which positions are in use
  seed: int = 0

  def __post_init__(self):
    if not isinstance(self.length, int) or self.length <= 0:
      raise UsageError(f'model.prefix.length must be a positive integer (0 = off), got '
                       f'{self.length!r}')
    if not isinstance(self.bottleneck, int) or self.bottleneck <= 0:
      raise UsageError(f'model.prefix.bottleneck must be a positive integer (0 = flat '
                       f'prefixes, no MLP), got {self.bottleneck!r}')

  def encoder_hook(self, model_config, dtype):
    if self.flat or self.masked:
      return FlatPrefix(self.length, model_config.num_layers, model_config.num_heads,
                        model_config.hidden_size // model_config.num_heads, self.masked,
                        name=MODULE)
    return PrefixMLP(self.length, self.bottleneck, model_config.num_layers,
                     model_config.num_heads, model_config.hidden_size // model_config.num_heads,
                     dtype=dtype, name=MODULE)

  def init_encoder(self, encoder_params: dict):
    """Embeddings N(0, 1); Linear weights and biases U(+-1/sqrt(fan_in)) (torch's default)."""
    module = encoder_params[MODULE]
    rng = np.random.default_rng((self.seed, 20_000))
    if self.flat or self.masked:
      module['kv'][...] = rng.standard_normal(module['kv'].shape)
      if self.masked:
        module['keep'][...] = 0.0  # what an artifact without prefixes serves with
      return
    module['wte'][...] = rng.standard_normal(module['wte'].shape)
    for name in ('down', 'up'):
      bound = 1.0 / np.sqrt(module[name]['kernel'].shape[0])
      for leaf in ('kernel', 'bias'):
        module[name][leaf][...] = rng.uniform(-bound, bound, module[name][leaf].shape)

  def check(self, model_config):
    if self.length >= model_config.max_positions:
      raise UsageError(f'model.prefix.length={self.length} is not below the model\'s '
                       f'{model_config.max_positions} positions; use a shorter prefix')


def _by_layer(kv, length: int, num_layers: int, num_heads: int, head_dim: int):
  """[P, layers x 2 x heads x head_dim] (AdapterHub's layout) -> [layers, 2, P, heads, hd]."""
  kv = kv.reshape(length, num_layers * 2, num_heads, head_dim)
  return kv.transpose(1, 0, 2, 3).reshape(num_layers, 2, length, num_heads, head_dim)


class FlatPrefix(nn.Module):
  """() -> (the key/value prefixes, stored as they are used (no reparametrisation), which
  positions are in use [layers, P] or None: all). `masked` (serving several artifacts in one
  batch, `union`) adds 'keep' [P]: 1 where this example's artifact has a prefix position,
  0 past its length or for an artifact without prefixes, so each example sees its own."""

  length: int
  num_layers: int
  num_heads: int
  head_dim: int
  masked: bool = False

  @nn.compact
  def __call__(self):
    d = self.num_heads * self.head_dim
    kv = self.param('kv', nn.initializers.zeros, (self.length, self.num_layers * 2 * d))
    kv = _by_layer(kv, self.length, self.num_layers, self.num_heads, self.head_dim)
    if not self.masked:
      return kv, None
    keep = self.param('keep', nn.initializers.ones, (self.length,)) > 0.5
    return kv, jnp.broadcast_to(keep, (self.num_layers, self.length))


class PrefixMLP(nn.Module):
  """() -> key/value prefixes [layers, 2, P, heads, head_dim] (index 0 keys, 1 values)."""

  length: int
  bottleneck: int
  num_layers: int
  num_heads: int
  head_dim: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self):
    d = self.num_heads * self.head_dim
    zeros = nn.initializers.zeros  # shapes only: the draw is PrefixConfig.init_encoder's
    wte = self.param('wte', zeros, (self.length, d))
    h = jnp.tanh(nn.Dense(self.bottleneck, kernel_init=zeros, dtype=self.dtype,
                          name='down')(wte))
    kv = nn.Dense(self.num_layers * 2 * d, kernel_init=zeros, dtype=self.dtype, name='up')(h)
    return _by_layer(kv, self.length, self.num_layers, self.num_heads, self.head_dim), None


def param_count(config: PrefixConfig, hidden: int, num_layers: int) -> int:
  """Flat: P 2 L d. MLP: P d (embeddings) + d b + b (first Linear) + b 2 L d + 2 L d."""
  p, b = config.length, config.bottleneck
  if config.flat:
    return p * 2 * num_layers * hidden
  return p * hidden + hidden * b + b + b * 2 * num_layers * hidden + 2 * num_layers * hidden


def prefixes(module: dict) -> np.ndarray:
  """The MLP's output for its P embeddings, [P, layers x 2 x d] (float32, on the host)."""
  down, up = module['down'], module['up']
  h = np.tanh(np.asarray(module['wte'], np.float32) @ np.asarray(down['kernel'], np.float32)
              + np.asarray(down['bias'], np.float32))
  return h @ np.asarray(up['kernel'], np.float32) + np.asarray(up['bias'], np.float32)


def eject(config: PrefixConfig, encoder_params: dict) -> tuple[PrefixConfig, dict]:
  """(flat config, encoder params with the MLP replaced by the prefixes it computes): what an
  artifact stores. Unchanged when flat already, when `keep_mlp`, or when the MLP was not
  trained whole (a rule list freezing part of it: the artifact then holds only that part)."""
  module = encoder_params.get(MODULE)
  whole = module is not None and {'wte', 'down', 'up'} <= set(module) and all(
      set(module[n]) == {'kernel', 'bias'} for n in ('down', 'up'))
  if config.flat or config.keep_mlp or not whole:
    return config, encoder_params
  flat = dataclasses.replace(config, flat=True)
  return flat, {**encoder_params, MODULE: {'kv': prefixes(module)}}


def from_run_config(config) -> PrefixConfig | None:
  c = config.model.prefix
  if c.length == 0:
    return None
  return PrefixConfig(length=c.length, bottleneck=c.bottleneck or 512, flat=c.bottleneck == 0,
                      keep_mlp=bool(c.get('keep_mlp', False)), seed=config.seed)


def from_meta(fields) -> PrefixConfig | None:
  return from_fields(PrefixConfig, fields, 'prefix-tuning')


def union(configs: list[PrefixConfig]) -> PrefixConfig:
  """Flat prefixes of the longest length, each artifact's positions marked (`masked`)."""
  return PrefixConfig(length=max(c.length for c in configs), flat=True, masked=True)


def for_serving(config: PrefixConfig, encoder_params: dict) -> dict:
  """An artifact's params as the `union` config holds them: flat prefixes (the MLP's output,
  if it kept the MLP) and its positions marked in use (shorter ones pad with unused)."""
  config, encoder_params = eject(dataclasses.replace(config, keep_mlp=False), encoder_params)
  module = encoder_params[MODULE]
  return {**encoder_params, MODULE: {**module, 'keep': np.ones((config.length,), np.float32)}}


METHOD = Method(name='prefix', config_class=PrefixConfig, param_marker=PARAM_MARKER,
                from_run_config=from_run_config, from_meta=from_meta, union=union,
                for_artifact=eject, for_serving=for_serving)
