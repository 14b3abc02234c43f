"""Reading Hugging Face encoder checkpoints (models/families) into the Flax parameter tree.

Torch stores linear weights as [out, in]; Flax kernels are [in, out] (and our attention
projections are split per head), so each tensor is reshaped to the shape the Flax module
expects, which also lets us name the exact tensor when a checkpoint disagrees with its
config. Pickle is never loaded implicitly: `.bin` files go through
`torch.load(weights_only=True)`.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib

import numpy as np

from adapter_tuning.errors import UsageError
from adapter_tuning.models.encoder import ModelConfig
from adapter_tuning.models.families import family_named
from adapter_tuning import peft

WEIGHT_FILES = ('model.safetensors', 'model.safetensors.index.json', 'pytorch_model.bin')


def resolve_checkpoint(path_or_name: str) -> pathlib.Path:
  """A local checkpoint directory, or a hub name downloaded with huggingface_hub."""
  path = pathlib.Path(os.path.expanduser(str(path_or_name)))
  if path.exists():
    if not path.is_dir():
      raise UsageError(f'checkpoint {path} is a file; pass the directory that holds '
                       'config.json and the weights')
    return path
  looks_local = str(path_or_name).startswith(('.', '/', '~')) or str(path_or_name).count('/') > 1
  if looks_local:
    raise UsageError(f'checkpoint directory {path} does not exist; pass a local Hugging Face '
                     'directory (config.json + model.safetensors) or a hub name')
  try:
    import huggingface_hub
    local = huggingface_hub.snapshot_download(
        str(path_or_name),
        allow_patterns=['config.json', '*.safetensors', '*.safetensors.index.json', '*.json',
                        'vocab.txt', 'merges.txt', 'spm.model'])
  except Exception as e:  # pylint: disable=broad-except  # offline, unknown repo, auth...
    raise UsageError(
        f'could not fetch {path_or_name!r} from the Hugging Face hub ({type(e).__name__}); '
        'without network, download it elsewhere and pass the local directory with '
        'config.json + model.safetensors + tokenizer files') from None
  return pathlib.Path(local)


def read_model_config(directory: pathlib.Path) -> ModelConfig:
  config_path = directory / 'config.json'
  if not config_path.exists():
    raise UsageError(f'{directory} has no config.json; pass a Hugging Face checkpoint '
                     'directory (saved with save_pretrained)')
  try:
    hf = json.loads(config_path.read_text())
  except json.JSONDecodeError as e:
    raise UsageError(f'{config_path} is not valid JSON ({e}); re-save the checkpoint') from None
  return family_named(hf.get('model_type')).read_config(hf, config_path)


def _load_safetensors(path: pathlib.Path) -> dict[str, np.ndarray]:
  from safetensors.numpy import load_file
  try:
    return load_file(str(path))
  except Exception as e:  # pylint: disable=broad-except
    raise UsageError(f'cannot read {path} ({e}); the file is corrupt or not safetensors: '
                     're-download or re-save the checkpoint') from None


def _load_torch_bin(path: pathlib.Path) -> dict[str, np.ndarray]:
  try:
    import torch
  except ImportError:
    raise UsageError(f'{path} is a PyTorch pickle and torch is not installed; install torch '
                     'or convert the checkpoint to model.safetensors') from None
  try:
    state = torch.load(str(path), map_location='cpu', weights_only=True)
  except Exception as e:  # pylint: disable=broad-except
    raise UsageError(f'cannot safely load {path} ({type(e).__name__}: {e}); only plain tensor '
                     'state dicts are accepted; convert it to model.safetensors') from None
  return {k: v.float().numpy() if v.is_floating_point() else v.numpy()
          for k, v in state.items()}


def weight_files(directory: pathlib.Path) -> list[pathlib.Path]:
  """The files that hold the weights, in the order Hugging Face prefers them."""
  if (directory / 'model.safetensors').exists():
    return [directory / 'model.safetensors']
  index = directory / 'model.safetensors.index.json'
  if index.exists():
    shards = sorted(set(json.loads(index.read_text())['weight_map'].values()))
    return [directory / s for s in shards]
  if (directory / 'pytorch_model.bin').exists():
    return [directory / 'pytorch_model.bin']
  raise UsageError(f'{directory} has no weights: expected one of {", ".join(WEIGHT_FILES)}')


def load_state_dict(directory: pathlib.Path) -> dict[str, np.ndarray]:
  state = {}
  for f in weight_files(directory):
    if not f.exists():
      raise UsageError(f'weight shard {f} listed in the index is missing; re-download it')
    state.update(_load_torch_bin(f) if f.suffix == '.bin' else _load_safetensors(f))
  return state


def checkpoint_identity(directory: pathlib.Path) -> dict:
  """Content hash of the weights: what adapter artifacts record to refuse a wrong base."""
  digest = hashlib.sha256()
  for f in weight_files(directory):
    with open(f, 'rb') as fh:
      for chunk in iter(lambda: fh.read(1 << 22), b''):
        digest.update(chunk)
  return {'name': directory.name, 'sha256': digest.hexdigest()}


def _strip_prefix(state: dict[str, np.ndarray], prefixes: tuple[str, ...]) -> dict[str, np.ndarray]:
  out = {}
  for key, value in state.items():
    for prefix in prefixes:
      if key.startswith(prefix):
        key = key[len(prefix):]
        break
    key = key.replace('LayerNorm.gamma', 'LayerNorm.weight').replace('LayerNorm.beta',
                                                                      'LayerNorm.bias')
    out[key] = value
  return out


def checkpoint_key(path: tuple[str, ...], family: str) -> tuple[str, str]:
  """A Flax param path under the encoder -> (HF key, conversion kind), by the family's map."""
  return family_named(family).checkpoint_key(path)


