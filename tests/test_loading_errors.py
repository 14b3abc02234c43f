"""Bad checkpoints give one clear error naming the problem (and the tensor, for shapes)."""

import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from adapter_tuning import load_pretrained
from adapter_tuning.errors import UsageError


def _copy(minilm_dir, tmp_path, skip=()):
  out = tmp_path / 'ckpt'
  out.mkdir()
  for f in minilm_dir.iterdir():
    if f.name not in skip:
      shutil.copy(f, out / f.name)
  return out


def test_missing_directory(tmp_path):
  with pytest.raises(UsageError, match='does not exist'):
    load_pretrained(tmp_path / 'nope')


def test_missing_config(minilm_dir, tmp_path):
  with pytest.raises(UsageError, match='has no config.json'):
    load_pretrained(_copy(minilm_dir, tmp_path, skip=('config.json',)))


def test_unsupported_model_type(minilm_dir, tmp_path):
  d = _copy(minilm_dir, tmp_path)
  cfg = json.loads((d / 'config.json').read_text())
  cfg['model_type'] = 'gpt2'
  (d / 'config.json').write_text(json.dumps(cfg))
  with pytest.raises(UsageError, match="unsupported model_type 'gpt2'"):
    load_pretrained(d)


def test_shape_mismatch_names_the_tensor(minilm_dir, tmp_path):
  d = _copy(minilm_dir, tmp_path, skip=('model.safetensors',))
  state = load_file(str(minilm_dir / 'model.safetensors'))
  key = 'encoder.layer.2.intermediate.dense.weight'
  state[key] = np.zeros((1000, 384), np.float32)
  save_file(state, str(d / 'model.safetensors'))
  with pytest.raises(UsageError, match=f"tensor '{key}'.*shape \\(1000, 384\\)"):
    load_pretrained(d)


def test_missing_tensor(minilm_dir, tmp_path):
  d = _copy(minilm_dir, tmp_path, skip=('model.safetensors',))
  state = load_file(str(minilm_dir / 'model.safetensors'))
  del state['encoder.layer.0.attention.self.query.weight']
  save_file(state, str(d / 'model.safetensors'))
  with pytest.raises(UsageError, match='lacks tensor'):
    load_pretrained(d)


def test_no_weights(minilm_dir, tmp_path):
  with pytest.raises(UsageError, match='has no weights'):
    load_pretrained(_copy(minilm_dir, tmp_path, skip=('model.safetensors',)))


def test_corrupt_safetensors(minilm_dir, tmp_path):
  d = _copy(minilm_dir, tmp_path, skip=('model.safetensors',))
  (d / 'model.safetensors').write_bytes(b'not a safetensors file')
  with pytest.raises(UsageError, match='corrupt or not safetensors'):
    load_pretrained(d)


def test_sharded_safetensors(minilm_dir, tmp_path, minilm):
  d = _copy(minilm_dir, tmp_path, skip=('model.safetensors',))
  state = load_file(str(minilm_dir / 'model.safetensors'))
  keys = sorted(state)
  half = len(keys) // 2
  shards = {'model-00001-of-00002.safetensors': keys[:half],
            'model-00002-of-00002.safetensors': keys[half:]}
  weight_map = {}
  for name, ks in shards.items():
    save_file({k: state[k] for k in ks}, str(d / name))
    weight_map.update({k: name for k in ks})
  (d / 'model.safetensors.index.json').write_text(json.dumps({'weight_map': weight_map}))
  pre = load_pretrained(d)
  out = pre.encode(['sharded weights load the same'])
  ref = minilm.encode(['sharded weights load the same'])
  np.testing.assert_array_equal(out['pooled'], ref['pooled'])


def test_bin_without_torch(minilm_dir, tmp_path, monkeypatch):
  import builtins
  d = _copy(minilm_dir, tmp_path, skip=('model.safetensors',))
  (d / 'pytorch_model.bin').write_bytes(b'\x80\x04pickle')
  real_import = builtins.__import__

  def no_torch(name, *args, **kwargs):
    if name == 'torch':
      raise ImportError('no torch')
    return real_import(name, *args, **kwargs)

  monkeypatch.setattr(builtins, '__import__', no_torch)
  with pytest.raises(UsageError, match='torch is not installed'):
    load_pretrained(d)


def test_hub_name_offline_names_local_alternative(monkeypatch):
  monkeypatch.setenv('HF_HUB_OFFLINE', '1')
  with pytest.raises(UsageError, match='pass the local directory'):
    load_pretrained('bert-base-uncased')
