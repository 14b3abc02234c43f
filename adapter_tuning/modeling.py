"""A Flax Linen encoder for the BERT family (BERT, RoBERTa), with optional adapters.

One module tree serves both families: RoBERTa differs only in how position ids are made
(offset past the padding index) and in having a single token type. Parameter paths are
what the rest of the project matches on: adapter parameters live under `*_adapter/`,
every LayerNorm under `*layer_norm/`, the task head under `head/`.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from adapter_tuning.adapters import Adapter, AdapterConfig


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Geometry of a BERT-family encoder, read from a Hugging Face `config.json`."""

  family: str = 'bert'  # 'bert' | 'roberta'
  vocab_size: int = 30522
  hidden_size: int = 768
  num_layers: int = 12
  num_heads: int = 12
  intermediate_size: int = 3072
  max_positions: int = 512
  type_vocab_size: int = 2
  pad_token_id: int = 0
  layer_norm_eps: float = 1e-12
  hidden_act: str = 'gelu'
  hidden_dropout: float = 0.1
  attention_dropout: float = 0.1

  @property
  def position_offset(self) -> int:
    """RoBERTa numbers positions from pad_token_id + 1; BERT from 0."""
    return self.pad_token_id + 1 if self.family == 'roberta' else 0

  @property
  def max_seq_length(self) -> int:
    return self.max_positions - self.position_offset


_HIDDEN_ACTS = {
    'gelu': lambda x: jax.nn.gelu(x, approximate=False),
    'gelu_new': lambda x: jax.nn.gelu(x, approximate=True),
    'gelu_pytorch_tanh': lambda x: jax.nn.gelu(x, approximate=True),
    'relu': jax.nn.relu,
}

ACTS = tuple(_HIDDEN_ACTS)


class Dropout(nn.Module):
  """Inverted dropout drawing 16 random bits per element instead of 32.

  On CPU, generating the dropout masks with `jax.random.bernoulli` (32-bit uniforms) took
  ~16% of a MiniLM adapter step; two masks per 32-bit word cut that ~3x. The rate is
  quantised to 1/65536 (0.1 -> 0.100006) and the scale uses the quantised rate, so the
  expectation stays exact.
  """

  rate: float

  @nn.compact
  def __call__(self, x, deterministic: bool):
    if deterministic or self.rate <= 0:
      return x
    threshold = int(round(self.rate * 65536))
    words = jax.random.bits(self.make_rng('dropout'), ((x.size + 1) // 2,), jnp.uint32)
    halves = jax.lax.bitcast_convert_type(words, jnp.uint16).reshape(-1)[:x.size]
    keep = halves.reshape(x.shape) >= threshold
    return jnp.where(keep, x / (1.0 - threshold / 65536), 0).astype(x.dtype)


class Embeddings(nn.Module):
  config: ModelConfig
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, input_ids_BxT, token_type_ids_BxT, deterministic: bool):
    cfg = self.config
    if cfg.family == 'roberta':
      not_pad_BxT = (input_ids_BxT != cfg.pad_token_id).astype(jnp.int32)
      positions_BxT = jnp.cumsum(not_pad_BxT, axis=1) * not_pad_BxT + cfg.pad_token_id
    else:
      positions_BxT = jnp.broadcast_to(jnp.arange(input_ids_BxT.shape[1]), input_ids_BxT.shape)
    x = nn.Embed(cfg.vocab_size, cfg.hidden_size, name='word_embeddings')(input_ids_BxT)
    x += nn.Embed(cfg.max_positions, cfg.hidden_size, name='position_embeddings')(positions_BxT)
    x += nn.Embed(cfg.type_vocab_size, cfg.hidden_size,
                  name='token_type_embeddings')(token_type_ids_BxT)
    x = nn.LayerNorm(epsilon=cfg.layer_norm_eps, name='layer_norm')(x)
    x = Dropout(cfg.hidden_dropout)(x, deterministic=deterministic)
    return x.astype(self.dtype)


class SelfAttention(nn.Module):
  """Multi-head self-attention; `jax.nn.dot_product_attention` when no attention dropout."""

  config: ModelConfig
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BxTxD, mask_BxT, deterministic: bool):
    cfg = self.config
    head_dim = cfg.hidden_size // cfg.num_heads
    dense = lambda name: nn.DenseGeneral((cfg.num_heads, head_dim), dtype=self.dtype, name=name)
    q_BxTxNxH = dense('query')(x_BxTxD)
    k_BxTxNxH = dense('key')(x_BxTxD)
    v_BxTxNxH = dense('value')(x_BxTxD)
    use_dropout = not deterministic and cfg.attention_dropout > 0
    if use_dropout:
      logits_BxNxTxT = jnp.einsum('btnh,bsnh->bnts', q_BxTxNxH, k_BxTxNxH) / jnp.sqrt(
          jnp.asarray(head_dim, self.dtype))
      big_neg = jnp.finfo(logits_BxNxTxT.dtype).min
      logits_BxNxTxT = jnp.where(mask_BxT[:, None, None, :], logits_BxNxTxT, big_neg)
      probs_BxNxTxT = jax.nn.softmax(logits_BxNxTxT.astype(jnp.float32), axis=-1)
      probs_BxNxTxT = Dropout(cfg.attention_dropout)(probs_BxNxTxT, deterministic=False)
      out_BxTxNxH = jnp.einsum('bnts,bsnh->btnh', probs_BxNxTxT.astype(self.dtype), v_BxTxNxH)
    else:
      out_BxTxNxH = jax.nn.dot_product_attention(
          q_BxTxNxH, k_BxTxNxH, v_BxTxNxH, mask=mask_BxT[:, None, None, :])
    return nn.DenseGeneral(cfg.hidden_size, axis=(-2, -1), dtype=self.dtype,
                           name='out')(out_BxTxNxH)


