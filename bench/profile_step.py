"""Where a train step spends its time on XLA:CPU: a profile broken down by kind of work.

  python bench/profile_step.py --model ../shared/models/all-MiniLM-L6-v2 [train_step.py flags]

Builds and compiles exactly the step `bench/train_step.py` times (same flags), runs it once,
traces `--profile_steps` more with `jax.profiler`, and reads the trace back
(`jax.profiler.ProfileData`): every XLA thunk's time on every worker thread, attributed to
its HLO instruction in the compiled module and, through the instruction's JAX metadata, to a
kind of work -- matmul (dot fusions: XLA:CPU's YNNPACK/oneDNN/Eigen dots), attention softmax
and mask, LayerNorm, GELU/activation, dropout masks, layout (transpose/copy), the optimizer
update, other. One JSON line: the step's wall time, thread-busy seconds per kind and share,
and the largest non-matmul instructions. Shares are of busy thread time (two threads on a
2-core host), so they say what to fix first, not wall time exactly.
"""

from __future__ import annotations

import collections
import glob
import json
import pathlib
import re
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import train_step  # noqa: E402

# (kind, test on the instruction's JAX op_name metadata), first match wins.
KINDS = (
    ('optimizer', lambda op: 'TaskModel' not in op),
    ('dropout', lambda op: 'Dropout' in op or 'random' in op or 'threefry' in op),
    ('attention softmax/mask', lambda op: '/attention/' in op and re.search(
        r'(exp|reduce_max|reduce_sum|select_n|div|softmax|sub)$', op) is not None),
    ('layer norm', lambda op: 'layer_norm' in op or 'LayerNorm' in op),
    ('activation', lambda op: re.search(r'(erf|tanh|gelu|logistic|integer_pow)', op) is not None),
    ('layout (transpose/copy)', lambda op: re.search(r'(transpose|copy|reshape|concatenate)$',
                                                      op) is not None),
)


def instruction_ops(hlo_text: str) -> dict[str, tuple[str, bool]]:
  """HLO instruction name -> (its JAX op_name, whether it is a matmul)."""
  out = {}
  for line in hlo_text.splitlines():
    m = re.match(r'\s*(?:ROOT )?%([\w.\-]+) = [^ ]+ (\w[\w-]*)\(', line)
    if not m:
      continue
    name, opcode = m.group(1), m.group(2)
    op = re.search(r'op_name="([^"]*)"', line)
    is_dot = opcode in ('dot', 'convolution') or name.startswith(('ynn_fusion', 'onednn',
                                                                  'xnn_fusion'))
    out[name] = (op.group(1) if op else '', is_dot)
  return out


def kind_of(op_name: str, is_dot: bool) -> str:
  if is_dot:
    return 'matmul'
  for kind, test in KINDS:
    if test(op_name):
      return kind
  return 'other'


def thunk_times(trace_dir: str) -> collections.Counter:
  """Busy nanoseconds per HLO instruction name, summed over the XLA worker threads."""
  from jax.profiler import ProfileData
  path = sorted(glob.glob(f'{trace_dir}/**/*.xplane.pb', recursive=True))[-1]
  times = collections.Counter()
  for plane in ProfileData.from_file(path).planes:
    for line in plane.lines:
      if not line.name.startswith('tf_XLAEigen'):
        continue
      for event in line.events:
        if not event.name.startswith('ThunkExecutor'):
          times[event.name] += event.duration_ns
  return times


def breakdown(compiled, times: collections.Counter, steps: int) -> dict:
  ops = instruction_ops(compiled.as_text())
  kinds, rest = collections.Counter(), collections.Counter()
  for name, ns in times.items():
    if name not in ops:  # the thread pool's own events (waiting, scheduling)
      kind, op = 'runtime (not an HLO instruction)', ''
    else:
      op, is_dot = ops[name]
      kind = kind_of(op, is_dot)
    kinds[kind] += ns / steps / 1e9
    if kind != 'matmul':
      rest[(name, op.split('/')[-1] if op else '?', kind)] += ns / steps / 1e9
  busy = sum(kinds.values())
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost.get('flops', 0.0)) if cost else 0.0
  return {'busy_thread_s_per_step': busy, 'xla_gflops_per_step': flops / 1e9,
          # the dots' rate had they run alone on every thread the step used
          'matmul_gflops_per_thread_s': flops / 1e9 / max(kinds['matmul'], 1e-9),
          'by_kind_s': {k: round(v, 4) for k, v in kinds.most_common()},
          'by_kind_share': {k: round(v / busy, 3) for k, v in kinds.most_common()},
          'top_non_matmul': [{'instruction': n, 'op': o, 'kind': k, 's': round(v, 4)}
                             for (n, o, k), v in rest.most_common(12)]}


def main(argv=None):
  argv = list(sys.argv[1:] if argv is None else argv)
  profile_steps = 2
  if '--profile_steps' in argv:
    i = argv.index('--profile_steps')
    profile_steps = int(argv[i + 1])
    del argv[i:i + 2]
  args = train_step.parse_args(argv)
  import jax
  compiled, state, frozen, batch = train_step.compiled_step(args)
  state, metrics = compiled(state, frozen, batch)
  jax.block_until_ready(metrics['loss'])
  with tempfile.TemporaryDirectory() as trace_dir:
    t0 = time.perf_counter()
    jax.profiler.start_trace(trace_dir)
    for _ in range(profile_steps):
      state, metrics = compiled(state, frozen, batch)
      jax.block_until_ready(metrics['loss'])
    jax.profiler.stop_trace()
    wall = (time.perf_counter() - t0) / profile_steps
    times = thunk_times(trace_dir)
  line = {'tool': 'adapter_tuning', 'what': 'step_profile', 'model': args.model,
          'method': args.method, 'trainable': args.trainable, 'batch_size': args.batch_size,
          'seq_len': args.seq_len, 'dtype': args.dtype, 'step_s_traced': wall,
          **breakdown(compiled, times, profile_steps), **train_step.method_specs.machine()}
  print(json.dumps(line))


if __name__ == '__main__':
  main()
