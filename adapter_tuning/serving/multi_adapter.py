"""Many task adapters on one frozen base, routed per example inside one jitted pass.

Every artifact's trained leaves (adapters, layer norms, head) are stacked along a task
axis; each example gathers its own task's slice, and `jax.vmap` runs the model over
examples with the frozen base unbatched. vmap turns a matmul with unbatched weights back
into one ordinary matmul over the whole batch, so the base costs what it costs for a
single task; only the small per-task pieces become batched (per-example) matmuls.

Artifacts may differ in method (a mix of bottleneck adapters, LoRA, IA³ and prefix tuning:
`peft.union`), adapter size (smaller ones are zero-padded: the extra bottleneck units have
zero weights in and out, so they contribute exactly nothing), placement or layers (absent
adapters are zero, LoRA's B zero, IA³'s vectors one: the identity), prefix length (each
example attends only to its own artifact's prefix positions; `peft.for_serving`), trainable
rules (a leaf one task did not train takes the base's value) and head width (extra logits
are masked). A fusion artifact's fused adapters are part of the resident base (loaded from
their own artifacts, hash-checked); per-example switches say which of them an example's
fusion attends over, none for other artifacts' examples (peft/fusion.py). A stack artifact's
adapter below is resident the same way, switched on for its own examples only, and runs
before the (union's) bottleneck adapter at each site (peft/stack.py).
"""

from __future__ import annotations

import dataclasses
import pathlib

import flax.traverse_util as tu
import jax
import jax.numpy as jnp
import numpy as np

from adapter_tuning.errors import UsageError
from adapter_tuning.interop import artifact
from adapter_tuning.models.heads import TaskModel, head_kind
from adapter_tuning import peft
from adapter_tuning.training import trainable as trainable_lib


@dataclasses.dataclass
class LoadedTask:
  name: str  # the data.task it was trained on, e.g. glue/sst2
  head: str
  label_names: tuple
  num_outputs: int
  directory: pathlib.Path
  meta: dict


def union_adapter(metas: list[dict]):
  """One PEFT config that holds every artifact's modules exactly (peft.union)."""
  return peft.union([peft.config_from_meta(m) for m in metas])


def _pad_to(value: np.ndarray, shape: tuple) -> np.ndarray:
  if value.shape == shape:
    return value
  if value.ndim != len(shape) or any(v > s for v, s in zip(value.shape, shape)):
    raise UsageError(f'adapter tensor of shape {value.shape} does not fit {shape}')
  out = np.zeros(shape, value.dtype)
  out[tuple(slice(0, v) for v in value.shape)] = value
  return out


