"""python -m adapter_tuning.export: share adapters with AdapterHub (`adapters` 1.3), both ways.

Export an artifact (the adapter/ folder of a training run) as an AdapterHub adapter + head:

  python -m adapter_tuning.export --adapter runs/sst2/adapter --format adapterhub \\
      --output sst2_ah [--name sst2] [--base BASE_DIR] [--overwrite]

OUT then holds what `model.save_adapter(OUT, name, with_head=True)` writes --
adapter_config.json, pytorch_adapter.bin, head_config.json, pytorch_model_head.bin (plus
adapter.safetensors / model_head.safetensors for `use_safetensors=True`) -- and, when the
artifact trained LayerNorms (the `adapters` preset does), layer_norms.safetensors with one
documented extra step, spelled out in OUT/README.md:

  model = adapters.AutoAdapterModel.from_pretrained(BASE)
  model.set_active_adapters(model.load_adapter(OUT))
  model.base_model.load_state_dict(safetensors.torch.load_file(OUT + '/layer_norms.safetensors'),
                                   strict=False)

AdapterHub adapters cannot carry the base LayerNorms (see adapterhub.py), hence the file.

Every PEFT method exports except BitFit: bottleneck adapters (DoubleSeqBnConfig, SeqBnConfig,
ParBnConfig), LoRA (LoRAConfig), IA³ (IA3Config), prefix tuning (PrefixTuningConfig), and a
combination of them as one ConfigUnion (MAM); an AdapterFusion as `Fuse` over its adapters
(interop/adapterhub_fusion.py) and a stack as `Stack(below, top)` (interop/adapterhub_stack.py),
each a folder of AdapterHub adapters plus a README with the loading snippet, imported back
the same way. Import an AdapterHub adapter of those configs,
saved with its head, as an artifact that `adapter_tuning.predict` serves:

  python -m adapter_tuning.export --adapter AH_DIR --format adapterhub --to_artifact \\
      --base BASE_DIR --output OUT_ARTIFACT [--name TASK] [--max_seq_length N]

Export an artifact whose methods only change weights (LoRA, IA³, BitFit, LayerNorms, the
head) as a plain Hugging Face checkpoint, the methods merged into the base's tensors:

  python -m adapter_tuning.export --adapter runs/sst2/adapter --format hf_merged --output OUT

OUT loads with `transformers.AutoModelForSequenceClassification.from_pretrained(OUT)` alone.

Export an artifact with its base and head as one inference graph (interop/serving_export.py;
LoRA and IA³ merged into the base weights first, bottleneck adapters and prefixes kept as
computation; checked against the artifact's own logits before anything is written):

  python -m adapter_tuning.export --adapter runs/sst2/adapter --format onnx --output model.onnx
  python -m adapter_tuning.export --adapter runs/sst2/adapter --format stablehlo --output OUT

model.onnx takes input_ids, attention_mask, token_type_ids (int32, dynamic batch and sequence)
and returns logits; OUT holds jax.export StableHLO, weights.npz and stablehlo_loader.py, which
runs it with jax + numpy alone.

Flags may be spelled with dashes too (--to-artifact). Anything the other side cannot
compute exactly is refused with a one-line reason (exit 2): a base that is not BERT/RoBERTa,
an adapter placement or option the other side lacks (e.g. original_ln_before=True with
residual_before_ln=False), params trained outside adapters/LayerNorms/head/pooler, an
existing --output without --overwrite.
"""

from __future__ import annotations

import json
import pathlib
import re
import sys

import numpy as np
from absl import flags

# Own FlagValues: predict.py defines flags of the same names on the global FLAGS.
FLAGS = flags.FlagValues()
flags.DEFINE_string('adapter', None, 'Artifact folder (export) or AdapterHub adapter folder '
                    '(with --to_artifact).', flag_values=FLAGS)
flags.DEFINE_enum('format', None, ['adapterhub', 'hf_merged', 'onnx', 'stablehlo'],
                  'adapterhub: AdapterHub adapter folder (both ways); hf_merged: a plain Hugging '
                  'Face *ForSequenceClassification checkpoint with LoRA/IA³/BitFit merged in; '
                  'onnx: one .onnx file (base + adapter + head); stablehlo: a jax.export folder '
                  'with a jax + numpy loader.', flag_values=FLAGS)
