"""Running the real command line in a subprocess, as users do."""

import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run_train(*args, devices: int = 1, timeout: int = 600, env_extra=None):
  """python -m adapter_tuning.train ARGS; returns the CompletedProcess (text)."""
  return subprocess.run([sys.executable, '-m', 'adapter_tuning.train', *map(str, args)],
                        cwd=ROOT, env=_env(devices, env_extra), capture_output=True, text=True,
                        timeout=timeout)


def read_metrics(workdir) -> list[dict]:
  path = pathlib.Path(workdir) / 'metrics.jsonl'
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def final_eval(workdir) -> dict:
  evals = [m for m in read_metrics(workdir) if any(k.startswith('eval/') for k in m)]
  return evals[-1]


def _env(devices: int, env_extra=None):
  env = dict(os.environ)
  env['JAX_PLATFORMS'] = 'cpu'
  env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={devices}'
  env.update(env_extra or {})
  return env


def start_train(*args, devices: int = 1, env_extra=None) -> subprocess.Popen:
  return subprocess.Popen([sys.executable, '-m', 'adapter_tuning.train', *map(str, args)],
                          cwd=ROOT, env=_env(devices, env_extra), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def wait_for_step(workdir, step: int, proc: subprocess.Popen, timeout: float = 300):
  """Blocks until metrics.jsonl shows a train log at or past `step`."""
  import time
  deadline = time.time() + timeout
  path = pathlib.Path(workdir) / 'metrics.jsonl'
  while time.time() < deadline:
    if proc.poll() is not None:
      raise AssertionError(f'training exited early: {proc.stderr.read()[-2000:]}')
    if path.exists() and any(m.get('step', 0) >= step and 'train/loss' in m
                             for m in read_metrics(workdir)):
      return
    time.sleep(0.2)
  proc.kill()
  raise AssertionError(f'no step {step} within {timeout}s')


def tiny_config(checkpoint, task: str, **overrides):
  """The package defaults shrunk to a seconds-long run: the one config builder for tests.

  `overrides` are dotted keys (`**{'data.source': 'files'}`) or top-level ones
  (`num_train_steps=20`); each must already exist in the schema, so a typo fails.
  """
  from adapter_tuning import config as defaults
  config = defaults.get_config()
  config.model.checkpoint = str(checkpoint)
  config.model.adapter.size = 8
  config.data.task = task
  config.data.max_seq_length = 32
  config.batch_size = 16
  config.num_train_steps = 4
  config.progress_bar = False
  for key, value in overrides.items():
    *path, leaf = key.split('.')
    target = config
    for part in path:
      target = target[part]
    if leaf not in target:
      raise KeyError(f'{key} is not a config key')
    target[leaf] = value
  return config


def merged_classifier(pretrained, config, base_dir, out, num_labels: int, **hf_kwargs):
  """Random trained method params, pooler and head (IA³ scales around 1) for `pretrained`,
  merged by hf_merged into `out` and loaded by transformers: (encoder params with the
  trained ones, head, the transformers model). The parity tests of every family use it."""
  import flax.traverse_util as tu
  import numpy as np
  import transformers
  from adapter_tuning import peft
  from adapter_tuning.interop import hf_merged
  rng = np.random.default_rng(1)
  flat = tu.flatten_dict(pretrained.params)
  trained = {('encoder',) + k: rng.normal(1 if '_ia3' in k[-2] else 0, 0.2, v.shape
                                          ).astype(np.float32)
             for k, v in flat.items() if k[0] == 'pooler' or peft.is_method_param(k)}
  width = pretrained.config.hidden_size
  trained[('head', 'kernel')] = rng.normal(0, 0.2, (width, num_labels)).astype(np.float32)
  trained[('head', 'bias')] = rng.normal(0, 0.2, (num_labels,)).astype(np.float32)
  trained = tu.unflatten_dict(trained)
  meta = {'head': 'classification', 'pooling': 'pooler', 'peft': peft.to_meta(config),
          'label_names': [f'l{i}' for i in range(num_labels)], 'num_outputs': num_labels}
  hf_config, state = hf_merged.build(meta, trained, base_dir)
  hf_merged.write(out, hf_config, state, base_dir)
  merged = transformers.AutoModelForSequenceClassification.from_pretrained(out, **hf_kwargs)
  encoder = tu.unflatten_dict({**flat, **tu.flatten_dict(trained['encoder'])})
  return encoder, trained['head'], merged.eval()


# Demo runs that several test files compare against. Each is trained once per session by a
# fixture in conftest.py (`demo_reference_run`, `demo_checkpointed_run`); tests copy the
# folder before they run anything in it, so the shared run is never changed.
DEMO_REFERENCE = ('--config', 'configs/demo.py', '--config.num_train_steps=8',
                  '--config.batch_size=16', '--config.log_every_steps=1',
                  '--config.data.max_train_examples=256', '--config.checkpoint_every_steps=4',
                  '--config.progress_bar=false')
DEMO_CHECKPOINTED = ('--config', 'configs/demo.py', '--config.num_train_steps=24',
                     '--config.checkpoint_every_steps=6', '--config.log_every_steps=3',
                     '--config.data.max_train_examples=256')


def copy_run(workdir, to):
  """A copy of a finished run's folder, to resume, damage or rerun without touching it."""
  import shutil
  shutil.copytree(workdir, to)
  return pathlib.Path(to)


def run_main(main, argv) -> subprocess.CompletedProcess:
  """An entry point's `main(argv)` in this process, without a new interpreter (imports and
  compiles shared with the tests): its exit code, stdout and stderr as a CompletedProcess.
  For tests about what the command does; those about the process itself (signals, exit
  of the interpreter, multi-process) run it with subprocess."""
  import contextlib
  import io
  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    code = main(list(argv))
  return subprocess.CompletedProcess(list(argv), code, out.getvalue(), err.getvalue())


def predict_main(*args) -> subprocess.CompletedProcess:
  """`python -m adapter_tuning.predict ARGS`, in this process (run_main)."""
  from adapter_tuning import predict
  predict.FLAGS.unparse_flags()  # absl's global flags: each call starts from the defaults
  return run_main(predict.main, ['predict', *map(str, args)])