class MultiTaskModel:
  """The frozen base plus K task artifacts; `predict` routes each example to its task."""

  def __init__(self, adapter_dirs, base_path=None):
    from adapter_tuning.interop.pretrained import load_pretrained
    loaded = [(pathlib.Path(d), *artifact.load(d)) for d in adapter_dirs]
    if not loaded:
      raise UsageError('no adapter given; pass --adapter DIR[,DIR...]')
    metas = [m for _, m, _ in loaded]
    for (d, meta, _) in loaded:
      if head_kind(meta['head']).not_servable:
        raise UsageError(f'adapter {d} ({meta["task"]}): {head_kind(meta["head"]).not_servable}')
    names = [m['task'] for m in metas]
    if len(set(names)) != len(names):
      raise UsageError(f'two adapters were trained on the same task ({names}); load one per task')
    base_path = artifact.base_path(loaded[0][0], metas[0], base_path)
    adapter = union_adapter(metas)
    self.pretrained = load_pretrained(base_path, adapter)
    for d, meta, params in loaded:
      artifact.check_base(meta, self.pretrained.identity, str(d))
      artifact.check_weights(d, meta, params, self.pretrained.config)
    kinds = {head_kind(m['head']) for m in metas}
    per_token = [k for k in kinds if k.per_token]
    if per_token and len(metas) > 1:
      raise UsageError(f'{per_token[0].name} adapters are served one at a time; pass it alone')
    # Vector heads of every kind share one padded linear layer (logits past a task's own
    # outputs are masked), so the served module is built as the widest classification head.
    self.kind = per_token[0] if per_token else head_kind('classification')
    self.head = self.kind.name
    poolings = {m.get('pooling', 'pooler') for m in metas}
    if len(poolings) > 1:
      raise UsageError(f'cannot serve heads with different poolings {sorted(poolings)} in one '
                       'pass (model.head.pooling of each run); run them separately')
    self.max_outputs = max(m['num_outputs'] for m in metas)
    self.tasks = [LoadedTask(m['task'], m['head'], tuple(m['label_names']), m['num_outputs'], d, m)
                  for d, m, _ in loaded]
    self.model = TaskModel(self.pretrained.config, adapter, self.head, self.max_outputs,
                           pooling=poolings.pop())
    self._build_params([peft.for_serving(peft.config_from_meta(m), p) for _, m, p in loaded])
    self._forward = jax.jit(self._forward_impl)

  def _build_params(self, trained: list[dict]):
    hidden = self.pretrained.config.hidden_size
    head_outputs = self.max_outputs
    base = {'encoder': self.pretrained.params,
            'head': {'kernel': np.zeros((hidden, head_outputs), np.float32),
                     'bias': np.zeros((head_outputs,), np.float32)}}
    flat_base = tu.flatten_dict(base)
    varying = set()
    for p in trained:
      for k in tu.flatten_dict(p):
        if k not in flat_base:
          raise UsageError(f'adapter weight {"/".join(k)} has no place in this model; '
                           'was the artifact made for another architecture?')
        varying.add(k)
    stacked = {}
    for k in sorted(varying):
      rows = []
      for p in trained:
        value = tu.flatten_dict(p).get(k)
        rows.append(flat_base[k] if value is None else _pad_to(np.asarray(value), flat_base[k].shape))
      stacked[k] = np.stack(rows)
    frozen = {k: v for k, v in flat_base.items() if k not in varying}
    self.stacked = jax.device_put(tu.unflatten_dict(stacked))
    self.frozen = jax.device_put(tu.unflatten_dict(frozen))
    self.num_outputs = jnp.asarray([t.num_outputs for t in self.tasks], jnp.int32)

  def _forward_impl(self, stacked, frozen, task_ids_B, ids_BxT, mask_BxT, types_BxT):
    per_example = jax.tree.map(lambda x: x[task_ids_B], stacked)

    def one(params, ids_T, mask_T, types_T):
      full = trainable_lib.merge(params, frozen)
      return self.model.apply({'params': full}, ids_T[None], mask_T[None], types_T[None])[0]

    logits = jax.vmap(one)(per_example, ids_BxT, mask_BxT, types_BxT)
    if self.kind.per_token:
      return logits
    valid = jnp.arange(self.max_outputs)[None, :] < self.num_outputs[task_ids_B][:, None]
    return jnp.where(valid, logits, -jnp.inf)

  def task_index(self, name: str | None) -> int:
    if name is None:
      if len(self.tasks) == 1:
        return 0
      raise UsageError(f'input rows need a "task" when several adapters are loaded '
                       f'({", ".join(t.name for t in self.tasks)})')
    for i, t in enumerate(self.tasks):
      if t.name == name:
        return i
    raise UsageError(f'no adapter for task {name!r}; loaded: {", ".join(t.name for t in self.tasks)}')

  def logits(self, task_ids, batch) -> np.ndarray:
    return np.asarray(self._forward(self.stacked, self.frozen, jnp.asarray(task_ids, jnp.int32),
                                    batch['input_ids'], batch['attention_mask'],
                                    batch['token_type_ids']))


# Rows of text to output lines, shared by `predict` (files) and `serve` (HTTP).

def bucket_length(length: int, limit: int) -> int:
  """Pad lengths to a multiple of 32 (few compiled shapes)."""
  return min(limit, ((length + 31) // 32) * 32)


def tokenize_rows(tok, rows: list[dict], limit: int) -> list[tuple]:
  """(token ids, token type ids) per row, in row order, truncated to `limit` tokens.

  Pairs and single texts tokenise separately (the tokenizer takes one kind per call).
  """
  pairs = [r.get('text_pair') for r in rows]
  ids: list = [None] * len(rows)
  for has_pair in (False, True):
    idx = [i for i, p in enumerate(pairs) if (p is not None) == has_pair]
    if idx:
      a, b = tok.tokenize([rows[i]['text'] for i in idx],
                          [pairs[i] for i in idx] if has_pair else None, limit)
      for j, i in enumerate(idx):
        ids[i] = (a[j], b[j])
  return ids


def padded_logits(mt, task_ids, ids: list[tuple], length: int, batch_rows: int) -> np.ndarray:
  """Logits of `ids` (from `tokenize_rows`) padded to a fixed [batch_rows, length] shape.

  Fixed shapes keep the number of compiled programs small; the extra rows are copies of
  row 0 and are dropped from the result.
  """
  batch = mt.pretrained.tokenizer.pad([x[0] for x in ids], [x[1] for x in ids], length)
  tids = np.asarray(task_ids, np.int32)
  pad_rows = batch_rows - len(ids)
  if pad_rows:
    batch = {k: np.concatenate([v, np.repeat(v[:1], pad_rows, 0)]) for k, v in batch.items()}
    tids = np.concatenate([tids, np.repeat(tids[:1], pad_rows)])
  return mt.logits(tids, batch)[:len(ids)]


def output_fields(mt, task_id: int, logits_row) -> dict:
  """One output line: the task's name, and its head's fields ('label' and 'logits' | 'score')."""
  task = mt.tasks[task_id]
  return {'task': task.name,
          **head_kind(task.head).output_fields(logits_row[:task.num_outputs], task.label_names)}
