"""Masks, positions and sentence vectors over a batch's sequence axis, for padded rows and
for rows that pack several examples (data.packing: `segments`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def head_mask(mask):
  """[B, 1, T, S] bool for the attention logits from a key mask [B, S] or a query-by-key
  mask [B, T, S] (packed rows: each token sees its own example only; ModernBERT's window)."""
  return mask[:, None] if mask.ndim == 3 else mask[:, None, None, :]


def same_segment(segment_ids_BxT):
  """[B, T, T] bool: query and key in the same packed example (segment 0 is padding)."""
  return ((segment_ids_BxT[:, :, None] == segment_ids_BxT[:, None, :])
          & (segment_ids_BxT[:, None, :] > 0))


def segment_positions(segment_ids_BxT):
  """[B, T] each token's index within its own packed example (0 at its first token)."""
  index = jax.lax.broadcasted_iota(jnp.int32, segment_ids_BxT.shape, 1)
  starts = jnp.concatenate([jnp.ones_like(segment_ids_BxT[:, :1], bool),
                            segment_ids_BxT[:, 1:] != segment_ids_BxT[:, :-1]], axis=1)
  return index - jax.lax.cummax(jnp.where(starts, index, 0), axis=1)


def pool_tokens(x_BxTxD, mask_BxT, how: str, segments=None):
  """One vector per example: its first token ('cls') or the mean over its real tokens
  ('mean'); [B, D], or [E, D] for the E examples packed into the rows (`segments`:
  segment_ids [B, T], example_row [E], example_start [E])."""
  if how == 'mean':  # sums in float32 (a bf16 model's mean over 128 tokens loses digits)
    x_BxTxD = x_BxTxD.astype(jnp.float32)
  if segments is None:
    if how == 'cls':
      return x_BxTxD[:, 0]
    m_BxTx1 = mask_BxT[..., None].astype(x_BxTxD.dtype)
    return (x_BxTxD * m_BxTx1).sum(1) / jnp.maximum(m_BxTx1.sum(1), 1)
  row_E, start_E = segments['example_row'], segments['example_start']
  if how == 'cls':
    return x_BxTxD[row_E, start_E]
  seg_ExT = segments['segment_ids'][row_E]
  member_ExT = (seg_ExT == seg_ExT[jnp.arange(row_E.shape[0]), start_E][:, None]) & (seg_ExT > 0)
  weights_ExT = member_ExT.astype(x_BxTxD.dtype)
  total_ExD = jnp.einsum('et,etd->ed', weights_ExT, x_BxTxD[row_E])
  return total_ExD / jnp.maximum(weights_ExT.sum(1), 1)[:, None]
