"""An artifact as a plain Hugging Face `*ForSequenceClassification` checkpoint.

Methods that only change weights -- LoRA (W + (alpha/r) A B), IA³ (W, b scaled), BitFit and
trained LayerNorms (new values), the head -- fold into the base's own tensors, so the result
is an ordinary checkpoint that `transformers` alone loads, at the base's inference cost.
Methods that add computation (bottleneck adapters) cannot fold and are refused. The file
layout is what `save_pretrained` writes: config.json (the base's, with the architecture,
labels and problem type), model.safetensors, and the base's tokenizer files.
"""

from __future__ import annotations

import json
import pathlib
import shutil

import flax.traverse_util as tu
import jax
import numpy as np

from adapter_tuning import fileio, peft
from adapter_tuning.errors import UsageError
from adapter_tuning.interop import hf_checkpoint
from adapter_tuning.models.families import family_named

TOKENIZER_FILES = ('tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json',
                   'vocab.txt', 'vocab.json', 'merges.txt')


def merged_encoder(meta: dict, params: dict, base_dir: pathlib.Path):
  """(model config, encoder params with every method folded in): base + the artifact."""
  from adapter_tuning.interop.pretrained import load_pretrained
  config = peft.config_from_meta(meta)
  cannot = [peft.method_of(c).name for c in peft.parts(config) if peft.method_of(c).merge is None]
  if cannot:
    raise UsageError(f'the artifact uses {", ".join(cannot)}, which adds computation and '
                     'cannot merge into a plain checkpoint; export it with --format adapterhub '
                     '(only LoRA, IA³, BitFit, LayerNorms and the head merge)')
  pre = load_pretrained(base_dir, config)
  flat = tu.flatten_dict(pre.params)
  flat.update({k[1:]: np.asarray(v) for k, v in tu.flatten_dict(params).items()
               if k[0] == 'encoder'})
  encoder = tu.unflatten_dict(flat)
  for part in peft.parts(config):
    encoder = peft.method_of(part).merge(encoder, part, pre.config.num_layers)
  return pre.config, encoder


def build(meta: dict, params: dict, base_dir: pathlib.Path) -> tuple[dict, dict]:
  """(config.json dict, state dict) of the merged sequence-classification checkpoint."""
  if meta['head'] not in ('classification', 'regression'):
    raise UsageError(f'hf_merged writes *ForSequenceClassification checkpoints; a {meta["head"]} '
                     'head has no such form')
  if meta.get('pooling', 'pooler') != 'pooler':
    raise UsageError(f'the head reads pooling={meta.get("pooling")!r}; Hugging Face sequence '
                     'classifiers read the pooler over [CLS]: train with model.head.pooling=pooler')
  config, encoder = merged_encoder(meta, params, base_dir)
  family = family_named(config.family)
  pooler = jax.tree.map(np.asarray, encoder['pooler'])
  head = {k: np.asarray(v) for k, v in params['head'].items()}
  architecture, classifier, keep_pooler = family.sequence_classifier(pooler, head)
  body = hf_checkpoint.export_encoder_state(
      encoder if keep_pooler else {k: v for k, v in encoder.items() if k != 'pooler'},
      config.family)
  state = {f'{family.key_prefixes[0]}{k}': v for k, v in body.items()}
  state.update({k: np.ascontiguousarray(v, np.float32) for k, v in classifier.items()})
  hf_config = json.loads((base_dir / 'config.json').read_text())
  labels = list(meta['label_names']) or [f'LABEL_{i}' for i in range(meta['num_outputs'])]
  hf_config.update(
      architectures=[architecture], num_labels=meta['num_outputs'],
      id2label={str(i): str(l) for i, l in enumerate(labels)},
      label2id={str(l): i for i, l in enumerate(labels)},
      problem_type='regression' if meta['head'] == 'regression' else
      'single_label_classification')
  return hf_config, state


def write(out: pathlib.Path, hf_config: dict, state: dict, base_dir: pathlib.Path):
  """The checkpoint folder, whole or not at all (a temporary folder renamed into place)."""
  from safetensors.numpy import save
  from adapter_tuning.interop.artifact import replace_dir
  tmp = out.with_name(out.name + '.tmp')
  try:
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    fileio.write_file(tmp / 'model.safetensors', save(state, metadata={'format': 'pt'}))
    fileio.write_file(tmp / 'config.json', json.dumps(hf_config, indent=2, sort_keys=True))
    for name in TOKENIZER_FILES:
      if (base_dir / name).exists():
        shutil.copyfile(base_dir / name, tmp / name)
    replace_dir(tmp, out)
  except OSError as e:
    raise fileio.disk_failure(e, out) from None
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
