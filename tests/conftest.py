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
