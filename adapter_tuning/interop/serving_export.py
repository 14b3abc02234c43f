"""An artifact + its base + its head as one deployable inference graph: ONNX or StableHLO.

Both formats trace the same deterministic forward, `TaskModel.apply` in inference mode
(no dropout, `jax.nn.dot_product_attention`, exact GELU through erf; the custom VJPs of
models/activations.py never run because nothing is differentiated), so what is exported is
what `predict` computes. Before tracing, every method that only changes weights (LoRA,
IA³; BitFit and trained LayerNorms are new values anyway) is merged into the base's
tensors with the method's own `merge` (as `--format hf_merged` does): the graph then has
the base's shape and cost. Methods that add computation (bottleneck adapters, prefix
tuning) stay in the graph. Every export is checked before it is written: the exported
model runs on two padded probe batches of different sizes and lengths and must reproduce
the unmerged artifact's logits (ONNX through onnxruntime, when it is installed, within
1e-4; the StableHLO round trip within 1e-5), else nothing is written.

  onnx       one .onnx file (jax2onnx, opset 17): inputs input_ids, attention_mask,
             token_type_ids (int32 [batch, sequence], both axes dynamic), output logits
             ([batch, num_outputs], span heads [batch, sequence, 2]); the weights are graph
             initializers; metadata_props['adapter_tuning'] holds task, labels and limits.
             Refused: prefix tuning and DeBERTa bases (see `to_onnx_model`).
  stablehlo  a folder: model.stablehlo (`jax.export`, symbolic batch and sequence -- a
             fixed sequence for DeBERTa, see `serialize_stablehlo` -- lowered for cpu, cuda
             and tpu), weights.npz (passed as the first argument, a dict of '/'-joined
             parameter paths), serving.json, and stablehlo_loader.py, which runs it with
             jax + numpy alone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import json
import logging
import pathlib
import re
import shutil

import flax.traverse_util as tu
import jax
import jax.numpy as jnp
import numpy as np

from adapter_tuning import fileio, peft
from adapter_tuning.errors import RunFailure, UsageError
from adapter_tuning.interop import stablehlo_loader

INPUT_NAMES = ('input_ids', 'attention_mask', 'token_type_ids')
OUTPUT_NAME = 'logits'
ONNX_OPSET = 17  # older runtimes read it too (jax2onnx defaults to 23); all we use lowers
ONNX_TOL, STABLEHLO_TOL = 1e-4, 1e-5
PLATFORMS = ('cpu', 'cuda', 'tpu')


@dataclasses.dataclass
class ServingModel:
  """What gets exported (`model`, `params`: merged) and what it must equal (`reference`)."""

  model: object  # TaskModel with the methods that stay in the graph
  params: dict
  reference: tuple  # (TaskModel, params): the artifact exactly as predict runs it
  meta: dict
  config: object  # ModelConfig of the base
  merged: tuple[str, ...]
  kept: tuple[str, ...]

  @property
  def max_seq_length(self) -> int:
    """The longest input the graph computes correctly: the base's position table (the
    artifact's own training length is recorded beside it, for tokenising)."""
    return self.config.max_seq_length

  def forward(self, params, input_ids, attention_mask, token_type_ids):
    return self.model.apply({'params': params}, input_ids, attention_mask, token_type_ids)

  def description(self) -> dict:
    """What a deployment needs to know besides the graph (ONNX metadata, serving.json)."""
    return {'task': self.meta['task'], 'head': self.meta['head'],
            'label_names': list(self.meta['label_names']),
            'num_outputs': self.meta['num_outputs'],
            'pooling': self.meta.get('pooling', 'pooler'),
            'max_seq_length': self.max_seq_length, 'inputs': list(INPUT_NAMES),
            'trained_max_seq_length': self.meta.get('max_seq_length'),
            'output': OUTPUT_NAME, 'merged_methods': list(self.merged),
            'graph_methods': list(self.kept), 'family': self.config.family,
            'pad_token_id': self.config.pad_token_id,
            'base': {k: self.meta.get('base', {}).get(k) for k in ('name', 'sha256')}}


