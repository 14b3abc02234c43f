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
import math
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


def read_tensors(directory: pathlib.Path, family: str, keys) -> dict[str, np.ndarray]:
  """The tensors among `keys` (names without the family's prefix) that the checkpoint holds:
  heads kept beside the encoder (the masked-LM head). Only they are read from safetensors
  files; a `.bin` checkpoint is read whole."""
  prefixes = family_named(family).key_prefixes + ('model.',)
  reader = SliceReader.open(pathlib.Path(directory), prefixes)
  if reader is None:
    state = _strip_prefix(load_state_dict(pathlib.Path(directory)), prefixes)
    return {k: np.asarray(state[k], np.float32) for k in keys if k in state}
  return {k: reader.read(k).astype(np.float32) for k in keys if k in reader.keys}


def checkpoint_key(path: tuple[str, ...], family: str) -> tuple[str, str]:
  """A Flax param path under the encoder -> (HF key, conversion kind), by the family's map."""
  return family_named(family).checkpoint_key(path)


def _convert(value: np.ndarray, kind: str, target_shape: tuple[int, ...], leaf: str):
  """One HF tensor -> one Flax param; 'KIND:i' takes the i-th third of its rows first (a
  fused projection such as ModernBERT's Wqkv loaded as query, key, value)."""
  kind, _, part = kind.partition(':')
  if part:
    value = np.split(value, 3, axis=0)[int(part)]
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
  state, thirds = {}, {}
  for path, value in tu.flatten_dict(params).items():
    if peft.is_method_param(path):
      continue
    key, kind = family_spec.checkpoint_key(path)
    kind, _, part = kind.partition(':')
    value = np.asarray(value, np.float32)
    leaf = path[-1]
    if kind == 'attn_in':
      value = value.reshape(value.shape[0], -1).T if leaf == 'kernel' else value.reshape(-1)
    elif kind == 'attn_out' and leaf == 'kernel':
      value = value.reshape(-1, value.shape[-1]).T
    elif kind in ('linear', 'attn_out') and leaf == 'kernel':
      value = value.T
    if part:  # a third of a fused tensor: joined below, in order
      thirds.setdefault(key, {})[int(part)] = value
    else:
      state[key] = np.ascontiguousarray(value)
  for key, parts in thirds.items():
    state[key] = np.ascontiguousarray(np.concatenate([parts[i] for i in sorted(parts)]))
  return state


class SliceReader:
  """Reads whole tensors or slices of them from a checkpoint's safetensors files, counting
  the bytes it reads (`bytes_read`), so a process can fetch only what its devices hold.

  Keys are looked up without the family's prefix, as `convert_encoder_params` does. A
  `pytorch_model.bin` checkpoint cannot be sliced (pickle): `open` returns None for it and
  the caller loads it whole.
  """

  def __init__(self, files: dict[str, pathlib.Path], keys: dict[str, str]):
    self._files = files  # checkpoint key -> file
    self.keys = keys  # key without prefix -> checkpoint key
    self._handles: dict[pathlib.Path, object] = {}
    self.bytes_read = 0

  @classmethod
  def open(cls, directory: pathlib.Path, prefixes: tuple[str, ...]) -> 'SliceReader | None':
    from safetensors import safe_open
    paths = weight_files(directory)
    if any(p.suffix == '.bin' for p in paths):
      return None
    files = {}
    for path in paths:
      if not path.exists():
        raise UsageError(f'weight shard {path} listed in the index is missing; re-download it')
      try:
        with safe_open(str(path), 'numpy') as f:
          files.update(dict.fromkeys(f.keys(), path))
      except Exception as e:  # pylint: disable=broad-except
        raise UsageError(f'cannot read {path} ({e}); the file is corrupt or not safetensors: '
                         're-download or re-save the checkpoint') from None
    stripped = _strip_prefix(dict.fromkeys(files), prefixes)  # same order, keys renamed
    return cls(files, dict(zip(stripped, files)))

  def _slice(self, key: str):
    from safetensors import safe_open
    path = self._files[self.keys[key]]
    if path not in self._handles:
      self._handles[path] = safe_open(str(path), 'numpy')
    return self._handles[path].get_slice(self.keys[key])

  def shape(self, key: str) -> tuple[int, ...]:
    return tuple(self._slice(key).get_shape())

  def read(self, key: str, index: tuple[slice, ...] | None = None) -> np.ndarray:
    """The tensor, or the part `index` (one slice per dimension) of it."""
    part = self._slice(key)
    value = np.asarray(part[index] if index is not None else part[:])
    self.bytes_read += value.nbytes
    return value


