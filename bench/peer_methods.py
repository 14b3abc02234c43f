#!/usr/bin/env python3
"""The peer's train step per PEFT method: AdapterHub 1.3 (PyTorch, CPU, eager, float32).

  ../peer-venv/bin/python bench/peer_methods.py --model bert-base --method lora
  ../peer-venv/bin/python bench/peer_methods.py --model tiny --method mam --steps 1 --warmup 1

One method per process (so `peak_rss_mb`, the process's peak RSS, is that method's), one
JSON line on stdout with the fields `bench/train_step.py --method` prints. The method's
hyperparameters come from `bench/method_specs.py`, the table ours reads too, translated to
AdapterHub's configs (DoubleSeqBnConfig, SeqBnConfig, ParBnConfig, LoRAConfig, IA3Config,
PrefixTuningConfig, MAMConfig; fusion: `Fuse` over frozen bottleneck adapters with
DynamicAdapterFusionConfig, `train_adapter_fusion`). What trains: `train_adapter(name)` (the method's parameters
and the head; the base, LayerNorms and pooler frozen); bitfit: every parameter named
`*bias` and the head; full: everything. The head is one linear layer on the [CLS] state
(`add_classification_head(layers=1, use_pooler=False)`), as in
../shared/bench/peer_adapterhub.py, whose settings (2 threads, AdamW lr 1e-4 weight decay
0.01, random token ids, all-ones mask) this follows.

`--model bert-base` is `BertConfig()` (BERT-base geometry) with random weights, `tiny` the
2-layer width-128 BERT of method_specs.TINY, a directory a checkpoint (e.g. MiniLM).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import method_specs  # noqa: E402  (stdlib only)

NAME = 'bench'  # the adapter's name inside the AdapterHub model


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--method', required=True, choices=method_specs.NAMES)
  p.add_argument('--model', default='bert-base',
                 help="'bert-base' (alias bert-base-random) or 'tiny' (random) or a checkpoint dir")
  p.add_argument('--batch_size', '--batch-size', type=int, default=32)
  p.add_argument('--seq_len', '--seq-len', type=int, default=128)
  p.add_argument('--steps', type=int, default=10)
  p.add_argument('--warmup', type=int, default=2)
  p.add_argument('--threads', type=int, default=2)
  p.add_argument('--lr', type=float, default=1e-4)
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--params_only', action='store_true',
                 help='print the parameter counts and stop (no steps)')
  return p.parse_args(argv)


def build_model(args):
  """BertAdapterModel (random or loaded) with a 1-layer classification head on [CLS]."""
  import torch
  from adapters import AutoAdapterModel, BertAdapterModel
  from transformers import BertConfig

  torch.manual_seed(args.seed)
  if args.model in ('bert-base', 'bert-base-random'):
    model = BertAdapterModel(BertConfig())
  elif args.model == 'tiny':
    t = method_specs.TINY
    model = BertAdapterModel(BertConfig(hidden_size=t['hidden_size'],
                                        num_hidden_layers=t['num_layers'],
                                        num_attention_heads=t['num_heads'],
                                        intermediate_size=t['intermediate_size']))
  else:
    model = _load_directory(args.model)
    if model is not None:
      return model.to(torch.float32)
    model = AutoAdapterModel.from_pretrained(args.model)
  model = model.to(torch.float32)
  model.add_classification_head('cls', num_labels=2, layers=1, use_pooler=False)
  return model


def _load_directory(directory: str):
  """A checkpoint whose model_type AdapterHub 1.3 has no *AdapterModel for (ModernBERT):
  transformers' sequence classifier with `adapters.init` (the plugin interface); its
  classifier (on [CLS], as our head) trains, see `set_trainable`. None for the others."""
  import adapters
  import transformers
  model_type = json.loads((pathlib.Path(directory) / 'config.json').read_text())['model_type']
  if model_type != 'modernbert':
    return None
  model = transformers.AutoModelForSequenceClassification.from_pretrained(
      directory, num_labels=2, classifier_pooling='cls')
  adapters.init(model)
  return model


def bottleneck_config(adapter: dict, hidden: int):
  """AdapterHub's bottleneck config for a method_specs adapter entry (same width, placement,
  activation, scaling); AdapterHub gives the width as hidden / reduction_factor."""
  import adapters

  size = method_specs.adapter_size(adapter, hidden)
  rf = hidden / size
  act = adapter['activation']
  if adapter['placement'] == 'houlsby':
    return adapters.DoubleSeqBnConfig(reduction_factor=rf, non_linearity=act)
  if adapter['placement'] == 'pfeiffer':
    return adapters.SeqBnConfig(reduction_factor=rf, non_linearity=act,
                                original_ln_before=adapter.get('original_ln_before', True))
  if adapter['placement'] == 'parallel_ffn':
    return adapters.ParBnConfig(reduction_factor=rf, non_linearity=act,
                                scaling=adapter['scaling'])
  if adapter['placement'] == 'parallel':
    return adapters.ParBnConfig(reduction_factor=rf, non_linearity=act,
                                scaling=adapter['scaling'], mh_adapter=True)
  raise SystemExit(f'no AdapterHub config for placement {adapter["placement"]!r}')


def adapterhub_config(spec: dict, hidden: int):
  """The AdapterHub config for a method_specs entry, or None (bitfit, full)."""
  import adapters

  lora_sites = {'query': 'q', 'key': 'k', 'value': 'v'}
  if 'prefix' in spec:
    prefix = adapters.PrefixTuningConfig(prefix_length=spec['prefix']['length'],
                                         bottleneck_size=spec['prefix']['bottleneck'])
    if 'adapter' in spec:
      return adapters.MAMConfig(prefix, bottleneck_config(spec['adapter'], hidden))
    return prefix
  if 'adapter' in spec:
    return bottleneck_config(spec['adapter'], hidden)
  if 'lora' in spec:
    lora = spec['lora']
    if any(t not in lora_sites for t in lora['targets']):
      raise SystemExit(f'bench: LoRA targets {lora["targets"]} beyond q/k/v not mapped')
    return adapters.LoRAConfig(r=lora['rank'], alpha=lora['alpha'],
                               attn_matrices=[lora_sites[t] for t in lora['targets']])
  if 'ia3' in spec:
    targets = spec['ia3']['targets']
    return adapters.IA3Config(attn_matrices=[lora_sites[t] for t in targets if t in lora_sites],
                              intermediate_lora='intermediate' in targets,
                              output_lora='output' in targets)
  return None


def set_trainable(model, spec: dict, config) -> None:
  """AdapterHub's own recipe per method (see the module docstring); training mode on."""
  if 'fusion' in spec:
    _fuse(model, spec['fusion'])
  elif config is not None:
    model.add_adapter(NAME, config=config)
    model.train_adapter(NAME)  # freezes the base, unfreezes the adapter; the head trains
    for n, p in model.named_parameters():  # a plugin-interface model's own head (ModernBERT)
      if n.startswith(('classifier.', 'head.')):
        p.requires_grad_(True)
  elif spec['trainable'] == 'bitfit':
    for n, p in model.named_parameters():
      p.requires_grad_(n.endswith('bias') or n.startswith('heads.'))
  elif spec['trainable'] == 'full':
    for p in model.parameters():
      p.requires_grad_(True)
  else:
    raise SystemExit(f'bench: no peer recipe for trainable={spec["trainable"]!r}')
  model.train()