def _convert(value: np.ndarray, kind: str, target_shape: tuple[int, ...], leaf: str):
  if kind == 'linear' and leaf == 'kernel':
    value = value.T
  elif kind == 'attn_in':  # torch [N*H, D] -> flax [D, N, H]; bias [N*H] -> [N, H]
    value = value.T if leaf == 'kernel' else value
  elif kind == 'attn_out' and leaf == 'kernel':  # torch [D, N*H] -> flax [N, H, D]
    value = value.T
  if value.size != int(np.prod(target_shape)):
    raise ValueError
  return value.reshape(target_shape)


def convert_encoder_params(state: dict[str, np.ndarray], shapes, family: str,
                           source: str, config: ModelConfig | None = None
                           ) -> tuple[dict, list[str]]:
  """Builds the encoder's (non-adapter) params from a HF state dict.

  Args:
    state: HF tensors.
    shapes: nested dict of ShapeDtypeStruct for the encoder params (from `eval_shape`).
    family: the family's name (models/families), whose key map names each tensor.
    source: checkpoint directory, for error messages.
    config: the model config; with it, a tensor the checkpoint omits but the family can
      compute (`Family.missing_tensor`: DistilBERT's sinusoidal positions) is computed.

  Returns:
    (params, names of checkpoint tensors that were not used). A missing pooler is left
    out of params.
  """
  import flax.traverse_util as tu
  family_spec = family_named(family)
  state = _strip_prefix(state, family_spec.key_prefixes + ('model.',))
  flat_shapes = tu.flatten_dict(shapes)
  params, used = {}, set()
  for path, spec in flat_shapes.items():
    if peft.is_method_param(path):
      continue
    key, kind = family_spec.checkpoint_key(path)
    if key not in state and path[0] == 'pooler':
      continue  # checkpoints saved without a pooler: the caller keeps its fresh init
    if key not in state and config is not None:
      computed = family_spec.missing_tensor(path, config)
      if computed is not None:
        params[path] = np.asarray(computed, np.float32).reshape(spec.shape)
        continue
    if key not in state:
      raise UsageError(f'checkpoint {source} lacks tensor {key!r} needed for {"/".join(path)}; '
                       f'is it a {family} encoder checkpoint?')
    value = np.asarray(state[key])
    try:
      params[path] = _convert(value, kind, spec.shape, path[-1]).astype(np.float32)
    except ValueError:
      raise UsageError(f'tensor {key!r} in {source} has shape {tuple(value.shape)} but '
                       f'config.json implies {spec.shape} for {"/".join(path)}; the weights '
                       'and config.json do not match') from None
    used.add(key)
  unused = sorted(k for k in state if k not in used and not k.endswith('position_ids'))
  return tu.unflatten_dict(params), unused


def export_encoder_state(params: dict, family: str) -> dict[str, np.ndarray]:
  """The inverse of `convert_encoder_params`: HF-named torch-layout tensors (no prefix).

  PEFT method params are skipped; they have their own export formats.
  """
  import flax.traverse_util as tu
  family_spec = family_named(family)
  state = {}
  for path, value in tu.flatten_dict(params).items():
    if peft.is_method_param(path):
      continue
    key, kind = family_spec.checkpoint_key(path)
    value = np.asarray(value, np.float32)
    leaf = path[-1]
    if kind == 'attn_in':
      value = value.reshape(value.shape[0], -1).T if leaf == 'kernel' else value.reshape(-1)
    elif kind == 'attn_out' and leaf == 'kernel':
      value = value.reshape(-1, value.shape[-1]).T
    elif kind in ('linear', 'attn_out') and leaf == 'kernel':
      value = value.T
    state[key] = np.ascontiguousarray(value)
  return state
