"""Pre-LN transformer layers with the PEFT sites of BERT's: ModernBERT's (Warner et al.
2024) and, with `Options(rotary=False, gated_mlp=False, norm_first_layer=True)`, XLM-R-XL's
(BERT's attention and GELU MLP, a LayerNorm before every sub-layer).

    h   = x + hook_attention(Attn(LN_attn(x)))      (layer 0: no LN_attn, x as it is)
    out = h + hook_ffn(Wo(act(Wi_in LN_mlp(h)) * Wi_gate LN_mlp(h)))

What differs from BERT's post-LN `encoder.TransformerLayer`, read from Hugging Face
`modeling_modernbert.py` (transformers 4.57):
- LayerNorm before each sub-layer, none after; no biases by default (`attention_bias`,
  `mlp_bias`, `norm_bias`); the encoder adds a final LayerNorm (`ModelConfig.final_norm`).
- Rotary position embeddings on queries and keys (no position table): theta
  `global_rope_theta` in global layers, `local_rope_theta` in local ones.
- Every `global_attn_every_n_layers`-th layer (0, n, 2n, ...) attends globally; the others
  only to keys within `local_attention // 2` positions on either side (a sliding window).
- A GeGLU MLP: `Wi` projects to 2 x intermediate_size, split into an input and a gate half:
  Wo(act(input) * gate).

Where PEFT methods sit. The checkpoint's fused `Wqkv` is loaded as three projections
(`query`, `key`, `value`: the rows of Wqkv in that order), so LoRA and IA³ take q, k and v
separately, prefix tuning prepends to the keys and values after the rotation (a prefix has no
position), and merges fold into the same kernels as in BERT. `intermediate` is all of `Wi`
(LoRA's and IA³'s 'intermediate_dense' site act on its 2 x intermediate_size output, as
AdapterHub's LoRA on `mlp.Wi`); the 'intermediate' site sees act(input) * gate.

Bottleneck adapters (sub-layer sites 'attention' and 'ffn') sit on the sub-layer's output,
before the residual add: x + adapter(sublayer(LN(x))). That is the Houlsby placement read
for a pre-LN layer: in BERT the adapter also transforms the sub-layer's output before the
residual joins it, and starting at zero it leaves the layer exactly as it was. There is no
LayerNorm after the add, so AdapterHub's `original_ln_before` has nothing to re-run and is
refused; a parallel adapter reads the sub-layer's input, LN(x).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from adapter_tuning.errors import UsageError
from adapter_tuning.models.activations import ACTIVATIONS
from adapter_tuning.models.dropout import Dropout
from adapter_tuning.models.encoder import (DenseAct, ModelConfig, SelfAttention, _site_rng,
                                           folded_attention, hooked, with_prefix)


@dataclasses.dataclass(frozen=True)
class Options:
  """ModernBERT's layer settings (`ModelConfig.family_options`), as ModernBertConfig names
  them; defaults are ModernBertConfig's."""

  global_rope_theta: float = 160000.0
  local_rope_theta: float = 10000.0
  local_attention: int = 128  # window width: a local layer sees |i - j| <= local_attention // 2
  global_every: int = 3  # global_attn_every_n_layers
  attention_bias: bool = False
  mlp_bias: bool = False
  rotary: bool = True  # False: positions come from the embeddings (BERT's attention)
  gated_mlp: bool = True  # False: act(x W_i + b) W_o, BERT's MLP
  norm_first_layer: bool = False  # ModernBERT's layer 0 has no attention LayerNorm

  def is_global(self, layer: int) -> bool:
    return layer % self.global_every == 0


def rotate(x_BxTxNxH, theta: float):
  """Rotary embedding of positions 0..T-1 (HF's rotate_half form: the two halves of the head
  dimension rotate together), angles in float32 as HF computes them."""
  t, h = x_BxTxNxH.shape[1], x_BxTxNxH.shape[-1]
  inv_freq = 1.0 / np.float32(theta) ** (np.arange(0, h, 2, dtype=np.float32) / np.float32(h))
  positions_Tx1 = jax.lax.broadcasted_iota(jnp.float32, (t, 1), 0)
  angles_TxH = jnp.concatenate([positions_Tx1 * inv_freq] * 2, -1)
  cos, sin = (f(angles_TxH)[None, :, None, :].astype(x_BxTxNxH.dtype) for f in (jnp.cos, jnp.sin))
  first, second = jnp.split(x_BxTxNxH, 2, axis=-1)
  return x_BxTxNxH * cos + jnp.concatenate([-second, first], axis=-1) * sin