def _fuse(model, fusion: dict) -> None:
  """spec['count'] bottleneck adapters (random N(0, 0.02) weights, frozen) under
  `Fuse(...)` with DynamicAdapterFusionConfig; `train_adapter_fusion` trains the fusion
  layers (the head trains too)."""
  import adapters
  import torch
  from adapters.composition import Fuse

  names = [f'{NAME}{k}' for k in range(fusion['count'])]
  for name in names:
    model.add_adapter(name, config=bottleneck_config(fusion['adapter'], model.config.hidden_size))
  with torch.no_grad():
    for n, p in model.named_parameters():
      if 'adapters.' in n and 'adapter_fusion' not in n and n.endswith('weight'):
        p.normal_(0.0, 0.02)
  setup = Fuse(*names)
  model.add_adapter_fusion(setup, adapters.DynamicAdapterFusionConfig(
      dropout_prob=fusion['dropout']))
  model.train_adapter_fusion(setup)


def random_batches(args, vocab: int):
  """Warm-up + timed batches of random ids (a fresh batch per step, as the peer script)."""
  import torch

  g = torch.Generator().manual_seed(args.seed)
  shape = (args.batch_size, args.seq_len)
  return [(torch.randint(1000, vocab, shape, generator=g), torch.ones(shape, dtype=torch.long),
           torch.randint(0, 2, (args.batch_size,), generator=g))
          for _ in range(args.warmup + args.steps)]


def train(model, args):
  """zero_grad -> forward -> backward -> AdamW, timed per step after the warm-up.

  Returns (timed step seconds, last loss, params that received a gradient)."""
  import torch

  params = [p for p in model.parameters() if p.requires_grad]
  opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
  times, with_grad, loss = [], None, None
  for i, (ids, mask, labels) in enumerate(random_batches(args, model.config.vocab_size)):
    t0 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    if with_grad is None:
      with_grad = sum(p.numel() for p in params if p.grad is not None)
    opt.step()
    loss = float(out.loss.detach())
    if i >= args.warmup:
      times.append(time.perf_counter() - t0)
    print(f'[{args.method}] step {i} {time.perf_counter() - t0:.3f}s loss={loss:.4f}',
          file=sys.stderr, flush=True)
  return times, loss, with_grad


def main(argv=None):
  """Build, choose what trains, time the steps, print the line train_step.py prints."""
  args = parse_args(argv)
  import adapters
  import torch
  import transformers

  torch.set_num_threads(args.threads)
  spec = method_specs.METHODS[args.method]
  model = build_model(args)
  config = None if 'fusion' in spec else adapterhub_config(spec, model.config.hidden_size)
  set_trainable(model, spec, config)
  counts = {'trainable': sum(p.numel() for p in model.parameters() if p.requires_grad),
            'total': sum(p.numel() for p in model.parameters())}
  if args.params_only:
    print(json.dumps({'tool': 'adapterhub', 'method': args.method, 'model': args.model,
                      'trainable': spec['trainable'], 'trainable_params': counts['trainable'],
                      'total_params': counts['total']}))
    return
  times, loss, with_grad = train(model, args)
  result = {
      'tool': 'adapterhub', 'method': args.method, 'model': args.model,
      'trainable': spec['trainable'], 'pooling': 'cls',
      'peft_config': config.to_dict() if config is not None else None,
      'batch_size': args.batch_size, 'seq_len': args.seq_len, 'dtype': 'float32',
      'steps': args.steps, 'warmup': args.warmup,
      **method_specs.timing(times, args.batch_size, args.seq_len),
      'trainable_params': counts['trainable'], 'total_params': counts['total'],
      'trainable_params_with_grad': with_grad,
      'peak_rss_mb': method_specs.peak_rss_mib(), **method_specs.machine(),
      'threads': torch.get_num_threads(), 'final_loss': loss,
      'versions': {'torch': torch.__version__, 'transformers': transformers.__version__,
                   'adapters': adapters.__version__},
  }
  print(json.dumps(result, default=str), flush=True)


if __name__ == '__main__':
  os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')
  main()
