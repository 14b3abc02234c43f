"""bench/memory.py: per-device bytes of the trainer's step on an fsdp mesh, compiled from
shapes alone (8 fake CPU devices, in subprocesses: the device count is set before JAX starts)."""

import importlib.util
import json
import subprocess
import sys

from helpers import ROOT, _env

SPEC = importlib.util.spec_from_file_location('memory_bench', ROOT / 'bench' / 'memory.py')
memory = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(memory)

TINY = {'model_type': 'bert', 'vocab_size': 2048, 'hidden_size': 128, 'num_hidden_layers': 2,
        'num_attention_heads': 4, 'intermediate_size': 512, 'max_position_embeddings': 64}


def _bench(*args) -> dict:
  proc = subprocess.run([sys.executable, 'bench/memory.py', *map(str, args)], cwd=ROOT,
                        env=_env(8), capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def test_xlm_roberta_xl_on_fsdp8_holds_an_eighth_of_the_base_per_device():
  out = _bench('--model', 'xlm-roberta-xl', '--fsdp', 8, '--params_only')
  assert 3.4e9 < out['total_params'] < 3.6e9, out  # the 3.5B geometry
  assert out['base_param_bytes'] > 13e9
  assert out['per_device_param_bytes'] <= 1.1 * out['base_param_bytes'] / 8, out
  # Adapters, LayerNorms and head: replicated float32 params; Adam's mu and nu beside them.
  trained = 4 * out['trainable_params']
  assert 2 * trained <= out['per_device_opt_bytes'] <= 2 * trained + 1024, out


def test_compiled_step_figures_on_a_checkpoint_directory(tmp_path):
  (tmp_path / 'config.json').write_text(json.dumps(TINY))  # no weights needed
  common = ('--model', tmp_path, '--batch_size', 16, '--seq_len', 32, '--budget_gb', 0.05)
  one, four = _bench(*common, '--fsdp', 1), _bench(*common, '--fsdp', 4)
  assert one['base_param_bytes'] == four['base_param_bytes']
  assert four['per_device_param_bytes'] < 0.5 * one['per_device_param_bytes'], (one, four)
  for out in (one, four):
    assert out['devices'] == 8 and out['per_device_temp_bytes'] > 0
    assert out['per_device_peak_bytes'] >= out['per_device_param_bytes'] + \
        out['per_device_opt_bytes']
    assert out['max_batch_size'] >= 16 and out['max_batch_size'] % 8 == 0, out
  assert four['max_batch_size'] >= one['max_batch_size']


def test_max_batch_is_affine_through_two_compiles():
  # peak = 2 + 0.25 * batch bytes: 100 bytes hold 392 rows, 384 in multiples of 16.
  assert memory.max_batch({32: 10, 64: 18}, 100, 16) == 384
  assert memory.max_batch({32: 10, 64: 18}, 5, 16) == 0


def test_search_compiles_and_checks_each_extrapolated_batch():
  peak = lambda b: 100 + b if b <= 64 else 36 + 2 * b  # twice as steep past 64 rows
  best, peaks = memory.search_max_batch(peak, 32, 300, 8)
  assert best == 128 and peak(128) <= 300 < peak(136)  # the true largest multiple of 8
  assert list(peaks) == [32, 64, 200, 128]  # the affine guess (200) was checked and refused
