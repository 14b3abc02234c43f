"""Per-device memory of the trainer's step for a large base on a mesh: one JSON line, no weights.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \
    python bench/memory.py --model xlm-roberta-xl --fsdp 8 --trainable adapters \
      --batch_size 32 --seq_len 128 --budget_gb 16

`--model` is a named geometry (`bert-large`, `xlm-roberta-xl`, `xlm-roberta-xxl`,
`deberta-v2-xxlarge`) or a checkpoint directory (only its config.json is read). The step is
the trainer's own (`steps.make_train_step`, the shardings of `training/parallel.py` for
`mesh.fsdp = --fsdp` over every visible device), lowered from abstract shapes
(`jax.eval_shape`) and compiled: nothing runs and no weights exist, so a 10B base is
measured on a laptop with fake CPU devices. Fields:

- `base_param_bytes`: the whole base (everything but the PEFT modules and the head), float32;
- `per_device_param_bytes`, `per_device_opt_bytes`: what one device holds of all params
  (frozen + trained) and of the optimizer state, from the shardings;
- `per_device_temp_bytes`: the compiled step's scratch (activations kept for the backward
  pass, gathered fsdp matrices, gradients), from XLA's `memory_analysis()`;
- `per_device_peak_bytes`: arguments + outputs not aliased to donated inputs + scratch;
- `max_batch_size`: the largest global batch (a multiple of the device count) whose compiled
  peak fits `--budget_gb` per device (`search_max_batch`: compiles at twice the batch, then
  at extrapolated batches, each checked; `peak_bytes_at` lists them) -- XLA:CPU's
  scheduling and buffer assignment, a guide for GPU and TPU, not a promise.

The XLM-R geometries use the post-LayerNorm layer of `models/encoder.py` with the
checkpoints' sizes (XLM-R-XL/XXL are pre-LN in Hugging Face; the parameter count and the
memory are the same). DeBERTa-v2-xxlarge leaves out its first layer's convolution (refused
by the loader; 7M parameters).
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

_BERT = {'model_type': 'bert', 'vocab_size': 30522, 'max_position_embeddings': 512,
         'type_vocab_size': 2, 'hidden_size': 768, 'num_hidden_layers': 12,
         'num_attention_heads': 12, 'intermediate_size': 3072}
_XLMR = {'model_type': 'xlm-roberta-xl', 'vocab_size': 250880, 'max_position_embeddings': 514,
         'type_vocab_size': 1, 'pad_token_id': 1, 'layer_norm_eps': 1e-5,
         'num_attention_heads': 32}
GEOMETRIES = {  # config.json fields of the public checkpoints
    'bert-base': _BERT,
    'bert-large': {**_BERT, 'hidden_size': 1024, 'num_hidden_layers': 24,
                   'num_attention_heads': 16, 'intermediate_size': 4096},
    'xlm-roberta-xl': {**_XLMR, 'hidden_size': 2560, 'num_hidden_layers': 36,
                       'intermediate_size': 10240},
    'xlm-roberta-xxl': {**_XLMR, 'hidden_size': 4096, 'num_hidden_layers': 48,
                        'intermediate_size': 16384},
    'deberta-v2-xxlarge': {'model_type': 'deberta-v2', 'hidden_size': 1536,
                           'num_hidden_layers': 48, 'num_attention_heads': 24,
                           'intermediate_size': 6144, 'vocab_size': 128100,
                           'max_position_embeddings': 512, 'layer_norm_eps': 1e-7,
                           'relative_attention': True, 'position_buckets': 256,
                           'norm_rel_ebd': 'layer_norm', 'share_att_key': True,
                           'pos_att_type': 'p2c|c2p', 'position_biased_input': False,
                           'max_relative_positions': -1, 'type_vocab_size': 0},
}


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--model', default='xlm-roberta-xl',
                 help=f'{" | ".join(GEOMETRIES)} or a checkpoint directory')
  p.add_argument('--fsdp', type=int, default=1, help='mesh.fsdp: devices per fsdp group')
  p.add_argument('--trainable', default='adapters', help='a trainable preset (config.trainable)')
  p.add_argument('--adapter_size', type=int, default=64, help='Houlsby adapters; 0 = none')
  p.add_argument('--batch_size', type=int, default=32, help='global batch')
  p.add_argument('--seq_len', type=int, default=128)
  p.add_argument('--dtype', default='bfloat16', choices=('float32', 'bfloat16'))
  p.add_argument('--remat', default='none', help='model.remat: none | full | dots_saveable')
  p.add_argument('--scan', action='store_true', help='model.scan_layers: lax.scan over layers')
  p.add_argument('--budget_gb', type=float, default=16.0,
                 help='per-device memory for max_batch_size (GiB; 16 = a TPU v5e chip); '
                      '0 = skip that second compile')
  p.add_argument('--params_only', action='store_true',
                 help='only the parameter and optimizer bytes (no compile: seconds)')
  return p.parse_args(argv)


def model_config(name: str):
  from adapter_tuning.interop import hf_checkpoint
  from adapter_tuning.models.families import family_named
  if name in GEOMETRIES:
    hf = GEOMETRIES[name]
    return family_named(hf['model_type']).read_config(dict(hf), name)
  return hf_checkpoint.read_model_config(hf_checkpoint.resolve_checkpoint(name))


def abstract_setup(args):
  """(model, abstract trainable params, abstract frozen params, rules, tx): shapes only."""
  import jax
  import jax.numpy as jnp
  import ml_collections

  from adapter_tuning.models.heads import TaskModel
  from adapter_tuning.peft.bottleneck import AdapterConfig
  from adapter_tuning.training import trainable as tl
  from adapter_tuning.training.optim import make_optimizer

  config = model_config(args.model)
  adapter = AdapterConfig(size=args.adapter_size) if args.adapter_size else None
  dtype = jnp.bfloat16 if args.dtype == 'bfloat16' else jnp.float32
  model = TaskModel(config, adapter, 'classification', 2, dtype=dtype, remat=args.remat,
                    scan=args.scan)
  ids = jnp.zeros((1, 8), jnp.int32)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), ids, ids + 1, ids)['params']
  rules = tl.resolve(args.trainable, config.num_layers)
  train, frozen = tl.split(shapes, rules)
  opt = ml_collections.ConfigDict(dict(learning_rate=1e-4, warmup_ratio=0.1, weight_decay=0.01,
                                       adam_b1=0.9, adam_b2=0.999, adam_eps=1e-6,
                                       grad_clip_norm=1.0))
  return model, shapes, train, frozen, rules, make_optimizer(opt, 1000)


def compile_step(model, tx, state, frozen, mesh, batch_size: int, seq_len: int):
  """The trainer's jitted step, lowered from sharded abstract arguments and compiled."""
  import jax
  import jax.numpy as jnp

  from adapter_tuning.training import parallel, steps
  rows = parallel.batch_sharded(mesh)
  tokens = jax.ShapeDtypeStruct((batch_size, seq_len), jnp.int32, sharding=rows)
  batch = {'input_ids': tokens, 'attention_mask': tokens, 'token_type_ids': tokens,
           'labels': jax.ShapeDtypeStruct((batch_size,), jnp.int32, sharding=rows)}
  shardings = lambda tree: jax.tree.map(lambda x: x.sharding, tree)
  step = jax.jit(steps.make_train_step(model, tx, 'classification'),
                 in_shardings=(shardings(state), shardings(frozen), rows),
                 out_shardings=(shardings(state), parallel.replicated(mesh)),
                 donate_argnums=(0,))
  return step.lower(state, frozen, batch).compile()


