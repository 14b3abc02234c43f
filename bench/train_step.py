"""Steady-state train-step benchmark: one JSON line per run.

  python bench/train_step.py --model bert-base --trainable adapters --batch_size 32 --seq_len 128

`--model bert-base` is BERT-base geometry with random weights (speed does not depend on the
weights); a directory loads that checkpoint. Inputs are random token ids of a fixed length,
as in the peer benchmark (../shared/bench/peer_adapterhub.py). The step is exactly the
trainer's (`adapter_tuning.training.steps.make_train_step`): the trainable subtree alone is
differentiated, its state donated.

FLOP model (per token, N = matmul params of the encoder, L layers, T tokens, d hidden):
forward 2N + 4LTd (attention scores and mixing); `full` training = 3x forward; adapter or
head training = forward + input-gradient backward (2x forward), plus the small weight
gradients of what trains. `model_gflops_per_s` divides that by the median step time;
`xla_gflops_per_step` is XLA's own count for the compiled step.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

PEAK_TFLOPS = {'H100': 989.0, 'H200': 989.0, 'A100': 312.0}  # dense bf16 tensor-core peaks


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--model', default='bert-base', help="'bert-base' (random) or a checkpoint dir")
  p.add_argument('--trainable', default='adapters', help='adapters | full | head | top:K')
  p.add_argument('--adapter_size', type=int, default=64)
  p.add_argument('--placement', default='houlsby')
  p.add_argument('--batch_size', type=int, default=32)
  p.add_argument('--seq_len', type=int, default=128)
  p.add_argument('--steps', type=int, default=10)
  p.add_argument('--warmup', type=int, default=2)
  p.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16'))
  p.add_argument('--remat', action='store_true')
  p.add_argument('--scan', action='store_true', help='scan over the layer stack (Encoder.scan)')
  p.add_argument('--adapter_layers', default='', help='e.g. 6-11: adapters (and LNs) only there')
  return p.parse_args(argv)


def build(args):
  import flax.traverse_util as tu
  import jax
  import jax.numpy as jnp
  import numpy as np

  from adapter_tuning.models.encoder import ModelConfig
  from adapter_tuning.models.heads import TaskModel
  from adapter_tuning.peft.bottleneck import AdapterConfig
  from adapter_tuning.training import trainable as tl

  adapter = None
  layers = None
  if args.adapter_layers:
    lo, hi = (int(x) for x in args.adapter_layers.split('-'))
    layers = tuple(range(lo, hi + 1))
  if args.trainable == 'adapters' and args.placement != 'none':
    adapter = AdapterConfig(size=args.adapter_size, placement=args.placement, layers=layers)
  if args.model == 'bert-base':
    config = ModelConfig()
    params = None
  else:
    from adapter_tuning.interop.pretrained import load_pretrained
    pre = load_pretrained(args.model, adapter)
    config, params = pre.config, {'encoder': pre.params}
  dtype = jnp.bfloat16 if args.dtype == 'bfloat16' else jnp.float32
  rules = tl.resolve(args.trainable, config.num_layers)
  if layers is not None and args.trainable == 'adapters':
    # Train only adapters and layer norms of the adapted layers (and the head).
    pattern = '|'.join(str(i) for i in layers)
    rules = ((rf'^encoder/layer_({pattern})/.*(_adapter|layer_norm)/', 'train'),
             (r'^head/', 'train'), (r'.*', 'freeze'))
  probe = TaskModel(config, adapter, 'classification', 2, dtype=dtype)
  if params is None:
    ids = jnp.zeros((1, 8), jnp.int32)
    params = jax.jit(probe.init)(jax.random.PRNGKey(0), ids, ids + 1, ids)['params']
  else:
    params['head'] = {'kernel': np.zeros((config.hidden_size, 2), np.float32),
                      'bias': np.zeros((2,), np.float32)}
  model = TaskModel(config, adapter, 'classification', 2, dtype=dtype, remat=args.remat,
                    scan=args.scan)
  return model, params, rules, config, tu


def flops_per_step(config, counts, args) -> float:
  tokens = args.batch_size * args.seq_len
  matmul = config.num_layers * (4 * config.hidden_size ** 2 +
                                2 * config.hidden_size * config.intermediate_size)
  matmul += counts['adapter'] + config.hidden_size ** 2  # adapters, pooler
  attention = 4 * config.num_layers * args.seq_len * config.hidden_size
  forward = 2 * matmul + attention
  if args.trainable == 'full':
    return 3 * forward * tokens
  return (2 * forward + 2 * counts['trainable']) * tokens


def main(argv=None):
  args = parse_args(argv)
  import jax
  import jax.numpy as jnp
  import ml_collections
  import numpy as np

  from adapter_tuning.training import steps, trainable as tl
  from adapter_tuning.training.optim import make_optimizer

  model, params, rules, config, tu = build(args)
  train_p, frozen_p = tl.split(params, rules)
  counts = tl.summary(params, rules)
  opt = ml_collections.ConfigDict(dict(learning_rate=1e-4, warmup_ratio=0.1, weight_decay=0.01,
                                       adam_b1=0.9, adam_b2=0.999, adam_eps=1e-6,
                                       grad_clip_norm=1.0))
  tx = make_optimizer(opt, args.steps + args.warmup)
  state = jax.jit(lambda p: steps.init_state(p, tx, 0))(train_p)
  frozen = jax.device_put(frozen_p)
  rng = np.random.default_rng(0)
  batch = {
      'input_ids': jnp.asarray(rng.integers(1000, config.vocab_size, (args.batch_size, args.seq_len)),
                               jnp.int32),
      'attention_mask': jnp.ones((args.batch_size, args.seq_len), jnp.int32),
      'token_type_ids': jnp.zeros((args.batch_size, args.seq_len), jnp.int32),
      'labels': jnp.asarray(rng.integers(0, 2, args.batch_size), jnp.int32),
  }
  step_fn = jax.jit(steps.make_train_step(model, tx, 'classification'), donate_argnums=(0,))
  t0 = time.perf_counter()
  compiled = step_fn.lower(state, frozen, batch).compile()
  compile_s = time.perf_counter() - t0
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  xla_flops = float(cost.get('flops', 0.0)) if cost else 0.0
  times = []
  for i in range(args.warmup + args.steps):
    t = time.perf_counter()
    state, metrics = compiled(state, frozen, batch)
    jax.block_until_ready(metrics['loss'])
    if i >= args.warmup:
      times.append(time.perf_counter() - t)
  median = statistics.median(times)
  flops = flops_per_step(config, counts, args)
  device = jax.devices()[0]
  trainable_state = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state['params']))
  opt_state = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state['opt_state'])
                  if hasattr(x, 'size'))
  result = {
      'tool': 'adapter_tuning', 'model': args.model, 'trainable': args.trainable,
      'adapter_size': args.adapter_size, 'batch_size': args.batch_size, 'seq_len': args.seq_len,
      'dtype': args.dtype, 'remat': args.remat, 'scan': args.scan,
      'huge_pages': 'glibc.malloc.hugetlb=1' in os.environ.get('GLIBC_TUNABLES', ''),
      'adapter_layers': args.adapter_layers or 'all',
      'steps': args.steps, 'step_s_median': median, 'step_s_min': min(times),
      'examples_per_s': args.batch_size / median,
      'tokens_per_s': args.batch_size * args.seq_len / median,
      'model_gflops_per_step': flops / 1e9, 'model_gflops_per_s': flops / median / 1e9,
      'xla_gflops_per_step': xla_flops / 1e9,
      'trainable_params': counts['trainable'], 'total_params': counts['total'],
      'trainable_state_mb': (trainable_state + opt_state) / 2 ** 20,
      'peak_rss_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
      'compile_s': compile_s, 'device_kind': device.device_kind, 'platform': device.platform,
      'device_count': jax.device_count(), 'final_loss': float(metrics['loss']),
  }
  peak = next((v for k, v in PEAK_TFLOPS.items() if k in device.device_kind), None)
  if peak and args.dtype == 'bfloat16':
    result['mfu_pct'] = 100 * flops / median / (peak * 1e12)
  print(json.dumps(result))


if __name__ == '__main__':
  from adapter_tuning.training import hugepages
  hugepages.reexec()  # as the trainer CLI does; ADAPTER_TUNING_NO_REEXEC=1 measures without
  os.environ.setdefault('XLA_FLAGS', '')
  main()
