"""AdapterFusion (Pfeiffer et al. 2021, arXiv 2005.00247): attention over frozen task adapters.

A PEFT method on the seam of `adapter_tuning.peft` (`METHOD`). Given bottleneck-adapter
artifacts A, B, ... trained on the same base, every sub-layer site where they sit gets a
`Fusion` module named '{site}_fusion' that runs each fused adapter's bottleneck branch
u_k = s_k up_k(f(down_k(x))) on the site's input x (the sub-layer output h, or LN(x + h)
for adapters with original_ln_before) and returns

    h + sum_k softmax_k(Dropout(Q(x) . K(u_k))) V(u_k)

which the layer then normalises as usual: LN(residual + that). Q and K are d x d with bias,
N(0, 0.02) (AdapterHub's `init_bert_weights`); V is d x d without bias, initialised to
the identity with 1e-6 off the diagonal, and pulled towards the identity by
regularization x ||I - V||^2 -- AdapterHub 1.3's default `DynamicAdapterFusionConfig`
(query, key, value, value_before_softmax, value_initialized, regularization on;
query_before_ln, residual_before, temperature off; dropout on the scores at the base's
attention dropout unless model.fusion.dropout says otherwise), so that `Fuse(A, B)` there
reproduces these logits (interop/adapterhub_fusion.py).

The fused adapters' weights are loaded from their artifacts (`references.py`, shared with
stacking; verified against the content hash recorded here) into 'fused_<hash>' submodules
and are never trained: the method's `frozen_params` pattern freezes them under every
trainable preset, so a fusion run's artifact holds only Q, K, V (+ head, + LayerNorms under
`adapters`) and names its adapters by path and hash. Their own heads and trained LayerNorms
are not used.

Serving several artifacts in one batch (`union`, `for_serving`): each site holds every
fused adapter of every fusion artifact, and a scalar 'use_<hash>' per adapter and example
says which ones this example's fusion attends over; an example of a plain artifact uses
none, and the site then returns h unchanged, exactly.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from adapter_tuning.errors import UsageError
from adapter_tuning.models.activations import ACTIVATIONS
from adapter_tuning.models.dropout import Dropout
from adapter_tuning.peft import SUBLAYER_SITES, Method, from_fields
from adapter_tuning.peft import references

PARAM_MARKER = '_fusion'
FROZEN = PARAM_MARKER + r'/fused_'  # the fused adapters' params: loaded, never trained
VALUE_OFF_DIAGONAL = 1e-6  # AdapterHub's value_initialized: identity, 1e-6 elsewhere
QK_INIT_STD = 0.02  # AdapterHub's init_bert_weights for query and key
SUBMODULE = 'fused'  # each fused adapter's submodule: 'fused_<hash>' (AdapterRef.submodule)
BORROWER = references.Borrower('fused adapter', 'the fusion')


@dataclasses.dataclass(frozen=True)
class FusionConfig(references.Borrowing):
  """The fused adapters and the fusion layer's training options.

  Attributes:
    adapters: the fused adapters (`AdapterRef`, or their fields as dicts: an artifact's meta).
    dropout: dropout on the attention scores while training (AdapterHub: the base's
      attention_probs_dropout_prob).
    regularization: strength of ||I - V||^2 in the loss (AdapterHub: 0.01; 0 = off). Added
      as its gradient at V (`pulled_to_identity`), so the logged loss is the task's alone.
    serving: the `union` form: per-example 'use_<hash>' switches (module docstring).
  """

  adapters: tuple = ()
  dropout: float = 0.0
  regularization: float = 0.01
  serving: bool = False
  seed: int = 0

  def __post_init__(self):
    fused = references.as_refs(self.adapters)
    object.__setattr__(self, 'adapters', fused)
    if not fused:
      raise UsageError('an AdapterFusion needs adapters; set model.fusion.adapters=A,B')
    if not 0 <= self.dropout < 1:
      raise UsageError(f'model.fusion.dropout must be in [0, 1) (or -1: the base\'s attention '
                       f'dropout), got {self.dropout}')
    if self.regularization < 0:
      raise UsageError(f'model.fusion.regularization must be >= 0, got {self.regularization}')
    if len({a.adapter.original_ln_before for a in fused}) > 1:
      raise UsageError('cannot fuse adapters with and without original_ln_before: they read '
                       'different inputs; fuse adapters of one kind')
    parallel = [a.name for a in fused if a.adapter.parallel]
    if parallel:
      raise UsageError(f'adapters {parallel} are parallel adapters; AdapterFusion fuses '
                       'sequential bottleneck adapters (houlsby, pfeiffer)')

  def borrowed(self) -> tuple:
    return self.adapters

  def hook(self, layer: int, site: str, dtype):
    members = self.members(layer, site)
    if not members:
      return None
    geometry = tuple((a.submodule(SUBMODULE), a.adapter.size, a.adapter.activation,
                      a.adapter.scaling) for a in members)
    return Fusion(geometry, members[0].adapter.original_ln_before, self.dropout,
                  self.regularization, self.serving, dtype=dtype, name=f'{site}{PARAM_MARKER}')

  def init_layer(self, layer_params: dict, layer: int):
    """Q, K ~ N(0, 0.02) with zero biases, V = identity (+1e-6), the fused adapters' weights
    from their artifacts (checked against their hashes); 'use_*' off (serving)."""
    for site in self.sites(layer):
      module = layer_params[f'{site}{PARAM_MARKER}']
      rng = np.random.default_rng((self.seed, 2 * layer + SUBLAYER_SITES.index(site), 0xF05E))
      for proj in ('query', 'key'):
        module[proj]['kernel'][...] = QK_INIT_STD * rng.standard_normal(
            module[proj]['kernel'].shape)
        module[proj]['bias'][...] = 0.0
      module['value'][...] = VALUE_OFF_DIAGONAL
      np.fill_diagonal(module['value'], 1.0)
      for member in self.members(layer, site):
        references.copy_adapter(module[member.submodule(SUBMODULE)], member, layer, site,
                                BORROWER)
        if self.serving:
          module[f'use_{member.submodule(SUBMODULE)}'][...] = 0.0

  def check(self, model_config):
    for member in self.adapters:
      member.adapter.check(model_config)


def pulled_to_identity(kernel, strength: float):
  """`kernel` unchanged; its gradient gains that of strength * ||I - kernel||^2 (AdapterHub's
  fusion regularization, which its trainer adds to the loss). A gradient rather than a loss
  term because the method seam hands modules to the encoder and never sees the loss."""
  return _pulled(kernel, strength)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _pulled(kernel, strength):
  del strength
  return kernel


def _pulled_fwd(kernel, strength):
  del strength
  return kernel, kernel


def _pulled_bwd(strength, kernel, g):
  eye = jnp.eye(kernel.shape[0], dtype=kernel.dtype)
  return (g + 2.0 * strength * (kernel - eye),)


_pulled.defvjp(_pulled_fwd, _pulled_bwd)


class Fusion(nn.Module):
  """A sub-layer hook: h + sum_k softmax_k(Q(x) . K(u_k)) V(u_k) (module docstring).

  `adapters`: (submodule name, size, activation, scaling) of each fused adapter here.
  Computed through each adapter's bottleneck instead of its output: with h_k = f(down_k(x))
  [.., m] and u_k = s (h_k W_up + b_up),

      K(u_k) = h_k (s W_up W_K) + (s b_up W_K + b_K),   V(u_k) = h_k (s W_up V) + s b_up V,

  the same maps, associated differently (float32 rounding apart), so the two d x d maps
  applied to every token's u_k (4 T d^2 multiply-adds per token for K = 2 adapters) become
  m x d maps on h_k (4 T m d): 12x fewer at m = 64, d = 768, in the forward and backward
  passes alike. The scores use Q(x) (s W_up W_K)^T . h_k, so the keys are never formed;
  only Q stays d x d.
  """

  adapters: tuple
  original_ln_before: bool = False
  dropout: float = 0.0
  regularization: float = 0.0
  serving: bool = False
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, y_BxTxD, residual_BxTxD=None, norm=None):
    x_BxTxD = norm(residual_BxTxD + y_BxTxD) if self.original_ln_before else y_BxTxD
    d, init = y_BxTxD.shape[-1], nn.initializers.zeros  # shapes only: init_layer draws
    q_BxTxD = nn.Dense(d, kernel_init=init, dtype=self.dtype, name='query')(x_BxTxD)
    key_DxD, key_bias_D = Weights((d, d), name='key')()
    value_DxD = self.param('value', init, (d, d))
    training = self.has_rng('dropout')  # the train step's apply; evaluation passes none
    if training and self.regularization:
      value_DxD = pulled_to_identity(value_DxD, self.regularization)
    scores, values = [], []
    for module, size, act, scaling in self.adapters:
      h_BxTxM, up_MxD, up_bias_D = Bottleneck(size, act, self.dtype, name=module)(x_BxTxD)
      up_MxD, up_bias_D = scaling * up_MxD, scaling * up_bias_D
      key_MxD, key_shift_D = up_MxD @ key_DxD, up_bias_D @ key_DxD + key_bias_D
      qk_BxTxM = q_BxTxD @ key_MxD.T.astype(self.dtype)
      scores.append(jnp.einsum('btm,btm->bt', qk_BxTxM, h_BxTxM) +
                    q_BxTxD @ key_shift_D.astype(self.dtype))
      values.append((h_BxTxM, (up_MxD @ value_DxD).astype(self.dtype), up_bias_D @ value_DxD))
    scores_BxTxK = jnp.stack(scores, axis=-1).astype(jnp.float32)
    scores_BxTxK = Dropout(self.dropout)(scores_BxTxK, deterministic=not training)
    if self.serving:
      use_K = jnp.stack([self.param(f'use_{module}', init, ()) for module, *_ in self.adapters])
      scores_BxTxK = jnp.where(use_K > 0.5, scores_BxTxK, jnp.finfo(jnp.float32).min)
    probs_BxTxK = jax.nn.softmax(scores_BxTxK, axis=-1)
    if self.serving:  # an example using none of them: all-zero weights, h unchanged
      probs_BxTxK = jnp.where(use_K > 0.5, probs_BxTxK, 0.0)
    context_BxTxD = sum(
        (probs_BxTxK[..., k, None].astype(self.dtype) * h_BxTxM) @ value_MxD +
        probs_BxTxK[..., k, None] * shift_D for k, (h_BxTxM, value_MxD, shift_D) in
        enumerate(values))
    return y_BxTxD + context_BxTxD.astype(y_BxTxD.dtype)


class Weights(nn.Module):
  """A map's params as nn.Dense names them ('kernel', 'bias'), returned as arrays so that
  `Fusion` can fold them into the fused adapters' up projections."""

  shape: tuple

  @nn.compact
  def __call__(self):
    init = nn.initializers.zeros
    return self.param('kernel', init, self.shape), self.param('bias', init, self.shape[-1:])


class Bottleneck(nn.Module):
  """A fused adapter at one site, with `bottleneck.Adapter`'s param names ('down', 'up'):
  its hidden f(down(x)) [.., m], and its up projection's kernel and bias as arrays."""

  size: int
  activation: str
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BxTxD):
    d, init = x_BxTxD.shape[-1], nn.initializers.zeros
    h_BxTxM = nn.Dense(self.size, kernel_init=init, dtype=self.dtype, name='down')(x_BxTxD)
    return (ACTIVATIONS[self.activation](h_BxTxM),
            *Weights((self.size, d), name='up')())