flags.DEFINE_string('output', None, 'Folder (onnx: file) to write (must not exist unless '
                    '--overwrite).',
                    flag_values=FLAGS)
flags.DEFINE_bool('to_artifact', False, 'Import --adapter (AdapterHub) into an artifact.',
                  flag_values=FLAGS)
flags.DEFINE_string('base', None, 'Base checkpoint; export: default = the one the artifact '
                    'records; import: required.', flag_values=FLAGS)
flags.DEFINE_string('name', None, 'Export: the AdapterHub adapter/head name (default: the task, '
                    'e.g. glue_sst2). Import: the artifact task name (default: the task our export '
                    'recorded, else the AdapterHub adapter name).', flag_values=FLAGS)
flags.DEFINE_integer('max_seq_length', 0, 'Import: max_seq_length recorded in the artifact '
                     '(0 = what our export recorded, else 128 or the base maximum if smaller).', flag_values=FLAGS)
flags.DEFINE_bool('overwrite', False, 'Replace --output if it exists.', flag_values=FLAGS)
flags.DEFINE_bool('verbose', False, 'Show tracebacks for errors.', flag_values=FLAGS)


def _base_dir(path_or_name: str, hint: str) -> pathlib.Path:
  from adapter_tuning.errors import UsageError
  from adapter_tuning.interop import hf_checkpoint
  try:
    return hf_checkpoint.resolve_checkpoint(path_or_name)
  except UsageError as e:
    raise UsageError(f'{e}; {hint}') from None


def _weight_keys(directory: pathlib.Path) -> set:
  from adapter_tuning.interop import hf_checkpoint
  keys = set()
  for f in hf_checkpoint.weight_files(directory):
    if f.suffix == '.safetensors':
      from safetensors import safe_open
      with safe_open(str(f), 'np') as fh:
        keys.update(fh.keys())
    else:
      keys.update(hf_checkpoint.load_state_dict(directory))
  return keys


def _check_output(out: pathlib.Path, overwrite: bool):
  from adapter_tuning.errors import UsageError
  if out.exists() and not overwrite:
    raise UsageError(f'--output {out} exists; pass --overwrite to replace it or choose another')


def write_adapterhub(files, out: pathlib.Path):
  """Writes AdapterHubFiles the way save_adapter does (.bin when torch is available).

  All into a temporary folder that replaces `out` only once complete; a full disk is one
  line naming `out`, and an `out` that was there stays as it was."""
  from adapter_tuning.interop.artifact import write_folder
  return write_folder(out, lambda tmp: _write_adapterhub_files(files, tmp))


def write_config_and_weights(folder: pathlib.Path, config_name: str, weight_names: tuple,
                             config: dict, state: dict) -> bool:
  """One AdapterHub config + its weights, as its save_* methods write them: safetensors
  (weight_names[0]) and, when torch is available, the .bin (weight_names[1]); True if both."""
  from safetensors.numpy import save_file
  try:
    import torch
  except ImportError:
    torch = None
  (folder / config_name).write_text(json.dumps(config, indent=2, sort_keys=True))
  state = {k: np.ascontiguousarray(v, np.float32) for k, v in state.items()}
  save_file(state, str(folder / weight_names[0]))
  if torch is not None:
    torch.save({k: torch.from_numpy(v.copy()) for k, v in state.items()}, folder / weight_names[1])
  return torch is not None


def _write_adapterhub_files(files, tmp: pathlib.Path) -> bool:
  from safetensors.numpy import save_file

  from adapter_tuning.interop import adapterhub as ah
  wrote_bin = True
  for config_name, weight_names, config, state in (
      (ah.ADAPTER_CONFIG, ah.ADAPTER_WEIGHTS, files.adapter_config, files.adapter_state),
      (ah.HEAD_CONFIG, ah.HEAD_WEIGHTS, files.head_config, files.head_state)):
    wrote_bin = write_config_and_weights(tmp, config_name, weight_names, config, state)
  if files.layer_norm_state:
    save_file({k: np.ascontiguousarray(v, np.float32) for k, v in files.layer_norm_state.items()},
              str(tmp / ah.LAYER_NORMS))
  (tmp / 'README.md').write_text(ah.readme(files))
  return wrote_bin


