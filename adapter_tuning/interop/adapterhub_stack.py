"""Stack artifacts <-> AdapterHub's (`adapters` 1.3) `Stack(below, task)`, both ways.

An export of a stack artifact (peft/stack.py) is one folder OUT:

  OUT/adapters/<below>/  the frozen adapter below, as `model.load_adapter` reads it (the
                         bottleneck export of interop/adapterhub.py, with its own task's
                         head; loaded with_head=False), without its LayerNorms
  OUT/adapters/<task>/   the adapter trained on top, with the stack's head (and, when the
                         stack run trained LayerNorms, its layer_norms.safetensors)
  OUT/stack.json         the composition, bottom to top, and where it came from
  OUT/README.md          the loading snippet: `model.active_adapters = Stack(below, task)`

Facts about AdapterHub 1.3.0 behind it, checked against its source
(`methods/adapter_layer_base.py` `compose_stack`, `methods/bottleneck.py` `pre_block`,
`compose_single`, `bottleneck_layer_forward`; `methods/modeling.py` `Adapter.pre_forward`,
`post_forward`): in a bottleneck layer a `Stack` runs its adapters in order, each taking
the previous one's output as its residual and its input (through the base LayerNorm with
the sub-layer input, LN(x + it), when original_ln_before), skips an adapter the layer lacks,
and the last one's `post_forward` applies LN(x + .): what peft/stack.py computes. An
import builds the same pair of artifacts back: the adapter below under
OUT_ARTIFACT/below/<below>/, the stack artifact at OUT_ARTIFACT referencing it by path and
content hash.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import shutil

from adapter_tuning import peft
from adapter_tuning.errors import UsageError
from adapter_tuning.interop import adapterhub as ah
from adapter_tuning.interop import artifact
from adapter_tuning.peft import references, stack
from adapter_tuning.peft.bottleneck import AdapterConfig

STACK_FILE = 'stack.json'
ADAPTERS_DIR = 'adapters'
BELOW_DIR = 'below'  # an import's adapter below, under the stack artifact

README_TEXT = """\
# AdapterHub export of an adapter_tuning adapter stack

