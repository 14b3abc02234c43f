"""The masked-LM head of every family that has one: a transform, then the tied decoder.

logits = LN(act(x W + b)) E^T + bias, where E is the encoder's own word-embedding table
(`encoder/embeddings/word_embeddings/embedding`, frozen under the PEFT presets). Hugging
Face ties the decoder's weight to that table, so the head reads it from the encoder params
at every call instead of holding a vocab x d copy: the head itself is only `dense`,
`layer_norm` and the vocabulary `bias` ({'head': {'dense', 'layer_norm', 'bias'}}).

Where each family keeps these tensors (`BertForMaskedLM`'s `cls.predictions.*`, RoBERTa's
`lm_head.*`, ...) and which activation it uses is the family's fact
(`Family.mlm_heads`); `load_or_init` reads them when the checkpoint has them, and otherwise
starts the head as Hugging Face's `_init_weights` does (dense N(0, 0.02), LayerNorm
ones/zeros, bias zeros), saying which in a note the run log prints once.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from adapter_tuning.errors import UsageError
from adapter_tuning.models.activations import ACTIVATIONS
from adapter_tuning.models.encoder import ModelConfig

INIT_STD = 0.02  # BERT's initializer_range: the transform's kernel when the head is new


def layouts(family: str):
  """The family's masked-LM head layouts; a family without one is refused in one line."""
  from adapter_tuning.models.families import families, family_named
  found = family_named(family).mlm_heads
  if not found:
    usable = ', '.join(f.name for f in families() if f.mlm_heads)
    raise UsageError(f'data.task=mlm has no masked-LM head for model_type {family!r}; '
                     f'use a checkpoint of {usable}')
  return found


class MLMHead(nn.Module):
  """Logits over the vocabulary for hidden states [..., d], given the tied word embeddings
  [V, E] (E: the embedding width, ELECTRA's narrower one included). Computed in float32: the
  softmax over tens of thousands of ids is where bfloat16 would lose the loss."""

  config: ModelConfig

  @nn.compact
  def __call__(self, x, word_embeddings_VxE):
    cfg = self.config
    names = layouts(cfg.family)[0]
    width = word_embeddings_VxE.shape[-1]
    h = nn.Dense(width, kernel_init=nn.initializers.normal(INIT_STD), name='dense')(
        x.astype(jnp.float32))
    h = ACTIVATIONS[names.activation or cfg.hidden_act](h)
    h = nn.LayerNorm(epsilon=cfg.layer_norm_eps, name='layer_norm')(h)
    bias = self.param('bias', nn.initializers.zeros, (word_embeddings_VxE.shape[0],))
    return h @ jnp.asarray(word_embeddings_VxE, jnp.float32).T + bias


@dataclasses.dataclass(frozen=True)
class HeadSource:
  """Where the run's head came from: `loaded` from these checkpoint tensors, or initialised."""

  loaded: bool
  names: str  # e.g. 'cls.predictions.*' (loaded) or the tensor that was looked for

  def note(self) -> str:
    if self.loaded:
      return f'loaded from the checkpoint ({self.names})'
    return (f'initialised (the checkpoint has no {self.names}: dense N(0, {INIT_STD}), '
            'LayerNorm 1/0, bias 0)')


def init_head(config: ModelConfig, seed: int) -> dict:
  """A fresh head, as Hugging Face initialises `*ForMaskedLM` heads."""
  width = config.embedding_width
  rng = np.random.default_rng((seed, 20_000))
  return {'dense': {'kernel': rng.normal(0.0, INIT_STD, (config.hidden_size, width)
                                         ).astype(np.float32),
                    'bias': np.zeros((width,), np.float32)},
          'layer_norm': {'scale': np.ones((width,), np.float32),
                         'bias': np.zeros((width,), np.float32)},
          'bias': np.zeros((config.vocab_size,), np.float32)}


def _wanted(names) -> dict[str, str]:
  """{checkpoint tensor name: its place in our head}, the bias under each of its names."""
  keys = {f'{names.dense}.weight': 'dense/kernel', f'{names.dense}.bias': 'dense/bias',
          f'{names.layer_norm}.weight': 'layer_norm/scale',
          f'{names.layer_norm}.bias': 'layer_norm/bias'}
  keys.update({b: 'bias' for b in names.bias})
  return keys


def load_or_init(directory: pathlib.Path, config: ModelConfig, seed: int
                 ) -> tuple[dict, HeadSource]:
  """The checkpoint's head (the first of the family's layouts it holds), else a new one."""
  from adapter_tuning.interop import hf_checkpoint
  options = layouts(config.family)
  wanted = {k: v for names in options for k, v in _wanted(names).items()}
  found = hf_checkpoint.read_tensors(directory, config.family, wanted)
  for names in options:
    if f'{names.dense}.weight' in found:
      common = os.path.commonprefix([names.dense, names.layer_norm, names.bias[0]])
      return _from_tensors(found, names, config, directory), HeadSource(True, f'{common}*')
  return init_head(config, seed), HeadSource(False, f'{options[0].dense}.weight')


def _from_tensors(found: dict, names, config: ModelConfig, directory) -> dict:
  """Our head from the checkpoint's tensors (torch Linear [out, in] -> Flax [in, out])."""
  head, fresh = init_head(config, 0), init_head(config, 0)
  got = set()
  for key, place in _wanted(names).items():
    if key not in found:
      continue
    *parent, leaf = place.split('/')
    into, like = (head[parent[0]], fresh[parent[0]]) if parent else (head, fresh)
    value = found[key].T if place == 'dense/kernel' else found[key]
    if value.shape != like[leaf].shape:
      raise UsageError(f'tensor {key!r} in {directory} has shape {found[key].shape}, but '
                       f'config.json implies {like[leaf].shape}; the weights and config.json '
                       'do not match')
    into[leaf] = np.ascontiguousarray(value, np.float32)
    got.add(place)
  missing = sorted(set(_wanted(names).values()) - got)
  if missing:
    raise UsageError(f'checkpoint {directory} has {names.dense}.weight but lacks the rest of '
                     f'its masked-LM head ({", ".join(missing)}); re-save it with '
                     'save_pretrained')
  return head