def read_weights(directory: pathlib.Path, names: tuple, fix: str):
  """The first of `names` in `directory` as {key: array} (checked), or None if none is there."""
  from adapter_tuning import fileio
  from adapter_tuning.interop import hf_checkpoint
  for n in names:
    path = directory / n
    if path.exists():
      if path.suffix == '.safetensors':
        return fileio.read_tensors(path, fix)
      return fileio.check_values(path, hf_checkpoint._load_torch_bin(path), fix)  # pylint: disable=protected-access
  return None


def read_adapterhub(directory: pathlib.Path):
  """AdapterHubFiles from a folder written by save_adapter (safetensors preferred)."""
  from adapter_tuning import fileio
  from adapter_tuning.interop import adapterhub as ah

  fix = 'save the adapter again with model.save_adapter (and save_head), or re-copy the folder'
  load = lambda names: read_weights(directory, names, fix)

  def config(name):
    path = directory / name
    return fileio.read_json(path, fix) if path.exists() else None

  if not directory.is_dir():
    raise fileio.file_error(directory, 'no such folder' if not directory.exists() else
                            'a file, not a folder', 'pass the folder model.save_adapter wrote')
  adapter_config, adapter_state = config(ah.ADAPTER_CONFIG), load(ah.ADAPTER_WEIGHTS)
  if adapter_config is None or adapter_state is None:
    raise fileio.file_error(directory, f'is not an AdapterHub adapter: it needs {ah.ADAPTER_CONFIG} '
                            f'and {" or ".join(ah.ADAPTER_WEIGHTS)}',
                            'pass the folder model.save_adapter wrote')
  ln = load((ah.LAYER_NORMS,))
  return ah.AdapterHubFiles(adapter_config, adapter_state, config(ah.HEAD_CONFIG),
                            load(ah.HEAD_WEIGHTS), ln)


def _load_artifact(artifact_dir: pathlib.Path, base: str | None):
  """(meta, params, base folder, base config): the artifact checked against its base."""
  from adapter_tuning.interop import artifact, hf_checkpoint
  meta, params = artifact.load(artifact_dir)
  base_dir = _base_dir(artifact.base_path(artifact_dir, meta, base),
                       'pass --base with the checkpoint the adapter was trained on')
  config = hf_checkpoint.read_model_config(base_dir)
  artifact.check_base(meta, hf_checkpoint.checkpoint_identity(base_dir), str(artifact_dir))
  artifact.check_weights(artifact_dir, meta, params, config)
  return meta, params, base_dir, config


def export_artifact(artifact_dir: pathlib.Path, out: pathlib.Path, name: str | None = None,
                    base: str | None = None, overwrite: bool = False) -> str:
  """Artifact -> AdapterHub folder; returns a one-paragraph summary."""
  from adapter_tuning.interop import adapterhub as ah
  _check_output(out, overwrite)
  meta, params, base_dir, config = _load_artifact(artifact_dir, base)
  from adapter_tuning.interop import adapterhub_fusion, adapterhub_stack
  if adapterhub_fusion.fusion_of(meta) is not None:  # OUT/adapters/*, fusion/, head/
    return _export_fusion(meta, params, base_dir, config, out)
  if adapterhub_stack.stack_of(meta) is not None:  # OUT/adapters/{below,top}, stack.json
    return _export_stack(meta, params, base_dir, config, out, name)
  name = name or re.sub(r'[^A-Za-z0-9_\-]', '_', str(meta.get('task') or 'adapter'))
  files = ah.to_adapterhub(params, meta, config, name, base_dir.name)
  head_config = files.head_config['config']
  _check_pooler(head_config, base_dir)
  wrote_bin = write_adapterhub(files, out)
  parts = [f'wrote AdapterHub adapter {name!r} + {head_config["head_type"]} head to {out}']
  if not wrote_bin:
    parts.append('torch is not installed, so only safetensors: load with use_safetensors=True')
  if files.layer_norm_state:
    parts.append(f'trained LayerNorms are in {ah.LAYER_NORMS}: load them with '
                 'model.base_model.load_state_dict(..., strict=False), see README.md')
  return '; '.join(parts)


