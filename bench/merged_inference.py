"""Does a merged LoRA model infer as fast as its base? Forward-only throughput, one process.

  python bench/merged_inference.py --model bert-base --rounds 5 --reps 3

Three jitted eval-mode forwards (encoder + classification head on [CLS], batch 32 x 128 of
random token ids, random BERT-base-geometry weights) on the same inputs:

  base           the plain encoder
  lora_unmerged  the encoder with LoRA (rank 8, alpha 8, query and value: bench/method_specs.py)
                 as trained: two extra thin matmuls per adapted projection
  lora_merged    `adapter_tuning.peft.lora.merge` of that model: (alpha / r) A B folded into
                 the kernels, run by the plain encoder of `base`

LoRA's B is drawn nonzero (a trained adapter's is), so the merge changes the kernels; the
line for lora_merged records how far its logits are from lora_unmerged's. The three
alternate within each round (the order rotates each round) so that drift of the machine
over the run hits all three alike; one JSON line per variant (median s/batch over every
timed call), then one with the ratios to base.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import method_specs  # noqa: E402  (stdlib only)

VARIANTS = ('base', 'lora_unmerged', 'lora_merged')


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--model', default='bert-base', help="'bert-base' or 'tiny' (random weights)")
  p.add_argument('--batch_size', type=int, default=32)
  p.add_argument('--seq_len', type=int, default=128)
  p.add_argument('--rounds', type=int, default=5)
  p.add_argument('--reps', type=int, default=3, help='timed calls per variant per round')
  p.add_argument('--warmup', type=int, default=1, help='untimed calls per variant first')
  return p.parse_args(argv)


def build(args):
  """{variant: (jitted forward, params)} and the model config; params live on the device."""
  import jax
  import numpy as np

  import train_step
  from adapter_tuning.models.heads import TaskModel
  from adapter_tuning.peft import lora

  if args.model not in ('bert-base', 'tiny'):
    raise SystemExit('merged_inference: --model is bert-base or tiny (random weights)')
  args.method = None  # train_step.model_config reads only args.model
  config, _ = train_step.model_config(args)
  lora_config = lora.LoRAConfig(**method_specs.METHODS['lora']['lora'])
  base = TaskModel(config, None, 'classification', 2, pooling='cls')
  with_lora = TaskModel(config, lora_config, 'classification', 2, pooling='cls')
  params = train_step.random_params(with_lora, lora_config, config)
  rng = np.random.default_rng(1)
  for i in range(config.num_layers):  # a trained B, not the zero of its init
    attention = params['encoder'][f'layer_{i}']['attention']
    for site in lora_config.sites(i):
      b = attention[f'{site}{lora.PARAM_MARKER}']['lora_B']
      b[...] = rng.normal(0.0, 0.02, b.shape)
  merged = {'encoder': lora.merge(params['encoder'], lora_config, config.num_layers),
            'head': params['head']}

  def forward(model):
    return jax.jit(lambda p, ids, mask, types: model.apply(
        {'params': p}, ids, mask, types, deterministic=True))

  plain = forward(base)
  return {'base': (plain, jax.device_put(strip_lora(params))),
          'lora_unmerged': (forward(with_lora), jax.device_put(params)),
          'lora_merged': (plain, jax.device_put(merged))}, config


def strip_lora(params: dict) -> dict:
  """The base model's params: the same weights with every LoRA module dropped."""
  import flax.traverse_util as tu
  from adapter_tuning.peft import lora

  flat = tu.flatten_dict(params)
  return tu.unflatten_dict({k: v for k, v in flat.items()
                            if not any(n.endswith(lora.PARAM_MARKER) for n in k)})


def inputs(args, config):
  """One fixed batch of random ids: the forward's speed does not depend on the tokens."""
  import jax.numpy as jnp
  import numpy as np

  rng = np.random.default_rng(0)
  shape = (args.batch_size, args.seq_len)
  return (jnp.asarray(rng.integers(1000, config.vocab_size, shape), jnp.int32),
          jnp.ones(shape, jnp.int32), jnp.zeros(shape, jnp.int32))


def measure(variants, batch, args) -> dict:
  """{variant: [seconds per timed call]}, the variants alternating round by round."""
  import jax

  for fn, params in variants.values():
    for _ in range(args.warmup):
      jax.block_until_ready(fn(params, *batch))
  times = {v: [] for v in variants}
  for r in range(args.rounds):
    order = VARIANTS[r % 3:] + VARIANTS[:r % 3]
    for v in order:
      fn, params = variants[v]
      for _ in range(args.reps):
        t = time.perf_counter()
        jax.block_until_ready(fn(params, *batch))
        times[v].append(time.perf_counter() - t)
  return times


def main(argv=None):
  """Check the merge is the same model (logits), then time the three; JSON lines out."""
  args = parse_args(argv)
  import jax
  import numpy as np

  variants, config = build(args)
  batch = inputs(args, config)
  logits = {v: np.asarray(fn(params, *batch)) for v, (fn, params) in variants.items()}
  times = measure(variants, batch, args)
  common = {'tool': 'adapter_tuning', 'bench': 'merged_inference', 'model': args.model,
            'batch_size': args.batch_size, 'seq_len': args.seq_len, 'rounds': args.rounds,
            'reps': args.reps, 'versions': {'jax': jax.__version__}}
  medians = {}
  for v in VARIANTS:
    line = {**common, 'variant': v,
            'params': sum(x.size for x in jax.tree.leaves(variants[v][1])),
            **method_specs.timing(times[v], args.batch_size, args.seq_len)}
    line['batch_s_median'] = medians[v] = line.pop('step_s_median')
    line['batch_s_min'], line['batch_s_all'] = line.pop('step_s_min'), line.pop('step_s_all')
    if v == 'lora_merged':
      diff = {other: float(np.abs(logits[v] - logits[other]).max())
              for other in ('lora_unmerged', 'base')}
      line['max_abs_logit_diff_vs_unmerged'] = diff['lora_unmerged']  # ~0: the same model
      line['max_abs_logit_diff_vs_base'] = diff['base']  # > 0: the merge changed the kernels
    print(json.dumps(line), flush=True)
  print(json.dumps({**common, 'variant': 'summary',
                    'merged_over_base': medians['lora_merged'] / medians['base'],
                    'unmerged_over_base': medians['lora_unmerged'] / medians['base'],
                    'peak_rss_mb': method_specs.peak_rss_mib(), **method_specs.machine()}))


if __name__ == '__main__':
  from adapter_tuning.training import hugepages
  hugepages.reexec()  # as bench/train_step.py, so the numbers compare with its
  main()