class TransformerLayer(nn.Module):
  """Post-LN layer: LN(x + Adapter(Drop(Attn(x)))), then LN(h + Adapter(Drop(FFN(h)))).

  With adapter.original_ln_before, a site's adapter reads LN(x + a) (that same LayerNorm)
  and adds its output to a: LN(x + a + up(f(down(LN(x + a))))), as AdapterHub computes it.
  """

  config: ModelConfig
  adapter: Optional[AdapterConfig]
  index: int
  dtype: jnp.dtype = jnp.float32

  def _adapter(self, site):
    a = self.adapter
    if a is None or not a.has_adapter(self.index, site):
      return None
    return Adapter(a.size, a.activation, a.init_scale, dtype=self.dtype, name=f'{site}_adapter')

  @nn.compact
  def __call__(self, x_BxTxD, mask_BxT, deterministic: bool):
    cfg = self.config
    drop = lambda y: Dropout(cfg.hidden_dropout)(y, deterministic=deterministic)
    ln = lambda name: nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=self.dtype, name=name)

    def add_and_norm(site, residual_BxTxD, y_BxTxD):
      norm = ln(f'{site}_layer_norm')
      if (adapter := self._adapter(site)) is not None:
        if self.adapter.original_ln_before:
          y_BxTxD = adapter(norm(residual_BxTxD + y_BxTxD), y_BxTxD)
        else:
          y_BxTxD = adapter(y_BxTxD)
      return norm(residual_BxTxD + y_BxTxD)

    a_BxTxD = drop(SelfAttention(cfg, self.dtype, name='attention')(
        x_BxTxD, mask_BxT, deterministic))
    h_BxTxD = add_and_norm('attention', x_BxTxD, a_BxTxD)

    f_BxTxF = nn.Dense(cfg.intermediate_size, dtype=self.dtype, name='intermediate')(h_BxTxD)
    f_BxTxF = _HIDDEN_ACTS[cfg.hidden_act](f_BxTxF)
    f_BxTxD = drop(nn.Dense(cfg.hidden_size, dtype=self.dtype, name='output')(f_BxTxF))
    return add_and_norm('ffn', h_BxTxD, f_BxTxD)


class Encoder(nn.Module):
  """Embeddings, the layer stack and the pooler; returns last hidden state and pooled [CLS].

  Attributes:
    remat: rematerialise each layer in the backward pass (less memory, ~1/3 more compute).

  No stop-gradient is needed below the lowest trained layer: JAX's transpose computes
  cotangents only on paths that lead to differentiated (trainable) inputs, so the backward
  pass already ends there (tests/test_step_equivalence.py checks it in the compiled FLOPs).
  """

  config: ModelConfig
  adapter: Optional[AdapterConfig] = None
  dtype: jnp.dtype = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, input_ids_BxT, attention_mask_BxT, token_type_ids_BxT=None,
               deterministic: bool = True):
    cfg = self.config
    if token_type_ids_BxT is None:
      token_type_ids_BxT = jnp.zeros_like(input_ids_BxT)
    mask_BxT = attention_mask_BxT.astype(bool)
    x_BxTxD = Embeddings(cfg, self.dtype, name='embeddings')(
        input_ids_BxT, token_type_ids_BxT, deterministic)
    layer_cls = nn.remat(TransformerLayer, static_argnums=(3,)) if self.remat else TransformerLayer
    for i in range(cfg.num_layers):
      x_BxTxD = layer_cls(cfg, self.adapter, i, self.dtype, name=f'layer_{i}')(
          x_BxTxD, mask_BxT, deterministic)
    pooled_BxD = jnp.tanh(nn.Dense(cfg.hidden_size, dtype=self.dtype, name='pooler')(
        x_BxTxD[:, 0]))
    return {'last_hidden_state': x_BxTxD, 'pooled': pooled_BxD}