def _check_pooler(head_config: dict, base_dir: pathlib.Path):
  from adapter_tuning.errors import UsageError
  if head_config.get('use_pooler') and 'pooler.dense.weight' not in {
      re.sub(r'^(bert|roberta)\.', '', k) for k in _weight_keys(base_dir)}:
    raise UsageError(f'base {base_dir} has no pooler weights: AdapterHub would initialise the '
                     'pooler its head reads at random; use a base saved with its pooler')


def _export_stack(meta, params, base_dir, config, out: pathlib.Path, name: str | None) -> str:
  """A stack artifact -> the adapters below and on top + `Stack` (interop/adapterhub_stack)."""
  from adapter_tuning.interop import adapterhub_stack
  files = adapterhub_stack.to_adapterhub(params, meta, config, base_dir.name, name)
  _check_pooler(files.task_files.head_config['config'], base_dir)
  wrote_bin = adapterhub_stack.write(files, out)
  return (f'wrote AdapterHub Stack({files.below!r}, {files.task!r}) to {out}'
          f'{"" if wrote_bin else " (safetensors only: torch is not installed)"}; see README.md')


def _export_fusion(meta, params, base_dir, config, out: pathlib.Path) -> str:
  """A fusion artifact -> AdapterHub's fusion layout (interop/adapterhub_fusion)."""
  from adapter_tuning.interop import adapterhub_fusion
  files = adapterhub_fusion.to_adapterhub(params, meta, config, base_dir.name)
  if not adapterhub_fusion.write(files, out):
    return (f'wrote AdapterHub fusion of {", ".join(files.adapters)} to {out} (safetensors '
            'only: torch is not installed; load with use_safetensors=True); see README.md')
  return f'wrote AdapterHub fusion of {", ".join(files.adapters)} to {out}; see README.md'


def export_merged(artifact_dir: pathlib.Path, out: pathlib.Path, base: str | None = None,
                  overwrite: bool = False) -> str:
  """Artifact -> plain Hugging Face checkpoint with the methods merged (interop/hf_merged)."""
  from adapter_tuning.interop import hf_merged
  _check_output(out, overwrite)
  meta, params, base_dir, _ = _load_artifact(artifact_dir, base)
  hf_config, state = hf_merged.build(meta, params, base_dir)
  hf_merged.write(out, hf_config, state, base_dir)
  return (f'wrote {hf_config["architectures"][0]} to {out}: load it with '
          f'transformers.AutoModelForSequenceClassification.from_pretrained({str(out)!r})')


def export_serving(artifact_dir: pathlib.Path, out: pathlib.Path, fmt: str,
                   base: str | None = None, overwrite: bool = False) -> str:
  """Artifact -> ONNX file or StableHLO folder (interop/serving_export)."""
  from adapter_tuning.interop import serving_export
  _check_output(out, overwrite)
  serving_export.check_output_kind(fmt, out)
  meta, params, base_dir, _ = _load_artifact(artifact_dir, base)
  return serving_export.export(fmt, meta, params, base_dir, out)


