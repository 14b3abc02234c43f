"""DeBERTa-v2/v3 disentangled self-attention (He et al. 2021), for `families/deberta_v2`.

DeBERTa adds no position vectors to the tokens (v3: `position_biased_input` false); a token
pair's relative distance enters each layer's attention logits instead. With q, k the
content projections and Q_r, K_r the projections of one shared, normalised table of
relative-distance embeddings (`encoder.rel_embeddings` + `encoder.LayerNorm`):

  logits[i, j] = ( q_i.k_j  +  q_i.K_r[d(i, j)]  +  k_j.Q_r[d(j, i)] ) / sqrt(H * s)
                  content      c2p                  p2c

where d(i, j) is the (log-bucketed) distance i - j shifted into the table and clipped,
each positional term is present as `pos_att_type` says, and s = 1 + len(pos_att_type).
`share_att_key` computes Q_r, K_r with the content query/key projections (so a PEFT hook
at 'query'/'key' acts on them too, as it would in a merged checkpoint); otherwise with
their own `pos_query_proj`/`pos_key_proj`. Facts and formulas checked against transformers
4.57 `modeling_deberta_v2.py` (tests/test_deberta.py compares outputs).

The encoder asks the family for these two modules (`families.Attention`): the table is
built once per encoder (`RelativeEmbeddings`), every layer's `DisentangledSelfAttention`
gets it. Flax parameter paths stay BERT's (`layer_i/attention/{query,key,value,out}`), so
PEFT sites and trainable rules match unchanged.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from adapter_tuning.errors import UsageError
from adapter_tuning.models.dropout import Dropout
from adapter_tuning.models.encoder import ModelConfig, _site_rng, hooked
from adapter_tuning.models.sequences import head_mask

POSITION_TERMS = ('c2p', 'p2c')


@dataclasses.dataclass(frozen=True)
class Disentangled:
  """DeBERTa's attention settings (`ModelConfig.family_options`), resolved from
  config.json the way DebertaV2Config/DisentangledSelfAttention resolve them."""

  relative: bool = True  # `relative_attention`: False = content logits only
  pos_att_type: tuple[str, ...] = ('p2c', 'c2p')
  position_buckets: int = 256  # <= 0: plain distances, no log buckets
  max_relative_positions: int = 512  # already defaulted to max_position_embeddings
  share_att_key: bool = True
  norm_rel_embeddings: bool = True  # `norm_rel_ebd` contains 'layer_norm'

  @property
  def span(self) -> int:
    """Half the table: distances map to [0, 2 * span) (HF `pos_ebd_size`)."""
    return self.position_buckets if self.position_buckets > 0 else self.max_relative_positions

  @property
  def scale_factor(self) -> int:
    """HF counts the positional terms asked for, even without relative attention."""
    return 1 + sum(t in self.pos_att_type for t in POSITION_TERMS)


def log_buckets(relative_BxT: np.ndarray, buckets: int, max_position: int) -> np.ndarray:
  """HF `make_log_bucket_position`, in float32 as torch computes it: distances under half
  the buckets stay exact, longer ones are compressed logarithmically up to max_position."""
  mid = buckets // 2
  sign = np.sign(relative_BxT)
  abs_pos = np.where(np.abs(relative_BxT) < mid, mid - 1, np.abs(relative_BxT))
  ratio = np.log(abs_pos.astype(np.float32) / np.float32(mid)) / np.log(
      np.float32((max_position - 1) / mid))
  log_pos = np.ceil(ratio * np.float32(mid - 1)) + np.float32(mid)
  return np.where(abs_pos <= mid, relative_BxT, log_pos * sign).astype(np.int32)


def relative_positions(length: int, options: Disentangled) -> np.ndarray:
  """[T, T] query position minus key position, bucketed when the config asks for buckets.

  Static in T (NumPy at trace time), so XLA sees the gather indices as constants.
  """
  pos = np.arange(length)
  relative = pos[:, None] - pos[None, :]
  if options.position_buckets > 0 and options.max_relative_positions > 0:
    relative = log_buckets(relative, options.position_buckets, options.max_relative_positions)
  return relative.astype(np.int32)


class RelativeEmbeddings(nn.Module):
  """The shared relative-distance table, normalised once per forward (HF
  `get_rel_embedding`), and the distances of a length-T sequence; None without
  relative attention."""

  config: ModelConfig
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, length: int) -> Optional[dict]:
    options = self.config.family_options
    if not options.relative:
      return None
    table_PxD = self.param('embeddings', nn.initializers.normal(0.02),
                           (2 * options.span, self.config.hidden_size))
    if options.norm_rel_embeddings:
      table_PxD = nn.LayerNorm(epsilon=self.config.layer_norm_eps, name='layer_norm')(table_PxD)
    return {'embeddings': table_PxD.astype(self.dtype),
            'positions': jnp.asarray(relative_positions(length, options))}


def _gather_distances(scores_BxNxTxP, index_TxT):
  """scores[b, n, i, index[i, j]] -> [B, N, T, T]."""
  index = jnp.broadcast_to(index_TxT, scores_BxNxTxP.shape[:2] + index_TxT.shape)
  return jnp.take_along_axis(scores_BxNxTxP, index, axis=-1)


def position_bias(q_BxTxNxH, k_BxTxNxH, pos_q_PxNxH, pos_k_PxNxH, positions_TxT,
                  options: Disentangled):
  """The c2p and p2c logits [B, N, T, T], unscaled.

  c2p[i, j] = q_i . K_r[clip(d(i, j) + span)]; p2c[i, j] = k_j . Q_r[clip(-d(j, i) + span)]
  (HF gathers p2c along the key's row, then transposes).
  """
  span = options.span
  bias = 0.0
  if 'c2p' in options.pos_att_type:
    c2p_BxNxTxP = jnp.einsum('btnh,pnh->bntp', q_BxTxNxH, pos_k_PxNxH)
    bias += _gather_distances(c2p_BxNxTxP, jnp.clip(positions_TxT + span, 0, 2 * span - 1))
  if 'p2c' in options.pos_att_type:
    p2c_BxNxSxP = jnp.einsum('bsnh,pnh->bnsp', k_BxTxNxH, pos_q_PxNxH)
    index_SxT = jnp.clip(-positions_TxT + span, 0, 2 * span - 1)
    bias += jnp.swapaxes(_gather_distances(p2c_BxNxSxP, index_SxT), -1, -2)
  return bias


class DisentangledSelfAttention(nn.Module):
  """`encoder.SelfAttention`'s fields and call, with DeBERTa's logits (module docstring).

  `shared` is `RelativeEmbeddings`' output. Prefix tuning is refused: the relative
  distance of a prefix key to a token is undefined.
  """

  config: ModelConfig
  dtype: jnp.dtype = jnp.float32
  adapter: Optional[object] = None  # the PEFT method's config: hooks at the projections
  index: int = 0  # the layer's index, for the hooks

  @nn.compact
  def __call__(self, x_BxTxD, mask_BxT, deterministic: bool, dropout_rng=None, prefix_kv=None,
               shared=None):
    if prefix_kv is not None:
      raise UsageError('prefix tuning is not supported on DeBERTa (relative positions of '
                       'prefix keys are undefined); use LoRA, IA³ or bottleneck adapters')
    cfg, options = self.config, self.config.family_options
    head_dim = cfg.hidden_size // cfg.num_heads
    scale = math.sqrt(head_dim * options.scale_factor)

    def projection(name, site=None):
      """x -> hook(x, x W + b): one Dense and one hook, reused for the position table."""
      dense = nn.DenseGeneral((cfg.num_heads, head_dim), dtype=self.dtype, name=name)
      hook = None if self.adapter is None or site is None else self.adapter.hook(
          self.index, site, self.dtype)
      rng = None if site is None else _site_rng(dropout_rng, site)
      return lambda x: dense(x) if hook is None else hook(x, dense(x), rng)

    query, key, value = projection('query', 'query'), projection('key', 'key'), projection(
        'value', 'value')
    q_BxTxNxH, k_BxTxNxH, v_BxTxNxH = query(x_BxTxD), key(x_BxTxD), value(x_BxTxD)
    logits_BxNxTxT = jnp.einsum('btnh,bsnh->bnts', q_BxTxNxH, k_BxTxNxH / scale)
    if shared is not None:
      table = Dropout(cfg.hidden_dropout)(
          shared['embeddings'], deterministic=deterministic,
          rng=None if dropout_rng is None else jax.random.fold_in(dropout_rng, 50))[None]
      terms = options.pos_att_type
      if options.share_att_key:
        pos_q, pos_k = query(table)[0], key(table)[0]
      else:
        pos_q = projection('pos_query')(table)[0] if 'p2c' in terms else None
        pos_k = projection('pos_key')(table)[0] if 'c2p' in terms else None
      logits_BxNxTxT += position_bias(q_BxTxNxH, k_BxTxNxH, pos_q, pos_k,
                                      shared['positions'], options) / scale
    logits_BxNxTxT = jnp.where(head_mask(mask_BxT), logits_BxNxTxT,
                               jnp.finfo(logits_BxNxTxT.dtype).min)
    probs_BxNxTxT = jax.nn.softmax(logits_BxNxTxT.astype(jnp.float32), axis=-1)
    probs_BxNxTxT = Dropout(cfg.attention_dropout)(probs_BxNxTxT, deterministic=deterministic,
                                                   rng=dropout_rng)
    out_BxTxNxH = jnp.einsum('bnts,bsnh->btnh', probs_BxNxTxT.astype(v_BxTxNxH.dtype),
                             v_BxTxNxH)
    return hooked(self.adapter, self.index, 'attention_out', self.dtype, out_BxTxNxH,
                  nn.DenseGeneral(cfg.hidden_size, axis=(-2, -1), dtype=self.dtype,
                                  name='out')(out_BxTxNxH),
                  _site_rng(dropout_rng, 'attention_out'))
