"""The per-task adapter artifact: the small thing users share and plug into a frozen base.

`adapter/config.json` records the PEFT method and its config, the head, label names, the
task, the trainable rules and the base checkpoint's identity (name + sha256 of its
weights); `adapter/weights.safetensors` holds the trainable subtree only ('/'-joined paths
as keys). Written to a temporary folder and renamed, so a crash or a full disk never
leaves half an artifact. Read back only through `load` (the file checks) and
`check_weights` (the tensors against the model the config describes): a damaged artifact
is a one-line error naming the file, never a silent stand-in for a missing weight.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import shutil

import flax.traverse_util as tu
import numpy as np

from adapter_tuning import fileio
from adapter_tuning.errors import UsageError

FORMAT_VERSION = 1
REQUIRED_KEYS = ('format_version', 'task', 'head', 'num_outputs', 'label_names', 'base',
                 'trainable_rules')
FIX = 're-copy the adapter/ folder from its training run (or rerun that run to write it again)'


def save(directory: pathlib.Path, trainable_params: dict, meta: dict):
  from safetensors.numpy import save as save_bytes
  directory = pathlib.Path(directory)
  tmp = directory.with_name(directory.name + '.tmp')
  flat = {'/'.join(k): np.ascontiguousarray(np.asarray(v, np.float32))
          for k, v in tu.flatten_dict(trainable_params).items()}
  weights = save_bytes(flat)
  config = json.dumps({'format_version': FORMAT_VERSION, **meta}, indent=2, sort_keys=True)
  try:
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    fileio.write_file(tmp / 'weights.safetensors', weights)
    fileio.write_file(tmp / 'config.json', config)
    replace_dir(tmp, directory)
  except OSError as e:
    raise fileio.disk_failure(e, directory, len(weights) + len(config)) from None
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def write_folder(out: pathlib.Path, fill):
  """Builds a folder with `fill(tmp)` in a temporary sibling, which replaces `out` only once
  complete (`replace_dir`): a full disk is one line naming `out`, and an `out` that was
  there stays as it was. Returns what `fill` returns."""
  out = pathlib.Path(out)
  tmp = out.with_name(out.name + '.tmp')
  try:
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    result = fill(tmp)
    replace_dir(tmp, out)
  except OSError as e:
    raise fileio.disk_failure(e, out) from None
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return result


def replace_dir(tmp: pathlib.Path, directory: pathlib.Path):
  """Puts a fully written folder in place; the old one goes only once the new one is there."""
  if directory.exists():
    old = directory.with_name(directory.name + '.old')
    shutil.rmtree(old, ignore_errors=True)
    directory.rename(old)
    tmp.rename(directory)
    shutil.rmtree(old)
  else:
    tmp.rename(directory)


def load(directory: pathlib.Path) -> tuple[dict, dict]:
  """(meta, trainable params as a nested dict), every file checked (module docstring)."""
  directory = pathlib.Path(directory)
  if not directory.is_dir():
    raise fileio.file_error(directory, 'no such folder' if not directory.exists() else
                            'a file, not an adapter folder',
                            'pass the adapter/ folder of a training run')
  if not any(directory.iterdir()):
    raise fileio.file_error(directory, 'an empty folder', 'pass the adapter/ folder of a '
                            'training run (it holds config.json and weights.safetensors)')
  absent = [n for n in ('config.json', 'weights.safetensors') if not (directory / n).exists()]
  if absent:
    raise fileio.file_error(directory, f'is not an adapter artifact (no {" or ".join(absent)})',
                            'pass the adapter/ folder of a training run')
  meta = fileio.read_json(directory / 'config.json', FIX, REQUIRED_KEYS)
  version = meta['format_version']
  if not isinstance(version, int) or version > FORMAT_VERSION:
    raise fileio.file_error(directory / 'config.json', f'format_version {version!r} is newer '
                            f'than this adapter_tuning reads ({FORMAT_VERSION})',
                            'upgrade adapter_tuning to load it')
  from adapter_tuning.models.heads import head_kind
  try:
    head_kind(meta['head'])
  except UsageError as e:
    raise fileio.file_error(directory / 'config.json', str(e), FIX) from None
  flat = fileio.read_tensors(directory / 'weights.safetensors', FIX)
  return meta, tu.unflatten_dict({tuple(k.split('/')): v for k, v in flat.items()})


def content_hash(directory: pathlib.Path) -> str:
  """sha256 over both files of an artifact: how a fusion artifact names the adapters it fuses,
  so that one changed or swapped afterwards is refused rather than silently fused."""
  digest = hashlib.sha256()
  for name in ('config.json', 'weights.safetensors'):
    data = (pathlib.Path(directory) / name).read_bytes()
    digest.update(f'{name}:{len(data)}:'.encode())
    digest.update(data)
  return digest.hexdigest()


def expected_shapes(meta: dict, model_config) -> dict[str, tuple]:
  """{'/'-joined path: shape} of what the artifact's run trained, rebuilt from its meta:
  the task model it describes (method, head, outputs, pooling) under its trainable rules."""
  import jax

  from adapter_tuning import peft
  from adapter_tuning.models.heads import TaskModel
  from adapter_tuning.training import trainable
  model = TaskModel(model_config, peft.config_from_meta(meta), meta['head'],
                    meta['num_outputs'], pooling=meta.get('pooling', 'pooler'))
  ids = jax.ShapeDtypeStruct((1, 8), np.int32)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), ids, ids, ids)['params']
  rules = tuple(tuple(r) for r in meta['trainable_rules'])
  flat = {trainable.path_str(k): tuple(v.shape) for k, v in tu.flatten_dict(shapes).items()}
  return {k: shape for k, shape in flat.items() if trainable.decide(rules, k)}


def check_weights(directory: pathlib.Path, meta: dict, params: dict, model_config):
  """The artifact's tensors are exactly what its config says its run trained on this base."""
  flat = {'/'.join(k): v for k, v in tu.flatten_dict(params).items()}
  fileio.check_tensors(pathlib.Path(directory) / 'weights.safetensors', flat,
                       expected_shapes(meta, model_config), FIX)


def base_path(directory: pathlib.Path, meta: dict, given: str | None) -> str:
  """The base to load: `given` (--base), else the recorded path, which must still exist."""
  if given:
    return given
  recorded = (meta.get('base') or {}).get('path')
  if not recorded:
    raise fileio.file_error(pathlib.Path(directory) / 'config.json', 'records no base path',
                            'pass --base with the checkpoint it was trained on')
  if not pathlib.Path(recorded).exists():
    raise fileio.file_error(pathlib.Path(directory) / 'config.json',
                            f'its base {recorded} is gone (moved or deleted)',
                            'pass --base with the checkpoint it was trained on')
  return recorded


def check_base(meta: dict, identity: dict, where: str):
  """Refuses an artifact trained on another base: its hidden states would be meaningless."""
  recorded = meta.get('base', {})
  if recorded.get('sha256') != identity['sha256']:
    raise UsageError(f'adapter {where} was trained on base {recorded.get("name")!r} '
                     f'(sha256 {str(recorded.get("sha256"))[:12]}...) but the base given is '
                     f'{identity["name"]!r} (sha256 {identity["sha256"][:12]}...); load it onto '
                     'the base it was trained on')
