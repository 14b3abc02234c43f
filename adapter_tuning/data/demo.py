"""The self-contained demo: a tiny BERT-shaped checkpoint and a text task, both generated.

It exists so that the first command a newcomer runs needs no network and no downloads,
yet goes through exactly the same path as a real run: a Hugging Face-layout checkpoint
directory (config.json, model.safetensors, vocab.txt) loaded by `load_pretrained`, a
WordPiece tokenizer, adapters, the jitted loop, evaluation and the adapter artifact.

The task: short 'reviews' built from filler words with one positive or one negative
opinion word (and distractors: negations flip nothing, they are just more fillers).
The base is randomly initialised and frozen; the adapters, layer norms and head must
learn to find the opinion word.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil

import numpy as np

LABELS = ('negative', 'positive')
POSITIVE = ('great', 'wonderful', 'superb', 'delightful', 'moving', 'brilliant', 'charming',
            'excellent', 'gripping', 'lovely', 'fresh', 'clever')
NEGATIVE = ('awful', 'dull', 'tedious', 'clumsy', 'boring', 'terrible', 'bland', 'messy',
            'lifeless', 'stale', 'weak', 'tiresome')
FILLERS = tuple(
    'the a an this that film movie story plot cast script scene music ending acting it is was '
    'quite rather very somewhat really and but with from of to in on at by for about as its '
    'director actor actress camera pace tone dialogue humor drama comedy thriller score light '
    'dark long short old new first last whole part overall simply mostly partly again still '
    'yet also even'.split())
INIT_STD = 0.02  # BERT's initialiser
OPINION_SHIFT = 3.0  # in units of INIT_STD
SPLIT_SIZES = {'train': 2048, 'validation': 512}
SPLIT_SEEDS = {'train': 1, 'validation': 2}

GEOMETRY = {'hidden_size': 64, 'num_hidden_layers': 2, 'num_attention_heads': 4,
            'intermediate_size': 256, 'max_position_embeddings': 64}


def make_examples(split: str, seed: int = 0) -> list[dict]:
  """Deterministic examples: a label-bearing word at a random place among 5-15 fillers."""
  rng = np.random.default_rng((SPLIT_SEEDS[split], seed))
  examples = []
  for i in range(SPLIT_SIZES[split]):
    label = int(rng.integers(2))
    words = list(rng.choice(FILLERS, size=int(rng.integers(5, 16))))
    opinion = rng.choice(POSITIVE if label else NEGATIVE)
    words.insert(int(rng.integers(len(words) + 1)), opinion)
    examples.append({'text': ' '.join(words), 'text_pair': None, 'label': label, 'idx': i})
  return examples


def ensure_checkpoint(directory: pathlib.Path, seed: int = 1234) -> pathlib.Path:
  """Writes the tiny random BERT checkpoint once (HF layout); reuses it afterwards."""
  directory = pathlib.Path(directory)
  if (directory / 'model.safetensors').exists():
    return directory
  import jax
  from safetensors.numpy import save_file

  from adapter_tuning.interop import hf_checkpoint
  from adapter_tuning.models.encoder import Encoder

  final = directory
  # Build in a private folder and rename: several processes may race to create it.
  directory = final.with_name(f'{final.name}.tmp{os.getpid()}')
  directory.mkdir(parents=True, exist_ok=True)
  vocab = ['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]'] + sorted(
      set(POSITIVE + NEGATIVE + FILLERS))
  (directory / 'vocab.txt').write_text('\n'.join(vocab) + '\n')
  hf_config = dict(model_type='bert', architectures=['BertModel'], vocab_size=len(vocab),
                   type_vocab_size=2, pad_token_id=0, layer_norm_eps=1e-12, hidden_act='gelu',
                   hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, **GEOMETRY)
  (directory / 'config.json').write_text(json.dumps(hf_config, indent=2))
  (directory / 'tokenizer_config.json').write_text(json.dumps({'do_lower_case': True}))
  config = hf_checkpoint.read_model_config(directory)
  model = Encoder(config)
  ids = np.zeros((1, 8), np.int32)
  params = model.init(jax.random.PRNGKey(seed), ids, np.ones_like(ids), ids)['params']
  params = jax.tree.map(lambda x: np.asarray(x) * 1.0, params)
  # BERT's initialiser, N(0, 0.02), for every weight: the base is random...
  rng = np.random.default_rng(seed)
  params = jax.tree_util.tree_map_with_path(
      lambda p, x: x if 'layer_norm' in str(p) or 'bias' in str(p)
      else (INIT_STD * rng.standard_normal(x.shape)).astype(np.float32), params)
  # ...except for the one thing pretraining is known to give word embeddings: opinion
  # words of one polarity share a direction. Whether the sentence holds such a word must
  # still be carried to [CLS] through frozen random layers: that is the adapters' job.
  direction = rng.standard_normal(GEOMETRY['hidden_size']).astype(np.float32)
  direction *= OPINION_SHIFT * INIT_STD / np.sqrt(np.mean(direction ** 2))
  table = params['embeddings']['word_embeddings']['embedding']
  for word in POSITIVE:
    table[vocab.index(word)] += direction
  for word in NEGATIVE:
    table[vocab.index(word)] -= direction
  save_file(hf_checkpoint.export_encoder_state(params, 'bert'), str(directory / 'model.safetensors'))
  try:
    directory.rename(final)
  except OSError:  # another process finished first: theirs is identical
    shutil.rmtree(directory, ignore_errors=True)
  return final