def import_adapterhub(ah_dir: pathlib.Path, base: str, out: pathlib.Path,
                      name: str | None = None, max_seq_length: int = 0,
                      overwrite: bool = False) -> str:
  """AdapterHub folder -> artifact on `base`; returns a one-line summary."""
  from adapter_tuning import peft
  from adapter_tuning.errors import UsageError
  from adapter_tuning.interop import adapterhub as ah
  from adapter_tuning.interop import artifact, hf_checkpoint
  if not base:
    raise UsageError('--to_artifact needs --base: the checkpoint the AdapterHub adapter was '
                     'trained on')
  _check_output(out, overwrite)
  base_dir = _base_dir(base, 'pass --base with a local Hugging Face checkpoint directory')
  from adapter_tuning.interop import adapterhub_fusion, adapterhub_stack
  if adapterhub_fusion.is_layout(ah_dir):  # adapters/*, fusion/, head/: a fusion + its adapters
    return adapterhub_fusion.import_layout(ah_dir, base_dir, out, name, max_seq_length)
  if adapterhub_stack.is_layout(ah_dir):  # adapters/{below,top}, stack.json
    return adapterhub_stack.import_layout(ah_dir, base_dir, out, name, max_seq_length)
  config = hf_checkpoint.read_model_config(base_dir)
  files = read_adapterhub(ah_dir)
  imported = ah.from_adapterhub(files, config)
  identity = hf_checkpoint.checkpoint_identity(base_dir)
  recorded = (imported.origin.get('base') or {}).get('sha256')
  if recorded and recorded != identity['sha256']:
    raise UsageError(f'{ah_dir} was exported from an adapter trained on base '
                     f'{imported.origin["base"].get("name")!r} (sha256 {recorded[:12]}...), not '
                     f'{base_dir} (sha256 {identity["sha256"][:12]}...); pass that base')
  max_seq_length = (max_seq_length or imported.origin.get('max_seq_length')
                    or min(128, config.max_seq_length))
  if max_seq_length > config.max_seq_length:
    raise UsageError(f'--max_seq_length {max_seq_length} exceeds the base maximum '
                     f'{config.max_seq_length}')
  meta = {
      'task': name or imported.origin.get('task') or imported.name, 'head': imported.head,
      'label_names': imported.label_names, 'num_outputs': imported.num_outputs,
      'pooling': imported.pooling,
      'peft': peft.to_meta(imported.method),
      'adapter': peft.to_meta(imported.method).get('bottleneck'),  # as before methods combined
      'trainable_rules': imported.trainable_rules,
      'base': {**identity, 'path': str(base_dir)},
      'max_seq_length': max_seq_length,
      'source': {'format': 'adapterhub', 'path': str(ah_dir),
                 'version': files.adapter_config.get('version'),
                 'model_name': files.adapter_config.get('model_name')},
  }
  out.parent.mkdir(parents=True, exist_ok=True)
  artifact.save(out, imported.params, meta)
  return (f'wrote artifact {out}: {peft.describe(imported.method)} and a {imported.head} head '
          f'from AdapterHub adapter {imported.name!r}')


def _run():
  from adapter_tuning.errors import UsageError
  missing = [f for f in ('adapter', 'format', 'output') if not FLAGS[f].value]
  if missing:
    raise UsageError(f'{", ".join("--" + m for m in missing)} required; see the module doc '
                     '(python -m adapter_tuning.export --help)')
  adapter, out = pathlib.Path(FLAGS.adapter), pathlib.Path(FLAGS.output)
  if not adapter.exists():
    raise UsageError(f'--adapter {adapter} does not exist')
  if FLAGS.format in ('onnx', 'stablehlo'):
    if FLAGS.to_artifact:
      raise UsageError(f'--to_artifact imports AdapterHub adapters; --format {FLAGS.format} '
                       'only exports an artifact')
    print(export_serving(adapter, out, FLAGS.format, FLAGS.base, FLAGS.overwrite))
  elif FLAGS.format == 'hf_merged':
    print(export_merged(adapter, out, FLAGS.base, FLAGS.overwrite))
  elif FLAGS.to_artifact:
    print(import_adapterhub(adapter, FLAGS.base, out, FLAGS.name, FLAGS.max_seq_length,
                            FLAGS.overwrite))
  else:
    print(export_artifact(adapter, out, FLAGS.name, FLAGS.base, FLAGS.overwrite))


def _normalise(arg: str) -> str:
  """--to-artifact -> --to_artifact (flag names only, never values)."""
  if not arg.startswith('--'):
    return arg
  name, eq, value = arg[2:].partition('=')
  return '--' + name.replace('-', '_') + eq + value


def main(argv=None) -> int:
  argv = list(sys.argv if argv is None else argv)
  argv = argv[:1] + [_normalise(a) for a in argv[1:]]
  if any(a in ('--help', '-h', '--helpfull') for a in argv[1:]):
    print(__doc__ + '\n' + FLAGS.get_help())
    return 0
  FLAGS.unparse_flags()  # in-process callers (tests) start from the defaults each time
  from adapter_tuning.cli import flags_main
  return flags_main(FLAGS, _run, argv)


if __name__ == '__main__':
  sys.exit(main())