# ----------------------------------------------------------------------------- the method


def _check_alone(config):
  from adapter_tuning import peft
  others = [m.name for m in peft.methods()
            if m.config_class is not FusionConfig and m.from_run_config(config) is not None]
  if others:
    raise UsageError(f'model.fusion trains only the fusion layers and the head, but '
                     f'{", ".join(others)} is on too; switch it off (bottleneck: '
                     'model.adapter.placement=none)')


def from_run_config(config) -> FusionConfig | None:
  """`config.model.fusion` -> the fusion config (its artifacts read, hashed and checked
  against the run's base); None when model.fusion.adapters is empty."""
  f = config.model.get('fusion')
  paths = [p.strip() for p in str(f.adapters if f else '').split(',') if p.strip()]
  if not paths:
    return None
  if len(paths) < 2:
    raise UsageError(f'model.fusion.adapters names one artifact ({paths[0]}); a fusion '
                     'combines two or more: A,B[,...]')
  _check_alone(config)
  identity, model_config = references.run_base(config, 'model.fusion')
  taken: set = set()
  members = tuple(references.reference(
      p, identity, taken, 'AdapterFusion fuses bottleneck-adapter artifacts (houlsby, pfeiffer)')
      for p in paths)
  hashes = [m.sha256 for m in members]
  if len(set(hashes)) < len(hashes):
    raise UsageError('model.fusion.adapters names the same artifact twice; fuse distinct ones')
  dropout = model_config.attention_dropout if f.dropout < 0 else float(f.dropout)
  if dropout > 0 and config.model.get('scan_layers', False):
    raise UsageError('fusion dropout draws keys per layer, which the layer scan does not give; '
                     'set model.scan_layers=false or model.fusion.dropout=0')
  return FusionConfig(members, dropout=dropout, regularization=float(f.regularization),
                      seed=config.seed)


def from_meta(fields) -> FusionConfig | None:
  return from_fields(FusionConfig, fields, 'fusion')


def union(configs: list[FusionConfig]) -> FusionConfig:
  """Every fusion's adapters once (by content hash), with per-example 'use_*' switches."""
  members = {}
  for config in configs:
    for member in config.adapters:
      members.setdefault(member.sha256, member)
  return FusionConfig(tuple(members.values()), dropout=0.0, regularization=0.0, serving=True)


def for_serving(config: FusionConfig, encoder_params: dict) -> dict:
  """An artifact's params as `union`'s config holds them: its own adapters switched on."""
  return references.switched_on(config, config.adapters, PARAM_MARKER, SUBMODULE, BORROWER,
                                encoder_params)


METHOD = Method(name='fusion', config_class=FusionConfig, param_marker=PARAM_MARKER,
                from_run_config=from_run_config, from_meta=from_meta, union=union,
                for_serving=for_serving, frozen_params=FROZEN)
