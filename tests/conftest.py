"""Shared fixtures: the real data and model in ../shared, and small generated checkpoints."""

import os
import pathlib

os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import pytest

SHARED = pathlib.Path(__file__).resolve().parents[1].parent / 'shared'
MINILM = SHARED / 'models' / 'all-MiniLM-L6-v2'
GLUE_DIR = SHARED / 'data' / 'glue'
SQUAD_DEV = SHARED / 'data' / 'squad' / 'dev-v1.1.json'


@pytest.fixture(scope='session')
def minilm_dir():
  if not (MINILM / 'model.safetensors').exists():
    pytest.fail(f'{MINILM} is missing: tests need ../shared beside the project')
  return MINILM


@pytest.fixture(scope='session')
def minilm():
  from adapter_tuning import load_pretrained
  return load_pretrained(MINILM)


def _demo_run(tmp_path_factory, name, args):
  from helpers import run_train
  workdir = tmp_path_factory.mktemp(name) / 'run'
  result = run_train(*args, '--workdir', workdir)
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


@pytest.fixture(scope='session')
def demo_reference_run(tmp_path_factory):
  """helpers.DEMO_REFERENCE on one device: what fsdp, multi-device and multi-process runs of
  the same config must reproduce. Read it, or copy it (helpers.copy_run) to run in it."""
  from helpers import DEMO_REFERENCE
  return _demo_run(tmp_path_factory, 'demo_reference', DEMO_REFERENCE)


@pytest.fixture(scope='session')
def demo_checkpointed_run(tmp_path_factory):
  """helpers.DEMO_CHECKPOINTED, finished uninterrupted (checkpoints at steps 18 and 24 kept):
  what an interrupted or damaged run of that config must resume to. Read it, or copy it."""
  from helpers import DEMO_CHECKPOINTED
  return _demo_run(tmp_path_factory, 'demo_checkpointed', DEMO_CHECKPOINTED)


@pytest.fixture(scope='session')
def sst2_peft_run(tmp_path_factory):
  """(demo base, an SST-2 bottleneck adapter trained on it): `peft` preset (no LayerNorms of
  its own), weights large enough to matter. The stacking and fusion tests build on it and
  check that it stays untouched; copy it to change it."""
  from adapter_tuning.data import demo
  from adapter_tuning.training.trainer import train_and_evaluate
  from helpers import tiny_config
  root = tmp_path_factory.mktemp('sst2_peft')
  base = demo.ensure_checkpoint(root / 'base')
  train_and_evaluate(tiny_config(base, 'glue/sst2', **{
      'data.source': 'glue_dir', 'data.data_dir': str(GLUE_DIR),
      'data.max_train_examples': 128, 'data.max_eval_examples': 32, 'trainable': 'peft',
      'learning_rate': 1e-2, 'model.adapter.init_scale': 0.3}), root / 'sst2')
  return base, root / 'sst2' / 'adapter'
