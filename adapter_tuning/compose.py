"""python -m adapter_tuning.compose: new adapter artifacts made from trained ones, same base.

Averaging (adapter merging / task arithmetic, Ilharco et al. 2023; AdapterHub's
`average_adapter`):

  python -m adapter_tuning.compose average --adapter A,B[,...] --weights 0.7,0.3 --output C \\
      [--head average|N] [--base BASE_DIR] [--overwrite]

C holds every trained tensor of A, B, ... combined with the weights as given (not normalised;
negative weights subtract a skill):
  * PEFT tensors (bottleneck adapters, LoRA's A and B, IA³ vectors, prefixes): sum_i w_i θ_i,
    AdapterHub's 'linear' merge;
  * tensors of the base that a run trained (LayerNorms under the `adapters` preset, BitFit
    biases, top-k layers, the pooler): base + sum_i w_i (θ_i - base). Task arithmetic acts on
    what training changed: weights that do not sum to 1 scale that change, never the
    LayerNorm itself (a plain sum with weights 1, -1 would zero every LayerNorm scale). With
    weights summing to 1 both forms are the weighted average;
  * the head: `--head average` (default) combines the heads like PEFT tensors and needs
    them alike (kind, outputs, label names); `--head N` keeps artifact N's head (1-based)
    and its task, labels and metrics unchanged, for adapters of different tasks.
The artifacts must share the base (its sha256), the PEFT configuration (training-only fields
aside: seed, init_scale, dropout, drop_lowest), the pooling and every trained tensor's name
and shape; otherwise one line names the first difference. C records where it came from
(`composed`) and has no `final_metrics` (it was never evaluated). `predict` serves it.

AdapterDrop at inference (Rücklé et al. 2021): an artifact without the bottleneck adapters of
its lowest K layers (LayerNorms trained there stay); predict and multi-task serving run it as
any artifact, and the layers below the lowest adapter then run as the plain base:

  python -m adapter_tuning.compose skip --adapter A --lowest K --output C [--base BASE_DIR]

An existing --output is refused unless --overwrite is given; C is written whole or not at all.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import math
import pathlib
import sys

import flax.traverse_util as tu
import numpy as np

from adapter_tuning import peft
from adapter_tuning.errors import UsageError
from adapter_tuning.interop import artifact

# Fields that shape only training (the init, dropout, AdapterDrop), not the trained model:
# artifacts differing in them still average.
TRAINING_ONLY_FIELDS = ('seed', 'init_scale', 'dropout', 'drop_lowest')


@dataclasses.dataclass
class Loaded:
  directory: pathlib.Path
  meta: dict
  flat: dict  # {'/'-joined path: tensor}: the trained subtree


def load(directory) -> Loaded:
  meta, params = artifact.load(directory)
  flat = {'/'.join(k): np.asarray(v, np.float32) for k, v in tu.flatten_dict(params).items()}
  return Loaded(pathlib.Path(directory), meta, flat)


def _method_fields(meta: dict) -> dict:
  """{method: {field: value}} of the trained model, training-only fields left out."""
  config = peft.config_from_meta(meta)
  return {name: {k: v for k, v in fields.items() if k not in TRAINING_ONLY_FIELDS}
          for name, fields in peft.to_meta(config).items()}


def _method_difference(a: dict, b: dict) -> str | None:
  fa, fb = _method_fields(a), _method_fields(b)
  if set(fa) != set(fb):
    names = lambda f: ' + '.join(sorted(f)) or 'none'
    return f'PEFT methods ({names(fa)} vs {names(fb)})'
  for method in sorted(fa):
    for key in sorted(fa[method]):
      if fa[method][key] != fb[method].get(key):
        return f'{method} {key} ({fa[method][key]!r} vs {fb[method].get(key)!r})'
  return None


def _head_summary(meta: dict) -> str:
  return (f'{meta["head"]} with {meta["num_outputs"]} output(s) '
          f'[{", ".join(map(str, meta["label_names"]))}]')


def check_compatible(first: Loaded, other: Loaded, average_heads: bool):
  """One line naming the first way `other` cannot be averaged with `first`."""
  a, b = first.directory, other.directory
  fix = 'average adapters of one base and one configuration only'
  base_a, base_b = first.meta.get('base', {}), other.meta.get('base', {})
  if base_a.get('sha256') != base_b.get('sha256'):
    raise UsageError(f'{a} and {b} were trained on different bases ({base_a.get("name")!r} '
                     f'sha256 {str(base_a.get("sha256"))[:12]}... vs {base_b.get("name")!r} '
                     f'sha256 {str(base_b.get("sha256"))[:12]}...); {fix}')
  difference = _method_difference(first.meta, other.meta)
  if difference is None and first.meta.get('pooling') != other.meta.get('pooling'):
    difference = f'head pooling ({first.meta.get("pooling")} vs {other.meta.get("pooling")})'
  if difference:
    raise UsageError(f'{a} and {b} differ in {difference}; {fix}')
  if average_heads and _head_summary(first.meta) != _head_summary(other.meta):
    raise UsageError(f'{a} and {b} have different heads ({_head_summary(first.meta)} vs '
                     f'{_head_summary(other.meta)}); pass --head N to keep artifact N\'s head')
  keys = lambda x: {k for k in x.flat if average_heads or not k.startswith('head/')}
  for x, y in ((first, other), (other, first)):
    extra = sorted(keys(x) - keys(y))
    if extra:
      raise UsageError(f'{x.directory} trains {extra[0]}, which {y.directory} does not '
                       f'(different trainable rules); {fix}')
  for key in sorted(keys(first)):
    if first.flat[key].shape != other.flat[key].shape:
      raise UsageError(f'{a} and {b} differ in the shape of {key} ({first.flat[key].shape} vs '
                       f'{other.flat[key].shape}); {fix}')


def is_base_tensor(path: str) -> bool:
  """Whether the base holds this trained tensor (LayerNorm, bias, pooler, a layer's kernel);
  PEFT tensors and the head exist only in artifacts."""
  return path.startswith('encoder/') and not peft.is_method_param(path)


def base_values(loaded: Loaded, paths: list[str], base: str | None) -> dict:
  """{path: the base's value} for the given encoder paths (the reference of their change)."""
  from adapter_tuning.interop.pretrained import load_pretrained
  pre = load_pretrained(artifact.base_path(loaded.directory, loaded.meta, base))
  artifact.check_base(loaded.meta, pre.identity, str(loaded.directory))
  flat = {'/'.join(('encoder',) + k): v for k, v in tu.flatten_dict(pre.params).items()}
  return {p: np.asarray(flat[p], np.float64) for p in paths}


def weighted_sum(tensors: list[np.ndarray], weights: list[float], reference=None) -> np.ndarray:
  """reference + sum_i w_i (θ_i - reference), in float64; reference None = 0 (PEFT, head)."""
  ref = 0.0 if reference is None else reference
  total = sum(w * (np.asarray(t, np.float64) - ref) for t, w in zip(tensors, weights))
  return (ref + total).astype(np.float32)


def average(directories, weights, head='average', base: str | None = None) -> tuple[dict, dict]:
  """(meta, trained params) of the weighted combination (module docstring)."""
  loaded = [load(d) for d in directories]
  if len(weights) != len(loaded):
    raise UsageError(f'{len(loaded)} adapter(s) but {len(weights)} weight(s); give one weight '
                     'per adapter in --weights')
  if head != 'average' and not (isinstance(head, int) and 1 <= head <= len(loaded)):
    raise UsageError(f'--head must be average or an artifact number 1..{len(loaded)}, got {head!r}')
  average_heads = head == 'average'
  for other in loaded[1:]:
    check_compatible(loaded[0], other, average_heads)
  source = loaded[0] if average_heads else loaded[head - 1]
  keys = [k for k in loaded[0].flat if average_heads or not k.startswith('head/')]
  in_base = [k for k in keys if is_base_tensor(k)]
  reference = base_values(loaded[0], in_base, base) if in_base else {}
  flat = {k: weighted_sum([x.flat[k] for x in loaded], weights, reference.get(k)) for k in keys}
  if not average_heads:
    flat.update({k: v for k, v in source.flat.items() if k.startswith('head/')})
  meta = {k: v for k, v in source.meta.items() if k not in ('format_version', 'step')}
  meta['final_metrics'] = {}
  meta['composed'] = {'operation': 'average', 'head': head,
                      'adapters': [{'path': str(x.directory), 'weight': w,
                                    'weights_sha256': _sha256(x.directory)}
                                   for x, w in zip(loaded, weights)]}
  return meta, tu.unflatten_dict({tuple(k.split('/')): v for k, v in flat.items()})


def _sha256(directory: pathlib.Path) -> str:
  return hashlib.sha256((directory / 'weights.safetensors').read_bytes()).hexdigest()


def skip_lowest(directory, lowest: int, base: str | None = None) -> tuple[dict, dict]:
  """(meta, params) of the artifact without the bottleneck adapters of layers < `lowest`."""
  from adapter_tuning.interop import hf_checkpoint
  from adapter_tuning.peft import bottleneck
  x = load(directory)
  if lowest < 0:
    raise UsageError(f'--lowest must be >= 0, got {lowest}')
  parts = peft.parts(peft.config_from_meta(x.meta))
  adapters = [p for p in parts if isinstance(p, bottleneck.AdapterConfig)]
  if not adapters:
    raise UsageError(f'{x.directory} has no bottleneck adapters to skip; AdapterDrop removes '
                     'bottleneck adapters (model.adapter.placement) only')
  layers = adapters[0].layers
  if layers is None:
    checkpoint = hf_checkpoint.resolve_checkpoint(artifact.base_path(x.directory, x.meta, base))
    layers = tuple(range(hf_checkpoint.read_model_config(checkpoint).num_layers))
  kept = tuple(i for i in layers if i >= lowest)
  if not kept:
    raise UsageError(f'--lowest {lowest} would skip every adapter of {x.directory} (layers '
                     f'{min(layers)}..{max(layers)}); choose a smaller --lowest')
  config = peft.combine([dataclasses.replace(p, layers=kept) if p is adapters[0] else p
                         for p in parts])
  flat = {k: v for k, v in x.flat.items() if not _adapter_below(k, lowest)}
  meta = {k: v for k, v in x.meta.items() if k not in ('format_version', 'step')}
  meta.update(peft=peft.to_meta(config), adapter=peft.to_meta(config).get('bottleneck'),
              final_metrics={}, composed={'operation': 'skip_lowest', 'lowest': lowest,
                                          'from': str(x.directory),
                                          'weights_sha256': _sha256(x.directory)})
  return meta, tu.unflatten_dict({tuple(k.split('/')): v for k, v in flat.items()})


def _adapter_below(path: str, lowest: int) -> bool:
  """Whether `path` is a bottleneck adapter's tensor in a layer below `lowest`
  ('encoder/layer_3/ffn_adapter/down/kernel')."""
  from adapter_tuning.peft.bottleneck import PARAM_MARKER
  names = path.split('/')
  return (len(names) > 3 and names[0] == 'encoder' and names[1].startswith('layer_')
          and int(names[1][len('layer_'):]) < lowest and names[2].endswith(PARAM_MARKER))


def write(out, meta: dict, params: dict, overwrite: bool):
  out = pathlib.Path(out)
  if out.exists() and not overwrite:
    raise UsageError(f'--output {out} exists; pass --overwrite to replace it or choose another')
  artifact.save(out, params, meta)


class _Parser(argparse.ArgumentParser):
  """argparse whose mistakes are one-line UsageErrors (exit 2), as every entry point's are."""

  def error(self, message):
    raise UsageError(f'{message}; see python -m adapter_tuning.{self.prog} --help')


def parser() -> argparse.ArgumentParser:
  p = _Parser(prog='compose', description=__doc__.splitlines()[0])
  commands = p.add_subparsers(dest='command', required=True)
  avg = commands.add_parser('average', help='weighted sum of artifacts (task arithmetic)')
  avg.add_argument('--adapter', required=True, help='artifact folders, comma-separated')
  avg.add_argument('--weights', required=True, help='one number per artifact, e.g. 0.7,0.3')
  avg.add_argument('--head', default='average',
                   help="'average' (heads must match) or N: keep the N-th artifact's head")
  skip = commands.add_parser('skip', help='drop the adapters of the lowest K layers')
  skip.add_argument('--adapter', required=True, help='an artifact folder')
  skip.add_argument('--lowest', required=True, type=int, help='K: layers 0..K-1 lose adapters')
  for sub in (avg, skip):
    sub.add_argument('--output', required=True, help='artifact folder to write')
    sub.add_argument('--base', default=None, help='base checkpoint (default: the recorded one)')
    sub.add_argument('--overwrite', action='store_true', help='replace --output if it exists')
    sub.add_argument('--verbose', action='store_true', help='show tracebacks for errors')
  return p


def _numbers(text: str) -> list[float]:
  try:
    weights = [float(w) for w in text.split(',') if w.strip()]
  except ValueError:
    raise UsageError(f'--weights must be comma-separated numbers, got {text!r}') from None
  if not all(math.isfinite(w) for w in weights):
    raise UsageError(f'--weights must be finite numbers, got {text!r}')
  return weights


def _run(args):
  if args.command == 'average':
    head = args.head if args.head == 'average' else (
        int(args.head) if args.head.isdigit() else args.head)
    directories = [d for d in args.adapter.split(',') if d]
    meta, params = average(directories, _numbers(args.weights), head, args.base)
  else:
    meta, params = skip_lowest(args.adapter, args.lowest, args.base)
  write(args.output, meta, params, args.overwrite)
  print(f'wrote {args.output}')


def main(argv=None) -> int:
  from adapter_tuning.cli import run_guarded
  argv = sys.argv[1:] if argv is None else list(argv)
  return run_guarded(lambda: _run(parser().parse_args(argv)), '--verbose' in argv)


if __name__ == '__main__':
  sys.exit(main())