def window_mask(t: int, window: Optional[int], prefix: int = 0):
  """[T, prefix + T] bool: which keys each query may see by distance (all for global layers;
  the prefix positions, which have no distance, always). Built from iotas, so it also
  traces for a symbolic T (jax.export, ONNX)."""
  if window is None:
    return None
  rows = jax.lax.broadcasted_iota(jnp.int32, (t, t), 0)
  near = jnp.abs(rows - jax.lax.broadcasted_iota(jnp.int32, (t, t), 1)) <= window // 2
  return jnp.concatenate([jnp.ones((t, prefix), bool), near], axis=1) if prefix else near


class Attention(nn.Module):
  """Self-attention with rotary q/k, global or sliding-window by layer; params `query`,
  `key`, `value` ([D, N, H], from Wqkv) and `out` ([N, H, D], Wo) as BERT's attention."""

  config: ModelConfig
  dtype: jnp.dtype = jnp.float32
  adapter: Optional[object] = None
  index: int = 0

  @nn.compact
  def __call__(self, x_BxTxD, mask_BxT, deterministic: bool, dropout_rng=None, prefix_kv=None):
    cfg, options = self.config, self.config.family_options
    head_dim = cfg.hidden_size // cfg.num_heads
    project = lambda site, x, y: hooked(self.adapter, self.index, site, self.dtype, x, y,
                                        _site_rng(dropout_rng, site))
    dense = lambda name: project(name, x_BxTxD, nn.DenseGeneral(
        (cfg.num_heads, head_dim), use_bias=options.attention_bias, dtype=self.dtype,
        name=name)(x_BxTxD))
    is_global = options.is_global(self.index)
    theta = options.global_rope_theta if is_global else options.local_rope_theta
    q_BxTxNxH = rotate(dense('query'), theta)
    k_BxTxNxH = rotate(dense('key'), theta)
    v_BxTxNxH = dense('value')
    if prefix_kv is not None:
      k_BxTxNxH, v_BxTxNxH, mask_BxT = with_prefix(prefix_kv, k_BxTxNxH, v_BxTxNxH, mask_BxT)
    t, s = x_BxTxD.shape[1], k_BxTxNxH.shape[1]
    near_TxS = window_mask(t, None if is_global else options.local_attention, s - t)
    mask_BxTxS = (mask_BxT if mask_BxT.ndim == 3 else  # packed rows: already per query
                  jnp.broadcast_to(mask_BxT[:, None, :], (mask_BxT.shape[0], t, s)))
    if near_TxS is not None:
      mask_BxTxS = mask_BxTxS & near_TxS[None]
    if not deterministic and cfg.attention_dropout > 0:
      drop = Dropout(cfg.attention_dropout)
      out_BxTxNxH = folded_attention(q_BxTxNxH, k_BxTxNxH, v_BxTxNxH, mask_BxTxS,
                                     lambda p: drop(p, deterministic=False, rng=dropout_rng))
    else:
      out_BxTxNxH = jax.nn.dot_product_attention(q_BxTxNxH, k_BxTxNxH, v_BxTxNxH,
                                                 mask=mask_BxTxS[:, None])
    return project('attention_out', out_BxTxNxH, nn.DenseGeneral(
        cfg.hidden_size, axis=(-2, -1), use_bias=options.attention_bias, dtype=self.dtype,
        name='out')(out_BxTxNxH))