def build(meta: dict, params: dict, base_dir: pathlib.Path) -> ServingModel:
  """The artifact on its base, with the weight-only methods merged (module docstring).

  A method merges only where no method kept in the graph runs before it at the same
  site of the same layer (the hooks chain in order; merged weights act first)."""
  from adapter_tuning.interop.pretrained import load_pretrained
  from adapter_tuning.models.heads import TaskModel
  config = peft.config_from_meta(meta)
  pre = load_pretrained(base_dir, config)
  flat = tu.flatten_dict(pre.params)
  flat.update({k[1:]: np.asarray(v, np.float32) for k, v in tu.flatten_dict(params).items()
               if k[0] == 'encoder'})
  encoder = tu.unflatten_dict(flat)
  head = {k: np.asarray(v, np.float32) for k, v in params['head'].items()}
  make = lambda adapter: TaskModel(pre.config, adapter, meta['head'], meta['num_outputs'],
                                   pooling=meta.get('pooling', 'pooler'))
  reference = (make(config), {'encoder': encoder, 'head': head})
  merged, kept = [], []
  layers = range(pre.config.num_layers)
  for part in peft.parts(config):
    method = peft.method_of(part)
    blocked = any(set(part.sites(i)) & set(k.sites(i)) for k in kept for i in layers)
    if method.merge is None or blocked:
      kept.append(part)
    else:
      encoder = method.merge(encoder, part, pre.config.num_layers)
      merged.append(method.name)
  return ServingModel(make(peft.combine(kept)), {'encoder': encoder, 'head': head}, reference,
                      meta, pre.config, tuple(merged),
                      tuple(peft.method_of(k).name for k in kept))


