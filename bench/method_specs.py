"""The PEFT methods benchmarked side by side, and the facts every result line records.

Standard library only: both benchmark scripts import this file, ours (`train_step.py
--method`, the project venv) and the peer's (`peer_methods.py`, ../peer-venv with
AdapterHub), so one table decides each method's hyperparameters for both tools instead of
two copies that could drift apart. The values are AdapterHub 1.3's config defaults for
the same method (checked in its `configuration/adapter_config.py`), except where a
comment says otherwise:

  houlsby   DoubleSeqBnConfig, bottleneck 64 (reduction_factor = hidden / 64), GELU (the
            library default is swish; GELU is the paper's and our default, as in
            ../shared/bench/peer_adapterhub.py)
  pfeiffer  SeqBnConfig, bottleneck 64, ReLU, original_ln_before (the library default)
  parallel  ParBnConfig: one scaled parallel adapter at the FFN only (mh_adapter=False),
            bottleneck hidden / 2 (reduction_factor 2), scaling 4.0, ReLU
  lora      LoRAConfig(r=8, alpha=8) on query and value
  ia3       IA3Config: key, value and the FFN's first projection
  prefix    PrefixTuningConfig: 30 positions, reparametrisation MLP width 512
  mam       MAMConfig: PrefixTuningConfig(bottleneck_size=800) + ParBnConfig()
  fusion    AdapterFusion over two houlsby adapters (the entry above, frozen), AdapterHub's
            DynamicAdapterFusionConfig: Q, K, V per sub-layer, score dropout 0.1 (BERT's
            attention dropout), V regularised towards the identity (0.01)
  bitfit    every bias (LayerNorm biases too) and the head
  full      every parameter

What trains: the method's parameters and the head, LayerNorms frozen (AdapterHub's
`train_adapter`, our `peft` preset; fusion: the fusion layers and the head,
`train_adapter_fusion`); bitfit and full as named.
"""

from __future__ import annotations

import datetime
import os
import platform
import resource
import subprocess

HOULSBY_SIZE = 64
PARALLEL_REDUCTION = 2  # ParBnConfig.reduction_factor
PARALLEL = {'reduction_factor': PARALLEL_REDUCTION, 'placement': 'parallel_ffn',
            'scaling': 4.0, 'activation': 'relu'}

# name -> {'trainable': preset, and per method part its hyperparameters}
METHODS: dict[str, dict] = {
    'houlsby': {'trainable': 'peft',
                'adapter': {'size': HOULSBY_SIZE, 'placement': 'houlsby', 'activation': 'gelu'}},
    'pfeiffer': {'trainable': 'peft',
                 'adapter': {'size': HOULSBY_SIZE, 'placement': 'pfeiffer', 'activation': 'relu',
                             'original_ln_before': True}},
    'parallel': {'trainable': 'peft', 'adapter': dict(PARALLEL)},
    'lora': {'trainable': 'peft', 'lora': {'rank': 8, 'alpha': 8.0, 'targets': ('query', 'value')}},
    'ia3': {'trainable': 'peft', 'ia3': {'targets': ('key', 'value', 'intermediate')}},
    'prefix': {'trainable': 'peft', 'prefix': {'length': 30, 'bottleneck': 512}},
    'mam': {'trainable': 'peft', 'prefix': {'length': 30, 'bottleneck': 800},
            'adapter': dict(PARALLEL)},
    'fusion': {'trainable': 'peft',
               'fusion': {'count': 2, 'dropout': 0.1, 'regularization': 0.01,
                          'adapter': {'size': HOULSBY_SIZE, 'placement': 'houlsby',
                                      'activation': 'gelu'}}},
    'bitfit': {'trainable': 'bitfit'},
    'full': {'trainable': 'full'},
}
NAMES = tuple(METHODS)

# A BERT-shaped model small enough for smoke tests; both tools build it from these numbers.
TINY = {'hidden_size': 128, 'num_layers': 2, 'num_heads': 2, 'intermediate_size': 512}

# CPU features that decide which matmul kernels XLA and oneDNN can use.
_FLAGS = ('avx2', 'fma', 'avx512f', 'avx512_bf16', 'avx512_vnni', 'avx512_fp16',
          'amx_tile', 'amx_bf16', 'amx_int8')


def adapter_size(adapter: dict, hidden: int) -> int:
  """The bottleneck width: given, or hidden // reduction_factor (AdapterHub's rule)."""
  if 'size' in adapter:
    return adapter['size']
  return int(hidden // adapter['reduction_factor'])


def cpu_model() -> str:
  """`lscpu`'s 'Model name' (falls back to /proc/cpuinfo, then to platform)."""
  try:
    out = subprocess.run(['lscpu'], capture_output=True, text=True, check=False).stdout
    for line in out.splitlines():
      if line.strip().startswith('Model name:'):
        return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return _cpuinfo_field('model name') or platform.processor() or 'unknown'


def _cpuinfo_field(name: str) -> str:
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith(name):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return ''


def cpu_flags() -> dict:
  """Which of the matmul-relevant ISA extensions this CPU has: Intel hosts with AMX run
  oneDNN's (the peer's) kernels differently from AMD ones, so a result without this is
  hard to compare with another sitting's."""
  flags = set(_cpuinfo_field('flags').split())
  return {f: f in flags for f in _FLAGS}


def machine() -> dict:
  """The fields every JSON line carries about where it ran."""
  return {'cpu_model': cpu_model(), 'cpu_flags': cpu_flags(), 'cpu_count': os.cpu_count(),
          'python': platform.python_version()}


def peak_rss_mib() -> float:
  """This process's peak resident set (Linux reports ru_maxrss in KiB)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def timing(times: list[float], batch_size: int, seq_len: int) -> dict:
  """The step-time fields both tools report, from the timed (post-warm-up) steps."""
  ordered = sorted(times)
  n = len(ordered)
  median = (ordered[n // 2] + ordered[(n - 1) // 2]) / 2
  return {'step_s_median': median, 'step_s_min': ordered[0], 'step_s_all': times,
          'examples_per_s': batch_size / median, 'tokens_per_s': batch_size * seq_len / median}


def header() -> dict:
  """The sitting's first line (bench/methods.sh)."""
  return {'header': True, 'date': datetime.datetime.now().isoformat(timespec='seconds'),
          **machine()}


if __name__ == '__main__':
  import json
  print(json.dumps(header()))