class GatedInput(nn.Module):
  """act(input) * gate from one projection `Wi` ([D, 2F], + bias): `pre_act(x, y)` is the
  'intermediate_dense' hook on the whole 2F-wide y, before the split."""

  features: int
  act: str
  use_bias: bool
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BxTxD, pre_act=None):
    kernel = self.param('kernel', nn.initializers.lecun_normal(),
                        (x_BxTxD.shape[-1], 2 * self.features))
    y_BxTx2F = jnp.dot(x_BxTxD.astype(self.dtype), kernel.astype(self.dtype))
    if self.use_bias:
      y_BxTx2F += self.param('bias', nn.initializers.zeros_init(),
                             (2 * self.features,)).astype(self.dtype)
    if pre_act is not None:
      y_BxTx2F = pre_act(x_BxTxD, y_BxTx2F)
    input_BxTxF, gate_BxTxF = jnp.split(y_BxTx2F, 2, axis=-1)
    return ACTIVATIONS[self.act](input_BxTxF) * gate_BxTxF


class PreNormLayer(nn.Module):
  """One ModernBERT layer (module docstring); `encoder.TransformerLayer`'s fields and call."""

  config: ModelConfig
  adapter: Optional[object]
  index: int
  dtype: jnp.dtype = jnp.float32

  @staticmethod
  def variant(config: ModelConfig, index: int):
    """What makes layers of equal shapes compute differently (the encoder's scan runs only
    layers of one variant together): global attention, and layer 0's missing LN."""
    options = config.family_options
    return options.is_global(index), index == 0 and not options.norm_first_layer

  @nn.compact
  def __call__(self, x_BxTxD, mask_BxT, deterministic: bool, dropout_rng=None, prefix_kv=None,
               shared=None):
    del shared
    cfg, options = self.config, self.config.family_options
    key = lambda k: None if dropout_rng is None else jax.random.fold_in(dropout_rng, k)
    ln = lambda name: nn.LayerNorm(epsilon=cfg.layer_norm_eps, use_bias=cfg.norm_bias,
                                   dtype=self.dtype, name=name)
    project = lambda site, x, y: hooked(self.adapter, self.index, site, self.dtype, x, y,
                                        _site_rng(dropout_rng, site))

    def residual_add(site, residual_BxTxD, input_BxTxD, y_BxTxD):
      module = None if self.adapter is None else self.adapter.hook(self.index, site, self.dtype)
      if getattr(module, 'original_ln_before', False):
        raise UsageError('adapter original_ln_before re-runs the LayerNorm after the residual '
                         "add, which this family's pre-LN layers do not have; set "
                         'model.adapter.original_ln_before=false')
      if module is not None:
        y_BxTxD = module(y_BxTxD, input_BxTxD, None)
      return residual_BxTxD + y_BxTxD

    first = self.index == 0 and not options.norm_first_layer
    a_in = x_BxTxD if first else ln('attention_layer_norm')(x_BxTxD)
    attention = Attention if options.rotary else SelfAttention
    a_out = attention(cfg, self.dtype, self.adapter, self.index, name='attention')(
        a_in, mask_BxT, deterministic, key(0), prefix_kv)
    a_out = Dropout(cfg.attention_dropout)(a_out, deterministic=deterministic, rng=key(1))
    h_BxTxD = residual_add('attention', x_BxTxD, a_in, a_out)

    f_in = ln('ffn_layer_norm')(h_BxTxD)
    dense_hook = lambda x, y: project('intermediate_dense', x, y)
    if options.gated_mlp:
      f_BxTxF = GatedInput(cfg.intermediate_size, cfg.hidden_act, options.mlp_bias, self.dtype,
                           name='intermediate')(f_in, dense_hook)
    else:
      f_BxTxF = DenseAct(cfg.intermediate_size, cfg.hidden_act, self.dtype,
                         name='intermediate')(f_in, dense_hook)
    f_BxTxF = project('intermediate', f_in, Dropout(cfg.hidden_dropout)(
        f_BxTxF, deterministic=deterministic, rng=key(2)))
    f_BxTxD = project('output', f_BxTxF, nn.Dense(
        cfg.hidden_size, use_bias=options.mlp_bias, dtype=self.dtype, name='output')(f_BxTxF))
    return residual_add('ffn', h_BxTxD, f_in, f_BxTxD)
