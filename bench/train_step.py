"""Steady-state train-step benchmark: one JSON line per run.

  python bench/train_step.py --model bert-base --trainable adapters --batch_size 32 --seq_len 128
  python bench/train_step.py --model bert-base --method lora     # a PEFT method (bench/method_specs.py)

`--model bert-base` is BERT-base geometry with random weights (speed does not depend on the
weights), `--model tiny` a 2-layer BERT of width 128 for smoke tests; a directory loads that
checkpoint. `--method NAME` benchmarks one PEFT method with the hyperparameters and trainable
preset of `bench/method_specs.py` (shared with the peer's `bench/peer_methods.py`), reading
the [CLS] state as AdapterHub's `use_pooler=False` head does; it overrides `--trainable`
and `--placement`. Run one method per process: `peak_rss_mb` is the process's peak. Inputs are random token ids of a fixed length,
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
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import method_specs  # noqa: E402  (stdlib only)

PEAK_TFLOPS = {'H100': 989.0, 'H200': 989.0, 'A100': 312.0}  # dense bf16 tensor-core peaks


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--model', default='bert-base',
                 help="'bert-base' or 'tiny' (random weights) or a checkpoint dir")
  p.add_argument('--method', default=None, choices=method_specs.NAMES,
                 help='a PEFT method as bench/method_specs.py defines it (overrides --trainable, '
                      '--placement, --adapter_size)')
  p.add_argument('--pooling', default=None, choices=('pooler', 'cls', 'mean'),
                 help="the head's input; default cls with --method (AdapterHub's), else pooler")
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
  p.add_argument('--adapter_layers', default='',
                 help='e.g. 6,7,8,9,10,11 or 6-11: adapters (and, with --trainable adapters, '
                      'LNs) only there; with --trainable peft nothing below them trains')
  p.add_argument('--drop_lowest', type=int, default=0,
                 help="AdapterDrop's robust variant: each step drops the adapters of the lowest "
                      "k' ~ U{0..N} layers (model.adapter.drop_lowest)")
  p.add_argument('--params_only', action='store_true',
                 help='print the parameter counts and stop (no compile, no steps)')
  return p.parse_args(argv)


def method_config(spec: dict, hidden: int):
  """The PEFT config (None, one method's, or a `Combined`) for a method_specs entry."""
  from adapter_tuning import peft
  from adapter_tuning.peft.bottleneck import AdapterConfig
  from adapter_tuning.peft.ia3 import IA3Config
  from adapter_tuning.peft.lora import LoRAConfig
  from adapter_tuning.peft.prefix import PrefixConfig

  parts = []
  if 'prefix' in spec:
    parts.append(PrefixConfig(**spec['prefix']))
  if 'adapter' in spec:
    a = dict(spec['adapter'])
    a.pop('reduction_factor', None)
    a['size'] = method_specs.adapter_size(spec['adapter'], hidden)
    parts.append(AdapterConfig(**a))
  if 'lora' in spec:
    parts.append(LoRAConfig(**spec['lora']))
  if 'ia3' in spec:
    parts.append(IA3Config(**spec['ia3']))
  return peft.combine(parts)


def model_config(args):
  """(ModelConfig, checkpoint dir or None): random geometries need no files."""
  from adapter_tuning.models.encoder import ModelConfig
  if args.model == 'bert-base':
    return ModelConfig(), None
  if args.model == 'tiny':
    return ModelConfig(**method_specs.TINY), None
  from adapter_tuning.interop import hf_checkpoint
  directory = hf_checkpoint.resolve_checkpoint(args.model)
  return hf_checkpoint.read_model_config(directory), directory


def adapter_and_rules(args, config):
  """The PEFT config and trainable rules: from --method, else from the older flags."""
  from adapter_tuning.peft.bottleneck import AdapterConfig
  from adapter_tuning.training import trainable as tl

  if args.method:
    spec = method_specs.METHODS[args.method]
    args.trainable = spec['trainable']
    rules = tl.resolve(args.trainable, config.num_layers)
    if 'fusion' in spec:
      return fusion_config(spec['fusion'], config), rules
    return method_config(spec, config.hidden_size), rules
  adapter = None
  layers = parse_layers(args.adapter_layers) if args.adapter_layers else None
  if args.trainable in ('adapters', 'peft') and args.placement != 'none':
    adapter = AdapterConfig(size=args.adapter_size, placement=args.placement, layers=layers,
                            drop_lowest=args.drop_lowest)
  rules = tl.resolve(args.trainable, config.num_layers)
  if layers is not None and args.trainable == 'adapters':
    # Train only adapters and layer norms of the adapted layers (and the head).
    pattern = '|'.join(str(i) for i in layers)
    rules = ((rf'^encoder/layer_({pattern})/.*(_adapter|layer_norm)/', 'train'),
             (r'^head/', 'train'), (r'.*', 'freeze'))
  return adapter, rules


def fusion_config(spec: dict, config):
  """AdapterFusion over spec['count'] random bottleneck adapters. A fusion reads its adapters
  from artifacts (by path and content hash), so they are written to a temporary folder first;
  their weights are random (N(0, 0.02)): speed does not depend on them."""
  import atexit
  import dataclasses
  import shutil
  import tempfile

  import numpy as np

  from adapter_tuning.interop import artifact
  from adapter_tuning.peft.bottleneck import AdapterConfig
  from adapter_tuning.peft.fusion import FusionConfig

  adapter = AdapterConfig(**spec['adapter'], init_scale=0.0)
  root = pathlib.Path(tempfile.mkdtemp(prefix='bench_fusion_'))
  atexit.register(shutil.rmtree, root, ignore_errors=True)
  members = []
  for k in range(spec['count']):
    rng = np.random.default_rng(k)
    d, m = config.hidden_size, adapter.size
    bottleneck = lambda: {'down': {'kernel': rng.normal(0, 0.02, (d, m)), 'bias': np.zeros(m)},
                          'up': {'kernel': rng.normal(0, 0.02, (m, d)), 'bias': np.zeros(d)}}
    encoder = {f'layer_{i}': {f'{site}_adapter': bottleneck() for site in adapter.sites(i)}
               for i in range(config.num_layers)}
    meta = {'task': f'bench{k}', 'head': 'classification', 'num_outputs': 2,
            'label_names': ['0', '1'], 'base': {}, 'trainable_rules': [],
            'peft': {'bottleneck': dataclasses.asdict(adapter)}}
    artifact.save(root / f'bench{k}', {'encoder': encoder}, meta)
    members.append({'name': f'bench{k}', 'path': str(root / f'bench{k}'),
                    'sha256': artifact.content_hash(root / f'bench{k}'),
                    'adapter': dataclasses.asdict(adapter)})
  return FusionConfig(tuple(members), dropout=spec['dropout'],
                      regularization=spec['regularization'])


def parse_layers(text: str) -> tuple[int, ...]:
  """'6,7,8' or '6-11' or a mix ('0,6-11') -> sorted layer indices."""
  layers = set()
  for part in text.split(','):
    lo, _, hi = part.strip().partition('-')
    layers.update(range(int(lo), int(hi or lo) + 1))
  return tuple(sorted(layers))


def random_params(model, adapter, config):
  """Random params for a random-weight geometry, the PEFT method's own init on top (so
  e.g. LoRA's B starts at zero and prefixes at N(0, 1), as in a real run)."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  ids = jnp.zeros((1, 8), jnp.int32)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), ids, ids + 1, ids)['params']
  params = jax.tree.map(np.array, params)
  if adapter is not None:
    for i in range(config.num_layers):
      adapter.init_layer(params['encoder'][f'layer_{i}'], i)
    adapter.init_encoder(params['encoder'])
  return params


def build(args):
  """(model, params, rules, config, tu): random weights for a named geometry (speed does not
  depend on them), a checkpoint's otherwise, with the PEFT method's own initialisation."""
  import flax.traverse_util as tu
  import jax.numpy as jnp
  import numpy as np

  from adapter_tuning.models.heads import TaskModel

  config, directory = model_config(args)
  adapter, rules = adapter_and_rules(args, config)
  if args.pooling is None:
    args.pooling = 'cls' if args.method else 'pooler'
  dtype = jnp.bfloat16 if args.dtype == 'bfloat16' else jnp.float32
  if directory is None:
    probe = TaskModel(config, adapter, 'classification', 2, dtype=dtype, pooling=args.pooling)
    params = random_params(probe, adapter, config)
  else:
    from adapter_tuning.interop.pretrained import load_pretrained
    pre = load_pretrained(directory, adapter)
    kernel = np.random.default_rng(0).normal(0.0, 0.02, (config.hidden_size, 2))
    params = {'encoder': pre.params,  # a nonzero head, so gradients reach the encoder
              'head': {'kernel': kernel.astype(np.float32), 'bias': np.zeros((2,), np.float32)}}
  model = TaskModel(config, adapter, 'classification', 2, dtype=dtype, remat=args.remat,
                    scan=args.scan, pooling=args.pooling)
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
  # The input-gradient backward ends at the lowest adapted layer (nothing below trains).
  lowest = min(parse_layers(args.adapter_layers)) if args.adapter_layers else 0
  backward = forward * (config.num_layers - lowest) / config.num_layers
  return (forward + backward + 2 * counts['trainable']) * tokens


def peft_fields(adapter):
  """{method: its config's fields} (None without a method), for the result line."""
  if adapter is None:
    return None
  from adapter_tuning import peft
  return peft.to_meta(adapter)


def make_batch(args, config) -> dict:
  """Random token ids of one fixed shape, as the peer's benchmarks use."""
  import jax.numpy as jnp
  import numpy as np

  rng = np.random.default_rng(0)
  shape = (args.batch_size, args.seq_len)
  return {
      'input_ids': jnp.asarray(rng.integers(1000, config.vocab_size, shape), jnp.int32),
      'attention_mask': jnp.ones(shape, jnp.int32),
      'token_type_ids': jnp.zeros(shape, jnp.int32),
      'labels': jnp.asarray(rng.integers(0, 2, args.batch_size), jnp.int32),
  }


def run_steps(compiled, state, frozen, batch, args):
  """Warm-up then timed steps; (per-step seconds of the timed ones, last state, metrics)."""
  import jax

  times = []
  for i in range(args.warmup + args.steps):
    t = time.perf_counter()
    state, metrics = compiled(state, frozen, batch)
    jax.block_until_ready(metrics['loss'])
    if i >= args.warmup:
      times.append(time.perf_counter() - t)
  return times, state, metrics


def prepared(args, model, params, rules, config):
  """(compiled trainer step, its state, frozen params, batch, compile seconds)."""
  import jax
  import ml_collections

  from adapter_tuning.training import steps, trainable as tl
  from adapter_tuning.training.optim import make_optimizer

  train_p, frozen_p = tl.split(params, rules)
  opt = ml_collections.ConfigDict(dict(learning_rate=1e-4, warmup_ratio=0.1, weight_decay=0.01,
                                       adam_b1=0.9, adam_b2=0.999, adam_eps=1e-6,
                                       grad_clip_norm=1.0))
  tx = make_optimizer(opt, args.steps + args.warmup)
  state = jax.jit(lambda p: steps.init_state(p, tx, 0))(train_p)
  frozen = jax.device_put(frozen_p)
  batch = make_batch(args, config)
  step_fn = jax.jit(steps.make_train_step(model, tx, 'classification'), donate_argnums=(0,))
  t0 = time.perf_counter()
  compiled = step_fn.lower(state, frozen, batch).compile()
  return compiled, state, frozen, batch, time.perf_counter() - t0


def compiled_step(args):
  """The compiled step of these flags and what it runs on (bench/profile_step.py)."""
  model, params, rules, config, _ = build(args)
  return prepared(args, model, params, rules, config)[:4]


def main(argv=None):
  """Compile the trainer's own step once, time it, print one JSON line."""
  args = parse_args(argv)
  from adapter_tuning.training import trainable as tl

  model, params, rules, config, tu = build(args)
  counts = tl.summary(params, rules)
  if args.params_only:
    print(json.dumps({'tool': 'adapter_tuning', 'method': args.method, 'model': args.model,
                      'trainable': args.trainable, 'peft_config': peft_fields(model.adapter),
                      'trainable_params': counts['trainable'], 'total_params': counts['total']}))
    return
  compiled, state, frozen, batch, compile_s = prepared(args, model, params, rules, config)
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  xla_flops = float(cost.get('flops', 0.0)) if cost else 0.0
  times, state, metrics = run_steps(compiled, state, frozen, batch, args)
  print(json.dumps(result_line(args, model, config, counts, times, state, metrics,
                               compile_s, xla_flops)))


def result_line(args, model, config, counts, times, state, metrics, compile_s, xla_flops):
  """The one JSON line: what ran, where, how fast, how much memory and what trained."""
  import jax

  median = statistics.median(times)
  flops = flops_per_step(config, counts, args)
  device = jax.devices()[0]
  trainable_state = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state['params']))
  opt_state = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state['opt_state'])
                  if hasattr(x, 'size'))
  result = {
      'tool': 'adapter_tuning', 'method': args.method, 'model': args.model,
      'trainable': args.trainable, 'pooling': args.pooling,
      'peft_config': peft_fields(model.adapter),
      'adapter_size': args.adapter_size, 'batch_size': args.batch_size, 'seq_len': args.seq_len,
      'dtype': args.dtype, 'remat': args.remat, 'scan': args.scan,
      'huge_pages': 'glibc.malloc.hugetlb=1' in os.environ.get('GLIBC_TUNABLES', ''),
      'adapter_layers': args.adapter_layers or 'all', 'drop_lowest': args.drop_lowest,
      'steps': args.steps, 'warmup': args.warmup,
      **method_specs.timing(times, args.batch_size, args.seq_len),
      'model_gflops_per_step': flops / 1e9, 'model_gflops_per_s': flops / median / 1e9,
      'xla_gflops_per_step': xla_flops / 1e9,
      'trainable_params': counts['trainable'], 'total_params': counts['total'],
      'trainable_state_mb': (trainable_state + opt_state) / 2 ** 20,
      'peak_rss_mb': method_specs.peak_rss_mib(), **method_specs.machine(),
      'compile_s': compile_s, 'device_kind': device.device_kind, 'platform': device.platform,
      'device_count': jax.device_count(), 'final_loss': float(metrics['loss']),
      'versions': {'jax': jax.__version__},
  }
  peak = next((v for k, v in PEAK_TFLOPS.items() if k in device.device_kind), None)
  if peak and args.dtype == 'bfloat16':
    result['mfu_pct'] = 100 * flops / median / (peak * 1e12)
  return result


if __name__ == '__main__':
  from adapter_tuning.training import hugepages
  hugepages.reexec()  # as the trainer CLI does; ADAPTER_TUNING_NO_REEXEC=1 measures without
  os.environ.setdefault('XLA_FLAGS', '')
  main()