def _split_groups(view: tuple[int, ...], target: tuple[int, ...]):
  """The target dimensions each view dimension is reshaped into (view [N*H] -> target
  [N, H]: [[0, 1]]), or None when the reshape merges dimensions."""
  groups, t = [], 0
  for size in view:
    dims, product = [], 1
    while t < len(target) and (product < size or not dims):
      product *= target[t]
      dims.append(t)
      t += 1
    if product != size:
      return None
    groups.append(dims)
  return groups if t == len(target) else None


def read_converted(reader: SliceReader, key: str, kind: str, leaf: str,
                   target: tuple[int, ...], index: tuple[slice, ...]) -> np.ndarray:
  """`_convert(tensor, kind, target)[index]` in float32, reading from the file only the part
  of the tensor that `index` needs when one target dimension is cut and that dimension
  starts its group of the reshape (always so for the dimension `parallel.fsdp_spec`
  picks in a real base: the hidden, intermediate or vocabulary axis). Anything else reads
  the tensor whole and cuts it after converting."""
  source = reader.shape(key)
  if math.prod(source) != math.prod(target):
    raise ValueError
  transposed = leaf == 'kernel' and kind in ('linear', 'attn_in', 'attn_out')
  view = tuple(reversed(source)) if transposed else source
  bounds = [s.indices(n)[:2] for s, n in zip(index, target)]
  cut = [d for d, (lo, hi) in enumerate(bounds) if (lo, hi) != (0, target[d])]
  groups = _split_groups(view, target)
  group = None if len(cut) != 1 or groups is None else next(
      (g for g, dims in enumerate(groups) if dims[0] == cut[0]), None)
  if group is None:
    whole = _convert(reader.read(key), kind, target, leaf)
    return np.asarray(whole[tuple(slice(lo, hi) for lo, hi in bounds)], np.float32)
  d = cut[0]
  inner = math.prod(target[t] for t in groups[group][1:])
  lo, hi = bounds[d]
  source_dim = len(source) - 1 - group if transposed else group
  part = [slice(None)] * len(source)
  part[source_dim] = slice(lo * inner, hi * inner)
  value = reader.read(key, tuple(part))
  value = value.T if transposed else value
  shape = list(target)
  shape[d] = hi - lo
  return value.reshape(shape).astype(np.float32)


def load_encoder_sharded(directory: pathlib.Path, shapes, family: str, config: ModelConfig,
                         sharding_of) -> tuple[dict, list[str], SliceReader] | None:
  """The encoder's (non-PEFT) params born as sharded jax.Arrays: each process reads from the
  safetensors files only the slices its own devices hold (`jax.make_array_from_callback`),
  so no host materialises the whole base. None for a `.bin` checkpoint (not sliceable).

  Args:
    shapes: nested dict of ShapeDtypeStructs of the encoder params (from `eval_shape`).
    sharding_of: path tuple -> the jax Sharding that param is born with.

  Returns:
    (params, unused checkpoint tensors, the reader: `bytes_read` says how much was read).
  """
  import flax.traverse_util as tu
  import jax
  family_spec = family_named(family)
  reader = SliceReader.open(directory, family_spec.key_prefixes + ('model.',))
  if reader is None:
    return None
  params, used = {}, set()
  for path, spec in tu.flatten_dict(shapes).items():
    if peft.is_method_param(path):
      continue
    key, kind = family_spec.checkpoint_key(path)
    sharding = sharding_of(path)
    if key not in reader.keys:
      computed = None if path[0] == 'pooler' else family_spec.missing_tensor(path, config)
      if path[0] == 'pooler' and computed is None:
        continue  # checkpoints saved without a pooler: the caller keeps its fresh init
      if computed is None:
        raise UsageError(f'checkpoint {directory} lacks tensor {key!r} needed for '
                         f'{"/".join(path)}; is it a {family} encoder checkpoint?')
      value = np.asarray(computed, np.float32).reshape(spec.shape)
      params[path] = jax.make_array_from_callback(spec.shape, sharding, lambda i, v=value: v[i])
      continue
    cache = {}  # a shard several devices hold (data x fsdp) is read once

    def read(index, key=key, kind=kind, leaf=path[-1], target=tuple(spec.shape), cache=cache):
      bounds = tuple(s.indices(n)[:2] for s, n in zip(index, target))
      if bounds not in cache:
        cache[bounds] = read_converted(reader, key, kind, leaf, target, index)
      return cache[bounds]

    try:
      params[path] = jax.make_array_from_callback(spec.shape, sharding, read)
    except ValueError:
      raise UsageError(f'tensor {key!r} in {directory} has shape {reader.shape(key)} but '
                       f'config.json implies {spec.shape} for {"/".join(path)}; the weights '
                       'and config.json do not match') from None
    used.add(reader.keys[key])
  unused = sorted(k for k in reader.keys.values()
                  if k not in used and not k.endswith('position_ids'))
  return tu.unflatten_dict(params), unused, reader