Load onto the same base checkpoint with `adapters` (AdapterHub) 1.3:

    import adapters
    from adapters.composition import Stack
    model = adapters.AutoAdapterModel.from_pretrained(BASE)
    model.load_adapter(f'{{THIS_DIR}}/adapters/{below}', with_head=False)
    model.load_adapter(f'{{THIS_DIR}}/adapters/{task}')  # the top adapter + the stack's head
    model.active_adapters = Stack({below!r}, {task!r})
    model.active_head = {task!r}
{ln_step}
adapters/{below} was trained first and frozen (its folder also holds its own task's head);
adapters/{task} was trained on top of it. Each adapter reads the output of the one below at
every sub-layer where both sit.
"""

TASK_README = """\
# {task}: the top adapter of a stack

Trained on top of ../{below} (frozen): alone it does not compute what it was trained for.
Load both as ../../README.md says, with `Stack({below!r}, {task!r})`.
"""


@dataclasses.dataclass
class StackFiles:
  """The contents of an exported stack folder."""

  below: str  # the adapter names, bottom to top
  task: str
  below_files: ah.AdapterHubFiles
  task_files: ah.AdapterHubFiles
  manifest: dict
  readme: str


def stack_of(meta: dict) -> stack.StackConfig | None:
  """The artifact's stack config, or None when it is not a stack artifact."""
  found = [p for p in peft.parts(peft.config_from_meta(meta)) if isinstance(p, stack.StackConfig)]
  return found[0] if found else None


def is_layout(directory: pathlib.Path) -> bool:
  return (pathlib.Path(directory) / STACK_FILE).is_file()


# ----------------------------------------------------------------------------- export


def to_adapterhub(params: dict, meta: dict, config, base_name: str,
                  name: str | None = None) -> StackFiles:
  """A stack artifact (meta, trained params) + the artifact below it -> StackFiles."""
  below = stack_of(meta).below[0]
  top = [p for p in peft.parts(peft.config_from_meta(meta)) if not isinstance(p, stack.StackConfig)]
  if len(top) != 1 or not isinstance(top[0], AdapterConfig):
    raise UsageError(f'the stack trains {peft.describe(peft.combine(top))} on top; AdapterHub '
                     'export of a stack takes one bottleneck adapter on top')
  task = name or references.unique_name(str(meta.get('task') or 'task'), {below.name})
  if task == below.name:
    raise UsageError(f'--name {task!r} is the name of the adapter below; choose another')
  task_files = ah.to_adapterhub(params, {**meta, 'peft': peft.to_meta(top[0])}, config, task,
                                base_name)
  below_files = ah.referenced_files(below, stack.BORROWER, config, base_name)
  manifest = {'stack': [below.name, task], 'head': task, 'version': ah.ADAPTERHUB_VERSION,
              'adapter_tuning': {'task': meta.get('task'),
                                 'below': {'task': below.name, 'sha256': below.sha256}}}
  ln_step = ''
  if task_files.layer_norm_state:
    ln_step = ah.LN_STEP.replace('{THIS_DIR}/layer_norms', f'{{THIS_DIR}}/{ADAPTERS_DIR}/{task}/'
                                 'layer_norms')
  readme = README_TEXT.format(below=below.name, task=task, ln_step=ln_step)
  return StackFiles(below.name, task, below_files, task_files, manifest, readme)


def write(files: StackFiles, out: pathlib.Path) -> bool:
  """The whole folder, put in place once complete (`artifact.write_folder`); True when the
  torch .bin files were written too."""
  from adapter_tuning import export

  def fill(tmp):
    (tmp / ADAPTERS_DIR).mkdir()
    export.write_adapterhub(files.below_files, tmp / ADAPTERS_DIR / files.below)
    wrote_bin = export.write_adapterhub(files.task_files, tmp / ADAPTERS_DIR / files.task)
    (tmp / ADAPTERS_DIR / files.task / 'README.md').write_text(
        TASK_README.format(below=files.below, task=files.task))
    (tmp / STACK_FILE).write_text(json.dumps(files.manifest, indent=2, sort_keys=True))
    (tmp / 'README.md').write_text(files.readme)
    return wrote_bin
  return artifact.write_folder(out, fill)


# ----------------------------------------------------------------------------- import


def _names(ah_dir: pathlib.Path) -> tuple[str, str]:
  from adapter_tuning import fileio
  fix = 'export the stack again (python -m adapter_tuning.export --format adapterhub)'
  names = fileio.read_json(ah_dir / STACK_FILE, fix).get('stack')
  if not (isinstance(names, list) and len(names) == 2 and all(isinstance(n, str) for n in names)):
    raise fileio.file_error(ah_dir / STACK_FILE, f'"stack" is {names!r}, not two adapter names '
                            '(below, top)', fix)
  missing = [n for n in names if not (ah_dir / ADAPTERS_DIR / n).is_dir()]
  if missing:
    raise fileio.file_error(ah_dir / ADAPTERS_DIR, f'lacks the adapter folder(s) {missing}', fix)
  return names[0], names[1]


def import_layout(ah_dir: pathlib.Path, base_dir: pathlib.Path, out: pathlib.Path,
                  name: str | None = None, max_seq_length: int = 0) -> str:
  """An exported stack folder -> a stack artifact at `out` whose adapter below is imported
  as an artifact of its own under out/below/<name>/ (referenced by path and hash)."""
  from adapter_tuning import export
  ah_dir = pathlib.Path(ah_dir)
  below_name, task_name = _names(ah_dir)
  staged = out.with_name(out.name + '.stack.tmp')
  shutil.rmtree(staged, ignore_errors=True)
  try:
    ref = ah.import_referenced(ah_dir / ADAPTERS_DIR / below_name, base_dir,
                               staged / BELOW_DIR / below_name, out / BELOW_DIR / below_name,
                               stack.REFUSAL)
    export.import_adapterhub(ah_dir / ADAPTERS_DIR / task_name, str(base_dir), staged / 'top',
                             name, max_seq_length)
    meta, params = artifact.load(staged / 'top')
    top = peft.config_from_meta(meta)
    if not isinstance(top, AdapterConfig) or top.parallel:
      raise UsageError(f'adapter {task_name!r} is {peft.describe(top)}; a stack trains one '
                       'sequential bottleneck adapter (houlsby, pfeiffer) on top')
    meta = {k: v for k, v in meta.items() if k != 'format_version'}
    meta.update(peft=peft.to_meta(peft.combine([stack.StackConfig((ref,)), top])),
                source={**meta['source'], 'format': 'adapterhub_stack', 'path': str(ah_dir)})
    artifact.save(out, params, meta)
    (staged / BELOW_DIR).rename(out / BELOW_DIR)
  finally:
    shutil.rmtree(staged, ignore_errors=True)
  return (f'wrote stack artifact {out}: {peft.describe(top)} on top of {below_name} (imported '
          f'under {out / BELOW_DIR}) with a {meta["head"]} head')
