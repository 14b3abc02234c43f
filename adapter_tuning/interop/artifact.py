"""The per-task adapter artifact: the small thing users share and plug into a frozen base.

`adapter/config.json` records the adapter config, the head, label names, the task, the
trainable rules and the base checkpoint's identity (name + sha256 of its weights);
`adapter/weights.safetensors` holds the trainable subtree only ('/'-joined paths as keys).
Written to a temporary folder and renamed, so a crash never leaves half an artifact.
"""

from __future__ import annotations

import json
import pathlib
import shutil

import flax.traverse_util as tu
import numpy as np

from adapter_tuning.errors import UsageError

FORMAT_VERSION = 1


def save(directory: pathlib.Path, trainable_params: dict, meta: dict):
  from safetensors.numpy import save_file
  directory = pathlib.Path(directory)
  tmp = directory.with_name(directory.name + '.tmp')
  shutil.rmtree(tmp, ignore_errors=True)
  tmp.mkdir(parents=True)
  flat = {'/'.join(k): np.ascontiguousarray(np.asarray(v, np.float32))
          for k, v in tu.flatten_dict(trainable_params).items()}
  save_file(flat, str(tmp / 'weights.safetensors'))
  (tmp / 'config.json').write_text(json.dumps({'format_version': FORMAT_VERSION, **meta},
                                              indent=2, sort_keys=True))
  replace_dir(tmp, directory)


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
  """(meta, trainable params as a nested dict)."""
  from safetensors.numpy import load_file
  directory = pathlib.Path(directory)
  config_path, weights_path = directory / 'config.json', directory / 'weights.safetensors'
  if not config_path.exists() or not weights_path.exists():
    raise UsageError(f'{directory} is not an adapter artifact (needs config.json and '
                     'weights.safetensors); pass the adapter/ folder of a training run')
  meta = json.loads(config_path.read_text())
  flat = load_file(str(weights_path))
  return meta, tu.unflatten_dict({tuple(k.split('/')): v for k, v in flat.items()})


def check_base(meta: dict, identity: dict, where: str):
  """Refuses an artifact trained on another base: its hidden states would be meaningless."""
  recorded = meta.get('base', {})
  if recorded.get('sha256') != identity['sha256']:
    raise UsageError(f'adapter {where} was trained on base {recorded.get("name")!r} '
                     f'(sha256 {str(recorded.get("sha256"))[:12]}...) but the base given is '
                     f'{identity["name"]!r} (sha256 {identity["sha256"][:12]}...); load it onto '
                     'the base it was trained on')