def peak_bytes(stats) -> int:
  return (stats.argument_size_in_bytes + stats.output_size_in_bytes - stats.alias_size_in_bytes
          + stats.temp_size_in_bytes)


def max_batch(peak_at: dict[int, int], budget: float, multiple: int) -> int:
  """The largest batch (a multiple of `multiple`) whose peak, affine in the batch through
  the two measured points, stays within `budget` bytes; 0 when none does."""
  (b1, p1), (b2, p2) = sorted(peak_at.items())
  per_row = (p2 - p1) / (b2 - b1)
  fixed = p1 - per_row * b1
  if per_row <= 0:
    return 0
  return max(0, int((budget - fixed) // per_row) // multiple * multiple)


def search_max_batch(peak_of, batch: int, budget: float, multiple: int,
                     refinements: int = 3) -> tuple[int, dict[int, int]]:
  """(largest compiled batch whose peak fits `budget`, {batch: peak} of every compile).

  The peak is affine in the batch only while XLA keeps one partitioning strategy (with
  small batches it may gather activations rather than weights), so an extrapolated
  guess is compiled and checked, and the line redrawn through the last two compiles
  (the secant method), up to `refinements` times.
  """
  peaks = {batch: peak_of(batch), 2 * batch: peak_of(2 * batch)}
  for _ in range(refinements):
    guess = max_batch(dict(list(peaks.items())[-2:]), budget, multiple)
    if guess == 0 or guess in peaks:
      break
    peaks[guess] = peak_of(guess)
  fits = [b for b, p in peaks.items() if p <= budget]
  return (max(fits) if fits else 0), peaks


def measure(args) -> dict:
  import flax.traverse_util as tu
  import jax

  from adapter_tuning import peft
  from adapter_tuning.training import parallel, steps
  from adapter_tuning.training import trainable as tl
  model, shapes, train, frozen, rules, tx = abstract_setup(args)
  mesh = parallel.make_mesh(args.fsdp)
  state = jax.eval_shape(lambda p: steps.init_state(p, tx, 0), train)
  state = parallel.abstract(state, parallel.state_shardings(state, mesh))
  frozen = parallel.abstract(frozen, parallel.frozen_shardings(frozen, mesh))
  base = sum(math.prod(x.shape) * x.dtype.itemsize
             for path, x in tu.flatten_dict(shapes).items()
             if path[0] != 'head' and not peft.is_method_param(path))
  counts = tl.summary(shapes, rules)
  result = {
      'tool': 'adapter_tuning/bench/memory', 'model': args.model, 'fsdp': args.fsdp,
      'devices': jax.device_count(), 'platform': jax.devices()[0].platform,
      'trainable': args.trainable, 'adapter_size': args.adapter_size, 'dtype': args.dtype,
      'remat': args.remat, 'scan': args.scan, 'batch_size': args.batch_size,
      'seq_len': args.seq_len,
      'total_params': counts['total'], 'trainable_params': counts['trainable'],
      'base_param_bytes': base,
      'per_device_param_bytes': parallel.bytes_per_device((state['params'], frozen)),
      'per_device_opt_bytes': parallel.bytes_per_device(state['opt_state']),
  }
  if args.params_only:
    return result
  start = time.perf_counter()
  memory_at = lambda rows: compile_step(model, tx, state, frozen, mesh, rows,
                                        args.seq_len).memory_analysis()
  stats = memory_at(args.batch_size)
  result.update(per_device_temp_bytes=stats.temp_size_in_bytes,
                per_device_peak_bytes=peak_bytes(stats), budget_gb=args.budget_gb)
  if args.budget_gb:
    known = {args.batch_size: result['per_device_peak_bytes']}
    best, peaks = search_max_batch(
        lambda rows: known.get(rows) or peak_bytes(memory_at(rows)), args.batch_size,
        args.budget_gb * 2 ** 30, jax.device_count())
    result.update(max_batch_size=best, max_batch_peak_bytes=peaks.get(best),
                  peak_bytes_at={str(b): p for b, p in sorted(peaks.items())})
  result['compile_s'] = round(time.perf_counter() - start, 1)
  return result


def main(argv=None):
  print(json.dumps(measure(parse_args(argv))), flush=True)


if __name__ == '__main__':
  main()
