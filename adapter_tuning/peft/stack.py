"""Stacking (MAD-X, Pfeiffer et al. 2020, arXiv 2005.00052): a new adapter on a frozen one.

A PEFT method on the seam of `adapter_tuning.peft` (`METHOD`). `model.stack.below=A` names
a bottleneck-adapter artifact trained on the same base (a language or domain adapter); at
every sub-layer site where A sits, a '{site}_stack' module runs A's adapter, frozen, and the
run's own bottleneck adapter (`model.adapter.*`, trained) runs after it, as `peft.Combined`
chains a site's modules in `peft.methods()` order (stack before bottleneck). With y the
sub-layer output and x its input:

    y_A = y + u_A(in_A(y)),   y_T = y_A + u_T(in_T(y_A)),   then the layer's LN(x + y_T)

where u = s up(f(down(.))) and in(z) is z, or LN(x + z) for an adapter with
original_ln_before. That is AdapterHub 1.3's `Stack(A, T)` in a bottleneck layer, checked
against its source (`adapter_layer_base.compose_stack`, `bottleneck.pre_block` /
`compose_single`, `modeling.Adapter.pre_forward` / `post_forward`): each adapter's
pre_forward takes the previous adapter's output as its residual and as its input (as
LN(x + it) when original_ln_before), and the last adapter's post_forward applies
LN(x + .). Sites where only one of them sits run that one alone, as `Stack` skips adapters
a layer lacks. Parallel adapters are refused: AdapterHub's parallel pre_forward reads the
sub-layer input again, so a stack of them keeps only the last adapter's branch, and there
is nothing to chain.

A's weights come from its artifact (`references.py`: path + content hash, checked whenever
a model is built) into 'below_<hash>' submodules that `frozen_params` freezes under every
trainable preset; a stack artifact holds the new adapter (+ head, + LayerNorms under
`adapters`) and names A by path and hash. A's own head and trained LayerNorms are not used
(as in AdapterHub, whose adapters never hold LayerNorms): train a below adapter with
`trainable=peft` for the stack to see it exactly as trained.

Serving several artifacts in one batch (`union`, `for_serving`): each site holds the below
adapter of every stack artifact once, each behind a per-example scalar 'use_<hash>'; an
example of another artifact leaves them off and its sub-layer output passes unchanged.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax.numpy as jnp

from adapter_tuning.errors import UsageError
from adapter_tuning.peft import Method, from_fields, references
from adapter_tuning.peft.bottleneck import Adapter

PARAM_MARKER = '_stack'
SUBMODULE = 'below'  # the frozen adapter's submodule at each site: 'below_<hash>'
FROZEN = PARAM_MARKER + r'/' + SUBMODULE + '_'  # loaded, never trained
BORROWER = references.Borrower('stacked adapter', 'the stack')
REFUSAL = ('model.stack.below must be a bottleneck-adapter artifact (model.adapter.placement '
           'houlsby or pfeiffer, nothing else)')


@dataclasses.dataclass(frozen=True)
class StackConfig(references.Borrowing):
  """The frozen adapter(s) below the run's own.

  Attributes:
    below: the adapter below (`AdapterRef`, or its fields as a dict: an artifact's meta);
      one, except in `union`'s serving form, which holds every served stack's.
    serving: the `union` form: per-example 'use_<hash>' switches (module docstring).
  """

  below: tuple = ()
  serving: bool = False
  seed: int = 0

  def __post_init__(self):
    below = references.as_refs(self.below)
    object.__setattr__(self, 'below', below)
    if not below:
      raise UsageError('a stack needs an adapter below; set model.stack.below=ARTIFACT')
    if len(below) > 1 and not self.serving:
      raise UsageError(f'a stack has one adapter below, got {list(below)}')
    parallel = [r.name for r in below if r.adapter.parallel]
    if parallel:
      raise UsageError(f'adapter {parallel[0]!r} is a parallel adapter: it reads the sub-layer '
                       f'input, not the output of what runs before it, so nothing stacks on '
                       f'it; {REFUSAL}')

  def borrowed(self) -> tuple:
    return self.below

  def hook(self, layer: int, site: str, dtype):
    members = self.members(layer, site)
    if not members:
      return None
    geometry = tuple((r.submodule(SUBMODULE), r.adapter.size, r.adapter.activation,
                      r.adapter.original_ln_before, r.adapter.scaling) for r in members)
    return Below(geometry, self.serving, dtype=dtype, name=f'{site}{PARAM_MARKER}')

  def init_layer(self, layer_params: dict, layer: int):
    """The below adapters' weights from their artifacts (hash-checked); 'use_*' off."""
    for site in self.sites(layer):
      module = layer_params[f'{site}{PARAM_MARKER}']
      for ref in self.members(layer, site):
        references.copy_adapter(module[ref.submodule(SUBMODULE)], ref, layer, site, BORROWER)
        if self.serving:
          module[f'use_{ref.submodule(SUBMODULE)}'][...] = 0.0

  def check(self, model_config):
    for ref in self.below:
      ref.adapter.check(model_config)


class Below(nn.Module):
  """A sub-layer hook: the frozen adapter(s) below, each `bottleneck.Adapter`'s own math.

  `adapters`: (submodule name, size, activation, original_ln_before, scaling) of each. In
  the serving form each runs only for the examples whose 'use_<name>' is 1; the others get
  y back exactly (a select, not a product with 0).
  """

  adapters: tuple
  serving: bool = False
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, y_BxTxD, residual_BxTxD=None, norm=None):
    for module, size, activation, ln_before, scaling in self.adapters:
      out_BxTxD = Adapter(size, activation, ln_before, scaling=scaling, dtype=self.dtype,
                          name=module)(y_BxTxD, residual_BxTxD, norm)
      if self.serving:
        use = self.param(f'use_{module}', nn.initializers.zeros, ())
        out_BxTxD = jnp.where(use > 0.5, out_BxTxD, y_BxTxD)
      y_BxTxD = out_BxTxD
    return y_BxTxD


