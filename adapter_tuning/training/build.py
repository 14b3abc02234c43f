"""Phase 2 of a run, `build`: from the config to a model, its params and the task's data.

Loads the pretrained base with the configured adapters (interop/pretrained), tokenises the
task (data/tasks), draws the head, resolves which params train (training/trainable) and,
for regression, the train split's target scale. Given a mesh with an fsdp axis, the base's
params are born sharded on it (`load_sharded`): the one place a build touches devices,
because a base too large for one host must never be read whole. `predict`-style users get
the same `Setup` with `with_train=False`.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib

import flax.traverse_util as tu
import jax
import jax.numpy as jnp

from adapter_tuning.data import batching, packing
from adapter_tuning.data.tasks import load_task_data
from adapter_tuning.errors import UsageError
from adapter_tuning.models.heads import TargetScale, TaskModel, head_kind
from adapter_tuning import peft
from adapter_tuning.training import parallel
from adapter_tuning.training import trainable as trainable_lib


@dataclasses.dataclass
class Setup:
  """Everything built from the config before the first step; also used by predict/bench."""

  model: TaskModel
  params: dict  # full tree {'encoder', 'head'}
  rules: tuple
  pretrained: object
  data: object
  adapter: object | None  # the PEFT method's config (peft.from_run_config)
  target_scale: TargetScale  # regression targets' train-split scale (identity otherwise)


def resolve_checkpoint_path(config, workdir: pathlib.Path) -> str:
  if config.data.task == 'demo' and not config.model.checkpoint:
    from adapter_tuning.data import demo
    return str(demo.ensure_checkpoint(workdir / 'demo_base'))
  if not config.model.checkpoint:
    raise UsageError('model.checkpoint is empty; set it to a Hugging Face checkpoint '
                     'directory or hub name')
  return config.model.checkpoint


def build(config, workdir: pathlib.Path, with_train: bool = True, mesh=None) -> Setup:
  """`mesh`: with an fsdp axis (`mesh.fsdp` > 1), the base is born sharded on it
  (`load_sharded`); otherwise it is read whole into host memory."""
  from adapter_tuning.interop.pretrained import load_pretrained
  adapter = peft.from_run_config(config)
  dtype = jnp.bfloat16 if config.model.dtype == 'bfloat16' else jnp.float32
  path = resolve_checkpoint_path(config, workdir)
  pre = None
  if mesh is not None and parallel.fsdp_size(mesh) > 1:
    pre = load_sharded(path, adapter, dtype, config.trainable, mesh)
  if pre is None:
    pre = load_pretrained(path, adapter, dtype=dtype)
  if config.data.max_seq_length > pre.config.max_seq_length:
    raise UsageError(f'data.max_seq_length={config.data.max_seq_length} exceeds the model '
                     f'maximum of {pre.config.max_seq_length} positions; lower it')
  data = load_task_data(config, pre.tokenizer, with_train=with_train)
  hidden = pre.config.hidden_size
  kind = head_kind(data.head)
  rules = trainable_lib.resolve(config.trainable, pre.config.num_layers)
  if kind.vocabulary:
    head, rules = _lm_head(config, pre, data, rules)
  else:
    head = kind.init_params(jax.random.PRNGKey(config.seed + 1), hidden, data.num_outputs)
  params = {'encoder': pre.params, 'head': head}
  model = TaskModel(pre.config, adapter, data.head, data.num_outputs, dtype=dtype,
                    remat=config.model.remat, scan=config.model.scan_layers,
                    pooling=config.model.head.pooling)
  scale = TargetScale()
  if kind.standardized_targets and config.model.head.standardize_targets and with_train:
    scale = TargetScale.from_labels(data.train.labels['labels'])
  return Setup(model, params, rules, pre, data, adapter, scale)


def _lm_head(config, pre, data, rules):
  """The family's masked-LM head, loaded or initialised (`mlm_head.load_or_init`), and the
  rules with a loaded head frozen under the PEFT presets (`trainable.with_pretrained_head`);
  the run log says which, once (`data.report`)."""
  from adapter_tuning.models import mlm_head
  head, source = mlm_head.load_or_init(pre.directory, pre.config, config.seed + 1)
  if source.loaded:
    rules = trainable_lib.with_pretrained_head(config.trainable, rules)
  trains = trainable_lib.decide(rules, 'head/bias')
  data.report['mlm head'] = f'{source.note()}; {"trains" if trains else "frozen"} under ' \
                            f'trainable={config.trainable!r}'
  return head, rules


def load_sharded(path, adapter, dtype, trainable, mesh):
  """`load_pretrained` with every checkpoint tensor born a jax.Array on `mesh`, sharded as
  the trainer places it (`parallel.frozen_shardings` for frozen leaves,
  `parallel.state_shardings` for trained ones), each process reading only its devices'
  slices of the safetensors files. None for a checkpoint that cannot be sliced (.bin)."""
  from adapter_tuning.interop import hf_checkpoint
  from adapter_tuning.interop import pretrained as pretrained_lib
  from adapter_tuning.interop.tokenization import load_tokenizer
  from adapter_tuning.models.encoder import Encoder
  directory = hf_checkpoint.resolve_checkpoint(path)
  config = hf_checkpoint.read_model_config(directory)
  adapter = peft.as_config(adapter)
  if adapter is not None:
    adapter.check(config)
  model = Encoder(config, adapter, dtype=dtype)
  fresh = pretrained_lib.init_params(model, adapter.seed if adapter else 0)  # zeros: lazy pages
  shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), fresh)
  rules = trainable_lib.resolve(trainable, config.num_layers)
  flat_shapes = tu.flatten_dict(shapes)

  def sharding_of(param_path):
    spec = flat_shapes[param_path]
    trains = trainable_lib.decide(rules, trainable_lib.path_str(('encoder',) + param_path))
    place = parallel.state_shardings if trains else parallel.frozen_shardings
    return place(spec, mesh)

  loaded = hf_checkpoint.load_encoder_sharded(directory, shapes, config.family, config,
                                              sharding_of)
  if loaded is None:
    return None
  flat = tu.flatten_dict(fresh)
  flat.update(tu.flatten_dict(loaded[0]))
  return pretrained_lib.Pretrained(model, tu.unflatten_dict(flat),
                                   load_tokenizer(directory, config.family, config.pad_token_id),
                                   config, adapter, directory)


def with_raw_head(params: dict, scale: TargetScale) -> dict:
  """Trainable or full params with the head moved from the standardised to the raw scale."""
  if 'head' not in params or scale == TargetScale():
    return params
  return {**params, 'head': scale.fold(params['head'])}


def length_buckets(config, data) -> tuple[tuple[int, ...], dict[str, tuple[int, ...]]]:
  """Padded lengths for training and for each eval split: at most data.num_buckets each.

  data.fit_buckets picks them from the data (batching.fit_boundaries: least padding plus
  data.bucket_shape_cost positions per compiled shape); otherwise they are geometric up to
  max_seq_length.
  """
  d = config.data
  if d.get('packing', False):
    return packed_layouts(config, data)
  geometric = batching.bucket_boundaries(d.max_seq_length, d.num_buckets,
                                         min_len=d.min_bucket_length)
  if not d.fit_buckets:
    return geometric, {name: geometric for name in data.evals}
  fit = lambda maxima, rows: batching.fit_boundaries(
      maxima, d.num_buckets, max_len=d.max_seq_length, shape_cost=d.bucket_shape_cost / rows)
  train = fit(batching.train_batch_maxima(data.train.input_ids, config.batch_size, config.seed),
              config.batch_size)
  evals = {name: fit(batching.eval_batch_maxima(split.input_ids, config.eval_batch_size),
                     config.eval_batch_size)
           if len(split) else geometric for name, split in data.evals.items()}
  return train, evals


def packed_layouts(config, data) -> tuple[packing.Packed, dict[str, packing.Packed]]:
  """data.packing: rows of max_seq_length and data.num_buckets row counts per split, in
  place of length buckets (data/packing.py); refused where it cannot apply."""
  if head_kind(data.head).per_token:
    raise UsageError(f'data.packing is for heads with one output per example, not '
                     f'{data.head}; set data.packing=false')
  if jax.process_count() > 1:
    raise UsageError('data.packing runs on one process; set data.packing=false for '
                     'multi-host runs')
  d, devices = config.data, jax.device_count()
  train = packing.layout(data.train.input_ids, config.batch_size, config.seed,
                         d.max_seq_length, d.num_buckets, devices)
  evals = {name: packing.eval_layout(split.input_ids, config.eval_batch_size, d.max_seq_length,
                                     d.num_buckets, devices)
           for name, split in data.evals.items()}
  return train, evals


def num_steps_for(config, steps_per_epoch: int) -> int:
  if config.num_train_steps > 0:
    return int(config.num_train_steps)
  return max(1, int(math.ceil(config.num_epochs * steps_per_epoch)))
