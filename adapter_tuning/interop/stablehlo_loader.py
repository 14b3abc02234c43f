"""Runs a `--format stablehlo` export with only jax and numpy: no adapter_tuning needed.

The export folder holds the serving function as `jax.export` serialised StableHLO
(model.stablehlo), its weights (weights.npz, one array per '/'-joined parameter path) and
serving.json (input names, the longest sequence, labels). This file is copied into every
export folder, so the folder alone is the deliverable:

  import stablehlo_loader                       # from inside the export folder
  model = stablehlo_loader.load('exported/')
  logits = model(input_ids, attention_mask, token_type_ids)   # int arrays [B, T]

Batch and sequence length are symbolic in the serialised function: any B >= 1 and any
T up to serving.json's max_seq_length run without re-exporting (each new shape compiles
once). A family whose attention needs a concrete length (DeBERTa's relative positions) is
exported at one `sequence_length` instead; shorter inputs are padded to it here (masked
positions change no logit) and per-token outputs cut back. Weights travel as arguments
rather than baked-in constants so that the StableHLO stays small and inspectable and the
weights stay a plain array file.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np

FORMAT = 'adapter_tuning.stablehlo'
FORMAT_VERSION = 1
MODEL_FILE, WEIGHTS_FILE, SERVING_FILE = 'model.stablehlo', 'weights.npz', 'serving.json'


class StableHLOModel:
  """The deserialised serving function with its weights on the default device."""

  def __init__(self, directory):
    import jax
    from jax import export
    directory = pathlib.Path(directory)
    self.serving = json.loads((directory / SERVING_FILE).read_text())
    if self.serving.get('format') != FORMAT or self.serving.get('version', 0) > FORMAT_VERSION:
      raise ValueError(f'{directory / SERVING_FILE} is not a {FORMAT} v{FORMAT_VERSION} export')
    self.exported = export.deserialize(bytearray((directory / MODEL_FILE).read_bytes()))
    with np.load(directory / WEIGHTS_FILE, allow_pickle=False) as npz:
      self.weights = {k: jax.device_put(npz[k]) for k in npz.files}
    self.inputs = tuple(self.serving['inputs'])
    self.sequence_length = self.serving.get('sequence_length')  # None: symbolic
    self.max_seq_length = int(self.sequence_length or self.serving['max_seq_length'])

  def __call__(self, input_ids, attention_mask, token_type_ids=None) -> np.ndarray:
    """Logits for int token arrays [B, T] (token types default to zeros)."""
    ids = np.asarray(input_ids, np.int32)
    if token_type_ids is None:
      token_type_ids = np.zeros_like(ids)
    arrays = [ids, np.asarray(attention_mask, np.int32), np.asarray(token_type_ids, np.int32)]
    for name, a in zip(self.inputs, arrays):
      if a.ndim != 2 or a.shape != ids.shape or a.shape[0] < 1 or a.shape[1] < 1:
        raise ValueError(f'{name} must be a non-empty [batch, length] array shaped like '
                         f'input_ids {ids.shape}, got {a.shape}')
    if ids.shape[1] > self.max_seq_length:
      raise ValueError(f'sequence length {ids.shape[1]} exceeds the model maximum '
                       f'{self.max_seq_length}; truncate the inputs')
    if self.sequence_length:
      arrays = pad_inputs(arrays, self.sequence_length, self.serving.get('pad_token_id', 0))
    logits = np.asarray(self.exported.call(self.weights, *arrays))
    return logits[:, :ids.shape[1]] if logits.ndim == 3 else logits


def pad_inputs(arrays, length: int, pad_token_id: int) -> list:
  """(ids, mask, types) [B, T] padded on the right to [B, length]: pad ids, mask 0."""
  width = length - arrays[0].shape[1]
  return [np.pad(a, ((0, 0), (0, width)), constant_values=fill)
          for a, fill in zip(arrays, (pad_token_id, 0, 0))]


def load(directory) -> StableHLOModel:
  """The export in `directory` (the folder `--format stablehlo --output` wrote)."""
  return StableHLOModel(directory)