def _check_run(config, below: str):
  """What a stack run needs besides its artifact: an adapter to train on top, no fusion."""
  from adapter_tuning.peft import bottleneck
  if ',' in below:
    raise UsageError(f'model.stack.below names several artifacts ({below}); a stack has one '
                     'adapter below (fuse several with model.fusion.adapters instead)')
  if str(config.model.get('fusion', {}).get('adapters', '') or '').strip():
    raise UsageError('model.stack.below and model.fusion.adapters cannot combine; train the '
                     'stack or the fusion')
  top = bottleneck.from_run_config(config)
  if top is None:
    raise UsageError('model.stack.below needs an adapter to train on top of it; set '
                     'model.adapter.placement=houlsby or pfeiffer')
  if top.parallel:
    raise UsageError(f'model.adapter.placement={top.placement} is parallel: it reads the '
                     'sub-layer input, not the output of the adapter below, so it does not '
                     'stack; use houlsby or pfeiffer')


def from_run_config(config) -> StackConfig | None:
  """`config.model.stack.below` -> the stack config (its artifact read, hashed and checked
  against the run's base); None when it is empty."""
  s = config.model.get('stack')
  below = str(s.below if s else '').strip()
  if not below:
    return None
  _check_run(config, below)
  identity, _ = references.run_base(config, 'model.stack.below')
  ref = references.reference(below, identity, set(), REFUSAL)
  return StackConfig((ref,), seed=config.seed)


def from_meta(fields) -> StackConfig | None:
  return from_fields(StackConfig, fields, 'stack')


def union(configs: list[StackConfig]) -> StackConfig:
  """Every stack's adapter below once (by content hash), with per-example 'use_*' switches."""
  below = {}
  for config in configs:
    for ref in config.below:
      below.setdefault(ref.sha256, ref)
  return StackConfig(tuple(below.values()), serving=True)


def for_serving(config: StackConfig, encoder_params: dict) -> dict:
  """An artifact's params as `union`'s config holds them: its adapter below switched on."""
  return references.switched_on(config, config.below, PARAM_MARKER, SUBMODULE, BORROWER,
                                encoder_params)


METHOD = Method(name='stack', config_class=StackConfig, param_marker=PARAM_MARKER,
                from_run_config=from_run_config, from_meta=from_meta, union=union,
                for_serving=for_serving, frozen_params=FROZEN)