def probe_batches(sm: ServingModel, seed: int = 0) -> list[dict]:
  """Two padded batches of different sizes and lengths (row 2 half padding) of
  in-vocabulary ids: a dimension the converter fixed by mistake shows up here."""
  rng = np.random.default_rng(seed)
  batches = []
  for rows, length in ((2, min(8, sm.max_seq_length)), (3, min(13, sm.max_seq_length))):
    ids = rng.integers(0, sm.config.vocab_size, (rows, length)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, max(1, length // 2):] = 0
    ids = np.where(mask == 1, ids, sm.config.pad_token_id).astype(np.int32)
    types = ((np.arange(length)[None] >= length // 3) & (mask == 1)).astype(np.int32)
    if not sm.config.type_vocab_size or sm.config.type_vocab_size < 2:
      types = np.zeros_like(ids)
    batches.append(dict(zip(INPUT_NAMES, (ids, mask, types))))
  return batches


@functools.lru_cache(maxsize=4)
def _jitted_apply(model):
  """One compiled forward per model (modules are hashable), reused across the checks."""
  return jax.jit(lambda p, *a: model.apply({'params': p}, *a))


def _logits(model, params, batch: dict) -> np.ndarray:
  return np.asarray(_jitted_apply(model)(params, *(batch[n] for n in INPUT_NAMES)))


def _check_parity(sm: ServingModel, run, tol: float, what: str, merged: bool = False) -> float:
  """Max |exported - expected| over the probe batches, expected = the unmerged artifact
  (or, `merged`, the forward that was exported: a pure serialisation round trip); a
  RunFailure beyond `tol` (scaled by the logits' magnitude when that exceeds 1)."""
  worst = 0.0
  model, params = (sm.model, sm.params) if merged else sm.reference
  for batch in probe_batches(sm):
    ref = _logits(model, params, batch)
    try:
      got = np.asarray(run(batch))
    except Exception as e:  # e.g. onnxruntime refusing a shape the converter got wrong
      raise RunFailure(f'{what} fails on a probe batch of shape {batch["input_ids"].shape}: '
                       f'{_first_line(e)}; nothing was written') from e
    if got.shape != ref.shape:
      raise RunFailure(f'{what} gives logits of shape {got.shape}, expected {ref.shape}; '
                       'nothing was written')
    diff = float(np.abs(got - ref).max())
    worst = max(worst, diff)
    if not diff <= tol * max(1.0, float(np.abs(ref).max())):
      raise RunFailure(f'{what} differs from {"the traced forward" if merged else "the artifact"}'
                       f' by {diff:.2e} (> {tol:g}) on a probe batch; nothing was written '
                       '(rerun with --verbose and report it)')
  return worst


def check_output_kind(fmt: str, out: pathlib.Path):
  """ONNX is one file and StableHLO a folder: refuse the other kind before any work."""
  if fmt == 'onnx' and out.is_dir():
    raise UsageError(f'--output {out} is a folder; --format onnx writes one file (e.g. '
                     'model.onnx)')
  if fmt == 'stablehlo' and out.exists() and not out.is_dir():
    raise UsageError(f'--output {out} is a file; --format stablehlo writes a folder')


def export(fmt: str, meta: dict, params: dict, base_dir: pathlib.Path,
           out: pathlib.Path) -> str:
  """Writes the format; returns the one-line summary the command prints."""
  sm = build(meta, params, base_dir)
  methods = ([f'{", ".join(sm.merged)} merged into the base weights'] if sm.merged else []) + (
      [f'{", ".join(sm.kept)} computed in the graph'] if sm.kept else [])
  summary = export_onnx(sm, out) if fmt == 'onnx' else export_stablehlo(sm, out)
  return '; '.join([summary] + methods)


# ----------------------------------------------------------------------------- ONNX


@contextlib.contextmanager
def _arange_as_iota():
  """While jax2onnx traces: jnp.arange(n) of a symbolic n becomes lax.iota.

  jax2onnx 0.17 replaces jnp.arange during tracing with its own primitive, whose length
  is 'data dependent' even when n is the symbolic sequence length, so BERT's position ids
  (arange(T) broadcast to [B, T], models/families/bert.py) fail to broadcast. lax.iota
  gives the same values and jax2onnx lowers it to ONNX Range over the input's runtime
  shape. Only tracing for export sees this; training and predict are untouched."""
  patched = jnp.arange

  def arange(*args, **kwargs):
    if len(args) == 1 and not kwargs and not isinstance(args[0], (int, np.integer)):
      return jax.lax.iota(jnp.int32, args[0])
    return patched(*args, **kwargs)

  jnp.arange = arange
  try:
    yield
  finally:
    jnp.arange = patched


def to_onnx_model(sm: ServingModel):
  """The ONNX ModelProto: weights closed over (initializers), batch and sequence dynamic."""
  from adapter_tuning.models.families import family_named
  if family_named(sm.config.family).attention is not None:
    raise UsageError(f'a {sm.config.family} base cannot export to ONNX: its relative positions '
                     'are built for one concrete sequence length, which a graph with a dynamic '
                     'sequence axis cannot hold; export it with --format stablehlo (fixed length)')
  if 'prefix' in sm.kept:
    raise UsageError('prefix tuning cannot export to ONNX: jax2onnx 0.17 loses the dynamic '
                     'sequence length of the prefix-extended attention mask (onnxruntime then '
                     'fails on every batch); export it with --format stablehlo instead')
  # jax2onnx logs a traceback for each optional plugin whose library (equinox, dm_pix) is
  # absent; none of them is on this path (requirements-nodeps.txt).
  logging.getLogger('jax2onnx').setLevel(logging.ERROR)
  try:
    from jax2onnx import to_onnx
  except ImportError:
    raise UsageError('--format onnx needs jax2onnx: .venv/bin/pip install --no-deps -r '
                     'requirements-nodeps.txt') from None

  def serve(input_ids, attention_mask, token_type_ids):
    with _arange_as_iota():
      return sm.forward(sm.params, input_ids, attention_mask, token_type_ids)

  spec = jax.ShapeDtypeStruct(('batch', 'sequence'), jnp.int32)
  name = re.sub(r'[^A-Za-z0-9_]', '_', str(sm.meta['task']))
  try:
    model = to_onnx(serve, [spec] * 3, model_name=name, opset=ONNX_OPSET,
                    input_names=list(INPUT_NAMES), output_names=[OUTPUT_NAME])
  except Exception as e:  # the converter's own limits: name them, in one line
    raise UsageError(f'jax2onnx cannot convert this model ({sm.config.family} base, methods '
                     f'{", ".join(sm.kept) or "none"} in the graph): {_first_line(e)}; '
                     'export it with --format stablehlo instead') from e
  entry = model.metadata_props.add()
  entry.key, entry.value = 'adapter_tuning', json.dumps(sm.description(), sort_keys=True)
  return model


def export_onnx(sm: ServingModel, out: pathlib.Path) -> str:
  data = to_onnx_model(sm).SerializeToString()
  try:
    import onnxruntime as ort
  except ImportError:
    ort, note = None, 'not checked: onnxruntime is not installed'
  if ort is not None:
    session = ort.InferenceSession(data, providers=['CPUExecutionProvider'])
    diff = _check_parity(sm, lambda b: session.run([OUTPUT_NAME], b)[0], ONNX_TOL,
                         'the ONNX graph under onnxruntime')
    note = f'onnxruntime matches the artifact within {diff:.1e}'
  out.parent.mkdir(parents=True, exist_ok=True)
  fileio.write_atomic(out, data)
  return f'wrote ONNX {out} ({_mib(len(data))}; inputs {", ".join(INPUT_NAMES)}, dynamic ' \
         f'batch and sequence up to {sm.max_seq_length}); {note}'


# ----------------------------------------------------------------------------- StableHLO


def serialize_stablehlo(sm: ServingModel) -> tuple[bytes, dict, int | None]:
  """(jax.export bytes, the weights dict it takes first, the fixed sequence length or None).

  Batch and sequence are symbolic; a model that cannot trace with a symbolic length
  (DeBERTa builds its relative positions in NumPy) is exported at the artifact's training
  length, which its loader pads to."""
  weights = {'/'.join(k): np.ascontiguousarray(v, np.float32)
             for k, v in tu.flatten_dict(sm.params).items()}
  try:
    return _export(sm, weights, None), weights, None
  except Exception:  # pylint: disable=broad-except  (retried at a fixed length below)
    length = min(int(sm.meta.get('max_seq_length') or 128), sm.max_seq_length)
  try:
    return _export(sm, weights, length), weights, length
  except Exception as e:
    raise UsageError(f'jax.export cannot trace this model ({sm.config.family} base): '
                     f'{_first_line(e)}') from e


def _export(sm: ServingModel, weights: dict, length: int | None) -> bytes:
  from jax import export as jax_export

  def serve(weights, input_ids, attention_mask, token_type_ids):
    params = tu.unflatten_dict({tuple(k.split('/')): v for k, v in weights.items()})
    return sm.forward(params, input_ids, attention_mask, token_type_ids)

  dims = jax_export.symbolic_shape('batch, sequence' if length is None else 'batch')
  spec = jax.ShapeDtypeStruct(tuple(dims) + (() if length is None else (length,)), jnp.int32)
  shapes = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in weights.items()}
  exported = jax_export.export(jax.jit(serve), platforms=PLATFORMS)(shapes, spec, spec, spec)
  return bytes(exported.serialize())


def export_stablehlo(sm: ServingModel, out: pathlib.Path) -> str:
  from jax import export as jax_export
  data, weights, length = serialize_stablehlo(sm)
  exported = jax_export.deserialize(bytearray(data))

  def call(batch):
    arrays = [batch[n] for n in INPUT_NAMES]
    width = arrays[0].shape[1]
    if length:
      arrays = stablehlo_loader.pad_inputs(arrays, length, sm.config.pad_token_id)
    logits = np.asarray(exported.call(weights, *arrays))
    return logits[:, :width] if logits.ndim == 3 else logits

  diff = _check_parity(sm, call, STABLEHLO_TOL, 'the deserialised StableHLO', merged=True)
  notes = [f'round trip within {diff:.1e}']
  if sm.merged:  # merging reassociates float sums: the ONNX tolerance, against predict's
    notes.append(f'{_check_parity(sm, call, ONNX_TOL, "the merged model"):.1e} from the '
                 'unmerged artifact')
  buffer = io.BytesIO()
  np.savez(buffer, **weights)
  serving = {'format': stablehlo_loader.FORMAT, 'version': stablehlo_loader.FORMAT_VERSION,
             **sm.description(), 'sequence_length': length, 'platforms': list(PLATFORMS),
             'jax_version': jax.__version__,
             'calling_convention': 'exported.call(weights, input_ids, attention_mask, '
                                   'token_type_ids); weights = dict(np.load("weights.npz"))'}
  files = {stablehlo_loader.MODEL_FILE: data, stablehlo_loader.WEIGHTS_FILE: buffer.getvalue(),
           stablehlo_loader.SERVING_FILE: json.dumps(serving, indent=2, sort_keys=True),
           'stablehlo_loader.py': pathlib.Path(stablehlo_loader.__file__).read_bytes()}
  _write_folder(out, files)
  shape = (f'symbolic batch and sequence up to {sm.max_seq_length}' if length is None else
           f'symbolic batch, sequence fixed at {length} ({sm.config.family} attention needs '
           'a concrete length; the loader pads shorter inputs)')
  return (f'wrote StableHLO {out}/ ({stablehlo_loader.MODEL_FILE} {_mib(len(data))}, '
          f'{stablehlo_loader.WEIGHTS_FILE} {_mib(len(buffer.getvalue()))}; {shape}, '
          f'{"/".join(PLATFORMS)}); {", ".join(notes)}; stablehlo_loader.py in it runs it '
          'with jax + numpy')


def _write_folder(out: pathlib.Path, files: dict):
  """All files into a temporary folder that replaces `out` only once complete."""
  from adapter_tuning.interop.artifact import replace_dir
  tmp = out.with_name(out.name + '.tmp')
  try:
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name, data in files.items():
      fileio.write_file(tmp / name, data)
    replace_dir(tmp, out)
  except OSError as e:
    raise fileio.disk_failure(e, out, sum(len(d) for d in files.values())) from None
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def _first_line(e: BaseException) -> str:
  text = str(e).strip()
  return text.splitlines()[0] if text else type(e).__name__


def _mib(n: int) -> str:
  return f'{n / 2**20:.1f} MiB' if n >= 2**20 else f'{n / 2**10:.0f} KiB'
