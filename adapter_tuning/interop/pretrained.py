"""`load_pretrained`: the one way users, the trainer, tests and benchmarks get a model."""

from __future__ import annotations

import dataclasses
import functools
import logging
import pathlib
from typing import Any, Optional

import flax.traverse_util as tu
import jax
import jax.numpy as jnp
import numpy as np

from adapter_tuning.errors import UsageError
from adapter_tuning.interop import hf_checkpoint
from adapter_tuning.interop.tokenization import Tokenizer, load_tokenizer
from adapter_tuning.models.encoder import Encoder, ModelConfig
from adapter_tuning import peft


@dataclasses.dataclass
class Pretrained:
  """A frozen base encoder (with adapters, if asked for), its params and tokenizer."""

  model: Encoder
  params: dict
  tokenizer: Tokenizer
  config: ModelConfig
  adapter: Optional[object]  # the PEFT method's config (peft), or None
  directory: pathlib.Path

  @functools.cached_property
  def identity(self) -> dict:
    """Name and sha256 of the base weights, recorded in every adapter artifact."""
    return hf_checkpoint.checkpoint_identity(self.directory)

  @functools.cached_property
  def _forward(self):
    return jax.jit(lambda p, ids, mask, types: self.model.apply({'params': p}, ids, mask, types))

  def apply(self, input_ids, attention_mask, token_type_ids=None) -> dict[str, Any]:
    """Runs the encoder (deterministic): `last_hidden_state` [B, T, d] and `pooled` [B, d]."""
    input_ids = jnp.asarray(input_ids, jnp.int32)
    attention_mask = jnp.asarray(attention_mask, jnp.int32)
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    if input_ids.shape[1] > self.config.max_seq_length:
      raise UsageError(f'sequence length {input_ids.shape[1]} exceeds the model maximum '
                       f'{self.config.max_seq_length}; truncate the inputs')
    return self._forward(self.params, input_ids, attention_mask,
                         jnp.asarray(token_type_ids, jnp.int32))

  def encode(self, texts, text_pairs=None, max_length: int = 128) -> dict[str, Any]:
    """Tokenises like the checkpoint's tokenizer, pads to the longest, and runs the encoder."""
    max_length = min(max_length, self.config.max_seq_length)
    ids, types = self.tokenizer.tokenize(texts, text_pairs, max_length)
    batch = self.tokenizer.pad(ids, types)
    out = self.apply(batch['input_ids'], batch['attention_mask'], batch['token_type_ids'])
    return {**batch, 'last_hidden_state': np.asarray(out['last_hidden_state']),
            'pooled': np.asarray(out['pooled'])}


def load_pretrained(path_or_name, adapter=None, *, dtype=jnp.float32,
                    remat: bool = False) -> Pretrained:
  """Loads a Hugging Face encoder checkpoint into Flax, adding fresh adapters.

  Encoders: the `model_type`s of `models/families` (BERT, RoBERTa, XLM-R, DistilBERT,
  ELECTRA, DeBERTa-v2/v3).

  Args:
    path_or_name: a local directory (config.json + weights + tokenizer files) or a hub name.
    adapter: None (no adapters), or an adapter config as AdapterConfig, dict or ConfigDict
      with keys size, placement, activation, init_scale, layers, seed.
    dtype: compute dtype of the encoder (params stay float32).
    remat: rematerialise layers in the backward pass.
  """
  directory = hf_checkpoint.resolve_checkpoint(path_or_name)
  config = hf_checkpoint.read_model_config(directory)
  adapter = peft.as_config(adapter)
  if adapter is not None:
    adapter.check(config)
  model = Encoder(config, adapter, dtype=dtype, remat=remat)
  tokenizer = load_tokenizer(directory, config.family, config.pad_token_id)
  state = hf_checkpoint.load_state_dict(directory)
  params = init_params(model, adapter.seed if adapter else 0)
  shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  loaded, unused = hf_checkpoint.convert_encoder_params(state, shapes, config.family,
                                                        str(directory), config)
  if unused:
    logging.info('%d checkpoint tensors not used by the encoder (e.g. %s)', len(unused),
                 unused[0])
  flat = tu.flatten_dict(params)
  flat.update(tu.flatten_dict(loaded))
  params = tu.unflatten_dict(flat)
  return Pretrained(model, params, tokenizer, config, adapter, directory)


def init_params(model: Encoder, seed: int) -> dict:
  """Fresh params: adapters near identity, the rest zeros (the checkpoint overwrites them).

  Shapes come from `eval_shape` (no compile); the PEFT method's params from its
  `init_layer` (bottleneck: `init_kernels`, NumPy). A pooler that the checkpoint lacks keeps a BERT-style
  N(0, 0.02) init (and its LayerNorm, where the family has one, unit scale).
  """
  ids = jnp.zeros((1, 8), jnp.int32)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(seed), ids, ids, ids)['params']
  params = jax.tree.map(lambda v: np.zeros(v.shape, v.dtype), shapes)
  a = model.adapter
  if a is not None:
    for i in range(model.config.num_layers):
      a.init_layer(params[f'layer_{i}'], i)
    a.init_encoder(params)
  pooler = params['pooler']['kernel']
  pooler[...] = np.random.default_rng((seed, 10_000)).normal(0.0, 0.02, pooler.shape)
  if 'norm' in params['pooler']:  # ModernBERT's head.norm: the identity LayerNorm
    params['pooler']['norm']['scale'][...] = 1.0
  return params

